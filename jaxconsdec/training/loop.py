"""`jaxconsdec train`: the training run, from image files to an exported decoder.

A run folder holds:
  run.json          what the run is (settings, inputs, init and VAE identities, config);
                    a second command on the folder must match it, and then resumes
  checkpoints/      Orbax CheckpointManager: state (params, Adam, EMA, step) and the data
                    position, every `save_every` steps and at exit, the last `keep` kept
  metrics.jsonl     one line per `log_every` steps (loss, grad norm, lr, examples/s) and per
                    evaluation (held-out PSNR of 1- and 2-step decodes); TensorBoard events
                    of the same in tensorboard/
  samples/          original | 1 step | 2 steps grids of the held-out crops at each evaluation
  model/            the exported EMA params with their config (and the VAE encoder), a
                    jaxconsdec checkpoint: `jaxconsdec.load(RUN_DIR)` and
                    `jaxconsdec decode --weights RUN_DIR` read it
  failures.json     images left out, with why

Killed at any moment, the same command resumes from the last complete checkpoint and ends
bit for bit where an uninterrupted run ends (CPU): the state is saved whole, and the data
and every random draw are functions of the seed and the example index (`data`, `step`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import sys
import threading
import time
from typing import Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from jaxconsdec import checkpoint, host_memory, multihost
from jaxconsdec.config import UNetConfig, VAEConfig
from jaxconsdec.autoencoder import encode, encoder_half
from jaxconsdec.files import (NotRegularFileError, make_dirs_inside, open_regular,
                              open_regular_for_append, read_json_object, write_atomic)
from jaxconsdec.images import encode_png, side_by_side, to_uint8
from jaxconsdec.inputs.listing import Failure, gather_failures
from jaxconsdec.metrics import SCORES, blur_baseline
from jaxconsdec.sampler import decode
from jaxconsdec.weights import random_params
from jaxconsdec.training import data, latent_stats
from jaxconsdec.training.pairs import (FINE_TUNE_CURRICULUM, ICT_LAW, check_anchor_share,
                                      check_delta, check_law, curriculum_delta)
from jaxconsdec.training.run_files import (CHECKPOINTS, FAILURES, LOCK, METRICS, MODEL, RUN,
                                           SAMPLES, TENSORBOARD)
from jaxconsdec.training.loss import PAIR_WEIGHTINGS
from jaxconsdec.training.step import OBJECTIVES, Optimization, TrainStep, whole_copy

EVAL_SCHEDULES = {"1 step": (1.0,), "2 steps": (1.0, 0.5)}


class TrainingDivergedError(RuntimeError):
  """The run's loss, gradient norm or exported EMA went NaN or inf: it stopped, exported
  nothing, and kept only checkpoints of finite states."""


class TrainingSetupError(ValueError):
  """The run cannot start as asked (no usable images, mismatched VAE, another run's folder)."""


# What a process's own failure mid-run is raised as on the others (multihost.agree).
AGREED_ERRORS = (TrainingSetupError, OSError)


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """How a run trains (every field is a `jaxconsdec train` flag)."""
  steps: int
  batch_size: int = 8
  resolution: int = 256
  seed: int = 0
  curriculum: tuple[int, ...] = FINE_TUNE_CURRICULUM
  objective: str = "consistency"
  noise_law: tuple[float, float] = ICT_LAW
  pair_weighting: str = "ict"
  anchor_share: float = 0.0
  optimization: Optimization = Optimization()
  compute_dtype: str = "float32"
  flip: bool = True
  save_every: int = 500
  keep: int = 3
  eval_every: int = 500
  log_every: int = 10
  max_pixels: int = 4096 * 4096

  def __post_init__(self):
    object.__setattr__(self, "curriculum", tuple(check_delta(d) for d in self.curriculum))
    try:
      object.__setattr__(self, "noise_law", check_law(self.noise_law))
      object.__setattr__(self, "anchor_share", check_anchor_share(self.anchor_share))
    except (TypeError, ValueError) as e:
      raise TrainingSetupError(str(e)) from None
    for name in ("steps", "batch_size", "save_every", "keep", "eval_every", "log_every"):
      if getattr(self, name) < 1:
        raise TrainingSetupError(f"{name} must be at least 1, got {getattr(self, name)}")
    if self.resolution < 8 or self.resolution % 8:
      raise TrainingSetupError(f"the crop size must be a positive multiple of 8, got"
                               f" {self.resolution}")
    if not self.curriculum:
      raise TrainingSetupError("the curriculum needs at least one grid spacing")
    if self.objective not in OBJECTIVES:
      raise TrainingSetupError(f"objective must be one of {OBJECTIVES}")
    if self.pair_weighting not in PAIR_WEIGHTINGS:
      raise TrainingSetupError(f"pair_weighting must be one of {PAIR_WEIGHTINGS}")

  def to_json(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclasses.dataclass
class RunReport:
  steps_done: int
  resumed_from: int
  failures: list
  model_dir: str
  stopped: bool = False
  last_eval: Optional[dict] = None


def train(inputs: Sequence[str], run_dir: str, settings: RunSettings, *, params,
          config: UNetConfig, vae_params, vae_config: VAEConfig, from_scratch: bool,
          identities: dict, eval_inputs: Sequence[str] = (), progress: bool = True,
          stop: Optional[threading.Event] = None, strict: bool = False,
          state_layout: str = "auto", remat: str = "auto", log=sys.stderr) -> RunReport:
  """Trains (or resumes) the run in `run_dir`; see the module docstring.

  params/config: the decoder to start from (its device arrays are donated: deleted once the
  state holds them, a copy of the weights fewer for the whole run); from scratch
  (`from_scratch`), params are None and initialised from `seed` once the config has taken
  the VAE's latent space (channels, factors, and statistics measured over the images).
  vae_params: the frozen VAE (its encoder half is used, and exported with the model).
  identities: what names the init weights and the VAE by content (recorded in run.json).
  stop: set it to stop at the next step boundary (saving a checkpoint first).
  strict: refuse to start if any image is unusable (else they are left out and listed).
  state_layout: `step.STATE_LAYOUTS`; how the state lies on the devices, not what the run
  computes (a run resumes under another layout or device count).
  remat: `step.REMAT_CHOICES`; whether the backward pass recomputes ResBlock activations
  instead of keeping them, also not what the run computes.
  """
  lead = jax.process_index() == 0
  run_dir = os.path.abspath(run_dir)
  encoder = encoder_half(vae_params, vae_config)
  listing = data.list_training_images(inputs, settings.resolution, settings.max_pixels)
  _check_same_everywhere([(i.path, i.original) for i in listing.items], "training images")
  if strict and listing.failures:
    f = listing.failures[0]
    raise TrainingSetupError(f"{f.input}: {f.reason} (--strict; {len(listing.failures)}"
                             " unusable in all)")
  if not listing.items:
    reasons = "; ".join(f"{f.input}: {f.reason}" for f in listing.failures[:5])
    raise TrainingSetupError("no usable training images" + (f" ({reasons})" if reasons else
                             f" under {', '.join(inputs)}"))
  if vae_config.latent_channels != config.latent_channels and not from_scratch:
    raise TrainingSetupError(
        f"the VAE's latents have {vae_config.latent_channels} channels and the decoder takes"
        f" {config.latent_channels}: fine-tune a decoder of the VAE's latent space, or train"
        " one from scratch with --config")
  eval_items = _eval_items(eval_inputs, listing, settings)

  identity = {"settings": settings.to_json(), "from_scratch": from_scratch,
              "inputs": [[i.path, list(i.original)] for i in listing.items],
              "eval_inputs": [i.path for i in eval_items], **identities}
  run_file = os.path.join(run_dir, RUN)
  crops = data.TrainingCrops(listing.items, settings.resolution, settings.seed, settings.flip,
                             log=log)
  stored = _read_run(run_file, identity)
  lock = _lock(run_dir) if lead else None
  try:
    if lead:
      _clear_killed_exports(run_dir)
    if stored is not None:
      config = _stored_config(stored, config, from_scratch, run_file)
    elif from_scratch:
      config = _fit_latent_space(config, encoder, vae_config, crops, settings, log)
    config = config.replace(dtype=settings.compute_dtype)
    if lead and stored is None:
      os.makedirs(run_dir, exist_ok=True)
      write_atomic(run_file, json.dumps({**identity, "config": json.loads(config.to_json())},
                                        indent=2).encode())

    step_fn = TrainStep(config, vae_config, settings.optimization, seed=settings.seed,
                        deltas=settings.curriculum, remat=remat,
                        objective=settings.objective, noise_law=settings.noise_law,
                        pair_weighting=settings.pair_weighting,
                        anchor_share=settings.anchor_share, state_layout=state_layout)
    step_fn.check_batch_size(settings.batch_size)
    vae_encoder = step_fn.replicate(encoder)
    # Every save_every steps only: Orbax's default policy also saves the first step of a
    # run with no checkpoint yet, a save of the whole state the moment the run starts.
    manager = ocp.CheckpointManager(
        os.path.join(run_dir, CHECKPOINTS),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=settings.keep, enable_async_checkpointing=True,
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(
                settings.save_every)))
    # An asynchronous save writes the state while the next steps run. On a GPU or TPU it
    # writes a host copy; on a CPU it writes from the state's own buffers, so a step while
    # it runs cannot take the state over (donation) and allocates a second one beside it,
    # 9.3 GiB more at the released widths, which did not fit in 24 GB. There each save
    # completes before the next step.
    save_completes = on_cpu = step_fn.platform == "cpu"
    step_fn.compile(vae_encoder, settings.batch_size, settings.resolution)
    # CPU devices (simulated ones) share the host, each with its own temporaries.
    host_temporaries = (step_fn.temporary_bytes * len(step_fn.mesh.local_devices) if on_cpu
                        else None)
    start = manager.latest_step() or 0
    if not start:  # from scratch: initialised for the latent space now known
      state = step_fn.first_state(random_params(config, seed=settings.seed) if params is None
                                  else params, donate=True)
    elif params is not None:  # the checkpoint holds them; donated all the same
      for leaf in jax.tree.leaves(params):
        if isinstance(leaf, jax.Array):
          leaf.delete()
    params = None
    if start:  # restored into this run's layout, whatever layout or device count saved it
      restored = manager.restore(start, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(step_fn.state_abstract()),
          data=ocp.args.JsonRestore()))
      state = restored["state"]
      if restored["data"]["next_example"] != start * settings.batch_size:
        raise TrainingSetupError(f"{run_dir}: checkpoint {start} is not at this run's data"
                                 " position; the folder holds another run")
      if lead:
        print(f"resuming {run_dir} from step {start}", file=log)
    earlier = _earlier_failures(run_dir, listing.failures) if lead else []
    metrics = _MetricsLog(run_dir, start, lead)
    report = RunReport(steps_done=start, resumed_from=start, failures=listing.failures,
                       model_dir=os.path.join(run_dir, MODEL))
    evaluator = _Evaluator(eval_items, settings, config, encoder, vae_config, run_dir, lead,
                           log)
    if start == 0:
      report.last_eval = metrics.write(0, evaluator(state["ema"], 0), "eval")
    host_memory.release_free_memory()  # what setting up freed: see host_memory
    # Decided now, with nothing of a step allocated: a check after a step's dispatch would
    # run before its temporaries exist.
    hand_back = host_memory.cannot_grow_by(host_temporaries)

    per_process = settings.batch_size // jax.process_count()
    mine = jax.process_index() * per_process
    bar = tqdm.tqdm(total=settings.steps, initial=start, unit="step", file=log,
                    disable=not (progress and lead), dynamic_ncols=True)
    pending, tick, examples = [], time.perf_counter(), 0
    step = start
    delta = None
    diverged = None  # the first step whose loss or gradient norm was not finite
    # This process's own failure (a full disk, a tampered run file; process 0 alone writes
    # them): it trains on to the next sync point, where every process raises together, so
    # none is left waiting in a collective for one that has gone (multihost.agree).
    error = None
    finished = False  # the loop ended on every process alike
    prefetch = data.Prefetcher(crops, lambda s: s * settings.batch_size + mine, per_process,
                               start, settings.steps)
    try:
      while step < settings.steps:
        previous, delta = delta, curriculum_delta(step, settings.steps, settings.curriculum)
        if (lead and previous is not None and delta != previous
            and settings.objective == "consistency"):
          bar.write(f"step {step}: the curriculum moves from grid spacing {previous} to"
                    f" {delta}; pairs of nearer levels follow, and the loss jumps there by"
                    " design (it is weighted by 1 / the levels' gap)", file=log)
        first = step * settings.batch_size
        try:
          rows = prefetch.rows(step)
        except Exception as e:  # noqa: BLE001 (raised at the sync point below)
          r = settings.resolution
          error, rows = error or e, np.zeros((per_process, r, r, 3), np.uint8)
        state, step_metrics = step_fn(state, vae_encoder, rows, first, delta)
        if hand_back:
          jax.block_until_ready(step_metrics)  # its temporaries freed: see host_memory
          host_memory.release_free_memory()
        step += 1
        pending.append(step_metrics)
        examples += settings.batch_size
        log_now = step % settings.log_every == 0 or step == settings.steps
        save_now = manager.should_save(step)
        if log_now or save_now:  # never a checkpoint of a non-finite state
          values = jax.device_get(pending)  # the same values on every process
          diverged = _first_non_finite(values, step)
        try:
          if log_now or diverged is not None:
            now = time.perf_counter()
            line = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
            line.update(delta=delta, examples_per_s=examples / (now - tick))
            metrics.write(step, line, "train")
            bar.set_postfix(loss=f"{line['loss']:.4g}", grid=delta,
                            steps_s=f"{len(values) / (now - tick):.2f}")
            pending, tick, examples = [], now, 0
          bar.update(1)
          if diverged is None and (step % settings.eval_every == 0 or step == settings.steps):
            report.last_eval = metrics.write(step, evaluator(state["ema"], step), "eval")
        except Exception as e:  # noqa: BLE001 (raised at the sync point below)
          error = error or e
        if diverged is not None:
          break
        # Agreed before each checkpoint too: a checkpoint at step k means everything logged
        # for step k is on disk.
        if save_now or step == settings.steps or multihost.sync_point(step - 1):
          if multihost.agree(stop is not None and stop.is_set(), error, AGREED_ERRORS):
            report.stopped = True
            break
        if manager.save(step, args=_save_args(state, step, settings)) and save_completes:
          manager.wait_until_finished()
      multihost.agree(False, error, AGREED_ERRORS)  # after a divergence's early stop
      finished = True
    finally:
      bar.close()
      prefetch.close()
      # The last state is saved if the loop ended as planned (or, with one process, was
      # interrupted by an exception from outside it): not after a divergence; not after a
      # failure the processes agreed on, since the steps since it may have run on stand-in
      # rows; not when one process failed alone, since a save is a collective the others
      # would not join; not when the state is gone (donated to a step that failed).
      alone = jax.process_count() == 1 and error is None
      if (diverged is None and (finished or alone) and step > (manager.latest_step() or 0)
          and not any(x.is_deleted() for x in jax.tree.leaves(state))):
        diverged = _first_non_finite(jax.device_get(pending), step)
        if diverged is None:
          manager.save(step, args=_save_args(state, step, settings), force=True)
      manager.wait_until_finished()
      manager.close()
      metrics.close()
    report.steps_done = step
    if diverged is not None:
      raise TrainingDivergedError(
          f"the training diverged: the loss or gradient norm is NaN or inf at step"
          f" {diverged}. Nothing was exported, and the last checkpoint saved (step"
          f" {manager.latest_step() or 0}) holds finite values. Lower --lr (or raise"
          f" --warmup, lower --clip-norm) and start a new run, or --init it from a"
          f" checkpoint you trust.")
    report.failures = listing.failures + gather_failures(earlier + evaluator.failures
                                                         + crops.failures)
    if not report.stopped:
      _export(report.model_dir, state["ema"], config, encoder, vae_config, identity, step, lead)
      if lead:
        _write_failures(run_dir, report.failures)
    return report
  finally:
    if lock is not None:
      lock.close()


