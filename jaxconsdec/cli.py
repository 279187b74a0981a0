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

  config = {"released": jcd.CONSISTENCY_DECODER, "tiny": jcd.TINY}[args.model]
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
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if getattr(args, "size", 8) % 8 or getattr(args, "size", 8) <= 0:
    print(f"error: --size must be a positive multiple of 8, got {args.size}", file=sys.stderr)
    return 2
  try:
    return args.run(args)
  except (ValueError, TypeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
