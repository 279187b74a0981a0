"""The `jaxconsdec` command line: parses and validates flags, then calls the library.

The exit statuses are in EXIT_STATUSES below (and the README).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from typing import Optional

from jaxconsdec.jobs.latent_files import DEFAULT_MAX_PIXELS

DESCRIPTION = """\
OpenAI's Consistency Decoder in JAX: turn Stable Diffusion 1.x/2.x latents into images.

  jaxconsdec convert decoder.pt -o consdec-ckpt          convert the published weights once
  jaxconsdec decode LATENTS... -o OUT --weights consdec-ckpt   decode files of latents
  jaxconsdec encode IMAGES... -o LATENTS --vae vae-ckpt  images to latent files (SD VAE)
  jaxconsdec sample -o sample.png                        smoke test with random weights

Run `jaxconsdec COMMAND --help` for a command's flags.
"""
EXIT_STATUSES = """\
exit status:
  0    done, nothing failed
  1    done, but some inputs failed: listed at the end and in OUT_DIR/failures.json
  2    the command was wrong (a flag, the weights, what OUT_DIR holds), found before any work
  3    stopped by the environment: disk full, permission denied, I/O error, out of memory
  4    internal error, a bug in jaxconsdec: the traceback is printed
  130  interrupted (Ctrl-C); nothing half-written is left behind
