"""Dependency pins, the pip calls that must never replace Slicer's packages, device choice, and sample data."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from AACScoreLib.slicer import dependencies
from AACScoreLib.slicer import sample_data
from AACScoreLib.slicer.dependencies import (
    PYPI_INDEX,
    REQUIREMENTS,
    TORCH_CPU_INDEX,
    canonical,
    missing_requirements,
    pip_install_arguments,
)
from AACScoreLib.devices import device_choice

ROOT = Path(__file__).resolve().parents[3]
SLICER_LIKE = {"numpy": "1.26.4", "SimpleITK": "2.4.0", "vtk": "9.4.2", "requests": "2.32.3", "Pillow": "10.4.0"}


def _requested(calls):
    """The requirement specifiers of pip calls: arguments that are neither options nor option values."""
    requested = []
    for call in calls:
        skip = False
        for argument in call:
            if skip:
                skip = False
            elif argument in ("-c", "--index-url", "--extra-index-url"):
                skip = True
            else:
                assert not argument.startswith("-"), argument
                requested.append(argument)
    return requested


def test_requirements_equal_pyproject_pins():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert list(REQUIREMENTS) == pyproject["project"]["dependencies"]
    assert all("==" in requirement for requirement in REQUIREMENTS)


def test_this_environment_has_every_pinned_package():
    """CI installs pyproject's pins, so the check reports nothing missing here (torch may carry +cpu/+cuXXX)."""
    assert missing_requirements() == []


def test_missing_requirements_names_absent_and_different_versions():
    installed = {name: version for name, version in map(dependencies.split_requirement, REQUIREMENTS)}
    del installed["nnunetv2"]
    installed["Pillow"] = installed.pop("pillow").replace("13", "10")
    installed["torch"] += "+cpu"
    problems = missing_requirements(installed)
    assert problems == ["nnunetv2==2.8.1 (not installed)", "pillow==13.0.0 (version 10.0.0 installed)"]


def test_pip_never_replaces_slicers_packages(tmp_path):
    constraints = tmp_path / "constraints.txt"
    calls = pip_install_arguments(constraints, installed=SLICER_LIKE, cuda=False, system="Linux")
    requested = _requested(calls)
    requested_names = {canonical(dependencies.split_requirement(r)[0]) for r in requested}
    # nothing Slicer already has is asked for, not even in the pinned version of pyproject
    assert not requested_names & {"numpy", "simpleitk", "vtk", "pillow", "requests"}
    assert all("==" in requirement for requirement in requested)
    # and everything installed, numpy, SimpleITK and vtk included, is held at its version for the dependencies
    lines = constraints.read_text().splitlines()
    for name, version in SLICER_LIKE.items():
        assert f"{canonical(name)}=={version}" in lines
    assert all(call[call.index("-c") + 1] == str(constraints) for call in calls)


def test_slicer_packages_are_never_installed_even_when_pip_cannot_see_them(tmp_path):
    calls = pip_install_arguments(tmp_path / "c.txt", installed={}, cuda=True, system="Linux")
    requested = {canonical(dependencies.split_requirement(r)[0]) for r in _requested(calls)}
    assert "numpy" not in requested and "simpleitk" not in requested and "vtk" not in requested
    assert "torch" in requested and "nnunetv2" in requested


def test_torch_comes_from_the_cpu_index_without_cuda(tmp_path):
    calls = pip_install_arguments(tmp_path / "c.txt", installed=SLICER_LIKE, cuda=False, system="Linux")
    first = calls[0]
    assert first[:2] == ["torch==2.14.1+cpu", "torchvision==0.29.1+cpu"]
    assert first[first.index("--index-url") + 1] == TORCH_CPU_INDEX
    assert first[first.index("--extra-index-url") + 1] == PYPI_INDEX
    assert all("torch" not in argument for argument in _requested(calls[1:]))
    assert "nnunetv2==2.8.1" in calls[1]


def test_torch_with_cuda_from_pypi_on_linux_and_the_cuda_index_on_windows(tmp_path):
    linux = pip_install_arguments(tmp_path / "c.txt", installed=SLICER_LIKE, cuda=True, system="Linux")
    assert len(linux) == 1 and "torch==2.14.1" in linux[0] and "--index-url" not in linux[0]
    windows = pip_install_arguments(tmp_path / "c.txt", installed=SLICER_LIKE, cuda=True, system="Windows")
    assert windows[0][0] == "torch==2.14.1+cu128" and dependencies.TORCH_CUDA_INDEX in windows[0]
    mac = pip_install_arguments(tmp_path / "c.txt", installed=SLICER_LIKE, cuda=False, system="Darwin")
    assert "torch==2.14.1" in mac[0] and "--index-url" not in mac[0]


