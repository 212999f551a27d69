#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install moe-distill into it.
# torch goes in first, pinned to the CPU build this machine ships (override: TORCH_SPEC="torch==2.5.1+cu121"
# or TORCH_SPEC=skip to keep whatever torch is installed), so no dependency resolution pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi

# Reinstall only when the dependency list changed since the last successful install.
stamp="$VENV/.moedistill-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)-$TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if [ "$TORCH_SPEC" != "skip" ]; then
  echo "[bootstrap] installing $TORCH_SPEC"
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
fi
echo "[bootstrap] installing moe-distill and its dependencies (first time: a few minutes)"
"$VENV/bin/python" -m pip install -q -e ".[dev]"
echo "$want" > "$stamp"
