#!/usr/bin/env bash
# Prints the path of a CPython 3.13 for the newest-JAX test leg (jax 0.11 and later need
# Python 3.12 or newer), taking the first that works of:
#   python3.13 on PATH; a pyenv install; one this script built earlier on this machine;
#   one built now from Debian's source archive (trixie's python3.13, ~5 minutes on 2 cores).
# What it builds is kept in $JAXCONSDEC_CI_CACHE (default ~/.cache/jaxconsdec-ci), so it is
# built once per machine. Progress goes to stderr; stdout is the interpreter's path alone.
#
#   .ci/python313.sh           # the machine's, else the cached or a new build
#   .ci/python313.sh --build   # ignore the machine's: the cached or a new build
set -euo pipefail

cache="${JAXCONSDEC_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/jaxconsdec-ci}"
say() { echo "python313: $*" >&2; }

# An interpreter counts only if it is 3.13 and has what venv, pip and the suite need.
works() {
  [ -x "$1" ] && "$1" - <<'EOF' 2>/dev/null
import sys
assert sys.version_info[:2] == (3, 13)
import bz2, ctypes, ensurepip, hashlib, lzma, sqlite3, ssl, venv, zlib
EOF
}

found() {
  say "using $1 ($("$1" -c 'import sys; print(sys.version.split()[0])'))"
  echo "$1"
  exit 0
}

if [ "${1:-}" != --build ]; then
  if command -v python3.13 >/dev/null && works "$(command -v python3.13)"; then
    found "$(command -v python3.13)"
  fi
  if command -v pyenv >/dev/null; then
    for p in "$(pyenv root)"/versions/3.13*/bin/python3.13; do
      if works "$p"; then found "$p"; fi
    done
  fi
fi

mkdir -p "$cache"
exec 9>"$cache/.lock"  # two runs on one machine: the second waits for the first's build
flock 9
for p in "$cache"/python-3.13*/bin/python3.13; do
  if works "$p"; then found "$p"; fi
done

work=$(mktemp -d "$cache/build.XXXXXX")  # on the same file system as $prefix
trap 'rm -rf "$work"' EXIT
say "building CPython 3.13 from Debian's source archive in $work"
# A private apt state: the machine's sources and lists are left as they are.
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/src"
echo "deb-src http://deb.debian.org/debian trixie main" > "$work/sources.list"
apt_opts=(-q -o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache")
apt-get "${apt_opts[@]}" update >&2
# apt checks the Release signature and the files' hashes in the .dsc.
(cd "$work/src" && apt-get "${apt_opts[@]}" source --download-only python3.13 >&2)
tarball=$(ls "$work"/src/python3.13_*.orig.tar.xz)
version=$(basename "$tarball" .orig.tar.xz); version=${version#python3.13_}
prefix="$cache/python-$version"
tar -xJf "$tarball" -C "$work/src"
cd "$work/src/Python-$version"
./configure --prefix="$prefix" >"$work/configure.log" 2>&1 \
  || { tail -30 "$work/configure.log" >&2; exit 1; }
make -j"$(nproc)" >"$work/make.log" 2>&1 || { tail -30 "$work/make.log" >&2; exit 1; }
# Installed beside, then renamed: an interrupted build leaves no half-installed Python.
make install DESTDIR="$work/root" >"$work/install.log" 2>&1 \
  || { tail -30 "$work/install.log" >&2; exit 1; }
rm -rf "$prefix"
mv "$work/root$prefix" "$prefix"
if works "$prefix/bin/python3.13"; then found "$prefix/bin/python3.13"; fi
say "the build at $prefix lacks a module the suite needs (ssl, sqlite3, lzma, ...):" \
    "install the -dev packages (libssl-dev libsqlite3-dev liblzma-dev libbz2-dev libffi-dev)"
exit 1
