"""`jaxconsdec parity`: jaxconsdec against diffusers (PyTorch) on the user's weights, device
and dtypes; what is measured is in `jaxconsdec.parity`."""

from __future__ import annotations

import json
import os
import sys
import tempfile

from jaxconsdec import __version__
from jaxconsdec.cli.common import (EXIT_INPUTS_FAILED, EXIT_OK, MAX_SEED, VAE_PRESETS,
                                   UsageError, add_verbose, check_seed, config_arg, load_vae)

NAME = "parity"
HELP = ("run diffusers' ConsistencyDecoderVAE (PyTorch) and jaxconsdec on the same weights,"
        " latents and noise; report each block's and the decode's relative error, and times")
SUMMARY = "measure jaxconsdec against diffusers on your weights and device"
EXAMPLES = ("jaxconsdec parity openai/consistency-decoder --out parity",
            "jaxconsdec parity decoder.pt --images a.png b.jpg --vae stabilityai/sd-vae-ft-mse",
            "jaxconsdec parity DIFFUSERS_FOLDER --dtype float32 --size 512 --batch 4")
NOTE = ("Needs the optional dependencies: pip install 'jaxconsdec[parity]'. Exit status 1:"
        " an error above its bound (float32: 1e-5 per block, 1e-4 end to end; bf16/fp16:"
        " 3e-2 end to end).")
DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(p) -> None:
  p.add_argument("weights", nargs="+", metavar="WEIGHTS",
                 help="a PyTorch weight file or a diffusers folder, in any layout `convert`"
                 " reads (for the raw layout, then its embedding file), or a name"
                 " (openai/consistency-decoder)")
  p.add_argument("--config", help="architecture of a decoder weight file, as for convert")
  p.add_argument("--images", nargs="+", metavar="IMAGE",
                 help="PNG or JPEG files encoded by the SD VAE into the latents both sides"
                 " decode (each center-cropped to a square and resized to --size); default:"
                 " seeded random latents")
  p.add_argument("--vae", help="the SD VAE for --images: a checkpoint folder, a weight file or"
                 " a name (default: the VAE the weights hold, if any)")
  p.add_argument("--vae-config", metavar="CONFIG",
                 help=f"architecture of a VAE weight file: {', '.join(VAE_PRESETS)} or a JSON")
  p.add_argument("--dtype", default="float32,bfloat16",
                 help=f"comma-separated compute dtypes among {', '.join(DTYPES)}; diffusers"
                 " in float32 is the reference of each")
  p.add_argument("--size", type=int, default=256, help="image side in pixels, multiple of 8")
  p.add_argument("--batch", type=int, default=1, help="images per decode")
  p.add_argument("--seed", type=int, default=0,
                 help=f"seed of the noise (and of random latents), 0 to {MAX_SEED}")
  p.add_argument("--jax-device", help="JAX platform to run on: cpu, gpu, tpu (default: JAX's"
                 " default device)")
  p.add_argument("--torch-device", help="torch device: cpu, cuda, cuda:1 ... (default: cuda"
                 " where torch sees one, else cpu)")
  p.add_argument("--repeats", type=int, default=2,
                 help="timed decodes per side after the first (default 2; the median is"
                 " reported)")
  p.add_argument("--out", default="parity", metavar="PATH",
                 help="writes PATH.json and PATH.md (default: parity.json, parity.md)")
  add_verbose(p)


def _check(args) -> list[str]:
  dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
  unknown = [d for d in dtypes if d not in DTYPES]
  if not dtypes or unknown:
    raise UsageError(f"--dtype {args.dtype}: give a comma-separated list of {', '.join(DTYPES)}")
  if args.size <= 0 or args.size % 8:
    raise UsageError(f"--size must be a positive multiple of 8, got {args.size}")
  if args.batch <= 0 or args.repeats < 0:
    raise UsageError("--batch must be positive and --repeats at least 0")
  check_seed(args.seed)
  out_dir = os.path.dirname(os.path.abspath(args.out))
  if not os.path.isdir(out_dir):
    raise UsageError(f"--out {args.out}: the folder {out_dir} does not exist")
  if len(args.weights) > 2:
    raise UsageError("give one weight file or folder (and, for the raw layout, its embedding"
                     " file)")
  return list(dict.fromkeys(dtypes))


