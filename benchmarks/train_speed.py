"""One consistency-training step of the released widths: jaxconsdec against the same step
written with PyTorch on diffusers' UNet2DModel, and the compiled memory of a step.

The step (both sides): student forward and backward at t_hi, teacher forward at t_lo without
gradients, the pseudo-Huber loss of docs/training.md, gradients clipped to global norm 1, Adam.
The two frameworks cannot both hold a 621M-parameter model with its Adam state in 24 GB, so
they alternate by *process*: round r runs jaxconsdec for --steps steps in one process, then
torch in another (JAX reuses its compiled program from a persistent cache after the first
round). The first step of each process is a warm-up and not counted. Reported: median seconds
per step of each, the ratio jaxconsdec/torch of the medians, and the spread of the per-round
ratios.

Each side runs as its trainer runs it: jaxconsdec with the host-memory setting `jaxconsdec
train` applies first thing (`jaxconsdec/host_memory.py`: freed memory is kept, so a step's
temporaries are not faulted in afresh every step), torch with its defaults. Since the setting
is a C-library one that helps any program, each round also runs torch under it and
jaxconsdec without it; the like-for-like ratios and each step's minor page faults are
reported beside the main one.

Memory: XLA's compiled memory per device (arguments, outputs, temporaries) of the whole
trainer step (`jaxconsdec.training.step.TrainStep`, with the frozen SD encoder, the state
donated) at 256x256, 1 and 8 examples per device, on 1 and 8 simulated CPU devices: fp32 and
bf16, with and without rematerialised ResBlocks, the state sharded (and replicated, for
comparison). Compiling only; nothing runs.

Peaks: peak RSS of whole runs in their own processes: `jaxconsdec train` of the released
widths for 2 steps at 256², batch 1 on one device and at 64², batch 8 on 8 simulated
devices, and the same step in PyTorch (with an EMA copy, as the trainer keeps).

Throughput (the GPU check): the whole trainer step (encoder, pair draws, loss, Adam, EMA)
of the released widths on every device, the state sharded and donated: images/s, the
device's peak memory, and MFU = FLOPs by XLA's cost
analysis (docs/training.md's estimate, ~4 UNet forwards = 34 TFLOP per 256x256 example, beside
it) over the time, over the peak of a large matmul measured on the same device.

  python benchmarks/train_speed.py speed --size 64 --batch 1 --rounds 3 --steps 3
  python benchmarks/train_speed.py peaks
  python benchmarks/train_speed.py memory --size 256 --batches 1,8 --devices 1,8
  python benchmarks/train_speed.py throughput --size 256 --batch 8 --dtype bfloat16
Writes benchmarks/results/train_speed_cpu.json / train_peaks_cpu.json / train_memory_cpu.json /
train_throughput_<backend>.json (and .md).
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
T_LO, T_HI = 496, 512  # a released-grid pair: the teacher runs
TFLOP_PER_EXAMPLE_256 = 34.0  # docs/training.md: ~4 UNet forwards per 256x256 example


def _inputs(batch, size):
  rng = np.random.default_rng(0)
  x0 = np.clip(rng.standard_normal((batch, size, size, 3)) * 0.5, -1, 1).astype(np.float32)
  lat = (rng.standard_normal((batch, size // 8, size // 8, 4)) * 4).astype(np.float32)
  eps = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
  return x0, lat, eps


def _set_memory(args):
  """`jaxconsdec train`'s host-memory setting, before the framework starts its threads."""
  if args.memory == "kept":
    from jaxconsdec import host_memory
    assert host_memory.keep_freed_memory()