def _first_non_finite(values: list, step: int) -> Optional[int]:
  """The first of the steps `values` (those up to `step`) whose loss or gradient norm is NaN
  or inf; None if all are finite."""
  for i, v in enumerate(values):
    if not (np.isfinite(v["loss"]) and np.isfinite(v["grad_norm"])):
      return step - len(values) + 1 + i
  return None


def _save_args(state, step: int, settings: RunSettings):
  return ocp.args.Composite(state=ocp.args.StandardSave(state),
                            data=ocp.args.JsonSave({"next_example": step * settings.batch_size}))


def _check_same_everywhere(value, what: str) -> None:
  views = multihost.gather_json(value)
  if any(v != views[0] for v in views[1:]):
    raise TrainingSetupError(f"the processes list different {what}: every host must see the"
                             " same files")


def _clear_killed_exports(run_dir: str) -> None:
  """An export killed mid-write (SIGKILL) leaves its temporary folder beside model/, as large
  as the model; under the run's lock no export is in flight, so any such folder is stale."""
  for name in os.listdir(run_dir):
    if name.startswith(f".{MODEL}.tmp-"):
      path = os.path.join(run_dir, name)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
      else:
        os.remove(path)


def _run_file(opener, path: str):
  """A file of the run folder, opened without blocking: a FIFO, device or socket in its
  place (a tampered folder) is refused in one line instead of hanging the trainer."""
  try:
    return opener(path)
  except NotRegularFileError as e:
    raise TrainingSetupError(f"{path} is {e.strerror}: this run folder was tampered with."
                             " Move that entry away and run the same command again (the"
                             " run resumes from its last checkpoint)") from None


