"""What the commands share: exit statuses, flag parsing and checking, weights by flag, the
job runtime (distributed start, compile cache) and the job report.

Nothing here imports JAX at module level: `jaxconsdec --help` must not start it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Optional

from jaxconsdec.inputs.listing import DEFAULT_MAX_PIXELS

EXIT_OK, EXIT_INPUTS_FAILED, EXIT_USAGE, EXIT_ENVIRONMENT, EXIT_INTERNAL = 0, 1, 2, 3, 4
EXIT_DIVERGED = 5  # train: the loss went NaN or inf
EXIT_INTERRUPTED = 130
MAX_SEED = 2**32 - 1  # JAX keys hold 32 bits of an int seed: larger seeds would collide
PRESETS = ("released", "tiny")
VAE_PRESETS = ("sd", "sdxl", "sd3", "flux", "tiny")


class UsageError(Exception):
  """The command was wrong (a flag, the weights): exit status 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """Every flag's help ends with its default, where it has one and does not say it already."""

  def _get_help_string(self, action):
    text = action.help or ""
    if (action.option_strings and "default" not in text and action.default is not None
        and action.default is not False and action.default is not argparse.SUPPRESS):
      text += " (default: %(default)s)"
    return text


def usage_errors() -> tuple[type[BaseException], ...]:
  """Exceptions that mean the command itself was wrong (exit status 2)."""
  from jaxconsdec.checkpoint import CheckpointError
  from jaxconsdec.conversion import ConversionError
  from jaxconsdec.named_weights import UnknownNameError
  from jaxconsdec.parity import ParityError
  from jaxconsdec.convert import WeightFileError
  from jaxconsdec.jobs.engine import JobMismatchError, ProcessesDisagreeError
  from jaxconsdec.training.data import NoReadableImagesError
  from jaxconsdec.training.loop import TrainingSetupError
  from jaxconsdec.weights import ParamsMismatchError
  return (UsageError, WeightFileError, CheckpointError, ConversionError, UnknownNameError,
          ParamsMismatchError, JobMismatchError, ProcessesDisagreeError, TrainingSetupError,
          NoReadableImagesError, ParityError)


def config_arg(value: Optional[str]):
  """--config / --random-weights: a preset name, a jaxconsdec JSON or a diffusers
  config.json; None when not given (the weights' own, or the released decoder)."""
  import jaxconsdec as jcd
  from jaxconsdec.convert import read_config
  if value is None:
    return None
  if value in PRESETS:
    return {"released": jcd.CONSISTENCY_DECODER, "tiny": jcd.TINY}[value]
  if not os.path.exists(value):
    raise UsageError(f"--config {value}: neither {' nor '.join(PRESETS)} nor an existing file")
  return read_config(value)


def vae_config_arg(value: Optional[str], flag: str = "--vae-config"):
  """--vae-config: a preset name or a JSON file (jaxconsdec's VAEConfig, or a diffusers
  AutoencoderKL config.json); None when not given."""
  import jaxconsdec as jcd
  from jaxconsdec.convert import diffusers_config
  if value is None:
    return None
  presets = dict(zip(VAE_PRESETS, (jcd.SD_VAE, jcd.SDXL_VAE, jcd.SD3_VAE, jcd.FLUX_VAE,
                                   jcd.TINY_VAE)))
  if value in presets:
    return presets[value]
  if not os.path.exists(value):
    raise UsageError(f"{flag} {value}: neither one of {', '.join(VAE_PRESETS)} nor an"
                     " existing file")
  return diffusers_config.read_vae_config(value)


def schedule_arg(value: str) -> tuple[float, ...]:
  from jaxconsdec.schedule import timesteps_for
  try:
    schedule = tuple(float(s) for s in value.split(","))
    timesteps_for(schedule)  # validates
  except (ValueError, TypeError) as e:
    raise UsageError(f"--schedule takes comma-separated numbers in [0, 1], got {value!r} ({e})")
  return schedule


def check_seed(seed: int) -> None:
  if not 0 <= seed <= MAX_SEED:
    raise UsageError(f"--seed must be in [0, {MAX_SEED}] (JAX keys hold 32 bits of a seed),"
                     f" got {seed}")