def test_nothing_to_install_means_no_pip_call(tmp_path):
    everything = dict(map(dependencies.split_requirement, REQUIREMENTS))
    assert pip_install_arguments(tmp_path / "c.txt", installed=everything) == []
    assert not (tmp_path / "c.txt").exists()


def test_install_missing_passes_each_call_to_slicers_pip(tmp_path, monkeypatch):
    monkeypatch.setattr(dependencies, "installed_versions", lambda: dict(SLICER_LIKE))
    monkeypatch.setattr(dependencies, "cuda_present", lambda: False)
    made = []
    calls = dependencies.install_missing(tmp_path / "c.txt", pip_install=made.append, log=lambda line: None)
    assert made == calls and len(calls) == 2


def test_unusable_version_strings_stay_out_of_the_constraints_file(tmp_path):
    pip_install_arguments(tmp_path / "c.txt", installed={"weird": "1.0-local build", "ok": "2.0.post1"},
                          cuda=False, system="Linux")
    assert (tmp_path / "c.txt").read_text().splitlines() == ["ok==2.0.post1"]


def test_device_choice_messages():
    assert device_choice("cpu") == ("cpu", "Using the CPU, as chosen.")
    no_gpu = lambda: "torch 2.14.1 (a CPU-only build) sees no usable NVIDIA GPU"  # noqa: E731
    device, message = device_choice("cuda", no_gpu)
    assert device == "cpu"
    assert message.startswith("CUDA was requested but cannot be used: torch 2.14.1 (a CPU-only build)")
    assert message.endswith("Using the CPU instead (slower).")
    assert device_choice("auto", no_gpu) == ("cpu", f"Using the CPU: {no_gpu()}.")
    assert device_choice("cuda", lambda: None) == ("cuda", "Using the NVIDIA GPU (CUDA).")
    assert device_choice("AUTO", lambda: None)[0] == "cuda"
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        device_choice("gpu")


def test_device_choice_with_the_real_probe():
    """Without a usable GPU the real probe says why in words (whatever torch build is installed)."""
    device, message = device_choice("cuda")
    if device == "cuda":  # CI on a GPU machine
        assert message == "Using the NVIDIA GPU (CUDA)."
    else:
        assert device == "cpu" and message.startswith("CUDA was requested but cannot be used: torch")


def test_sample_data_checksums_match_the_files():
    present = {path.name: sample_data.file_sha256(path) for path in sorted(sample_data.SAMPLE_DATA_DIR.glob("*.dcm"))}
    assert sample_data.SAMPLE_SHA256 == present, (
        f"update SAMPLE_SHA256 in AACScoreLib/sample_data.py to:\n{present!r}")


def test_sample_data_registration_uses_sha256_checksums(monkeypatch, tmp_path):
    monkeypatch.setattr(sample_data, "SAMPLE_DATA_DIR", tmp_path)
    monkeypatch.setattr(sample_data, "SAMPLE_SHA256", {"phantom_s7_0000.dcm": "ab" * 32})
    registered = []

    class _Logic:
        @staticmethod
        def registerCustomSampleDataSource(**kwargs):
            registered.append(kwargs)

    assert sample_data.register(_Logic) == ["AACScore phantom_s7_0000"]
    (source,) = registered
    assert source["checksums"] == "SHA256:" + "ab" * 32 and source["category"] == "AACScore"
    assert source["uris"] == (tmp_path / "phantom_s7_0000.dcm").as_uri()
    assert source["fileNames"] == "phantom_s7_0000.dcm" and source["nodeNames"] == "AACScore phantom_s7_0000"


def test_dicom_results_wait_for_pydicom_3_where_slicer_bundles_pydicom_2(tmp_path):
    _, slicer_510 = dependencies.slicer_release_packages("5.10")
    assert slicer_510["pydicom"].startswith("2.")
    calls = pip_install_arguments(tmp_path / "c.txt", installed=slicer_510, cuda=False, system="Linux")
    requested = {canonical(dependencies.split_requirement(r)[0]) for r in _requested(calls)}
    assert "nnunetv2" in requested and not requested & {"highdicom", "dicomweb-client", "pydicom"}
    everything_but_dicom = {name: version for name, version in map(dependencies.split_requirement, REQUIREMENTS)
                            if name not in dependencies.NEED_PYDICOM_3}
    assert missing_requirements({**everything_but_dicom, "pydicom": "2.4.4"}) == ["pydicom==3.0.2 (version 2.4.4 installed)"]
    assert "highdicom==0.28.2 (not installed)" in missing_requirements(everything_but_dicom)