def _lock(run_dir: str):
  """An exclusive lock on the run folder for as long as this trainer runs: a second trainer
  on the same folder would interleave two runs' checkpoints."""
  import fcntl
  os.makedirs(run_dir, exist_ok=True)
  handle = _run_file(open_regular_for_append, os.path.join(run_dir, LOCK))
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.close()
    raise TrainingSetupError(f"another `jaxconsdec train` is running on {run_dir}: wait for it"
                             " to end, or stop it (it saves a checkpoint on SIGTERM)")
  return handle


def _read_run(path: str, identity: dict) -> Optional[dict]:
  """The stored run.json if this command continues that run; None for a new run."""
  if not os.path.exists(path):
    folder = os.path.dirname(path)
    if os.path.isdir(folder) and set(os.listdir(folder)) - {LOCK}:
      raise TrainingSetupError(f"{folder} is not empty and holds no {RUN}: give"
                               " --out a new folder, or the folder of the run to resume")
    return None
  try:
    stored = read_json_object(path)
  except (NotRegularFileError, ValueError) as e:
    raise TrainingSetupError(f"{path} is unreadable ({e}): this is not a run folder jaxconsdec"
                             " can resume. Give --out a new folder") from None
  folder = os.path.dirname(path)
  settings = stored.get("settings")
  if isinstance(settings, dict):  # earlier versions counted remat as what a run is
    settings.pop("remat", None)
  diffs = _differences({k: stored.get(k) for k in identity}, identity)
  was, now = (stored.get("settings") or {}).get("steps"), identity["settings"]["steps"]
  if [name for name, _, _ in diffs] == ["settings.steps"] and isinstance(was, int) and now > was:
    raise TrainingSetupError(
        f"{folder} is a run of {was} steps, and this command asks for {now}. A run's"
        " curriculum and warm-up are laid out over its own steps, so"
        " it is not lengthened in place. To train on from its model, start a new run with"
        f" it as the init: jaxconsdec train IMAGES... --init {folder} --out NEW_RUN_DIR"
        f" --steps N (with the same VAE flag).")
  if diffs:
    listed = "; ".join(f"{name}: {stored_value} in the run, {given} in this command"
                       for name, stored_value, given in diffs)
    raise TrainingSetupError(
        f"{folder} holds another run. What differs: {listed}. Re-run the run's own command"
        " to resume it, or give --out a new folder")
  return stored


