#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 and installs the pinned dependencies once.
# Looks for python3.12 / python3.13 on PATH (3.12 first: the GPU machine runs 3.12), then
# pyenv's installed versions.
set -euo pipefail
cd "$(dirname "$0")/.."

is_new_enough() {
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
  local cand
  for cand in python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1 && is_new_enough "$cand"; then
      command -v "$cand"; return 0
    fi
  done
  local root="${PYENV_ROOT:-$HOME/.pyenv}"
  if command -v pyenv >/dev/null 2>&1; then root="$(pyenv root)"; fi
  for cand in $(ls -d "$root"/versions/3.1[2-9]* 2>/dev/null | sort -V); do
    if is_new_enough "$cand/bin/python3"; then
      echo "$cand/bin/python3"; return 0
    fi
  done
  return 1
}

if [ ! -x .venv/bin/python ]; then
  if ! py="$(find_python)"; then
    echo "error: mla_jax needs Python >= 3.12 (JAX 0.11 requires it)." >&2
    echo "Install one, e.g. 'pyenv install 3.12' or your OS package python3.12, then rerun." >&2
    exit 1
  fi
  echo "bootstrap: creating .venv with $py"
  "$py" -m venv .venv
fi
echo "bootstrap: installing mla_jax and its pinned dependencies into .venv"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'

# jax's CUDA plugin, for the tests marked aot: they compile for an H200 on a machine without a GPU
# (tests/helpers.compile_for_h200). It goes into .aot, not .venv: on a machine without a GPU, jax
# with the plugin installed reports a failed CUDA start at its first use. Where no wheel exists
# for this platform, the aot tests skip.
jax_version="$(.venv/bin/python -c 'import jax; print(jax.__version__)')"
echo "bootstrap: installing jax-cuda12-plugin $jax_version into .aot"
rm -rf .aot
if ! .venv/bin/python -m pip install -q --no-deps --target .aot \
    "jax-cuda12-plugin==$jax_version" "jax-cuda12-pjrt==$jax_version"; then
  echo "bootstrap: no jax-cuda12-plugin $jax_version for this platform; the aot tests will skip" >&2
fi