"""
PRESETS = ("released", "tiny")
EXIT_OK, EXIT_INPUTS_FAILED, EXIT_USAGE, EXIT_ENVIRONMENT, EXIT_INTERNAL = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130
MAX_SEED = 2**32 - 1  # JAX keys hold 32 bits of an int seed: larger seeds would collide


class UsageError(Exception):
  """The command was wrong (a flag, the weights): exit status 2."""


def _sample(args: argparse.Namespace) -> int:
  if args.size <= 0 or args.size % 8:
    raise UsageError(f"--size must be a positive multiple of 8, got {args.size}")
  _check_seed(args.seed)
  config = _config_arg(args.model)
  out_dir = os.path.dirname(os.path.abspath(args.output))
  if not os.path.isdir(out_dir):
    raise UsageError(f"output folder {out_dir} does not exist")
  schedule = _schedule_arg(args.schedule)  # validate before the slow parts
  import jax
  import jax.numpy as jnp

  import jaxconsdec as jcd

  print(f"WARNING: no weights are loaded. The '{args.model}' UNet "
        f"({jcd.param_count(config):,} parameters) is RANDOMLY INITIALISED, so the image is "
        "noise-like, not a decoded picture. This command shows the pipeline runs end to end.")
  h = args.size // 8
  # Sample latents: a smooth random field at the scale of raw SD latents (std ~ 1/0.18215).
  latents = jax.random.normal(jax.random.key(args.seed + 1),
                              (1, config.latent_channels, h, h)) / config.scaling_factor
  start = time.perf_counter()
  params = jcd.random_params(config, seed=args.seed)
  images = jcd.decode(params, latents, args.seed, config=config, schedule=schedule)
  images.block_until_ready()
  jcd.save_png(args.output, jnp.transpose(images[0], (1, 2, 0)))
  print(f"wrote {args.output}: {args.size}x{args.size}, {len(schedule)} step(s), "
        f"{time.perf_counter() - start:.1f} s including initialisation and compilation")
  return EXIT_OK


def _config_arg(value: Optional[str]):
  """--config / --random-weights: a preset name, a jaxconsdec JSON or a diffusers
  config.json; None when not given (the weights' own, or the released decoder)."""
  import jaxconsdec as jcd
  from jaxconsdec.convert import read_config
  if value is None:
    return None
  if value in PRESETS:
    return {"released": jcd.CONSISTENCY_DECODER, "tiny": jcd.TINY}[value]
  if not os.path.exists(value):
    raise UsageError(f"--config {value}: neither {' nor '.join(PRESETS)} nor an existing file")
  return read_config(value)


def _convert(args: argparse.Namespace) -> int:
  from jaxconsdec import __version__, checkpoint
  from jaxconsdec.convert import PARTS, layout_of, read_vae_weights, read_weights
  from jaxconsdec.weights import params_from_torch

  # Everything that can be wrong with the command is found before the slow reading.
  if checkpoint.check_replaceable(args.output) and not args.force:
    raise UsageError(f"{args.output} exists; pass --force to replace it")
  explicit, vae_explicit = _config_arg(args.config), _vae_config_arg(args.vae_config)
  parts = PARTS[layout_of(args.sources[0])]
  params = config = vae = vae_params = None
  sources = []
  if "decoder" in parts:
    weights = read_weights(args.sources, explicit, args.embedding)
    config = weights.config.replace(param_dtype=args.dtype)
    sources = weights.sources
  if "vae" in parts:
    vae = read_vae_weights(args.sources[0], vae_explicit)
    sources = sources or [vae.source]
    if len(args.sources) > 1 and "decoder" not in parts:
      raise UsageError(f"{args.sources[0]} is an SD VAE file: give it alone")
  for src in sources:
    print(f"found {src.path}: format {src.format}, {src.tensor_count} tensors,"
          f" dtype {'/'.join(src.dtypes)}, {src.size:,} bytes")
  if config is not None:
    print(f"decoder: {_describe_config(config)}")
    params = params_from_torch(weights.unet, config)
  vae_config = None
  if vae is not None:
    vae_config = vae.config.replace(param_dtype=args.dtype)
    print(f"VAE ({' and '.join(vae.halves)}): {_describe_vae(vae_config)}")
    vae_params = params_from_torch(vae.tensors, vae_config, vae.halves)
  provenance = {"sources": [s.to_json() for s in sources],
                "converter": f"jaxconsdec {__version__}", "param_dtype": args.dtype}
  stop = _ctrl_c_requests_stop("stopping: the partial checkpoint is removed once the file"
                               " being written is closed")
  checkpoint.save(args.output, params, config, provenance, vae_params=vae_params,
                  vae_config=vae_config, vae_halves=vae.halves if vae else (),
                  force=args.force, should_stop=stop.is_set)
  if stop.is_set():
    print("Ctrl-C came as the checkpoint was being completed: it is complete and kept",
          file=sys.stderr)
  print(f"wrote {args.output}: {checkpoint.describe(args.output)}")
  return EXIT_OK


def _describe_config(config) -> str:
  return (f"widths {config.block_out_channels}, {config.layers_per_block} layers per block,"
          f" {config.latent_channels}-channel latents (scaling {config.scaling_factor},"
          f" shift {config.shift_factor})")


def _describe_vae(config) -> str:
  return (f"widths {config.block_out_channels}, {config.latent_channels}-channel latents"
          f" (scaling {config.scaling_factor}, shift {config.shift_factor})")


VAE_PRESETS = ("sd", "sdxl", "sd3", "flux", "tiny")


def _vae_config_arg(value: Optional[str], flag: str = "--vae-config"):
  """--vae-config: a preset name or a JSON file (jaxconsdec's VAEConfig, or a diffusers
  AutoencoderKL config.json); None when not given."""
  import jaxconsdec as jcd
  from jaxconsdec.convert import diffusers_config
  if value is None:
    return None
  presets = dict(zip(VAE_PRESETS, (jcd.SD_VAE, jcd.SDXL_VAE, jcd.SD3_VAE, jcd.FLUX_VAE,
                                   jcd.TINY_VAE)))
  if value in presets:
    return presets[value]
  if not os.path.exists(value):
    raise UsageError(f"{flag} {value}: neither one of {', '.join(VAE_PRESETS)} nor an"
                     " existing file")
  return diffusers_config.read_vae_config(value)


def _ctrl_c_requests_stop(message: str, also: tuple = ()) -> threading.Event:
  """From now on Ctrl-C sets the returned Event instead of raising wherever it lands (in
  the middle of a library's threads), so the work stops at a clean point. `main` puts the
  usual handling back when the command returns."""
  stop = threading.Event()

  def handler(signum, frame):
    if not stop.is_set():
      print(message, file=sys.stderr)
    stop.set()
  if threading.current_thread() is threading.main_thread():
    for signum in (signal.SIGINT, *also):  # also: SIGTERM, a pre-emption's notice
      signal.signal(signum, handler)
  return stop


def _decode(args: argparse.Namespace) -> int:
  _schedule_arg(args.schedule)
  _check_job_flags(args)  # before anything is started, read or written
  _start_job_runtime(args)
  from jaxconsdec.jobs import decode_job
  from jaxconsdec.sharded import ShardedDecoder

  params, config, identity = _agreed(lambda: _weights_arg(args))
  decoder = ShardedDecoder(params, config=config, schedule=_schedule_arg(args.schedule),
                           layout=args.layout)
  settings = decode_job.JobSettings(weights=identity, seed=args.seed,
                                    schedule=_schedule_arg(args.schedule),
                                    scaled_latents=args.scaled_latents, format=args.format,
                                    layout=args.layout)
  job = decode_job.DecodeJob(decoder, settings, max_pixels=args.max_pixels or None)
  return _run_job(args, job, "decoding", "latents", "decoded")


def _encode(args: argparse.Namespace) -> int:
  _check_job_flags(args)  # before anything is started, read or written
  _start_job_runtime(args)
  from jaxconsdec.jobs import encode_job
  from jaxconsdec.sharded import ShardedEncoder

  vae_params, vae_config, identity = _agreed(lambda: _vae_arg(args))
  encoder = ShardedEncoder(vae_params, config=vae_config, sample=args.sample)
  settings = encode_job.EncodeSettings(vae=identity, sample=args.sample, seed=args.seed,
                                       format=args.format, fit=args.fit)
  job = encode_job.EncodeJob(encoder, settings, max_pixels=args.max_pixels or None)
  return _run_job(args, job, "encoding", "images", "encoded")


def _eval(args: argparse.Namespace) -> int:
  _check_seed(args.seed)
  if args.max_pixels < 0:
    raise UsageError(f"--max-pixels must be positive (or 0 for no limit), got {args.max_pixels}")
  if os.path.exists(args.output) and not os.path.isdir(args.output):
    raise UsageError(f"-o {args.output} exists and is not a folder")
  schedules = [_schedule_arg(s) for s in args.schedules]
  from jaxconsdec.jobs import evaluate

  params, config, _ = _weights_arg(args)
  # Without --vae, the decoder's checkpoint may carry one (a ConsistencyDecoderVAE's encoder).
  vae = _load_vae(args.vae or args.weights, args.vae_config)
  if "encoder" not in vae.vae_halves:
    raise UsageError("the VAE given holds no encoder: eval encodes the images first")
  result = evaluate.evaluate(args.inputs, args.output, params=params, config=config,
                             vae_params=vae.vae_params, vae_config=vae.vae_config,
                             vae_halves=vae.vae_halves,
                             schedules=schedules, seed=args.seed, fit=args.fit,
                             max_pixels=args.max_pixels or None)
  print(evaluate.markdown(result), end="")
  print(f"wrote {os.path.join(args.output, 'report.json')}, report.md and"
        f" {len(result.rows)} grid(s) under {os.path.join(args.output, 'grids')}",
        file=sys.stderr)
  return EXIT_INPUTS_FAILED if result.failures else EXIT_OK


def _train(args: argparse.Namespace) -> int:
  _check_job_flags(args)
  if args.init and args.config:
    raise UsageError("give --init (fine-tune those weights) or --config (train a new decoder"
                     " of that architecture from scratch), not both")
  if not args.init and not args.config:
    raise UsageError("nothing to train: pass --init CKPT to fine-tune a decoder (the converted"
                     " released one, say), or --config released|tiny|FILE to train one from"
                     " scratch")
  if bool(args.vae) == bool(args.random_vae):
    raise UsageError("pass the frozen VAE as --vae CKPT (one with an encoder), or --random-vae"
                     " tiny for a randomly initialised small one (tests and demos)")
  from jaxconsdec import host_memory
  host_memory.keep_freed_memory()  # before JAX starts its threads: see host_memory
  _start_job_runtime(args)
  import jax
  import jaxconsdec as jcd
  from jaxconsdec import checkpoint
  from jaxconsdec.training import loop, pairs, step

  scratch = args.config is not None
  curriculum = (tuple(int(d) for d in args.curriculum.split(",")) if args.curriculum else
                pairs.SCRATCH_CURRICULUM if scratch else pairs.FINE_TUNE_CURRICULUM)
  try:
    optimization = step.Optimization(
        lr=args.lr or (1e-4 if scratch else 1e-5), warmup_steps=args.warmup, b1=args.adam_b1,
        b2=args.adam_b2, eps=args.adam_eps, clip_norm=args.clip_norm, ema_decay=args.ema_decay)
    settings = loop.RunSettings(
        steps=args.steps, batch_size=args.batch_size, resolution=args.resolution,
        seed=args.seed, curriculum=curriculum, objective=args.objective,
        optimization=optimization,
        compute_dtype="bfloat16" if args.bf16 else "float32", remat=args.remat,
        flip=not args.no_flip, save_every=args.save_every, keep=args.keep,
        eval_every=args.eval_every, log_every=args.log_every,
        max_pixels=args.max_pixels or 1 << 62)
  except ValueError as e:
    raise UsageError(str(e))

  def load_models():
    if scratch:
      config = _config_arg(args.config).replace(dropout=args.dropout)
      params, init = None, f"random-init:{args.config}"  # initialised for the VAE's latents
    else:
      if args.dropout:
        raise UsageError("--dropout is for training from scratch; a fine-tuned decoder keeps"
                         " its architecture")
      params, config, init = _weights_arg(argparse.Namespace(
          random_weights=None, weights=args.init, config=None, embedding=None))
    if args.random_vae:
      vae_config = _vae_config_arg(args.random_vae, "--random-vae")
      print(f"WARNING: --random-vae: the {args.random_vae} VAE encoder is RANDOMLY"
            " INITIALISED; the decoder learns to decode its latents, not a real VAE's.",
            file=sys.stderr)
      return (params, config, init, jcd.random_params(vae_config, 0), vae_config,
              f"random-init:{args.random_vae}")
    loaded = _load_vae(args.vae, args.vae_config)
    if "encoder" not in loaded.vae_halves:
      raise UsageError(f"--vae {args.vae} holds no encoder: training encodes the images")
    return (params, config, init, loaded.vae_params, loaded.vae_config,
            checkpoint.identity([args.vae]))

  params, config, init, vae_params, vae_config, vae_identity = _agreed(load_models)
  stop = _ctrl_c_requests_stop("stopping after this step; saving a checkpoint (Ctrl-C or"
                               " SIGTERM)", also=(signal.SIGTERM,))
  report = loop.train(args.inputs, args.output, settings, params=params, config=config,
                      vae_params=vae_params, vae_config=vae_config, from_scratch=scratch,
                      identities={"init": init, "vae": vae_identity},
                      eval_inputs=args.eval_images or (), progress=not args.no_progress,
                      stop=stop, strict=args.strict)
  if jax.process_index() == 0:
    for failure in report.failures[:20]:
      print(f"  LEFT OUT {failure.input}: {failure.reason}", file=sys.stderr)
    if report.stopped:
      print(f"stopped at step {report.steps_done} of {args.steps}, checkpoint saved: run the"
            " same command to resume", file=sys.stderr)
    else:
      print(f"trained {report.steps_done} steps ({report.steps_done - report.resumed_from}"
            f" now); the EMA model is in {report.model_dir}"
            f" (jaxconsdec decode --weights {args.output})", file=sys.stderr)
  if report.stopped:
    return EXIT_INTERRUPTED
  return EXIT_INPUTS_FAILED if report.failures else EXIT_OK


def _start_job_runtime(args) -> None:
  """The distributed runtime and the compilation cache, before anything touches a JAX
  backend (the order matters)."""
  _start_distributed(args)
  _configure_compile_cache(args)


def _agreed(load):
  """Loads weights on every process; if any process fails, all raise (none waits forever
  for another in the job's first collective)."""
  from jaxconsdec import multihost
  result, error = None, None
  try:
    result = load()
  except _usage_errors() + (OSError,) as e:
    error = e
  multihost.raise_together(error, _usage_errors() + (OSError,))
  return result


def _run_job(args, job, doing: str, what: str, done: str) -> int:
  import jax

  from jaxconsdec.jobs import engine
  lead = jax.process_index() == 0
  if lead:
    print(f"{doing} on {jax.device_count()} device(s) in {jax.process_count()} process(es),"
          f" global batch {job.program.global_batch(args.batch_size)}", file=sys.stderr)
  report = engine.run_job(job, args.inputs, args.output, batch_size=args.batch_size,
                          strict=args.strict, progress=not args.no_progress)
  if lead:
    _print_report(report, args.output, what, done)
  if report.environment_error:
    return EXIT_ENVIRONMENT
  return EXIT_INPUTS_FAILED if report.failures else EXIT_OK


def _check_job_flags(args) -> None:
  _check_seed(args.seed)
  if args.batch_size <= 0:
    raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
  if args.max_pixels < 0:
    raise UsageError(f"--max-pixels must be positive (or 0 for no limit), got {args.max_pixels}")
  for flag, path in (("-o", args.output), ("--compile-cache", args.compile_cache)):
    if path and os.path.exists(path) and not os.path.isdir(path):
      raise UsageError(f"{flag} {path} exists and is not a folder")
  if args.num_processes is not None and args.num_processes < 1:
    raise UsageError(f"--num-processes must be at least 1, got {args.num_processes}")
  if args.process_id is not None and not (
      0 <= args.process_id < (args.num_processes or args.process_id + 1)):
    raise UsageError(f"--process-id must be in [0, --num-processes), got {args.process_id}")
  if args.coordinator is not None:
    host, _, port = args.coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise UsageError(f"--coordinator takes HOST:PORT, got {args.coordinator!r}")
  explicit = (args.coordinator, args.num_processes, args.process_id)
  if any(v is None for v in explicit) and not all(v is None for v in explicit):
    raise UsageError("give all of --coordinator, --num-processes and --process-id, or use"
                     " --distributed to detect them (TPU pods, SLURM)")


def _check_seed(seed: int) -> None:
  if not 0 <= seed <= MAX_SEED:
    raise UsageError(f"--seed must be in [0, {MAX_SEED}] (JAX keys hold 32 bits of a seed),"
                     f" got {seed}")


def _start_distributed(args) -> None:
  explicit = (args.coordinator, args.num_processes, args.process_id)
  if not args.distributed and all(v is None for v in explicit):
    return
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts need collectives
  if args.distributed:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)


