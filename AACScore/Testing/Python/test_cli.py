"""The `aacscore` command as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from AACScoreLib import cli

COMMANDS = ("demo", "score", "segment", "phantoms", "train-segmenter", "train-scorer", "evaluate", "bench", "models")


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in COMMANDS:
        assert command in text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0 and "usage: aacscore" in capsys.readouterr().out


def test_a_project_error_exits_2_with_a_one_line_message(tmp_path, capsys):
    code = cli.main(["evaluate", "--truth", str(tmp_path / "nope.csv"), "--pred", str(tmp_path / "nope2.csv")])
    error = capsys.readouterr().err
    assert code == 2 and "nope.csv" in error and "Traceback" not in error


def test_the_installed_entry_point_runs():
    completed = subprocess.run([sys.executable, "-m", "AACScoreLib.cli", "--version"], capture_output=True, text=True)
    assert completed.returncode == 0 and completed.stdout.startswith("aacscore ")