def _minor_faults():
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def jax_worker(args):
  _set_memory(args)
  import jax
  import jax.numpy as jnp
  import optax
  import jaxconsdec as jcd
  from jaxconsdec.models.conv import cpu_product_gradients
  from jaxconsdec.training.step import Optimization
  jax.config.update("jax_compilation_cache_dir", args.cache)
  cfg = jcd.CONSISTENCY_DECODER
  params = jcd.random_params(cfg, seed=0)
  tx = Optimization(lr=1e-5, warmup_steps=1).optimizer()
  opt_state = tx.init(params)
  x0, lat, eps = _inputs(args.batch, args.size)
  t_lo, t_hi = np.full(args.batch, T_LO), np.full(args.batch, T_HI)

  def update(params, opt_state, x0, lat, eps):
    with cpu_product_gradients(jax.default_backend() == "cpu"):  # as the trainer's step
      loss, grads = jax.value_and_grad(lambda p: jnp.mean(jcd.consistency_loss(
          p, x0, lat, t_lo, t_hi, eps, config=cfg, remat=args.remat)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  # The state is updated in place, as torch's; XLA:CPU options as every jaxconsdec program.
  step = jax.jit(update, donate_argnums=(0, 1), compiler_options=jcd.compiler_options())

  times, faults = [], []
  for _ in range(args.steps + 1):
    start, before = time.perf_counter(), _minor_faults()
    params, opt_state, loss = step(params, opt_state, x0, lat, eps)
    loss.block_until_ready()
    times.append(time.perf_counter() - start)
    faults.append(_minor_faults() - before)
  return times[1:], faults[1:], float(loss)


def torch_worker(args):
  _set_memory(args)
  import torch
  from diffusers.schedulers.scheduling_consistency_decoder import ConsistencyDecoderScheduler
  sys.path.insert(0, os.path.join(HERE, "..", "tests"))
  from reference import nchw, unet2d_kwargs
  import jaxconsdec as jcd
  from diffusers import UNet2DModel
  torch.manual_seed(0)
  unet = UNet2DModel(**unet2d_kwargs(jcd.CONSISTENCY_DECODER)).train()
  opt = torch.optim.Adam(unet.parameters(), lr=1e-5, betas=(0.9, 0.99), eps=1e-8)
  s = ConsistencyDecoderScheduler()
  x0, lat, eps = (nchw(a) for a in _inputs(args.batch, args.size))
  z = lat.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
  c = 0.00054 * (3 * args.size * args.size) ** 0.5
  sigma = lambda t: float((1 / s.sqrt_alphas_cumprod[t] ** 2 - 1) ** 0.5)
  t_lo, t_hi = torch.full((args.batch,), T_LO), torch.full((args.batch,), T_HI)

  def denoise(t, tt):
    x = s.sqrt_alphas_cumprod[t] * x0 + s.sqrt_one_minus_alphas_cumprod[t] * eps
    out = unet(torch.cat([s.c_in[t] * x, z], dim=1), tt).sample
    return s.c_skip[t] * x + s.c_out[t] * out[:, :3]

  ema = [p.detach().clone() for p in unet.parameters()] if args.ema else None
  times, faults = [], []
  for _ in range(args.steps + 1):
    start, before = time.perf_counter(), _minor_faults()
    with torch.no_grad():
      teacher = denoise(T_LO, t_lo)
    student = denoise(T_HI, t_hi)
    norm2 = ((student - teacher) ** 2).sum(dim=(1, 2, 3))
    loss = ((torch.sqrt(norm2 + c * c) - c) / (sigma(T_HI) - sigma(T_LO))).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)  # as Optimization's clip_norm
    opt.step()
    if ema is not None:
      with torch.no_grad():
        torch._foreach_lerp_(ema, list(unet.parameters()), 1e-4)
    times.append(time.perf_counter() - start)
    faults.append(_minor_faults() - before)
  return times[1:], faults[1:], float(loss)


# The processes of a round: (series name, worker, host memory, remat). The main ratio is
# jaxconsdec over torch as torch runs by default, both without recomputation (torch's step
# does not checkpoint). jaxconsdec_remat is the step as `jaxconsdec train` runs it at the
# released widths, its ResBlocks rematerialised to fit where users train; the other two
# series show what the host-memory setting does on each side.
SERIES = (("jaxconsdec", "jaxconsdec", "kept", False), ("torch", "torch", "default", False),
          ("torch_kept_memory", "torch", "kept", False),
          ("jaxconsdec_default_memory", "jaxconsdec", "default", False),
          ("jaxconsdec_remat", "jaxconsdec", "kept", True))


def speed(args):
  rows = {name: [] for name, *_ in SERIES}
  faults = {name: [] for name, *_ in SERIES}
  ratios, like_ratios = [], []
  with tempfile.TemporaryDirectory() as cache:
    for r in range(args.rounds):
      medians = {}
      for name, worker, memory, remat in SERIES:
        cmd = [sys.executable, __file__, "worker", worker, "--size", str(args.size), "--batch",
               str(args.batch), "--steps", str(args.steps), "--cache", cache,
               "--memory", memory] + (["--remat"] if remat else [])
        out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True)
                         .stdout.strip().splitlines()[-1])
        rows[name] += out["times"]
        faults[name] += out["faults"]
        medians[name] = statistics.median(out["times"])
        print(f"round {r}: {name} {', '.join(f'{t:.2f}' for t in out['times'])} s/step,"
              f" {', '.join(str(f) for f in out['faults'])} page faults/step", flush=True)
      ratios.append(medians["jaxconsdec"] / medians["torch"])
      like_ratios.append(medians["jaxconsdec"] / medians["torch_kept_memory"])
  med = {name: statistics.median(times) for name, times in rows.items()}
  jax_s, torch_s, kept_s = med["jaxconsdec"], med["torch"], med["torch_kept_memory"]
  jax_default_s, remat_s = med["jaxconsdec_default_memory"], med["jaxconsdec_remat"]
  result = {
      "machine": _machine(), "size": args.size, "batch": args.batch, "rounds": args.rounds,
      "steps_per_round": args.steps, "seconds_per_step": rows,
      "median_jaxconsdec_s": jax_s, "median_torch_s": torch_s,
      "ratio_of_medians": jax_s / torch_s, "round_ratios": ratios,
      "spread": [min(ratios), max(ratios)],
      "median_torch_kept_memory_s": kept_s, "like_for_like_ratio_of_medians": jax_s / kept_s,
      "like_for_like_round_ratios": like_ratios,
      "median_jaxconsdec_default_memory_s": jax_default_s,
      "default_memory_ratio_of_medians": jax_default_s / torch_s,
      "median_jaxconsdec_remat_s": remat_s, "remat_ratio_of_medians": remat_s / torch_s,
      "minor_page_faults_per_step": faults,
      "median_minor_page_faults_per_step": {n: statistics.median(f) for n, f in faults.items()},
  }
  pf = result["median_minor_page_faults_per_step"]
  table = ("| released widths, fp32 | size | batch | jaxconsdec s/step | torch s/step |"
           " ratio (median) | per-round ratios |\n|---|---|---|---|---|---|---|\n"
           f"| {_machine()['cpu']}, {_machine()['cores']} cores | {args.size}² | {args.batch} |"
           f" {jax_s:.2f} | {torch_s:.2f} | {jax_s / torch_s:.3f} |"
           f" {min(ratios):.3f}-{max(ratios):.3f} |\n\n"
           "| series | host memory | median s/step | median page faults/step |\n"
           "|---|---|---|---|\n" + "".join(
               f"| {name} | {memory} | {med[name]:.2f} | {pf[name]:,.0f} |\n"
               for name, _, memory, _ in SERIES)
           + f"\nLike for like (both sides keep freed memory): {jax_s / kept_s:.3f}"
           f" ({min(like_ratios):.3f}-{max(like_ratios):.3f} per round). Both with their"
           f" defaults: {jax_default_s / torch_s:.3f}. With the ResBlocks rematerialised, as"
           f" `jaxconsdec train` runs the released widths: {remat_s / torch_s:.3f}.\n")
  _write(args.out or os.path.join(RESULTS, "train_speed_cpu"), result, table)


