"""`jaxconsdec convert`: published PyTorch weights into a jaxconsdec checkpoint, torch-free."""

from __future__ import annotations

import sys

from jaxconsdec.cli.common import (EXIT_OK, VAE_PRESETS, UsageError, add_verbose,
                                   config_arg, ctrl_c_requests_stop, describe_config,
                                   describe_vae, vae_config_arg)

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
  from jaxconsdec import __version__, checkpoint
  from jaxconsdec.convert import PARTS, layout_of, read_vae_weights, read_weights
  from jaxconsdec.weights import params_from_torch

  # Everything that can be wrong with the command is found before the slow reading.
  if checkpoint.check_replaceable(args.output) and not args.force:
    raise UsageError(f"{args.output} exists; pass --force to replace it")
  explicit, vae_explicit = config_arg(args.config), vae_config_arg(args.vae_config)
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
    print(f"decoder: {describe_config(config)}")
    params = params_from_torch(weights.unet, config)
  vae_config = None
  if vae is not None:
    vae_config = vae.config.replace(param_dtype=args.dtype)
    print(f"VAE ({' and '.join(vae.halves)}): {describe_vae(vae_config)}")
    vae_params = params_from_torch(vae.tensors, vae_config, vae.halves)
  provenance = {"sources": [s.to_json() for s in sources],
                "converter": f"jaxconsdec {__version__}", "param_dtype": args.dtype}
  stop = ctrl_c_requests_stop("stopping: the partial checkpoint is removed once the file"
                              " being written is closed")
  checkpoint.save(args.output, params, config, provenance, vae_params=vae_params,
                  vae_config=vae_config, vae_halves=vae.halves if vae else (),
                  force=args.force, should_stop=stop.is_set)
  if stop.is_set():
    print("Ctrl-C came as the checkpoint was being completed: it is complete and kept",
          file=sys.stderr)
  print(f"wrote {args.output}: {checkpoint.describe(args.output)}")
  return EXIT_OK
