"""The `jaxconsdec` command line. Parses flags and calls the library; nothing else."""

from __future__ import annotations

import argparse
import os
import sys
import time

PRESETS = ("released", "tiny")


def _sample(args: argparse.Namespace) -> int:
  import jax
  import jax.numpy as jnp

  import jaxconsdec as jcd

  if args.size <= 0 or args.size % 8:
    print(f"error: --size must be a positive multiple of 8, got {args.size}", file=sys.stderr)
    return 2
  config = _config_arg(args.model)
  out_dir = os.path.dirname(os.path.abspath(args.output))
  if not os.path.isdir(out_dir):
    print(f"error: output folder {out_dir} does not exist", file=sys.stderr)
    return 2
  schedule = _schedule_arg(args.schedule)  # validate before the slow parts

  print(f"WARNING: no weights are loaded. The '{args.model}' UNet "
        f"({jcd.param_count(config):,} parameters) is RANDOMLY INITIALISED, so the image is "
        "noise-like, not a decoded picture. This command shows the pipeline runs end to end.")
  h = args.size // 8
  # Sample latents: a smooth random field at the scale of raw SD latents (std ~ 1/0.18215).
  latents = jax.random.normal(jax.random.key(args.seed + 1), (1, 4, h, h)) / jcd.sampler.LATENT_SCALE
  start = time.perf_counter()
  params = jcd.random_params(config, seed=args.seed)
  images = jcd.decode(params, latents, args.seed, config=config, schedule=schedule)
  images.block_until_ready()
  jcd.save_png(args.output, jnp.transpose(images[0], (1, 2, 0)))
  print(f"wrote {args.output}: {args.size}x{args.size}, {len(schedule)} step(s), "
        f"{time.perf_counter() - start:.1f} s including initialisation and compilation")
  return 0


def _config_arg(value: str):
  import jaxconsdec as jcd
  if value in ("released", "tiny"):
    return {"released": jcd.CONSISTENCY_DECODER, "tiny": jcd.TINY}[value]
  with open(value) as f:
    return jcd.UNetConfig.from_json(f.read())


def _convert(args: argparse.Namespace) -> int:
  import jax

  from jaxconsdec import __version__, checkpoint
  from jaxconsdec.convert import read_weights
  from jaxconsdec.weights import params_from_torch, param_count

  if os.path.exists(args.output) and not args.force:
    print(f"error: {args.output} exists; pass --force to replace it", file=sys.stderr)
    return 2
  config = _config_arg(args.config).replace(param_dtype=args.dtype)
  weights = read_weights(args.sources, config, args.embedding)
  for src in weights.sources:
    print(f"found {src.path}: format {src.format}, {src.tensor_count} tensors,"
          f" dtype {'/'.join(src.dtypes)}, {src.size:,} bytes")
  params = params_from_torch(weights.unet, config)
  extras = None
  if len(weights.extras):
    extras = {}
    for name in weights.extras:  # nested by name parts: Orbax keys are path components
      node = extras
      *parents, leaf = name.split(".")
      for part in parents:
        node = node.setdefault(part, {})
      node[leaf] = jax.numpy.asarray(weights.extras[name])  # jax leaves: see checkpoint._save_tree
  provenance = {"sources": [s.to_json() for s in weights.sources],
                "converter": f"jaxconsdec {__version__}", "param_dtype": args.dtype}
  checkpoint.save(args.output, params, config, provenance, extras, force=args.force)
  extra_note = f" and {len(weights.extras)} extra tensors (SD VAE encoder)" if extras else ""
  print(f"wrote {args.output}: {param_count(config):,} parameters in {args.dtype}{extra_note}")
  return 0


def _decode(args: argparse.Namespace) -> int:
  # Order matters: the distributed runtime and the compilation cache are configured before
  # anything touches a JAX backend.
  _start_distributed(args)
  _configure_compile_cache(args)
  import jax

  from jaxconsdec import batch
  from jaxconsdec.sharded import ShardedDecoder

  schedule = _schedule_arg(args.schedule)
  if args.batch_size <= 0:
    raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
  params, config, identity = _weights_arg(args)  # fails here, before any work, if wrong
  lead = jax.process_index() == 0
  decoder = ShardedDecoder(params, config=config, schedule=schedule, layout=args.layout)
  if lead:
    print(f"decoding on {jax.device_count()} device(s) in {jax.process_count()} process(es),"
          f" global batch {decoder.global_batch(args.batch_size)}", file=sys.stderr)
  settings = batch.JobSettings(weights=identity, seed=args.seed, schedule=schedule,
                               scaled_latents=args.scaled_latents, format=args.format,
                               layout=args.layout)
  report = batch.run_job(decoder, args.inputs, args.output, settings,
                         batch_size=args.batch_size, strict=args.strict,
                         progress=not args.no_progress)
  if lead:
    _print_report(report, args.output)
  return 1 if report.failures else 0


