"""`jaxconsdec cache`: what the weights cache holds (names fetched and converted once), and
removing it."""

from __future__ import annotations

from jaxconsdec.cli.common import EXIT_OK, UsageError, add_verbose

NAME = "cache"
HELP = "list or clear the weights fetched by name and converted once"
SUMMARY = "the weights cache"
EXAMPLES = ("jaxconsdec cache list", "jaxconsdec cache clear openai/consistency-decoder")


def add_arguments(p) -> None:
  p.add_argument("action", choices=("list", "clear"))
  p.add_argument("names", nargs="*", metavar="NAME",
                 help="clear: the names whose entries to remove (default: everything)")
  add_verbose(p)


def run(args) -> int:
  from jaxconsdec import weight_cache
  if args.action == "list":
    if args.names:
      raise UsageError("cache list takes no names")
    found = weight_cache.entries()
    for e in found:
      what = ", ".join(e.names) if e.names else {
          "entry": "(no name points here)", "download": "(a download not finished)",
          "unreadable": "(an unreadable name file)"}[e.kind]
      print(f"{_size(e.size):>10}  {what}\n{'':>10}  {e.path}")
    total = sum(e.size for e in found)
    print(f"{len(found)} item(s), {_size(total)}, in {weight_cache.cache_root()}/weights")
    return EXIT_OK
  removed = []
  for name in args.names or [None]:
    try:
      removed += weight_cache.clear(name)
    except ValueError as e:
      raise UsageError(str(e)) from None
  for e in removed:
    print(f"removed {e.path} ({_size(e.size)})")
  print(f"{len(removed)} item(s) removed, {_size(sum(e.size for e in removed))} freed")
  return EXIT_OK


def _size(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
    n /= 1024