def _configure_compile_cache(args) -> None:
  if args.no_compile_cache:
    return
  import jax
  folder = args.compile_cache or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxconsdec", "xla")
  jax.config.update("jax_compilation_cache_dir", folder)


def _schedule_arg(value: str) -> tuple[float, ...]:
  import jaxconsdec as jcd
  try:
    schedule = tuple(float(s) for s in value.split(","))
    jcd.timesteps_for(schedule)  # validates
  except (ValueError, TypeError) as e:
    raise UsageError(f"--schedule takes comma-separated numbers in [0, 1], got {value!r} ({e})")
  return schedule


def _weights_arg(args):
  """-> (params, config, identity of the weights by content, recorded with the outputs)."""
  import jaxconsdec as jcd
  from jaxconsdec import checkpoint
  if args.random_weights:
    config = _config_arg(args.random_weights)
    print(f"WARNING: --random-weights: the {args.random_weights} UNet is RANDOMLY INITIALISED."
          " The images are noise-like, not decoded pictures; this only shows the job runs."
          " Pass --weights with converted weights for real images.", file=sys.stderr)
    return jcd.random_params(config, seed=0), config, f"random-init:{args.random_weights}"
  if not args.weights:
    raise UsageError("no weights: pass --weights CKPT (a folder made by `jaxconsdec convert`,"
                     " or decoder.pt / a *.safetensors file), or --random-weights tiny for a"
                     " smoke test")
  if not os.path.exists(args.weights):
    raise UsageError(f"--weights {args.weights}: no such file or folder. Pass a checkpoint"
                     " folder made by `jaxconsdec convert`, or the PyTorch weight file itself")
  params, config = jcd.load(args.weights, config=_config_arg(args.config),
                            embedding=args.embedding)
  files = [args.weights] + ([args.embedding] if args.embedding and
                            not os.path.isdir(args.weights) else [])
  return params, config, checkpoint.identity(files)


