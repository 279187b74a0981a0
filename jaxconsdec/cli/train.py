"""`jaxconsdec train`: consistency-train a decoder (fine-tune one, or a new one from scratch)."""

from __future__ import annotations

import argparse
import signal
import sys

from jaxconsdec.cli.common import (EXIT_DIVERGED, EXIT_INPUTS_FAILED, EXIT_INTERRUPTED, EXIT_OK,
                                   VAE_PRESETS,
                                   UsageError, add_job_flags, agreed, check_job_flags,
                                   config_arg, ctrl_c_requests_stop, load_vae,
                                   start_job_runtime, vae_config_arg, weights_arg)

NAME = "train"
HELP = ("consistency-train a decoder on images: fine-tune one (--init) or train"
        " one for a VAE's latents from scratch (--config)")
SUMMARY = "fine-tune a decoder, or train one"
EXAMPLES = ("jaxconsdec train PHOTOS/ --out run --init consdec-ckpt --vae sd-vae-ckpt"
            " --steps 20000",
            "jaxconsdec train PHOTOS/ --out flux-run --config released --vae flux-vae-ckpt"
            " --steps 200000 --bf16")
NOTE = "The recipe, its defaults and its sources: docs/training.md in the repository."
MAX_WARMUP = 1000  # the recipe's warm-up; shorter runs warm up over their first tenth