# Compiled-memory variants: (compute dtype, remat, state layout).
MEMORY_VARIANTS = {"fp32": ("float32", "off", "sharded"),
                   "fp32, remat": ("float32", "on", "sharded"),
                   "bf16": ("bfloat16", "off", "sharded"),
                   "bf16, remat": ("bfloat16", "on", "sharded"),
                   "fp32, replicated state": ("float32", "off", "replicated")}


def memory(args):
  """Each device count in its own process (XLA's simulated CPU devices are fixed at start).
  --tables-only: the tables again from the rows of the last results, compiling nothing."""
  stem = args.out or os.path.join(RESULTS, "train_memory_cpu")
  rows = []
  if args.tables_only:
    with open(stem + ".json") as f:
      rows = json.load(f)["rows"]
  for devices in [] if args.tables_only else (int(d) for d in args.devices.split(",")):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, __file__, "memory-worker", "--size", str(args.size), "--batches",
           args.batches, "--variants", args.variants]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  torch_run = _torch_run()
  fits = _fits(rows)
  table = ("| devices | size | batch | variant | state GiB | temporaries GiB |"
           " total per device GiB |\n|---|---|---|---|---|---|---|\n" + "".join(
               f"| {r['devices']} | {r['size']}² | {r['batch']} | {r['variant']} |"
               f" {r['arguments_gib']:.2f} | {r['temporaries_gib']:.2f} |"
               f" {r['total_gib']:.2f} |\n" for r in rows))
  if torch_run:
    peak, status = torch_run["peak_rss_gib"], torch_run["exit_status"]
    table += ("\nPyTorch, the same step at 256², batch 1, one process (`peaks`): "
              + (f"peak RSS {peak:.2f} GiB.\n" if status == 0 else
                 f"killed (exit status {status}) at {peak:.2f} GiB of RSS.\n"))
  table += ("\nComputed from the rows above (not measured on such devices): the fixed part"
            " (state, gradients, the step's own buffers) and the memory per example, and"
            " the examples per device that fit in each device's memory.\n\n"
            "| devices | variant | fixed GiB | per example GiB |"
            + "".join(f" {c} GB |" for c in DEVICE_GB) + "\n|---|---|---|---|"
            + "---|" * len(DEVICE_GB) + "\n" + "".join(
                f"| {f['devices']} | {f['variant']} | {f['fixed_gib']:.2f} |"
                f" {f['per_example_gib']:.2f} |"
                + "".join(f" {n} |" for n in f["examples_per_device"].values()) + "\n"
                for f in fits))
  _write(stem, {"machine": _machine(), "rows": rows, "fits": fits, "torch_run": torch_run},
         table)