def _vae_arg(args):
  """-> (VAE params, VAEConfig, identity of the weights by content) for --vae."""
  from jaxconsdec import checkpoint
  loaded = _load_vae(args.vae, args.vae_config)
  return loaded.vae_params, loaded.vae_config, checkpoint.identity([args.vae])


def _load_vae(path: str, config_flag: Optional[str]):
  """What --vae names, loaded; it must hold an SD VAE (or a half of one)."""
  import jaxconsdec as jcd
  if not os.path.exists(path):
    raise UsageError(f"--vae {path}: no such file or folder. Pass a checkpoint folder made by"
                     " `jaxconsdec convert` from a VAE, or the VAE's weight file itself")
  loaded = jcd.load(path, vae_config=_vae_config_arg(config_flag))
  if loaded.vae_params is None:
    raise UsageError(f"--vae {path} holds no SD VAE ({loaded!r})")
  return loaded


def _print_report(report, out_dir: str, what: str = "latents", done: str = "decoded") -> None:
  hidden = f", {report.hidden} hidden files or folders skipped" if report.hidden else ""
  redone = f" ({report.redone} found cut short were redone)" if report.redone else ""
  print(f"{report.total} {what}: {report.done_before} already done, {report.written} {done}"
        f" now{redone}, {len(report.failures)} failed{hidden} ({report.seconds:.1f} s)",
        file=sys.stderr)
  if report.environment_error:
    print(f"error: the job stopped: {report.environment_error}. Fix it and run the same"
          " command again: it resumes where it stopped.", file=sys.stderr)
  elif report.stopped:
    print("stopped at the first bad input (--strict)", file=sys.stderr)
  for failure in report.failures[:20]:
    print(f"  FAILED {failure.input}: {failure.reason}", file=sys.stderr)
  if len(report.failures) > 20:
    print(f"  ... {len(report.failures) - 20} more", file=sys.stderr)
  if report.failures and os.path.exists(os.path.join(out_dir, "failures.json")):
    print(f"the list is in {os.path.join(out_dir, 'failures.json')}", file=sys.stderr)


