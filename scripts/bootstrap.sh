#!/usr/bin/env bash
# Creates .venv and installs kontext-lora with the trainer and dev extras. Idempotent: reinstalls only when
# pyproject.toml changed since the last successful install. pip's cache (~/.cache/pip) serves later runs.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
stamp="$VENV/.kontext-lora-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' \
    || { echo "kontext-lora needs Python >= 3.11 ($PYTHON is $("$PYTHON" --version))" >&2; exit 1; }
  "$PYTHON" -m venv "$VENV"
fi
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "[bootstrap] installing kontext-lora[trainer,dev] into $VENV (first run downloads PyTorch, a few GB)" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e '.[trainer,dev]'
  echo "$want" > "$stamp"
fi