DEVICE_GB = (16, 24, 40, 80)  # device memories the README's table is computed for


def _fits(rows):
  """Per (devices, variant) measured at two batches: memory = fixed + batch x per example
  (per device), and the examples per device each of DEVICE_GB holds (decimal GB)."""
  out = []
  for (devices, variant) in dict.fromkeys((r["devices"], r["variant"]) for r in rows):
    pts = sorted((r["batch"], r["total_gib"]) for r in rows
                 if r["devices"] == devices and r["variant"] == variant)
    if len(pts) < 2:
      continue
    (b0, m0), (b1, m1) = pts[0], pts[-1]
    per = (m1 - m0) / (b1 - b0)
    fixed = m0 - b0 * per
    out.append({"devices": devices, "variant": variant, "fixed_gib": fixed,
                "per_example_gib": per,
                "examples_per_device": {str(c): max(0, int((c * 1e9 / 2 ** 30 - fixed) // per))
                                        for c in DEVICE_GB}})
  return out


def _torch_run():
  """The PyTorch step's run in `peaks`' results (peak RSS, exit status), or None."""
  path = os.path.join(RESULTS, "train_peaks_cpu.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)["runs"].get("torch, 1 device, 256², batch 1")


def memory_worker(args):
  """XLA's compiled memory per device (arguments, outputs, temporaries) of the whole trainer
  step, the state donated, at each batch and variant. Compiling only; nothing runs."""
  import jax
  import jaxconsdec as jcd
  from jaxconsdec.training.step import Optimization, TrainStep
  vae = jcd.abstract_params(jcd.SD_VAE, halves=("encoder",))
  opt = Optimization()
  n = jax.device_count()
  for batch in (int(b) for b in args.batches.split(",")):
    for variant in args.variants.split(";"):
      dtype, remat, layout = MEMORY_VARIANTS[variant]
      if layout == "replicated" and n == 1:
        continue  # the same program as sharded on one device
      cfg = jcd.CONSISTENCY_DECODER.replace(dtype=dtype)
      step = TrainStep(cfg, jcd.SD_VAE, opt, seed=0, remat=remat, state_layout=layout)
      global_batch = batch * n  # `batch` examples per device
      pixels = jax.ShapeDtypeStruct((global_batch, args.size, args.size, 3), np.uint8,
                                    sharding=step.batch_sharding)
      vae_in = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=step.replicated), vae)
      levels, logits = step.tables(16)
      start = time.perf_counter()
      compiled = step.program.lower(step.state_abstract(), vae_in, pixels, np.int32(0), levels,
                                    logits).compile()
      m = compiled.memory_analysis()
      gib = lambda b: b / 2 ** 30
      print(json.dumps({
          "devices": n, "size": args.size, "batch": batch, "variant": variant,
          "arguments_gib": gib(m.argument_size_in_bytes),
          "outputs_gib": gib(m.output_size_in_bytes),
          "aliased_gib": gib(m.alias_size_in_bytes),
          "temporaries_gib": gib(m.temp_size_in_bytes),
          "total_gib": gib(m.argument_size_in_bytes + m.output_size_in_bytes
                           + m.temp_size_in_bytes - m.alias_size_in_bytes),
          "compile_s": time.perf_counter() - start}), flush=True)


# The runs of issue-style memory checks: (name, command kind, simulated devices, arguments).
PEAK_RUNS = (
    ("jaxconsdec train, 1 device, 256², batch 1", "train", 1,
     ["--resolution", "256", "--batch-size", "1"]),
    ("torch, 1 device, 256², batch 1", "torch", 1, ["--size", "256", "--batch", "1"]),
    ("jaxconsdec train, 8 devices, 64², batch 8", "train", 8,
     ["--resolution", "64", "--batch-size", "8"]),
)


def peaks(args):
  """Peak RSS of whole runs, each in its own process: `jaxconsdec train` of the released
  widths for 2 steps (random init, the tiny random VAE, as the README's smoke run; its
  evaluations included) and the same step in PyTorch on diffusers' UNet2DModel (student
  forward and backward, teacher forward, clipping, Adam, an EMA copy)."""
  import skimage.data
  from PIL import Image
  stem = args.out or os.path.join(RESULTS, "train_peaks_cpu")
  results = {}
  if args.only and os.path.exists(stem + ".json"):  # the runs not redone, as measured before
    with open(stem + ".json") as f:
      results = {name: r for name, r in json.load(f)["runs"].items()
                 if not name.startswith(args.only)}
  with tempfile.TemporaryDirectory() as work:
    photos = os.path.join(work, "photos")
    os.makedirs(photos)
    # One picture: the run's held-out evaluation (at step 0 and at the end) decodes its
    # first images, and at 256² on a CPU each takes minutes; the step is the same.
    Image.fromarray(skimage.data.astronaut()).save(os.path.join(photos, "astronaut.png"))
    for name, kind, devices, extra in PEAK_RUNS:
      if args.only and not name.startswith(args.only):
        continue
      if kind == "train":
        cmd = [sys.executable, "-m", "jaxconsdec.cli", "train", photos, "--out",
               os.path.join(work, f"run{devices}"), "--config", "released",
               "--random-vae", "tiny", "--steps", "2", "--no-progress", "--no-compile-cache",
               *extra]
      else:
        cmd = [sys.executable, __file__, "worker", "torch", "--steps", "1", "--memory",
               "default", "--ema", *extra]
      env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                 JAX_PLATFORMS="cpu")
      start = time.perf_counter()
      proc = subprocess.run([sys.executable, __file__, "peak-of", "--", *cmd], env=env,
                            capture_output=True, text=True)
      lines = proc.stdout.strip().splitlines()
      peak = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
      results[name] = {"command": " ".join(cmd[1:]), "devices": devices,
                       "exit_status": peak.get("exit_status", proc.returncode),
                       "peak_rss_gib": peak.get("peak_rss_gib"),
                       "seconds": time.perf_counter() - start,
                       "stderr_tail": proc.stderr[-1500:] if proc.returncode else ""}
      print(name, {k: v for k, v in results[name].items() if k != "stderr_tail"}, flush=True)
  table = ("| run | devices | exit status | peak RSS GiB | seconds |\n|---|---|---|---|---|\n"
           + "".join(f"| {name} | {r['devices']} | {r['exit_status']} |"
                     f" {r['peak_rss_gib'] or 0:.2f} | {r['seconds']:.0f} |\n"
                     for name, r in results.items()))
  _write(stem, {"machine": _machine(), "memory_gib": _memory_gib(), "runs": results}, table)