def _sources(weights: list[str], folder: str) -> list[str]:
  """The PyTorch files both sides read: a name fetched (Hub files stay in the Hub's cache),
  a diffusers folder as its weight file."""
  from jaxconsdec import loading, named_weights
  if len(weights) == 1 and loading.is_name(weights[0]):
    return named_weights.fetch(named_weights.parse(weights[0]), folder,
                               progress=sys.stderr.isatty(), say=print)
  for path in weights:
    if not os.path.exists(path):
      raise UsageError(f"{path}: no such file or folder. Pass a PyTorch weight file, a"
                       " diffusers folder or a name (openai/consistency-decoder)")
  if len(weights) == 1 and os.path.isdir(weights[0]):
    for name in named_weights.DIFFUSERS_FILES:
      if os.path.isfile(os.path.join(weights[0], name)):
        return [os.path.join(weights[0], name)]
    raise UsageError(f"{weights[0]} is a folder without a diffusers weight file"
                     f" ({' or '.join(named_weights.DIFFUSERS_FILES)}). parity needs the"
                     " PyTorch weights (a jaxconsdec checkpoint has no PyTorch side): give"
                     " the file it was converted from")
  return list(weights)


def _latents(args, loaded, rng):
  """Raw SD latents (B, 4, h, w): the images through the VAE's encoder, or random ones at
  raw SD latents' scale."""
  import numpy as np
  h = args.size // 8
  if not args.images:
    return (rng.standard_normal((args.batch, 4, h, h)) / loaded.config.scaling_factor).astype(
        np.float32), f"random (seed {args.seed})"
  import jaxconsdec as jcd
  vae = loaded if args.vae is None else load_vae(args.vae, args.vae_config)[0]
  if vae.vae_params is None or "encoder" not in vae.vae_halves:
    raise UsageError("--images needs an SD VAE encoder: pass --vae (the weights hold none)")
  pixels = np.stack([_square(path, args.size) for path in args.images])
  latents = jcd.encode(vae.vae_params, pixels, config=vae.vae_config, layout="NHWC")
  latents = np.asarray(latents, np.float32).transpose(0, 3, 1, 2)
  return latents, f"{len(args.images)} image(s) through the SD VAE's encoder (posterior mean)"


def _square(path: str, size: int):
  import numpy as np
  from PIL import Image
  try:
    with Image.open(path) as image:
      image = image.convert("RGB")
  except (OSError, ValueError) as e:
    raise UsageError(f"--images {path}: cannot read it as an image ({e})") from None
  side = min(image.size)
  left, top = (image.width - side) // 2, (image.height - side) // 2
  image = image.crop((left, top, left + side, top + side)).resize((size, size),
                                                                  Image.Resampling.BICUBIC)
  return np.asarray(image, np.uint8)


def run(args) -> int:
  dtypes = _check(args)
  from jaxconsdec import loading, parity
  torch, diffusers = parity.import_reference()
  import jax
  import numpy as np

  torch_device = args.torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
  jax_device = None
  if args.jax_device:
    try:
      jax_device = jax.devices(args.jax_device)[0]
    except RuntimeError as e:
      raise UsageError(f"--jax-device {args.jax_device}: {str(e).splitlines()[0]}") from None
  config = config_arg(args.config)
  with tempfile.TemporaryDirectory() as downloads:
    sources = _sources(args.weights, downloads)
    loaded = loading.load(sources, config=config)
    if loaded.params is None:
      raise UsageError(f"{args.weights[0]} holds no Consistency Decoder ({loaded!r})")
    parity.check_comparable(loaded.config)
    vae, how = parity.reference_model(sources, loaded.config, torch_device)
  rng = np.random.default_rng(args.seed)
  latents, described = _latents(args, loaded, rng)
  shape = (latents.shape[0], 3, latents.shape[2] * 8, latents.shape[3] * 8)
  noises = [rng.standard_normal(shape).astype(np.float32) for _ in parity.SCHEDULE]
  report = parity.compare(loaded.params, loaded.config, vae, latents, noises, dtypes=dtypes,
                          jax_device=jax_device, torch_device=torch_device,
                          repeats=args.repeats, say=lambda line: print(line, file=sys.stderr))
  report = {"weights": " ".join(args.weights), "torch_weights": how, "latents": described,
            "latent_shape": list(latents.shape), "schedule": list(parity.SCHEDULE),
            "versions": {"jaxconsdec": __version__,
                         "jax": jax.__version__, "torch": torch.__version__,
                         "diffusers": diffusers.__version__},
            **report}
  from jaxconsdec.files import write_atomic
  table = parity.markdown(report)
  write_atomic(args.out + ".json", json.dumps(report, indent=2).encode())
  write_atomic(args.out + ".md", table.encode())
  print(table, end="")
  print(f"wrote {args.out}.json and {args.out}.md", file=sys.stderr)
  if not report["passed"]:
    bad = [f"{r['dtype']} {r['part']} ({r['jaxconsdec']:.2e} > {r['bound']:.0e})"
           for r in report["rows"] if not r["within"]]
    print(f"above the bound: {', '.join(bad)}", file=sys.stderr)
    return EXIT_INPUTS_FAILED
  return EXIT_OK