# What a from-scratch run measures and stores in its config (the VAE's latent space).
LATENT_FIELDS = ("latent_channels", "in_channels", "scaling_factor", "shift_factor",
                 "latent_mean", "latent_std")


def _stored_config(stored: dict, config: UNetConfig, from_scratch: bool,
                   path: str) -> UNetConfig:
  """The decoder config run.json holds, checked against the one this command starts from:
  the same architecture (and, fine-tuning, the same latent space)."""
  try:
    saved = UNetConfig.from_json(json.dumps(stored["config"]))
  except (KeyError, TypeError, ValueError) as e:
    raise TrainingSetupError(f"{path}: its config is unreadable ({type(e).__name__}: {e}):"
                             " the run folder was tampered with. Give --out a new"
                             " folder") from None
  diffs = [f"{name}: {mine!r} in run.json, {theirs!r} now" for name, mine, theirs in
           saved.architecture_differences(config, LATENT_FIELDS if from_scratch else ())]
  if diffs:
    raise TrainingSetupError(f"{path} holds another decoder than this command trains: "
                             + "; ".join(diffs) + ". Give --out a new folder")
  return saved


def _differences(stored, given, name: str = "") -> list[tuple[str, str, str]]:
  """(setting, stored, given) for each leaf that differs, nested settings by dotted name."""
  if isinstance(stored, dict) and isinstance(given, dict):
    return [d for key in sorted(set(stored) | set(given), key=str)
            for d in _differences(stored.get(key), given.get(key),
                                  f"{name}.{key}" if name else str(key))]
  if stored == given:
    return []
  show = lambda v: (f"{len(v)} entries" if isinstance(v, list) and len(v) > 3 else
                    json.dumps(v))
  if isinstance(stored, list) and isinstance(given, list) and len(stored) == len(given) > 3:
    changed = sum(a != b for a, b in zip(stored, given))
    return [(name, f"{show(stored)}", f"{changed} of them changed")]
  return [(name, show(stored), show(given))]


