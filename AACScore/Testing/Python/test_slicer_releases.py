"""The supported 3D Slicer releases: AACScore's dependency set resolves with pip against each release's Python
and the packages it bundles (held at their versions, never replaced), and older releases get a reason.

pip resolves for another Python with `--dry-run --python-version X --only-binary=:all:` (it downloads only
metadata). Stood in for by wheels that carry only metadata, taken from this environment's installed packages:
grad-cam and acvl-utils, which publish no wheels (pip would have to build their metadata), and torch and
torchvision as the CPU build (`+cpu`) that PyTorchUtils installs on a computer without an NVIDIA GPU: PyPI's
Linux build would bring gigabytes of CUDA runtime wheels into a dry run that only checks Python and packages.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from AACScoreLib.slicer.dependencies import (REQUIREMENTS, SUPPORTED_SLICER_RELEASES, TORCH_RANGES, canonical,
                                             slicer_release_packages, split_requirement, unsupported_python,
                                             wanted_requirements)
from AACScoreLib.slicer.workflow import Job
from AACScoreLib.slicer import dependencies

SOURCE_ONLY = ("grad-cam", "acvl-utils")
CPU_BUILDS = ("torch", "torchvision")
PIP_SECONDS = 240


def _metadata_wheel(name: str, folder: Path, cpu_build: bool = False) -> Path:
    """A wheel holding only the installed distribution's metadata: enough for a pip dry run to resolve it.
    `cpu_build`: version `+cpu`, without the CUDA runtime requirements of PyPI's Linux build."""
    distribution = importlib.metadata.distribution(name)
    stem = re.sub(r"[-_.]+", "_", distribution.metadata["Name"]).lower()
    version = distribution.version.split("+")[0] + ("+cpu" if cpu_build else "")
    requirements = [r for r in distribution.requires or [] if not (cpu_build and 'platform_system == "Linux"' in r)]
    metadata = (f"Metadata-Version: 2.1\nName: {distribution.metadata['Name']}\nVersion: {version}\n"
                + "".join(f"Requires-Dist: {requirement}\n" for requirement in requirements))
    path = folder / f"{stem}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{stem}-{version}.dist-info/METADATA", metadata)
        wheel.writestr(f"{stem}-{version}.dist-info/WHEEL",
                       "Wheel-Version: 1.0\nGenerator: aacscore-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{stem}-{version}.dist-info/RECORD", "")
    return path


def _dry_run(python: str, requirements: list[str], constraints: Path | None, report: Path, wheels: Path):
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--python-version", ".".join(python.split(".")[:2]), "--only-binary=:all:", "--find-links",
               str(wheels), "--report", str(report), *requirements]
    if constraints is not None:
        command += ["-c", str(constraints)]
    # this machine's pip configuration (local wheel folders, caps) must not decide what PyPI offers
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
    env.pop("PIP_FIND_LINKS", None)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_release_files_name_python_and_the_packages_aacscore_must_not_replace():
    for release in SUPPORTED_SLICER_RELEASES:
        python, bundled = slicer_release_packages(release)
        assert python.startswith("3.12."), release
        assert {"numpy", "scipy", "pydicom", "pillow", "simpleitk", "vtk", "requests"} <= set(bundled), release
    assert slicer_release_packages("5.10")[1]["pydicom"] == "2.4.4"  # why the reader supports pydicom 2


def test_the_dependency_set_resolves_against_each_supported_release_and_not_python_39(tmp_path):
    wheels, source_only = tmp_path / "wheels", tmp_path / "source-only"
    wheels.mkdir()
    source_only.mkdir()
    for name in SOURCE_ONLY:
        _metadata_wheel(name, wheels)
        _metadata_wheel(name, source_only)
    for name in CPU_BUILDS:
        _metadata_wheel(name, wheels, cpu_build=True)
    runs = {}
    for release in SUPPORTED_SLICER_RELEASES:
        python, bundled = slicer_release_packages(release)
        constraints = tmp_path / f"slicer-{release}.txt"
        constraints.write_text("".join(f"{name}=={version}\n" for name, version in bundled.items()))
        wanted = wanted_requirements(bundled, torch_ranges=True)
        assert "torch" + TORCH_RANGES["torch"] in wanted and not {"numpy", "pydicom", "scipy"} & {
            canonical(split_requirement(r)[0]) for r in wanted}
        report = tmp_path / f"report-{release}.json"
        runs[release] = (python, bundled, wanted, report, _dry_run(python, wanted, constraints, report, wheels))
    old_report = tmp_path / "report-3.9.json"
    old = _dry_run("3.9", list(REQUIREMENTS), None, old_report, source_only)  # Slicer 5.6 and 5.8

    for release, (python, bundled, wanted, report, process) in runs.items():
        _, errors = process.communicate(timeout=PIP_SECONDS)
        assert process.returncode == 0, (
            f"AACScore's dependencies do not resolve in Slicer {release} (Python {python}) against its bundled "
            f"packages:\n{errors[-3000:]}")
        resolved = {canonical(item["metadata"]["name"]): item["metadata"]["version"]
                    for item in json.loads(report.read_text())["install"]}
        for requirement in wanted:
            assert canonical(re.split(r"[=<>]", requirement)[0]) in resolved, (release, requirement)
        assert resolved["torch"] == "2.14.1+cpu" and not any(name.startswith("nvidia") for name in resolved)
        changed = {name: (version, resolved[name]) for name, version in bundled.items()
                   if name in resolved and resolved[name] != version}
        assert not changed, f"Slicer {release}: these bundled packages would be replaced: {changed}"
    _, errors = old.communicate(timeout=PIP_SECONDS)
    assert old.returncode != 0 and "torch==2.14.1" in errors  # hence the panel's message on Python 3.9
    assert "Python 3.9" in unsupported_python((3, 9)) and "5.10" in unsupported_python((3, 9))
    assert unsupported_python((3, 12)) is None


def test_pip_runs_off_the_main_thread_and_reports_its_failure(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _metadata_wheel("acvl-utils", wheels)
    ok = Job(dependencies.pip_work([["--dry-run", "--no-deps", "--no-index", "--find-links", str(wheels),
                                     "acvl-utils"]], sys.executable)).start()
    assert ok.wait(120) and ok.error is None, ok.error
    failing = Job(dependencies.pip_work([["--no-index", "--find-links", str(wheels), "no-such-package-aac"]],
                                        sys.executable)).start()
    assert failing.wait(120)
    assert "pip install --no-index" in str(failing.error) and "no-such-package-aac" in str(failing.error)


@pytest.mark.parametrize("without_torch", [False, True])
def test_torch_is_left_to_pytorchutils_when_it_is_there(tmp_path, without_torch):
    calls = dependencies.pip_install_arguments(tmp_path / "c.txt", installed={"numpy": "2.0.2"}, cuda=False,
                                               system="Linux", without_torch=without_torch)
    asked = [argument for call in calls for argument in call]
    assert any(argument.startswith("torch==") for argument in asked) is not without_torch
    assert "nnunetv2==2.8.1" in asked