def peak_of(command):
  """Runs `command` and prints its exit status and peak RSS (that of its largest process)."""
  status = subprocess.run(command).returncode
  kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  print(json.dumps({"exit_status": status, "peak_rss_gib": kib / 2 ** 20}))


def _memory_gib():
  with open("/proc/meminfo") as f:
    return int(next(line for line in f if line.startswith("MemTotal")).split()[1]) / 2 ** 20


def throughput(args):
  import jax
  import jaxconsdec as jcd
  from jaxconsdec.training.step import Optimization, TrainStep
  sys.path.insert(0, HERE)
  from timing import best_seconds, matmul_peak, xla_flops
  cfg = (jcd.TINY if args.tiny else jcd.CONSISTENCY_DECODER).replace(dtype=args.dtype)
  vae_cfg = jcd.TINY_VAE if args.tiny else jcd.SD_VAE
  opt = Optimization()
  # The trainer's step as `jaxconsdec train` runs it: every device, the state sharded.
  step = TrainStep(cfg, vae_cfg, opt, seed=0, remat=args.remat, state_layout="sharded")
  state = step.first_state(jcd.random_params(cfg, 0))
  vae = step.replicate(jcd.random_params(vae_cfg, 0, halves=("encoder",)))
  pixels = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3),
                                             dtype=np.uint8)
  levels, logits = step.tables(16)
  start = time.perf_counter()
  compiled = step.program.lower(state, vae, jax.device_put(pixels, step.batch_sharding),
                                np.int32(0), levels, logits).compile()
  compile_s = time.perf_counter() - start
  flops = xla_flops(compiled)
  holder = {"state": state}

  def one():
    holder["state"], metrics = step(holder["state"], vae, pixels, 0, 16)
    jax.block_until_ready(metrics["loss"])
  seconds = best_seconds(one, args.repeats)
  stats = jax.devices()[0].memory_stats() or {}  # None on CPU
  device_peak = stats.get("peak_bytes_in_use")
  peak = matmul_peak(args.dtype)
  spec = TFLOP_PER_EXAMPLE_256 * 1e12 * (args.size / 256) ** 2 * args.batch
  result = {"machine": _machine(), "device": jax.devices()[0].device_kind,
            "backend": jax.default_backend(), "size": args.size, "batch": args.batch,
            "dtype": args.dtype, "remat": step.remat, "tiny": args.tiny,
            "seconds_per_step": seconds, "images_per_s": args.batch / seconds,
            "compile_s": compile_s, "xla_tflop": (flops or 0) / 1e12,
            "training_md_tflop": spec / 1e12, "matmul_peak_tflops": peak / 1e12,
            "mfu": (flops or spec) / seconds / peak, "devices": step.num_devices,
            "state_sharded": step.sharded,
            "device_peak_gib": device_peak / 2 ** 30 if device_peak else None}
  peak_text = f"{result['device_peak_gib']:.1f}" if device_peak else "n/a"
  table = ("| device | size | batch | dtype | remat | s/step | images/s | XLA TFLOP |"
           " TRAINING.md TFLOP | MFU | device peak GiB |\n"
           "|---|---|---|---|---|---|---|---|---|---|---|\n"
           f"| {result['device']} | {args.size}² | {args.batch} | {args.dtype} |"
           f" {'yes' if step.remat else 'no'} | {seconds:.3f} | {args.batch / seconds:.2f} |"
           f" {result['xla_tflop']:.1f} | {spec / 1e12:.1f} | {100 * result['mfu']:.0f}% |"
           f" {peak_text} |\n")
  _write(args.out or os.path.join(RESULTS, f"train_throughput_{jax.default_backend()}"), result,
         table)


