#!/usr/bin/env bash
# Creates .venv with the pinned dependencies (once; again only when pyproject.toml changes).
# Used by demo.sh and test.sh so that both work on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
stamp=".venv/.aacscore-installed"
needed_gb="${AACSCORE_SETUP_GB:-8}"
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    # PyTorch's wheels unpack to about 7 GB: say so at once rather than fail half-way through pip
    free_gb=$(( $(df -Pk . | awk 'NR == 2 {print $4}') / 1048576 ))
    if [ "$free_gb" -lt "$needed_gb" ]; then
        echo "setup: only $free_gb GB free on $(df -P . | awk 'NR == 2 {print $6}') for .venv; installing needs about $needed_gb GB" >&2
        exit 1
    fi
    echo "Installing AACScore and its pinned dependencies into .venv (first run: a few minutes, ~7 GB)..."
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet --no-cache-dir -e ".[slicer,test]"
    echo "$wanted" > "$stamp"
fi
