"""`jaxconsdec decode`: files of latents into images, on every device of every process."""

from __future__ import annotations

from jaxconsdec.cli.common import (PRESETS, add_job_flags, agreed,
                                   check_job_flags, run_job, schedule_arg, start_job_runtime,
                                   weights_arg)

NAME = "decode"
HELP = ("decode latent files into images on every device of every process;"
        " re-running resumes")
SUMMARY = "decode files of latents"
EXAMPLES = ("jaxconsdec decode LATENTS... -o OUT --weights consdec-ckpt",
            "jaxconsdec decode samples/latents -o decoded --weights samples/demo/model")


def add_arguments(p) -> None:
  p.add_argument("inputs", nargs="+", metavar="INPUT",
                 help=".npy, .npz or .safetensors files, or folders of them")
  p.add_argument("-o", "--output", required=True, help="output folder")
  weights = p.add_mutually_exclusive_group()
  weights.add_argument("--weights", help="checkpoint folder from `jaxconsdec convert`, a"
                       " training run folder, decoder.pt / a *.safetensors weight file"
                       " (converted in memory), or a name: openai/consistency-decoder,"
                       " hf://ORG/REPO[/FOLDER][@REV], openai:decoder.pt (fetched and"
                       " converted once)")
  weights.add_argument("--random-weights", choices=PRESETS,
                       help="RANDOMLY INITIALISED model of this size: a smoke test only")
  p.add_argument("--config",
                 help="architecture of a PyTorch weight file, as for convert (default: the"
                 " config.json beside a diffusers file, else released)")
  p.add_argument("--embedding", help="time-embedding table for the raw safetensors layout")
  p.add_argument("--schedule", default="1.0,0.5", help="comma-separated values in [0, 1]")
  p.add_argument("--layout", choices=("NCHW", "NHWC"), default="NCHW",
                 help="layout of the latents (and of --format npy outputs)")
  p.add_argument("--scaled-latents", action="store_true",
                 help="inputs are pipeline latents (raw * 0.18215): divide before decoding")
  p.add_argument("--format", choices=("png", "npy"), default="png",
                 help="png (uint8) or npy (float32 in [-1, 1])")
  add_job_flags(p, "latents whose image has")


def run(args) -> int:
  schedule = schedule_arg(args.schedule)
  check_job_flags(args)  # before anything is started, read or written
  start_job_runtime(args)
  from jaxconsdec.jobs import decode_job
  from jaxconsdec.sharded import ShardedDecoder

  params, config, identity = agreed(lambda: weights_arg(args))
  decoder = ShardedDecoder(params, config=config, schedule=schedule, layout=args.layout)
  settings = decode_job.JobSettings(weights=identity, seed=args.seed, schedule=schedule,
                                    scaled_latents=args.scaled_latents, format=args.format,
                                    layout=args.layout)
  job = decode_job.DecodeJob(decoder, settings, max_pixels=args.max_pixels or None)
  return run_job(args, job, "decoding", "latents", "decoded")
