#!/usr/bin/env bash
# Creates .venv with the pinned dependencies (once; again only when pyproject.toml changes).
# Used by demo.sh and test.sh so that both work on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
stamp=".venv/.aacscore-installed"
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "Installing AACScore and its pinned dependencies into .venv (first run: a few minutes, ~7 GB)..."
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[slicer,test]"
    echo "$wanted" > "$stamp"
fi
