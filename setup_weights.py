#!/usr/bin/env python3
"""Install, list and verify AACScore model packages (the same commands as `aacscore models ...`).

    python setup_weights.py install PATH_OR_URL [--sha256 HEX] [--models-dir DIR]
    python setup_weights.py list
    python setup_weights.py verify [NAME]

Runs from a source checkout without installing anything: it falls back to the AACScore/ folder beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

try:
    import AACScoreLib  # noqa: F401  (only to learn whether the package is importable)
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent / "AACScore"))

from AACScoreLib.cli import run_command
from AACScoreLib.models import add_commands


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="setup_weights.py", description=__doc__.splitlines()[0])
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return run_command("setup_weights.py", parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