def _start_distributed(args) -> None:
  explicit = (args.coordinator, args.num_processes, args.process_id)
  if not args.distributed and all(v is None for v in explicit):
    return
  import jax
  if any(v is None for v in explicit) and not all(v is None for v in explicit):
    raise ValueError("give all of --coordinator, --num-processes and --process-id, or use"
                     " --distributed to detect them (TPU pods, SLURM)")
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
  except ValueError:
    raise ValueError(f"--schedule takes comma-separated numbers in [0, 1], got {value!r}")
  jcd.timesteps_for(schedule)  # validates
  return schedule


def _weights_arg(args):
  """-> (params, config, identity string recorded with the job's outputs)."""
  import hashlib

  import jaxconsdec as jcd
  if args.random_weights:
    config = _config_arg(args.random_weights)
    print(f"WARNING: --random-weights: the {args.random_weights} UNet is RANDOMLY INITIALISED."
          " The images are noise-like, not decoded pictures; this only shows the job runs."
          " Pass --weights with converted weights for real images.", file=sys.stderr)
    return jcd.random_params(config, seed=0), config, f"random-init:{args.random_weights}"
  if not args.weights:
    raise ValueError("no weights: pass --weights CKPT (a folder made by `jaxconsdec convert`,"
                     " or decoder.pt / a *.safetensors file), or --random-weights tiny for a"
                     " smoke test")
  if not os.path.exists(args.weights):
    raise ValueError(f"--weights {args.weights}: no such file or folder. Pass a checkpoint"
                     " folder made by `jaxconsdec convert`, or the PyTorch weight file itself")
  params, config = jcd.load(args.weights, config=_config_arg(args.config),
                            embedding=args.embedding)
  if os.path.isdir(args.weights):
    with open(os.path.join(args.weights, "jaxconsdec.json"), "rb") as f:
      identity = "checkpoint:" + hashlib.sha256(f.read()).hexdigest()[:16]
  else:
    identity = f"file:{os.path.basename(args.weights)}:{os.path.getsize(args.weights)}"
  return params, config, identity


def _print_report(report, out_dir: str) -> None:
  print(f"{report.total} latents: {report.done_before} already done, {report.decoded} decoded"
        f" now, {len(report.failures)} failed ({report.seconds:.1f} s)", file=sys.stderr)
  if report.stopped:
    print("stopped at the first bad input (--strict)", file=sys.stderr)
  for failure in report.failures[:20]:
    print(f"  FAILED {failure.input}: {failure.reason}", file=sys.stderr)
  if len(report.failures) > 20:
    print(f"  ... {len(report.failures) - 20} more", file=sys.stderr)
  if report.failures:
    print(f"the list is in {os.path.join(out_dir, 'failures.json')}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jaxconsdec", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  sample = sub.add_parser(
      "sample", help="decode sample latents with RANDOM weights and write a PNG (smoke test)")
  sample.add_argument("-o", "--output", default="sample.png", help="PNG path (default sample.png)")
  sample.add_argument("--model", choices=PRESETS, default="tiny",
                      help="architecture: the released 621M UNet or the tiny test one")
  sample.add_argument("--size", type=int, default=128, help="image side in pixels, multiple of 8")
  sample.add_argument("--schedule", default="1.0,0.5", help="comma-separated values in [0, 1]")
  sample.add_argument("--seed", type=int, default=0)
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
  convert.add_argument("--config", default="released",
                       help="architecture: released (default), tiny, or a UNetConfig JSON file")
  convert.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
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
  dec.add_argument("--config", default="released",
                   help="architecture of a PyTorch weight file: released (default), tiny, JSON")
  dec.add_argument("--embedding", help="time-embedding table for the raw safetensors layout")
  dec.add_argument("--batch-size", type=int, default=8,
                   help="global batch per step, rounded up to a multiple of the device count")
  dec.add_argument("--schedule", default="1.0,0.5", help="comma-separated values in [0, 1]")
  dec.add_argument("--seed", type=int, default=0, help="base seed of the noise")
  dec.add_argument("--layout", choices=("NCHW", "NHWC"), default="NCHW",
                   help="layout of the latents (and of --format npy outputs)")
  dec.add_argument("--scaled-latents", action="store_true",
                   help="inputs are pipeline latents (raw * 0.18215): divide before decoding")
  dec.add_argument("--format", choices=("png", "npy"), default="png",
                   help="png (uint8) or npy (float32 in [-1, 1])")
  dec.add_argument("--strict", action="store_true", help="stop at the first bad input")
  dec.add_argument("--no-progress", action="store_true", help="no progress bar")
  dec.add_argument("--compile-cache", metavar="DIR",
                   help="persistent XLA compilation cache (default ~/.cache/jaxconsdec/xla)")
  dec.add_argument("--no-compile-cache", action="store_true")
  dist = dec.add_argument_group("multi-host (one process per host, same command everywhere)")
  dist.add_argument("--distributed", action="store_true",
                    help="jax.distributed.initialize() with auto-detection (TPU pods, SLURM)")
  dist.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
  dist.add_argument("--num-processes", type=int)
  dist.add_argument("--process-id", type=int)
  dec.set_defaults(run=_decode)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    return args.run(args)
  except (ValueError, TypeError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted; no file was left half-written", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
