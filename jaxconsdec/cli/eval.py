"""`jaxconsdec eval`: the SD VAE's decoder and the Consistency Decoder side by side."""

from __future__ import annotations

import os
import sys

from jaxconsdec.cli.common import (EXIT_INPUTS_FAILED, EXIT_OK, MAX_SEED, VAE_PRESETS,
                                   UsageError, add_verbose, check_seed, config_arg, load_vae,
                                   schedule_arg, weights_arg)
from jaxconsdec.inputs.listing import DEFAULT_MAX_PIXELS

NAME = "eval"
HELP = ("encode images, decode them with the SD VAE's decoder and the Consistency"
        " Decoder, and report PSNR, SSIM, time and side-by-side pictures")
SUMMARY = "compare the decoders on your pictures"
EXAMPLES = ("jaxconsdec eval IMAGES... -o REPORT --weights consdec-ckpt --vae sd-vae-ckpt",)


def add_arguments(p) -> None:
  p.add_argument("inputs", nargs="+", metavar="IMAGE", help="PNG or JPEG files, or folders")
  p.add_argument("-o", "--output", required=True, help="report folder")
  p.add_argument("--weights", required=True,
                 help="the Consistency Decoder: a checkpoint folder, a weight file or a"
                 " name (openai/consistency-decoder)")
  p.add_argument("--config", help="architecture of a decoder weight file, as for convert")
  p.add_argument("--embedding", help="time-embedding table for the raw safetensors layout")
  p.add_argument("--vae", help="the SD VAE: a checkpoint folder, a weight file or a name"
                 " (default: the VAE the --weights checkpoint holds, if any)")
  p.add_argument("--vae-config", metavar="CONFIG",
                 help=f"architecture of a VAE weight file: {', '.join(VAE_PRESETS)} or a JSON")
  p.add_argument("--schedules", nargs="+", default=["1.0", "1.0,0.5"], metavar="SCHEDULE",
                 help="Consistency Decoder schedules to compare (default: 1.0 and 1.0,0.5,"
                 " i.e. 1 and 2 steps)")
  p.add_argument("--seed", type=int, default=0, help=f"base seed of the noise, 0 to {MAX_SEED}")
  p.add_argument("--fit", choices=("refuse", "crop", "pad"), default="refuse",
                 help="images whose sides do not divide by 8, as for encode")
  p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                 help="refuse images with more than N pixels (default 2048x2048; 0: no limit)")
  add_verbose(p)
  p.set_defaults(random_weights=None)


def run(args) -> int:
  check_seed(args.seed)
  if args.max_pixels < 0:
    raise UsageError(f"--max-pixels must be positive (or 0 for no limit), got {args.max_pixels}")
  schedules = [schedule_arg(s) for s in args.schedules]
  from jaxconsdec.jobs import evaluate
  evaluate.check_out_dir(args.output)  # before the weights are read

  params, config, _ = weights_arg(args)
  # Without --vae, the decoder's checkpoint may carry one (a ConsistencyDecoderVAE's encoder).
  from jaxconsdec import loading
  vae, _ = load_vae(args.vae or loading.local(args.weights, config=config_arg(args.config)),
                    args.vae_config)
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