def _machine():
  return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
          "python": platform.python_version()}


def _write(stem, result, table):
  os.makedirs(os.path.dirname(stem), exist_ok=True)
  with open(stem + ".json", "w") as f:
    json.dump(result, f, indent=2)
  with open(stem + ".md", "w") as f:
    f.write(table)
  print(table)


def main():
  parser = argparse.ArgumentParser()
  sub = parser.add_subparsers(dest="mode", required=True)
  sp = sub.add_parser("speed")
  sp.add_argument("--size", type=int, default=64)
  sp.add_argument("--batch", type=int, default=1)
  sp.add_argument("--rounds", type=int, default=3)
  sp.add_argument("--steps", type=int, default=3)
  sp.add_argument("--out")
  for name in ("memory", "memory-worker"):
    mem = sub.add_parser(name)
    mem.add_argument("--size", type=int, default=256)
    mem.add_argument("--batches", default="1,8", help="examples per device")
    mem.add_argument("--devices", default="1,8", help="simulated CPU device counts")
    mem.add_argument("--variants", default=";".join(MEMORY_VARIANTS),
                     help=f"';'-separated, of {list(MEMORY_VARIANTS)}")
    mem.add_argument("--out")
    if name == "memory":
      mem.add_argument("--tables-only", action="store_true",
                       help="write the tables again from the last results' rows")
  pk = sub.add_parser("peaks")
  pk.add_argument("--out")
  pk.add_argument("--only", metavar="PREFIX",
                  help="run only the runs whose name starts with PREFIX (`jaxconsdec`, `torch`,"
                       " `jaxconsdec train, 1 device`); the others are kept from the results"
                       " file")
  po = sub.add_parser("peak-of")
  po.add_argument("command", nargs=argparse.REMAINDER)
  tp = sub.add_parser("throughput")
  tp.add_argument("--size", type=int, default=256)
  tp.add_argument("--batch", type=int, default=8)
  tp.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  tp.add_argument("--remat", choices=("auto", "on", "off"), default="auto",
                  help="as `jaxconsdec train --remat` (auto: on at the released widths)")
  tp.add_argument("--tiny", action="store_true", help="tiny widths (a dry run)")
  tp.add_argument("--repeats", type=int, default=5)
  tp.add_argument("--out")
  w = sub.add_parser("worker")
  w.add_argument("name", choices=("jaxconsdec", "torch"))
  w.add_argument("--size", type=int)
  w.add_argument("--batch", type=int)
  w.add_argument("--steps", type=int)
  w.add_argument("--cache")
  w.add_argument("--ema", action="store_true", help="torch: keep an EMA copy, as the trainer")
  w.add_argument("--remat", action="store_true", help="jaxconsdec: rematerialised ResBlocks")
  w.add_argument("--memory", choices=("kept", "default"), required=True,
                 help="kept: jaxconsdec train's host-memory setting (jaxconsdec/host_memory.py)")
  args = parser.parse_args()
  if args.mode == "worker":
    times, faults, loss = (jax_worker if args.name == "jaxconsdec" else torch_worker)(args)
    print(json.dumps({"times": times, "faults": faults, "loss": loss}))
  elif args.mode == "peak-of":
    peak_of(args.command[1:] if args.command[:1] == ["--"] else args.command)
  else:
    {"speed": speed, "memory": memory, "memory-worker": memory_worker, "peaks": peaks,
     "throughput": throughput}[args.mode](args)


if __name__ == "__main__":
  main()