def _fit_latent_space(config: UNetConfig, encoder, vae_config: VAEConfig,
                      crops: data.TrainingCrops, settings: RunSettings, log) -> UNetConfig:
  """A decoder trained from scratch decodes the VAE's latent space: its channels, scale and
  shift, and per-channel statistics measured over the training images (Welford)."""

  def latents_of(indices):
    centers = [data.center_crop(crops.pixels(i), settings.resolution) for i in indices]
    return encode(encoder, np.stack(centers), config=vae_config, layout="NHWC")

  mean, std = latent_stats.measure(len(crops.items), latents_of, vae_config.latent_channels,
                                   vae_config.scaling_factor, vae_config.shift_factor)
  if jax.process_index() == 0:
    print(f"latent statistics over {len(crops.items)} images: mean {np.round(mean, 4).tolist()},"
          f" std {np.round(std, 4).tolist()}", file=log)
  return config.replace(latent_channels=vae_config.latent_channels,
                        scaling_factor=vae_config.scaling_factor,
                        shift_factor=vae_config.shift_factor, latent_mean=mean, latent_std=std)


def _eval_items(eval_inputs, listing, settings: RunSettings):
  """Held-out images (their centered crops), or else the first training images (said so)."""
  if eval_inputs:
    held = data.list_training_images(eval_inputs, settings.resolution, settings.max_pixels)
    if not held.items:
      raise TrainingSetupError(f"no usable evaluation images under {', '.join(eval_inputs)}")
    return held.items[:8]
  return listing.items[:4]


