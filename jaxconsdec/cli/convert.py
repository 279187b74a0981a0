"""`jaxconsdec convert`: published PyTorch weights into a jaxconsdec checkpoint, torch-free."""

from __future__ import annotations

import sys

from jaxconsdec.cli.common import (EXIT_OK, VAE_PRESETS, UsageError, add_verbose,
                                   config_arg, ctrl_c_requests_stop, vae_config_arg)

NAME = "convert"
HELP = ("convert published PyTorch weights (decoder.pt or safetensors) into a"
        " jaxconsdec checkpoint; needs no torch")
SUMMARY = "convert the published weights once"
EXAMPLES = ("jaxconsdec convert decoder.pt -o consdec-ckpt",
            "jaxconsdec convert vae/diffusion_pytorch_model.safetensors -o sd-vae-ckpt")


def add_arguments(p) -> None:
  p.add_argument("sources", nargs="+", metavar="SRC",
                 help="weight file; for the raw layout, the embedding file may follow")
  p.add_argument("-o", "--output", required=True, help="checkpoint folder to create")
  p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                 help="dtype the params are stored in")
  p.add_argument("--embedding", help="safetensors file holding the time-embedding table")
  p.add_argument("--config",
                 help="architecture: released, tiny, a jaxconsdec UNetConfig JSON or a"
                 " diffusers config.json (default: the config.json beside a diffusers"
                 " file, else released)")
  p.add_argument("--vae-config", metavar="CONFIG",
                 help=f"architecture of an SD VAE file: {', '.join(VAE_PRESETS)}, a"
                 " jaxconsdec VAEConfig JSON or a diffusers config.json (default: the"
                 " config.json beside a diffusers file, else sd)")
  p.add_argument("--force", action="store_true",
                 help="replace an existing checkpoint at OUT (nothing else is replaced)")
  add_verbose(p)


def run(args) -> int:
  from jaxconsdec import checkpoint
  from jaxconsdec.conversion import convert_files

  # Everything that can be wrong with the command is found before the slow reading.
  if checkpoint.check_replaceable(args.output) and not args.force:
    raise UsageError(f"{args.output} exists; pass --force to replace it")
  config, vae_config = config_arg(args.config), vae_config_arg(args.vae_config)
  stop = ctrl_c_requests_stop("stopping: the partial checkpoint is removed once the file"
                              " being written is closed")
  convert_files(args.sources, args.output, dtype=args.dtype, config=config,
                vae_config=vae_config, embedding=args.embedding, force=args.force,
                should_stop=stop.is_set, say=print)
  if stop.is_set():
    print("Ctrl-C came as the checkpoint was being completed: it is complete and kept",
          file=sys.stderr)
  print(f"wrote {args.output}: {checkpoint.describe(args.output)}")
  return EXIT_OK