def _add_verbose(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--verbose", action="store_true",
                      help="show the messages of the libraries underneath (Orbax, asyncio)")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="jaxconsdec", description=DESCRIPTION, epilog=EXIT_STATUSES,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  from jaxconsdec import __version__
  parser.add_argument("--version", action="version", version=f"jaxconsdec {__version__}")
  sub = parser.add_subparsers(dest="command", required=True)
  sample = sub.add_parser(
      "sample", help="decode sample latents with RANDOM weights and write a PNG (smoke test)")
  sample.add_argument("-o", "--output", default="sample.png", help="PNG path (default sample.png)")
  sample.add_argument("--model", choices=PRESETS, default="tiny",
                      help="architecture: the released 621M UNet or the tiny test one")
  sample.add_argument("--size", type=int, default=128, help="image side in pixels, multiple of 8")
  sample.add_argument("--schedule", default="1.0,0.5", help="comma-separated values in [0, 1]")
  sample.add_argument("--seed", type=int, default=0, help=f"0 to {MAX_SEED}")
  _add_verbose(sample)
  sample.set_defaults(run=_sample)

  convert = sub.add_parser(
      "convert", help="convert published PyTorch weights (decoder.pt or safetensors) into a"
      " jaxconsdec checkpoint; needs no torch")
  convert.add_argument("sources", nargs="+", metavar="SRC",
                       help="weight file; for the raw layout, the embedding file may follow")
  convert.add_argument("-o", "--output", required=True, help="checkpoint folder to create")
  convert.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                       help="dtype the params are stored in (default float32)")
  convert.add_argument("--embedding", help="safetensors file holding the time-embedding table")
  convert.add_argument("--config",
                       help="architecture: released, tiny, a jaxconsdec UNetConfig JSON or a"
                       " diffusers config.json (default: the config.json beside a diffusers"
                       " file, else released)")
  convert.add_argument("--vae-config", metavar="CONFIG",
                       help=f"architecture of an SD VAE file: {', '.join(VAE_PRESETS)}, a"
                       " jaxconsdec VAEConfig JSON or a diffusers config.json (default: the"
                       " config.json beside a diffusers file, else sd)")
  convert.add_argument("--force", action="store_true",
                       help="replace an existing checkpoint at OUT (nothing else is replaced)")
  _add_verbose(convert)
  convert.set_defaults(run=_convert)

  dec = sub.add_parser(
      "decode", help="decode latent files into images on every device of every process;"
      " re-running resumes")
  dec.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=".npy, .npz or .safetensors files, or folders of them")
  dec.add_argument("-o", "--output", required=True, help="output folder")
  weights = dec.add_mutually_exclusive_group()
  weights.add_argument("--weights", help="checkpoint folder from `jaxconsdec convert`, or"
                       " decoder.pt / a *.safetensors weight file (converted in memory)")
  weights.add_argument("--random-weights", choices=PRESETS,
                       help="RANDOMLY INITIALISED model of this size: a smoke test only")
  dec.add_argument("--config",
                   help="architecture of a PyTorch weight file, as for convert (default: the"
                   " config.json beside a diffusers file, else released)")
  dec.add_argument("--embedding", help="time-embedding table for the raw safetensors layout")
  dec.add_argument("--schedule", default="1.0,0.5", help="comma-separated values in [0, 1]")
  dec.add_argument("--layout", choices=("NCHW", "NHWC"), default="NCHW",
                   help="layout of the latents (and of --format npy outputs)")
  dec.add_argument("--scaled-latents", action="store_true",
                   help="inputs are pipeline latents (raw * 0.18215): divide before decoding")
  dec.add_argument("--format", choices=("png", "npy"), default="png",
                   help="png (uint8) or npy (float32 in [-1, 1])")
  _add_job_flags(dec, "latents whose image has")
  dec.set_defaults(run=_decode)

  enc = sub.add_parser(
      "encode", help="encode PNG/JPEG images into latent files with the SD VAE's encoder, on"
      " every device of every process; re-running resumes")
  enc.add_argument("inputs", nargs="+", metavar="IMAGE",
                   help="PNG or JPEG files, or folders of them")
  enc.add_argument("-o", "--output", required=True, help="output folder")
  enc.add_argument("--vae", required=True,
                   help="checkpoint folder holding the VAE (or its encoder), or a VAE weight"
                   " file (converted in memory)")
  enc.add_argument("--vae-config", metavar="CONFIG",
                   help=f"architecture of a VAE weight file: {', '.join(VAE_PRESETS)} or a"
                   " JSON (default: the config.json beside a diffusers file, else sd)")
  enc.add_argument("--sample", action="store_true",
                   help="a sample of the posterior (seeded per image) instead of its mean")
  enc.add_argument("--fit", choices=("refuse", "crop", "pad"), default="refuse",
                   help="images whose sides do not divide by 8: refuse them (default), crop"
                   " to the centered multiple of 8, or pad the bottom and right edges; never"
                   " resized")
  enc.add_argument("--format", choices=("npy", "safetensors"), default="npy",
                   help="npy (default) or safetensors (tensor 'latent' with the sizes in its"
                   " metadata); raw (C, h, w) float32 latents either way")
  _add_job_flags(enc, "images with")
  enc.set_defaults(run=_encode)

  ev = sub.add_parser(
      "eval", help="encode images, decode them with the SD VAE's decoder and the Consistency"
      " Decoder, and report PSNR, SSIM, time and side-by-side pictures")
  ev.add_argument("inputs", nargs="+", metavar="IMAGE", help="PNG or JPEG files, or folders")
  ev.add_argument("-o", "--output", required=True, help="report folder")
  ev.add_argument("--weights", required=True,
                  help="the Consistency Decoder: a checkpoint folder or a weight file")
  ev.add_argument("--config", help="architecture of a decoder weight file, as for convert")
  ev.add_argument("--embedding", help="time-embedding table for the raw safetensors layout")
  ev.add_argument("--vae", help="the SD VAE: a checkpoint folder or a weight file (default:"
                  " the VAE the --weights checkpoint holds, if any)")
  ev.add_argument("--vae-config", metavar="CONFIG",
                  help=f"architecture of a VAE weight file: {', '.join(VAE_PRESETS)} or a JSON")
  ev.add_argument("--schedules", nargs="+", default=["1.0", "1.0,0.5"], metavar="SCHEDULE",
                  help="Consistency Decoder schedules to compare (default: 1.0 and 1.0,0.5,"
                  " i.e. 1 and 2 steps)")
  ev.add_argument("--seed", type=int, default=0, help=f"base seed of the noise, 0 to {MAX_SEED}")
  ev.add_argument("--fit", choices=("refuse", "crop", "pad"), default="refuse",
                  help="images whose sides do not divide by 8, as for encode")
  ev.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                  help="refuse images with more than N pixels (default 2048x2048; 0: no limit)")
  _add_verbose(ev)
  ev.set_defaults(run=_eval, random_weights=None)

  tr = sub.add_parser(
      "train", help="consistency-train a decoder on images: fine-tune one (--init) or train"
      " one for a VAE's latents from scratch (--config)")
  tr.add_argument("inputs", nargs="+", metavar="IMAGE", help="PNG or JPEG files, or folders")
  tr.add_argument("--out", dest="output", required=True, metavar="RUN_DIR",
                  help="the run folder (the same command on it again resumes the run)")
  tr.add_argument("--steps", type=int, required=True, help="optimiser steps in all")
  tr.add_argument("--resolution", type=int, default=256,
                  help="side of the random square crops (a multiple of 8; default 256)")
  tr.add_argument("--init", metavar="CKPT", help="fine-tune these decoder weights")
  tr.add_argument("--config", metavar="released|tiny|FILE",
                  help="train a new decoder of this architecture from scratch")
  tr.add_argument("--vae", metavar="CKPT", help="the frozen VAE whose latents are decoded")
  tr.add_argument("--vae-config", metavar="CONFIG",
                  help=f"architecture of a VAE weight file: {', '.join(VAE_PRESETS)} or a JSON")
  tr.add_argument("--random-vae", metavar="CONFIG",
                  help="a randomly initialised VAE of this architecture instead (tests and"
                  f" demos): {', '.join(VAE_PRESETS)} or a JSON")
  tr.add_argument("--eval-images", nargs="+", metavar="IMAGE",
                  help="held-out images for the PSNR and sample grids (default: the first"
                  " training images)")
  opt = tr.add_argument_group("optimisation (defaults: TRAINING.md's proposal)")
  opt.add_argument("--lr", type=float, help="Adam learning rate (default 1e-5 with --init,"
                   " 1e-4 from scratch)")
  opt.add_argument("--warmup", type=int, default=1000, help="linear warm-up steps")
  opt.add_argument("--adam-b1", type=float, default=0.9)
  opt.add_argument("--adam-b2", type=float, default=0.99)
  opt.add_argument("--adam-eps", type=float, default=1e-8)
  opt.add_argument("--clip-norm", type=float, default=1.0, help="global gradient-norm clip")
  opt.add_argument("--ema-decay", type=float, default=0.9999,
                   help="EMA of the exported weights (warmed up as min(d, (1+n)/(10+n)))")
  opt.add_argument("--curriculum", metavar="DELTAS",
                   help="grid spacings in table steps, in equal shares of the run (default 16"
                   " with --init; 64,32,16,8,4 from scratch)")
  opt.add_argument("--objective", choices=("consistency", "denoising"), default="consistency",
                   help="consistency training (default), or denoising pre-training: stage 1"
                   " of a new decoder, whose result a consistency run then takes as --init")
  opt.add_argument("--dropout", type=float, default=0.0, help="ResBlock dropout (from scratch)")
  opt.add_argument("--bf16", action="store_true",
                   help="bfloat16 compute, float32 master weights and loss")
  opt.add_argument("--remat", action="store_true",
                   help="recompute ResBlock activations in the backward pass (less memory)")
  opt.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
  out = tr.add_argument_group("checkpoints and metrics")
  out.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps")
  out.add_argument("--keep", type=int, default=3, help="checkpoints kept")
  out.add_argument("--eval-every", type=int, default=500,
                   help="held-out PSNR and sample grid every N steps")
  out.add_argument("--log-every", type=int, default=10, help="a metrics line every N steps")
  _add_job_flags(tr, "images with")
  tr.set_defaults(run=_train)
  return parser


