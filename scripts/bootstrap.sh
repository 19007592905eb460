#!/usr/bin/env bash
# Creates .venv and installs the project with its pinned dependencies, once per change of pyproject.toml.
# Sourced by scripts/run and scripts/test; safe to run on its own.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

python_bin="${RAYREC_PYTHON:-}"
if [ -z "$python_bin" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      python_bin="$candidate"; break
    fi
  done
fi
if [ -z "$python_bin" ]; then
  echo "rayrec needs Python 3.11 (set RAYREC_PYTHON to its path)" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $python_bin"
  "$python_bin" -m venv .venv
fi

stamp=".venv/.rayrec-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "==> installing rayrec and its dependencies into .venv"
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch first and exactly pinned: the CPU wheel is found locally (pip's find-links) and nothing
  # later can ask the resolver for a CUDA build.
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
  .venv/bin/python -m pip install --quiet -e ".[dev]"
  echo "$want" > "$stamp"
fi