def default_warmup(steps: int) -> int:
  return min(MAX_WARMUP, steps // 10)


def add_arguments(p) -> None:
  p.add_argument("inputs", nargs="+", metavar="IMAGE", help="PNG or JPEG files, or folders")
  p.add_argument("--out", dest="output", required=True, metavar="RUN_DIR",
                 help="the run folder (the same command on it again resumes the run)")
  p.add_argument("--steps", type=int, required=True, help="optimiser steps in all")
  p.add_argument("--resolution", type=int, default=256,
                 help="side of the random square crops (a multiple of 8)")
  p.add_argument("--init", metavar="CKPT", help="fine-tune these decoder weights (a"
                 " checkpoint, a weight file, a finished run's folder or a name such as"
                 " openai/consistency-decoder)")
  p.add_argument("--config", metavar="released|tiny|FILE",
                 help="train a new decoder of this architecture from scratch")
  p.add_argument("--vae", metavar="CKPT", help="the frozen VAE whose latents are decoded (a"
                 " checkpoint, a weight file or a name such as hf://stabilityai/sd-vae-ft-mse)")
  p.add_argument("--vae-config", metavar="CONFIG",
                 help=f"architecture of a VAE weight file: {', '.join(VAE_PRESETS)} or a JSON")
  p.add_argument("--random-vae", metavar="CONFIG",
                 help="a randomly initialised VAE of this architecture instead (tests and"
                 f" demos): {', '.join(VAE_PRESETS)} or a JSON")
  p.add_argument("--eval-images", nargs="+", metavar="IMAGE",
                 help="held-out images for the PSNR and sample grids (default: the first"
                 " training images)")
  opt = p.add_argument_group("optimisation (the recipe: docs/training.md)")
  opt.add_argument("--lr", type=float, help="Adam learning rate (default 1e-5 with --init,"
                   " 1e-4 from scratch)")
  opt.add_argument("--warmup", type=int, help="linear warm-up steps (default"
                   f" {MAX_WARMUP}, or a tenth of --steps when that is shorter)")
  opt.add_argument("--adam-b1", type=float, default=0.9, help="Adam's first-moment decay")
  opt.add_argument("--adam-b2", type=float, default=0.99, help="Adam's second-moment decay")
  opt.add_argument("--adam-eps", type=float, default=1e-8, help="Adam's epsilon")
  opt.add_argument("--clip-norm", type=float, default=1.0, help="global gradient-norm clip")
  opt.add_argument("--ema-decay", type=float, default=0.9999,
                   help="EMA of the exported weights, warmed up as min(d, (1+n)/(10+n))")
  opt.add_argument("--curriculum", metavar="DELTAS",
                   help="grid spacings in table steps, in equal shares of the run (default 16"
                   " with --init or --objective denoising; 64,32,16,8,4 from scratch)")
  opt.add_argument("--objective", choices=("consistency", "denoising"), default="consistency",
                   help="consistency training, or denoising pre-training: stage 1 of a new"
                   " decoder, whose result a consistency run then takes as --init")
  opt.add_argument("--noise-law", metavar="MEAN,STD",
                   help="the lognormal over sigma from which pairs (or, for denoising, levels)"
                   " are drawn: mean and std of ln sigma (default -1.1,2.0, iCT's; the demo"
                   " uses 1.0,2.0, docs/training.md)")
  opt.add_argument("--pair-weighting", choices=("ict", "uniform"), default="ict",
                   help="weight of a pair's distance: 1/(sigma_hi - sigma_lo) (iCT's), or 1"
                   " (CM's), which gives the top levels, where a decoder samples, more of"
                   " the gradient")
  opt.add_argument("--anchor-share", type=float, default=0.0, metavar="Q",
                   help="share of examples whose teacher is the clean image at any level (0:"
                   " only the boundary pair's; the demo uses 0.5, docs/training.md)")
  opt.add_argument("--dropout", type=float, default=0.0, help="ResBlock dropout (from scratch)")
  opt.add_argument("--bf16", action="store_true",
                   help="bfloat16 compute, float32 master weights and loss")
  opt.add_argument("--remat", action=argparse.BooleanOptionalAction,
                   help="recompute ResBlock activations in the backward pass instead of keeping"
                   " them (less memory, more compute); by default on at the released widths,"
                   " where a 256x256 step's activations would not fit in 24 GB otherwise")
  opt.add_argument("--state-layout", choices=("auto", "sharded", "replicated"), default="auto",
                   help="params, Adam state and EMA split over the devices (ZeRO/FSDP), or a"
                   " copy on each; auto: split where a copy exceeds 1 GiB (the released"
                   " widths). A run resumes under either, on any device count")
  opt.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
  out = p.add_argument_group("checkpoints and metrics")
  out.add_argument("--save-every", type=int, default=500,
                   help="checkpoint every N steps (and always at the end or a stop)")
  out.add_argument("--keep", type=int, default=3, help="checkpoints kept")
  out.add_argument("--eval-every", type=int, default=500,
                   help="held-out PSNR and sample grid every N steps (and at the end)")
  out.add_argument("--log-every", type=int, default=10, help="a metrics line every N steps")
  add_job_flags(p, "images with")


def _curriculum(value: str | None):
  if value is None:
    return None
  try:
    deltas = tuple(int(d) for d in value.split(","))
  except ValueError:
    raise UsageError(f"--curriculum takes comma-separated grid spacings (integers such as"
                     f" 64,32,16), got {value!r}") from None
  return deltas


def _noise_law(value: str | None):
  if value is None:
    return None
  try:
    mean, std = (float(v) for v in value.split(","))
  except ValueError:
    raise UsageError(f"--noise-law takes the mean and std of ln sigma (such as -1.1,2.0), got"
                     f" {value!r}") from None
  return mean, std


def run(args) -> int:
  check_job_flags(args, out_flag="--out")
  deltas = _curriculum(args.curriculum)
  noise_law = _noise_law(args.noise_law)
  if args.init and args.config:
    raise UsageError("give --init (fine-tune those weights) or --config (train a new decoder"
                     " of that architecture from scratch), not both")
  if not args.init and not args.config:
    raise UsageError("nothing to train: pass --init CKPT to fine-tune a decoder (the converted"
                     " released one, say), or --config released|tiny|FILE to train one from"
                     " scratch")
  if bool(args.vae) == bool(args.random_vae):
    raise UsageError("pass the frozen VAE as --vae CKPT (one with an encoder), or --random-vae"
                     " tiny for a randomly initialised small one (tests and demos)")
  if args.steps <= 0:
    raise UsageError(f"--steps must be positive, got {args.steps}")
  warmup = default_warmup(args.steps) if args.warmup is None else args.warmup
  if warmup >= args.steps:
    print(f"WARNING: --warmup {warmup} is not shorter than --steps {args.steps}: the learning"
          " rate never reaches --lr in this run", file=sys.stderr)
  if args.console:  # a process-wide setting: only when this command is the whole process
    from jaxconsdec import host_memory
    host_memory.keep_freed_memory()  # before JAX starts its threads: see host_memory
  start_job_runtime(args)
  import jax

  import jaxconsdec as jcd
  from jaxconsdec.training import loop, pairs, step

  scratch = args.config is not None
  # Denoising draws its levels on the grid too: by default the released sampler's, G_16.
  curriculum = deltas or (pairs.SCRATCH_CURRICULUM if scratch and args.objective == "consistency"
                          else pairs.FINE_TUNE_CURRICULUM)
  lr = args.lr if args.lr is not None else 1e-4 if scratch else 1e-5
  try:
    optimization = step.Optimization(
        lr=lr, warmup_steps=warmup, b1=args.adam_b1, b2=args.adam_b2, eps=args.adam_eps,
        clip_norm=args.clip_norm, ema_decay=args.ema_decay)
    settings = loop.RunSettings(
        steps=args.steps, batch_size=args.batch_size, resolution=args.resolution,
        seed=args.seed, curriculum=curriculum, objective=args.objective,
        noise_law=noise_law or pairs.ICT_LAW, pair_weighting=args.pair_weighting,
        anchor_share=args.anchor_share,
        optimization=optimization,
        compute_dtype="bfloat16" if args.bf16 else "float32",
        flip=not args.no_flip, save_every=args.save_every, keep=args.keep,
        eval_every=args.eval_every, log_every=args.log_every,
        max_pixels=args.max_pixels or 1 << 62)
  except ValueError as e:
    raise UsageError(str(e))

  def load_models():
    if scratch:
      config = config_arg(args.config).replace(dropout=args.dropout)
      params, init = None, f"random-init:{args.config}"  # initialised for the VAE's latents
    else:
      if args.dropout:
        raise UsageError("--dropout is for training from scratch; a fine-tuned decoder keeps"
                         " its architecture")
      params, config, init = weights_arg(argparse.Namespace(
          random_weights=None, weights=args.init, config=None, embedding=None))
    if args.random_vae:
      vae_config = vae_config_arg(args.random_vae, "--random-vae")
      print(f"WARNING: --random-vae: the {args.random_vae} VAE encoder is RANDOMLY"
            " INITIALISED; the decoder learns to decode its latents, not a real VAE's.",
            file=sys.stderr)
      return (params, config, init, jcd.random_params(vae_config, 0), vae_config,
              f"random-init:{args.random_vae}")
    loaded, vae_identity = load_vae(args.vae, args.vae_config)
    if "encoder" not in loaded.vae_halves:
      raise UsageError(f"--vae {args.vae} holds no encoder: training encodes the images")
    return params, config, init, loaded.vae_params, loaded.vae_config, vae_identity

  params, config, init, vae_params, vae_config, vae_identity = agreed(load_models)
  stop = ctrl_c_requests_stop("stopping after this step; saving a checkpoint (Ctrl-C or"
                              " SIGTERM)", also=(signal.SIGTERM,))
  try:
    report = loop.train(args.inputs, args.output, settings, params=params, config=config,
                        vae_params=vae_params, vae_config=vae_config, from_scratch=scratch,
                        identities={"init": init, "vae": vae_identity},
                        eval_inputs=args.eval_images or (), progress=not args.no_progress,
                        stop=stop, strict=args.strict, state_layout=args.state_layout,
                        remat={None: "auto", True: "on", False: "off"}[args.remat])
  except loop.TrainingDivergedError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_DIVERGED
  if jax.process_index() == 0:
    for failure in report.failures[:20]:
      print(f"  LEFT OUT {failure.input}: {failure.reason}", file=sys.stderr)
    if report.stopped:
      print(f"stopped at step {report.steps_done} of {args.steps}, checkpoint saved: run the"
            " same command to resume", file=sys.stderr)
    else:
      print(f"trained {report.steps_done} steps ({report.steps_done - report.resumed_from}"
            f" now); the EMA model is in {report.model_dir}"
            f" (jaxconsdec decode --weights {args.output})", file=sys.stderr)
  if report.stopped:
    return EXIT_INTERRUPTED
  return EXIT_INPUTS_FAILED if report.failures else EXIT_OK