def weights_arg(args):
  """-> (params, config, identity of the weights by content, recorded with the outputs)."""
  import jaxconsdec as jcd
  from jaxconsdec import loading
  if args.random_weights:
    config = config_arg(args.random_weights)
    print(f"WARNING: --random-weights: the {args.random_weights} UNet is RANDOMLY INITIALISED."
          " The images are noise-like, not decoded pictures; this only shows the job runs."
          " Pass --weights with converted weights for real images.", file=sys.stderr)
    return jcd.random_params(config, seed=0), config, f"random-init:{args.random_weights}"
  if not args.weights:
    raise UsageError("no weights: pass --weights CKPT (a folder made by `jaxconsdec convert`,"
                     " or decoder.pt / a *.safetensors file), or --random-weights tiny for a"
                     " smoke test")
  if not os.path.exists(args.weights) and not loading.is_name(args.weights):
    raise UsageError(f"--weights {args.weights}: no such file or folder. Pass a checkpoint"
                     " folder made by `jaxconsdec convert`, the PyTorch weight file itself,"
                     " or a name (openai/consistency-decoder)")
  config = config_arg(args.config)
  weights = loading.local(args.weights, config=config)
  params, config = loading.load(weights, config=config, embedding=args.embedding)
  files = [weights] + ([args.embedding] if args.embedding and not os.path.isdir(weights)
                       else [])
  return params, config, loading.identity(files)


def load_vae(path: str, config_flag: Optional[str]):
  """-> (what --vae names, loaded, which must hold an SD VAE or a half of one; the identity
  of those weights by content)."""
  from jaxconsdec import loading
  if not os.path.exists(path) and not loading.is_name(path):
    raise UsageError(f"--vae {path}: no such file or folder. Pass a checkpoint folder made by"
                     " `jaxconsdec convert` from a VAE, the VAE's weight file itself, or a"
                     " name (stabilityai/sd-vae-ft-mse)")
  vae_config = vae_config_arg(config_flag)
  path = loading.local(path, vae_config=vae_config)
  loaded = loading.load(path, vae_config=vae_config)
  if loaded.vae_params is None:
    raise UsageError(f"--vae {path} holds no SD VAE ({loaded!r})")
  return loaded, loading.identity([path])


def ctrl_c_requests_stop(message: str, also: tuple = ()) -> threading.Event:
  """From now on Ctrl-C sets the returned Event instead of raising wherever it lands (in
  the middle of a library's threads), so the work stops at a clean point. A second request
  raises KeyboardInterrupt at once: a process that cannot reach its next clean point (stuck
  in a read, say) still stops. `main` puts the handlers it found back when the command
  returns."""
  stop = threading.Event()

  def handler(signum, frame):
    if stop.is_set():
      raise KeyboardInterrupt
    print(f"{message} (again to stop at once)", file=sys.stderr)
    stop.set()
  if threading.current_thread() is threading.main_thread():
    for signum in (signal.SIGINT, *also):  # also: SIGTERM, a pre-emption's notice
      signal.signal(signum, handler)
  return stop


def agreed(load):
  """Loads weights on every process; if any process fails, all raise (none waits forever
  for another in the job's first collective)."""
  from jaxconsdec import multihost
  result, error = None, None
  try:
    result = load()
  except usage_errors() + (OSError,) as e:
    error = e
  multihost.raise_together(error, usage_errors() + (OSError,))
  return result


def add_verbose(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--verbose", action="store_true",
                      help="show the messages of the libraries underneath (Orbax, asyncio)")


def add_job_flags(parser, too_large: str) -> None:
  """The flags every file-to-file job takes."""
  parser.add_argument("--batch-size", type=int, default=8,
                      help="global batch per step, rounded up to a multiple of the device count")
  parser.add_argument("--seed", type=int, default=0,
                      help=f"base seed of the noise, 0 to {MAX_SEED}")
  parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                      help=f"refuse {too_large} more than N pixels, before compiling"
                      " (default 4194304 = 2048x2048; 0 for no limit)")
  parser.add_argument("--strict", action="store_true", help="stop at the first bad input")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  parser.add_argument("--compile-cache", metavar="DIR",
                      help="persistent XLA compilation cache (default ~/.cache/jaxconsdec/xla, or"
                      " $JAXCONSDEC_CACHE/xla)")
  parser.add_argument("--no-compile-cache", action="store_true",
                      help="no persistent compilation cache")
  add_verbose(parser)
  dist = parser.add_argument_group("multi-host (one process per host, same command everywhere)")
  dist.add_argument("--distributed", action="store_true",
                    help="jax.distributed.initialize() with auto-detection (TPU pods, SLURM)")
  dist.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
  dist.add_argument("--num-processes", type=int, help="how many processes in all")
  dist.add_argument("--process-id", type=int, help="this process's index, 0 to N - 1")