def _add_job_flags(parser, too_large: str) -> None:
  """The flags every file-to-file job takes."""
  parser.add_argument("--batch-size", type=int, default=8,
                      help="global batch per step, rounded up to a multiple of the device count")
  parser.add_argument("--seed", type=int, default=0,
                      help=f"base seed of the noise, 0 to {MAX_SEED}")
  parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                      help=f"refuse {too_large} more than N pixels, before compiling"
                      " (default 4194304 = 2048x2048; 0 for no limit)")
  parser.add_argument("--strict", action="store_true", help="stop at the first bad input")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  parser.add_argument("--compile-cache", metavar="DIR",
                      help="persistent XLA compilation cache (default ~/.cache/jaxconsdec/xla)")
  parser.add_argument("--no-compile-cache", action="store_true")
  _add_verbose(parser)
  dist = parser.add_argument_group("multi-host (one process per host, same command everywhere)")
  dist.add_argument("--distributed", action="store_true",
                    help="jax.distributed.initialize() with auto-detection (TPU pods, SLURM)")
  dist.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
  dist.add_argument("--num-processes", type=int)
  dist.add_argument("--process-id", type=int)


def _usage_errors() -> tuple[type[BaseException], ...]:
  """Exceptions that mean the command itself was wrong (exit status 2)."""
  from jaxconsdec.jobs.engine import JobMismatchError, ProcessesDisagreeError
  from jaxconsdec.checkpoint import CheckpointError
  from jaxconsdec.convert import WeightFileError
  from jaxconsdec.weights import ParamsMismatchError
  from jaxconsdec.training.loop import TrainingSetupError
  return (UsageError, WeightFileError, CheckpointError, ParamsMismatchError, JobMismatchError,
          ProcessesDisagreeError, TrainingSetupError)


