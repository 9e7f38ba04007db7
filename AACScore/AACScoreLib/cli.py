"""The `aacscore` command: one sub-command per job, each defined beside the code it drives.

Each module in COMMAND_MODULES has `add_cli(subparsers)`, which adds its parser and sets `func(args) -> int`.
Heavy imports (torch, nnU-Net) happen inside those functions so that `aacscore --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from . import __version__
from .errors import AACScoreError

COMMAND_MODULES: tuple[str, ...] = (
    "demo",
    "batch",
    "segmentation.segmenter",
    "phantoms.generator",
    "segmentation.training",
    "scoring.training",
    "evaluation.evaluate",
    "evaluation.bench",
    "evaluation.segmentation_benchmark",
    "models",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aacscore",
        description="Kauppila AAC-24 scoring of abdominal aortic calcification on lateral lumbar radiographs.",
    )
    parser.add_argument("--version", action="version", version=f"aacscore {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").add_cli(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("aacscore", build_parser().parse_args(argv))


def run_command(program: str, args: argparse.Namespace) -> int:
    """Run a parsed sub-command: a project error becomes one line on stderr and exit code 2, never a traceback."""
    try:
        return int(args.func(args) or 0)
    except AACScoreError as error:
        print(f"{program} {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{program} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
