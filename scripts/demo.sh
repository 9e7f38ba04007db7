#!/usr/bin/env bash
# Sets up .venv if needed, then runs the main job on the bundled demo data (results in demo_out/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/aacscore demo --out demo_out "$@"
