"""Host memory (RSS and its peak) at each phase of one `jaxconsdec train` run: compile,
first state, evaluation, each step. Where the peak RSS of `train_speed.py peaks` comes from.

  python benchmarks/train_phases.py IMAGES --out RUN --config released --random-vae tiny \
      --steps 2 --resolution 64 --batch-size 1 --no-progress --no-compile-cache

Arguments are `jaxconsdec train`'s. Prints one line per phase boundary to stderr (and
writes them to benchmarks/results/train_phases_cpu.txt with --record), with glibc's heap
(`mallinfo2`: in use and free, the free part being what the process keeps), and a line
whenever RSS moved by 0.5 GiB between phases (a step's peak is reached after its dispatch).
It wraps the trainer's methods to log around them; the run itself is the command's.
"""

import functools
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
START = time.time()
LINES = []


def _status_gib():
  values = {}
  with open("/proc/self/status") as f:
    for line in f:
      key, _, value = line.partition(":")
      if key in ("VmRSS", "VmHWM"):
        values[key] = int(value.split()[0]) / 2 ** 20
  return values


def _heap_gib():
  from jaxconsdec import host_memory
  heap = host_memory.heap_bytes()
  return heap and (heap[0] / 2 ** 30, heap[1] / 2 ** 30)


def log(what):
  s = _status_gib()
  heap = _heap_gib()
  line = (f"[{time.time() - START:7.1f} s] {what:36s} RSS {s['VmRSS']:6.2f} GiB,"
          f" peak {s['VmHWM']:6.2f} GiB"
          + (f", heap in use {heap[0]:6.2f}, free {heap[1]:6.2f} GiB" if heap else ""))
  LINES.append(line)
  print(line, file=sys.stderr, flush=True)


def watch(period=1.0, step_gib=0.5):
  """Logs RSS whenever it moved by step_gib since the last line (a daemon thread)."""
  def run():
    last = _status_gib()["VmRSS"]
    while True:
      time.sleep(period)
      now = _status_gib()["VmRSS"]
      if abs(now - last) >= step_gib:
        log("(RSS moved)")
        last = now
  threading.Thread(target=run, daemon=True).start()


def wrap(owner, name, label):
  method = getattr(owner, name)

  @functools.wraps(method)
  def logged(*args, **kwargs):
    log(f"before {label}")
    result = method(*args, **kwargs)
    log(f"after {label}")
    return result
  setattr(owner, name, logged)


def main():
  argv = sys.argv[1:]
  record = "--record" in argv
  argv = [a for a in argv if a != "--record"]
  from jaxconsdec import host_memory
  from jaxconsdec.cli import main as cli_main
  from jaxconsdec.training import loop, step
  wrap(step.TrainStep, "compile", "compiling the step")
  wrap(step.TrainStep, "first_state", "the first state")
  wrap(step.TrainStep, "__call__", "a step (dispatch)")
  wrap(loop._Evaluator, "__call__", "an evaluation")  # noqa: SLF001 (instrumentation)
  wrap(host_memory, "release_free_memory", "release_free_memory")
  log("start")
  watch()
  status = cli_main(["train", *argv], console=True)
  log(f"end, exit status {status}")
  if record:
    with open(os.path.join(HERE, "results", "train_phases_cpu.txt"), "w") as f:
      f.write("python benchmarks/train_phases.py " + " ".join(argv) + "\n" + "\n".join(LINES)
              + "\n")
  return status


if __name__ == "__main__":
  sys.exit(main())
