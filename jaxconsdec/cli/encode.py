"""`jaxconsdec encode`: images into latent files with the SD VAE's encoder."""

from __future__ import annotations

from jaxconsdec.cli.common import (VAE_PRESETS, add_job_flags, agreed,
                                   check_job_flags, load_vae, run_job, start_job_runtime)

NAME = "encode"
HELP = ("encode PNG/JPEG images into latent files with the SD VAE's encoder, on"
        " every device of every process; re-running resumes")
SUMMARY = "images to latent files (SD VAE)"
EXAMPLES = ("jaxconsdec encode IMAGES... -o LATENTS --vae sd-vae-ckpt",
            "jaxconsdec encode photos/ -o latents --vae samples/demo/model --fit crop")


def add_arguments(p) -> None:
  p.add_argument("inputs", nargs="+", metavar="IMAGE",
                 help="PNG or JPEG files, or folders of them")
  p.add_argument("-o", "--output", required=True, help="output folder")
  p.add_argument("--vae", required=True,
                 help="checkpoint folder holding the VAE (or its encoder), a VAE weight"
                 " file (converted in memory), or a name: hf://stabilityai/sd-vae-ft-mse,"
                 " openai/consistency-decoder (its SD encoder)")
  p.add_argument("--vae-config", metavar="CONFIG",
                 help=f"architecture of a VAE weight file: {', '.join(VAE_PRESETS)} or a"
                 " JSON (default: the config.json beside a diffusers file, else sd)")
  p.add_argument("--sample", action="store_true",
                 help="a sample of the posterior (seeded per image) instead of its mean")
  p.add_argument("--fit", choices=("refuse", "crop", "pad"), default="refuse",
                 help="images whose sides do not divide by 8: refuse them, crop to the"
                 " centered multiple of 8, or pad the bottom and right edges; never resized")
  p.add_argument("--format", choices=("npy", "safetensors"), default="npy",
                 help="npy or safetensors (tensor 'latent' with the sizes in its metadata);"
                 " raw (C, h, w) float32 latents either way")
  add_job_flags(p, "images with")


def run(args) -> int:
  check_job_flags(args)  # before anything is started, read or written
  start_job_runtime(args)
  from jaxconsdec.jobs import encode_job
  from jaxconsdec.sharded import ShardedEncoder

  def load():
    loaded, identity = load_vae(args.vae, args.vae_config)
    return loaded.vae_params, loaded.vae_config, identity

  vae_params, vae_config, identity = agreed(load)
  encoder = ShardedEncoder(vae_params, config=vae_config, sample=args.sample)
  settings = encode_job.EncodeSettings(vae=identity, sample=args.sample, seed=args.seed,
                                       format=args.format, fit=args.fit)
  job = encode_job.EncodeJob(encoder, settings, max_pixels=args.max_pixels or None)
  return run_job(args, job, "encoding", "images", "encoded")
