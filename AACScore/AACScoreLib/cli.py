"""The `aacscore` command: one sub-command per job, each defined beside the code it drives.

Each module in COMMAND_MODULES has `add_cli(subparsers)`, which adds its parser and sets `func(args) -> int`.
Heavy imports (torch, nnU-Net) happen inside those functions so that `aacscore --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
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
    "segmentation.blend",
    "segmentation.upright",
    "scoring.training",
    "evaluation.evaluate",
    "evaluation.bench",
    "qc.calibrate",
    "evaluation.stress",
    "evaluation.gradcam_report",
    "evaluation.generalisation",
    "evaluation.segmentation_benchmark",
    "evaluation.ct_radiographs",
    "models",
    "finetune",
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
        say(f"{program} {args.command}: error: {error}")
        return error.exit_code
    except KeyboardInterrupt:
        say(f"{program} {args.command}: interrupted")
        return 130


def say(text: str, stream=None, end: str = "\n"):
    """Print to stderr (or `stream`) and return the stream to use next: a stream whose reader has gone (piped into
    `head`, which exited) is pointed at the null device, so the run's outcome and exit code stay its own."""
    stream = stream or sys.stderr
    try:
        print(text, end=end, file=stream, flush=True)
        return stream
    except (BrokenPipeError, ValueError):
        pass
    try:  # the same file descriptor, now writing nowhere: the flush at exit succeeds too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
        return stream
    except (AttributeError, OSError, ValueError):
        return open(os.devnull, "w")


if __name__ == "__main__":
    sys.exit(main())