def check_job_flags(args, out_flag: str = "-o") -> None:
  check_seed(args.seed)
  if args.batch_size <= 0:
    raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
  if args.max_pixels < 0:
    raise UsageError(f"--max-pixels must be positive (or 0 for no limit), got {args.max_pixels}")
  for flag, path in ((out_flag, args.output), ("--compile-cache", args.compile_cache)):
    if path and os.path.exists(path) and not os.path.isdir(path):
      raise UsageError(f"{flag} {path} exists and is not a folder")
  if args.num_processes is not None and args.num_processes < 1:
    raise UsageError(f"--num-processes must be at least 1, got {args.num_processes}")
  if args.process_id is not None and not (
      0 <= args.process_id < (args.num_processes or args.process_id + 1)):
    raise UsageError(f"--process-id must be in [0, --num-processes), got {args.process_id}")
  if args.coordinator is not None:
    host, _, port = args.coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise UsageError(f"--coordinator takes HOST:PORT, got {args.coordinator!r}")
  explicit = (args.coordinator, args.num_processes, args.process_id)
  if any(v is None for v in explicit) and not all(v is None for v in explicit):
    raise UsageError("give all of --coordinator, --num-processes and --process-id, or use"
                     " --distributed to detect them (TPU pods, SLURM)")


def start_job_runtime(args) -> None:
  """The distributed runtime and the compilation cache, before anything touches a JAX
  backend (the order matters)."""
  _start_distributed(args)
  _configure_compile_cache(args)


def _start_distributed(args) -> None:
  explicit = (args.coordinator, args.num_processes, args.process_id)
  if not args.distributed and all(v is None for v in explicit):
    return
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts need collectives
  if args.distributed:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)


def _configure_compile_cache(args) -> None:
  if args.no_compile_cache:
    return
  import jax
  from jaxconsdec.weight_cache import cache_root
  folder = args.compile_cache or os.path.join(cache_root(), "xla")
  # Every program, not only those that took JAX's default second to compile: a training
  # command's small ones (evaluation, encoder, first state) cost a warm start 10 of its 35 s
  # on 2 cores, and all of them together take under 2 MB of disk.
  for name, value in (("jax_compilation_cache_dir", folder),
                      ("jax_persistent_cache_min_compile_time_secs", 0)):
    args.restore.callback(jax.config.update, name, getattr(jax.config, name))
    jax.config.update(name, value)


def run_job(args, job, doing: str, what: str, done: str) -> int:
  import jax

  from jaxconsdec.jobs import engine
  lead = jax.process_index() == 0
  if lead:
    print(f"{doing} on {jax.device_count()} device(s) in {jax.process_count()} process(es),"
          f" global batch {job.program.global_batch(args.batch_size)}", file=sys.stderr)
  report = engine.run_job(job, args.inputs, args.output, batch_size=args.batch_size,
                          strict=args.strict, progress=not args.no_progress)
  if lead:
    _print_report(report, args.output, what, done)
  if report.environment_error:
    return EXIT_ENVIRONMENT
  return EXIT_INPUTS_FAILED if report.failures else EXIT_OK


def _print_report(report, out_dir: str, what: str, done: str) -> None:
  hidden = f", {report.hidden} hidden files or folders skipped" if report.hidden else ""
  redone = f" ({report.redone} found cut short were redone)" if report.redone else ""
  print(f"{report.total} {what}: {report.done_before} already done, {report.written} {done}"
        f" now{redone}, {len(report.failures)} failed{hidden} ({report.seconds:.1f} s)",
        file=sys.stderr)
  if report.environment_error:
    print(f"error: the job stopped: {report.environment_error}. Fix it and run the same"
          " command again: it resumes where it stopped.", file=sys.stderr)
  elif report.stopped:
    print("stopped at the first bad input (--strict)", file=sys.stderr)
  for failure in report.failures[:20]:
    print(f"  FAILED {failure.input}: {failure.reason}", file=sys.stderr)
  if len(report.failures) > 20:
    print(f"  ... {len(report.failures) - 20} more", file=sys.stderr)
  if report.failures and os.path.exists(os.path.join(out_dir, "failures.json")):
    print(f"the list is in {os.path.join(out_dir, 'failures.json')}", file=sys.stderr)
