"""The `jaxconsdec` command line: one module per command, each declaring its name, help,
examples and flags (`add_arguments`) and running it (`run`): it checks its flags, then
calls the library. This entry point only builds the parser and dispatches.

`main(argv)` may be called in-process (tests, notebooks): whatever a command changes for
its own run (signal handlers, sys.unraisablehook, warnings filters, logger levels, JAX's
compilation-cache folder) is put back when it returns. Process-wide settings that cannot be
undone (glibc's allocator, Ctrl-C ignored during interpreter shutdown) are made only by the
console script, `entry()`. Exit statuses: EXIT_STATUSES below, and the README.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
import threading
import traceback
import warnings

from jaxconsdec import __version__
from jaxconsdec.files import os_error_in
from jaxconsdec.cli import (cache, convert, decode, encode, eval as eval_, parity, sample,
                            train)
from jaxconsdec.cli.common import (EXIT_ENVIRONMENT, EXIT_INPUTS_FAILED, EXIT_INTERNAL,
                                   EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, HelpFormatter,
                                   UsageError, usage_errors)

COMMANDS = (convert, decode, encode, eval_, train, sample, cache, parity)
DESCRIPTION = ("OpenAI's Consistency Decoder in JAX: turn Stable Diffusion 1.x/2.x latents into"
               " images.\n\n"
               + "".join(f"  {c.EXAMPLES[0]}\n      {c.SUMMARY}\n" for c in COMMANDS)
               + "\nRun `jaxconsdec COMMAND --help` for a command's flags.\n")
EXIT_STATUSES = """\
exit status:
  0    done, nothing failed
  1    done, but some inputs failed: listed at the end and in OUT_DIR/failures.json
  2    the command was wrong (a flag, the weights or their name, what OUT_DIR holds),
       found before any work
  3    stopped by the environment: disk full, permission denied, I/O error, out of memory,
       the network (no connection, a cut or corrupted download: run it again)
  4    internal error, a bug in jaxconsdec: the traceback is printed
  5    train: the loss went NaN or inf; nothing exported, the last good checkpoint kept
  130  interrupted (Ctrl-C); nothing half-written is left behind
"""
QUIETED_LOGGERS = ("absl", "asyncio")

__all__ = ["main", "entry", "EXIT_OK", "EXIT_INPUTS_FAILED", "EXIT_USAGE", "EXIT_ENVIRONMENT",
           "EXIT_INTERNAL", "EXIT_INTERRUPTED", "UsageError"]


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jaxconsdec", description=DESCRIPTION, epilog=EXIT_STATUSES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--version", action="version", version=f"jaxconsdec {__version__}")
  sub = p.add_subparsers(dest="command", required=True)
  for command in COMMANDS:
    epilog = ("examples:\n" + "".join(f"  {e}\n" for e in command.EXAMPLES)
              + (f"\n{command.NOTE}\n" if hasattr(command, "NOTE") else ""))
    cp = sub.add_parser(command.NAME, help=command.HELP, epilog=epilog,
                        formatter_class=HelpFormatter)
    command.add_arguments(cp)
    cp.set_defaults(run=command.run)
  return p


@contextlib.contextmanager
def _command_scope(verbose: bool, console: bool):
  """What a command changes for its run, put back afterwards. Unless --verbose, Orbax's and
  tensorstore's hundreds of asyncio tracebacks around one failed write (from their threads,
  through sys.unraisablehook, the asyncio logger and warnings about coroutines left
  pending) are not shown: the user sees jaxconsdec's one-line message. In the console
  script the quieting stays until the process ends, since the libraries' threads still
  report while the interpreter shuts down."""
  main_thread = threading.current_thread() is threading.main_thread()
  handlers = ({s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
              if main_thread else {})
  levels = {name: logging.getLogger(name).level for name in QUIETED_LOGGERS}
  hook = sys.unraisablehook
  kept_warnings = contextlib.nullcontext() if console else warnings.catch_warnings()
  with kept_warnings, contextlib.ExitStack() as restore:
    if not verbose:
      for name in QUIETED_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
      sys.unraisablehook = lambda unraisable: None
      warnings.filterwarnings("ignore", message="coroutine .* was never awaited")
    try:
      yield restore
    finally:
      if not console:
        sys.unraisablehook = hook
        for name, level in levels.items():
          logging.getLogger(name).setLevel(level)
      for signum, handler in handlers.items():
        signal.signal(signum, handler)


def main(argv: list[str] | None = None, *, console: bool = False) -> int:
  """Runs one command; returns its exit status. console: this is the whole process (the
  `jaxconsdec` script), so process-wide settings are allowed."""
  args = parser().parse_args(argv)  # a wrong flag exits 2 here, with argparse's message
  hint = "" if args.verbose else " (--verbose shows more)"
  with _command_scope(args.verbose, console) as restore:
    args.restore, args.console = restore, console
    try:
      return args.run(args)
    except KeyboardInterrupt:
      print("interrupted; no file was left half-written", file=sys.stderr)
      return EXIT_INTERRUPTED
    except usage_errors() as e:
      print(f"error: {e}", file=sys.stderr)
      return EXIT_USAGE
    except OSError as e:
      print(f"error: {_describe_os_error(e)}{hint}", file=sys.stderr)
      return EXIT_ENVIRONMENT
    except Exception as e:
      number = os_error_in(e)  # a write of a library's (Orbax) that the machine refused
      if number is not None:
        where = re.search(r'Failed writing: "([^"]+)"', str(e))
        print(f"error: {os.strerror(number)}"
              + (f" (writing {where.group(1)})" if where else "")
              + f"{hint}. Free space and run the same command again: it resumes.",
              file=sys.stderr)
        return EXIT_ENVIRONMENT
      if "RESOURCE_EXHAUSTED" in str(e):  # a device ran out of memory
        print(f"error: out of device memory ({str(e).splitlines()[0][:300]}). Lower"
              " --batch-size or --max-pixels.", file=sys.stderr)
        return EXIT_ENVIRONMENT
      traceback.print_exc()
      print("internal error: this is a bug in jaxconsdec; please report it with the traceback"
            " above", file=sys.stderr)
      return EXIT_INTERNAL


def _describe_os_error(e: OSError) -> str:
  if e.strerror and e.filename:
    return f"{e.filename}: {e.strerror}"
  return e.strerror or str(e)


def entry() -> None:
  """The console script. Once the command has returned, Ctrl-C is ignored: the work is done,
  and an interrupt during shutdown could only turn a success into a traceback."""
  status = main(console=True)
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
  sys.exit(status)


if __name__ == "__main__":
  entry()
