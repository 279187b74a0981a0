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
  schedule = tuple(float(s) for s in args.schedule.split(","))
  jcd.timesteps_for(schedule)  # validate before the slow parts

  print(f"WARNING: no weights are loaded. The '{args.model}' UNet "
        f"({jcd.param_count(config):,} parameters) is RANDOMLY INITIALISED, so the image is "
        "noise-like, not a decoded picture. This command shows the pipeline runs end to end.")
  h = args.size // 8
  # Sample latents: a smooth random field at the scale of raw SD latents (std ~ 1/0.18215).
  latents = jax.random.normal(jax.random.key(args.seed + 1), (1, 4, h, h)) / jcd.sampler.LATENT_SCALE
  start = time.perf_counter()
  params = jcd.UNet(config).init(jax.random.key(args.seed), jnp.zeros((1, 8, 8, config.in_channels)),
                                 jnp.zeros((1,), jnp.int32))["params"]
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
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    return args.run(args)
  except (ValueError, TypeError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted; nothing was written", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