class _Evaluator:
  """PSNR of 1- and 2-step decodes (EMA params) of the evaluation crops, and their grid PNG.
  Every process computes it on its first device (it is small); process 0 writes."""

  def __init__(self, items, settings: RunSettings, config, encoder, vae_config, run_dir,
               lead, log):
    held_out = data.TrainingCrops(items, settings.resolution, settings.seed, log=log)
    readable = [i for i in range(len(items)) if held_out.readable(i)]
    self.failures = held_out.failures
    if not readable:
      raise TrainingSetupError("no evaluation image could be decoded: "
                               + "; ".join(f"{f.input}: {f.reason}" for f in self.failures))
    self.pixels = np.stack([data.center_crop(held_out.pixels(i), settings.resolution)
                            for i in readable])
    self.config, self.run_dir, self.lead, self.seed = config, run_dir, lead, settings.seed
    self.latents = encode(encoder, self.pixels, config=vae_config, layout="NHWC")

  def __call__(self, ema, step: int) -> dict:
    params = whole_copy(ema)
    outputs = {name: np.asarray(to_uint8(decode(params, self.latents, self.seed,
                                                config=self.config, schedule=s,
                                                layout="NHWC")))
               for name, s in EVAL_SCHEDULES.items()}
    # Beside PSNR, what PSNR alone misses: colour fidelity (the PSNR of 8x8 block means)
    # and the detail ratio (below 1 smear, above 1 grain); and the bar, the blur baseline.
    blur = np.stack([blur_baseline(p) for p in self.pixels])
    line = {}
    for name, out in {"blur baseline": blur, **outputs}.items():
      for metric in ("psnr", "colour_psnr", "detail_ratio"):
        line[f"{metric}_{name.replace(' ', '_')}"] = float(
            np.mean([SCORES[metric](a, b) for a, b in zip(self.pixels, out)]))
    if self.lead:
      grid = np.concatenate([side_by_side(self.pixels[i], {n: o[i] for n, o in outputs.items()})
                             for i in range(len(self.pixels))])
      folder = make_dirs_inside(self.run_dir, SAMPLES)
      write_atomic(os.path.join(folder, f"step_{step:07d}.png"), encode_png(grid))
    return line


