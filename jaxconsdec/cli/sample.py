"""`jaxconsdec sample`: a smoke test, decoding random latents with RANDOM weights."""

from __future__ import annotations

import os
import time

from jaxconsdec.cli.common import (EXIT_OK, MAX_SEED, PRESETS, UsageError,
                                   add_verbose, check_seed, config_arg, schedule_arg)

NAME = "sample"
HELP = ("decode sample latents with RANDOM weights and write a PNG (smoke test)")
SUMMARY = "smoke test with random weights"
EXAMPLES = ("jaxconsdec sample -o sample.png",)


def add_arguments(p) -> None:
  p.add_argument("-o", "--output", default="sample.png", help="PNG path")
  p.add_argument("--model", choices=PRESETS, default="tiny",
                 help="architecture: the released 621M UNet or the tiny test one")
  p.add_argument("--size", type=int, default=128, help="image side in pixels, multiple of 8")
  p.add_argument("--schedule", default="1.0,0.5", help="comma-separated values in [0, 1]")
  p.add_argument("--seed", type=int, default=0, help=f"0 to {MAX_SEED}")
  add_verbose(p)


def run(args) -> int:
  if args.size <= 0 or args.size % 8:
    raise UsageError(f"--size must be a positive multiple of 8, got {args.size}")
  check_seed(args.seed)
  config = config_arg(args.model)
  out_dir = os.path.dirname(os.path.abspath(args.output))
  if not os.path.isdir(out_dir):
    raise UsageError(f"output folder {out_dir} does not exist")
  schedule = schedule_arg(args.schedule)  # validate before the slow parts
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
