#!/usr/bin/env bash
# CI's newest-JAX leg (README "Tests"): a Python 3.13 environment that already holds the
# current JAX, into which jaxconsdec's wheel is installed as a user would. Then:
#   1. the wheel must leave JAX, jaxlib and Flax as they were (no downgrade);
#   2. the README's quick start, from a folder outside the checkout;
#   3. the test files that do not compare against PyTorch (there is no CPU torch for 3.13
#      here), against the installed wheel, with deprecation warnings as errors, and the
#      outputs the Python 3.11 leg left in $JAXCONSDEC_ACROSS_VERSIONS compared
#      (tests/test_across_versions.py).
#
#   .ci/newest_jax.sh [PYTEST_ARGS]   # all of it
#   .ci/newest_jax.sh --prepare       # only the environment (.ci/run does it beside leg 1)
#   .ci/newest_jax.sh --test [ARGS]   # only 2 and 3, in the environment prepared
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
JAX=0.12.0.1
FLAX=0.12.12
phase=all
case "${1:-}" in --prepare|--test) phase=${1#--}; shift ;; esac

if [ "$phase" != test ]; then
  python=$(.ci/python313.sh)
  rm -rf .venv-newest
  "$python" -m venv .venv-newest
  . .venv-newest/bin/activate
  pip install -q "jax==$JAX" "jaxlib==$JAX" "flax==$FLAX"
  pip list --format=freeze | grep -iE '^(jax|jaxlib|flax)==' | sort > .venv-newest/before
  # Built from a copy: the build's files never meet leg 1's editable install in the tree.
  dist=$(mktemp -d)
  tar -C "$root" --exclude='./.venv*' --exclude=./.git -cf - . | tar -C "$dist" -xf -
  pip wheel -q --no-deps -w "$dist/wheel" "$dist"
  pip install -q "$(ls "$dist"/wheel/jaxconsdec-*.whl)[test]"
  rm -rf "$dist"
  pip list --format=freeze | grep -iE '^(jax|jaxlib|flax)==' | sort > .venv-newest/after
  if ! cmp -s .venv-newest/before .venv-newest/after; then
    echo "installing jaxconsdec changed JAX: before: $(cat .venv-newest/before);" \
         "after: $(cat .venv-newest/after)" >&2
    exit 1
  fi
  echo "newest-JAX leg: $(python --version), $(tr '\n' ' ' < .venv-newest/after)"
  deactivate
fi
[ "$phase" = prepare ] && exit 0

. .venv-newest/bin/activate
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
quick_start=${JAXCONSDEC_ACROSS_VERSIONS:-$work}/newest
(cd "$work" && jaxconsdec decode "$root/samples/latents" -o "$quick_start" \
  --weights "$root/samples/demo/model" --no-progress \
  && ls "$quick_start"/{astronaut,chelsea,coffee}.png)

# From outside the checkout, so that no process a test starts finds its sources either.
cd "$work"
JAXCONSDEC_EXPECT_INSTALLED=1 pytest -c "$root/pyproject.toml" --rootdir "$root" \
  -W error::DeprecationWarning --files torch-free "$@" "$root/tests"