def _summary_writer():
  """tensorboardX's SummaryWriter, imported with torch hidden. tensorboardX imports torch
  wherever it is installed, for tensor arguments the trainer never passes (it logs floats):
  that import alone cost a training start 2.2 s and 190 MB of RSS. A torch the process has
  already imported is left as it is."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hide:
      del sys.modules["torch"]
  return SummaryWriter


class _MetricsLog:
  """metrics.jsonl and TensorBoard, written by process 0. A resumed run first drops what
  the killed one logged after its last checkpoint, so each step appears once (lines are
  written before their step's checkpoint)."""

  def __init__(self, run_dir: str, start: int, lead: bool):
    self.lead = lead
    self.path = os.path.join(run_dir, METRICS)
    self.writer = None
    if not lead:
      return
    kept = []
    if os.path.exists(self.path):
      with _run_file(open_regular, self.path) as f:
        for line in io.TextIOWrapper(f, encoding="utf-8", errors="replace"):
          try:
            entry = json.loads(line)
          except ValueError:
            continue  # a line cut short by a kill
          if entry.get("step", 0) <= start:
            kept.append(line if line.endswith("\n") else line + "\n")
    write_atomic(self.path, "".join(kept).encode())
    try:
      self.writer = _summary_writer()(os.path.join(run_dir, TENSORBOARD),
                                      purge_step=start + 1 if start else None)
    except ImportError:  # optional: metrics.jsonl holds the same
      self.writer = None

  def write(self, step: int, values: dict, kind: str) -> dict:
    if self.lead:
      with _run_file(open_regular_for_append, self.path) as f:
        # NaN and inf are not JSON: they are written as null, so strict readers parse it.
        entry = {"step": step, "kind": kind, "time": time.time(),
                 **{k: v if not isinstance(v, float) or np.isfinite(v) else None
                    for k, v in values.items()}}
        f.write((json.dumps(entry, allow_nan=False) + "\n").encode())
      if self.writer is not None:
        for name, value in values.items():
          self.writer.add_scalar(f"{kind}/{name}", value, step)
    return values

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def _export(model_dir, ema, config, encoder, vae_config, identity, step, lead):
  params = jax.device_get(whole_copy(ema))
  vae = jax.device_get(encoder)
  if not all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params)):
    raise TrainingDivergedError(f"the EMA of the weights holds NaN or inf values at step"
                                f" {step}: no model was exported. Lower --lr and start a new"
                                " run.")
  if lead:
    checkpoint.save(model_dir, params, config.replace(dtype="float32"),
                    {"trained_by": "jaxconsdec train", "step": step, "run": identity},
                    vae_params=vae, vae_config=vae_config, vae_halves=("encoder",),
                    force=os.path.exists(model_dir))


def _earlier_failures(run_dir: str, listed: list[Failure]) -> list[Failure]:
  """What the run's earlier parts left out (failures.json), less what this listing finds
  again. An image that failed mid-run fails again only if its crop is drawn again after a
  resume; without this, a resumed or rerun run would drop it from its report. A file that
  is not that run's list is not trusted and is rewritten at the end."""
  path = os.path.join(run_dir, FAILURES)
  if not os.path.lexists(path):
    return []
  with _run_file(open_regular, path) as f:
    text = f.read(16 << 20)  # a longer file is cut, fails to parse, and is not trusted
  try:
    entries = json.loads(text)
    found = [Failure(str(e["input"]), str(e["reason"])) for e in entries]
  except (ValueError, TypeError, KeyError):
    return []
  seen = {(f.input, f.reason) for f in listed}
  return [f for f in found if (f.input, f.reason) not in seen]


def _write_failures(run_dir: str, failures: list[Failure]) -> None:
  path = os.path.join(run_dir, FAILURES)
  if failures:
    write_atomic(path, json.dumps([f.to_json() for f in failures], indent=2).encode())
  elif os.path.exists(path):
    os.remove(path)