def _quiet_libraries(verbose: bool) -> None:
  """Orbax and tensorstore answer one failed write with hundreds of asyncio tracebacks (from
  their threads, through sys.unraisablehook, the asyncio logger and warnings about coroutines
  left pending) around the one error that matters. Unless --verbose, they are not shown: the user sees jaxconsdec's message."""
  if verbose:
    return
  for name in ("absl", "asyncio"):
    logging.getLogger(name).setLevel(logging.CRITICAL + 1)
  sys.unraisablehook = lambda unraisable: None
  warnings.filterwarnings("ignore", message="coroutine .* was never awaited")


def main(argv: list[str] | None = None, *, console: bool = False) -> int:
  """Runs one command; returns its exit status. console: this is the whole process (the
  `jaxconsdec` script), so once the command has returned, Ctrl-C is ignored: the work is
  done, and an interrupt during shutdown could only turn a success into a traceback."""
  args = _parser().parse_args(argv)  # a wrong flag exits 2 here, with argparse's message
  _quiet_libraries(args.verbose)
  hint = "" if args.verbose else " (--verbose shows more)"
  usage_errors = _usage_errors()
  main_thread = threading.current_thread() is threading.main_thread()
  previous = signal.getsignal(signal.SIGINT) if main_thread else None
  try:
    return args.run(args)
  except KeyboardInterrupt:
    print("interrupted; no file was left half-written", file=sys.stderr)
    return EXIT_INTERRUPTED
  except usage_errors as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USAGE
  except OSError as e:
    print(f"error: {_describe_os_error(e)}{hint}", file=sys.stderr)
    return EXIT_ENVIRONMENT
  except Exception as e:
    if "RESOURCE_EXHAUSTED" in str(e):  # a device ran out of memory
      print(f"error: out of device memory ({str(e).splitlines()[0][:300]}). Lower"
            " --batch-size or --max-pixels.", file=sys.stderr)
      return EXIT_ENVIRONMENT
    traceback.print_exc()
    print("internal error: this is a bug in jaxconsdec; please report it with the traceback"
          " above", file=sys.stderr)
    return EXIT_INTERNAL
  finally:
    if main_thread:
      signal.signal(signal.SIGINT, signal.SIG_IGN if console else previous)


def _describe_os_error(e: OSError) -> str:
  if e.strerror and e.filename:
    return f"{e.filename}: {e.strerror}"
  return e.strerror or str(e)


def entry() -> None:
  """The console script."""
  sys.exit(main(console=True))


if __name__ == "__main__":
  entry()
