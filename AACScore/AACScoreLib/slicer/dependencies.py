"""The Python packages AACScore needs inside 3D Slicer, and how to install them without breaking Slicer.

A Slicer extension ships no pyproject.toml, so the pins live here (a test checks they equal pyproject's).
Installing goes through Slicer's pip (`slicer.util.pip_install`) with two safeguards, after what users of other
AI extensions complain about most:

- Slicer's own packages are never replaced. Every distribution already installed in Slicer's Python is written
  into a pip constraints file at its installed version (numpy, SimpleITK and vtk too, from their module's
  version when pip has no record of them), and nothing already installed is requested again, so pip either
  leaves them as they are or stops with a conflict; it can never up- or downgrade them.
- torch comes first, through the PyTorch extension's PyTorchUtils (declared as EXTENSION_DEPENDS), whose
  light-the-torch picks the build that matches the NVIDIA driver (the CPU build without one), within
  `TORCH_RANGES`: a range, since an exact CUDA build cannot suit every driver. Without that extension (the module
  added from a source tree), pip installs it: from PyTorch's CPU wheel index, pinned as `torch==2.14.1+cpu`, when
  this machine has no NVIDIA GPU (no working `nvidia-smi`), so a computer without CUDA does not download
  gigabytes of CUDA libraries; with a GPU, from PyPI on Linux (those wheels bundle CUDA) and from PyTorch's CUDA
  index (`+cu128`) on Windows, whose PyPI wheels are CPU-only. macOS always uses PyPI.

Supported: 3D Slicer 5.10 and 5.12 (Python 3.12). `Resources/SlicerConstraints/slicer-<release>.txt` lists the
packages each release bundles (from its SuperBuild files); a test resolves the set AACScore installs against
each with pip. Slicer 5.6 and 5.8 run Python 3.9, for which the pinned packages do not exist:
`unsupported_python` says so in the panel.
"""

from __future__ import annotations

import collections
import importlib
import importlib.metadata
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..errors import AACScoreError

REQUIREMENTS: tuple[str, ...] = (
    "torch==2.14.1",
    "torchvision==0.29.1",
    "nnunetv2==2.8.1",
    "grad-cam==1.5.7",
    "safetensors==0.8.0",
    "pydicom==3.0.2",
    "highdicom==0.28.2",
    "dicomweb-client==0.61.2",
    "pylibjpeg==2.1.0",
    "pylibjpeg-libjpeg==2.5.0",
    "pylibjpeg-openjpeg==2.6.0",
    "pylibjpeg-rle==2.2.0",
    "pyjpegls==1.5.1",
    "pynrrd==1.1.3",
    "nibabel==5.4.2",
    "scikit-image==0.26.0",
    "scipy==1.17.1",
    "pillow==13.0.0",
    "matplotlib==3.11.2",
    "numpy==2.4.6",
)
"""The core's pinned dependencies, equal to pyproject.toml's [project] dependencies."""

NEED_PYDICOM_3: tuple[str, ...] = ("highdicom", "dicomweb-client")
"""DICOM results and PACS access (highdicom 0.28 needs pydicom >= 3.0.1): skipped where Slicer bundles pydicom 2
(5.10), which AACScore never replaces; everything else works there, and the panel says what is missing."""

SLICER_PACKAGES: dict[str, str] = {"numpy": "numpy", "SimpleITK": "SimpleITK", "vtk": "vtk"}
"""Packages Slicer builds or bundles itself (distribution name: import name); never installed by AACScore."""

TORCH_PACKAGES: tuple[str, ...] = ("torch", "torchvision")
TORCH_RANGES: dict[str, str] = {"torch": ">=2.6,<=2.14.1", "torchvision": ">=0.21,<=0.29.1"}
"""What PyTorchUtils may install: tested with the pins, and no newer; 2.6 made `weights_only` loading the default."""
MINIMUM_PYTHON: tuple[int, int] = (3, 10)
SUPPORTED_SLICER_RELEASES: tuple[str, ...] = ("5.10", "5.12")
CONSTRAINTS_DIR = Path(__file__).resolve().parents[2] / "Resources" / "SlicerConstraints"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu128"  # CUDA 12.8 wheels of torch 2.14 for Windows
PYPI_INDEX = "https://pypi.org/simple"  # torch's own dependencies (sympy, filelock, ...)


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name (Pillow, pillow and PIL-low spellings compare equal)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def split_requirement(requirement: str) -> tuple[str, str]:
    """("torch", "2.14.1") from "torch==2.14.1"."""
    name, _, version = requirement.partition("==")
    return name.strip(), version.strip()


def _valid_version(version: str) -> bool:
    """pip rejects a whole constraints file over one non-PEP 440 version (some source builds have them)."""
    return re.fullmatch(r"v?\d+(\.\d+)*((a|b|rc|\.post|\.dev)\d*)*(\+[A-Za-z0-9.]+)?", version) is not None


def installed_versions() -> dict[str, str]:
    """Every distribution in this Python (canonical name -> version), plus Slicer's packages that pip does not
    know about (Slicer builds SimpleITK and vtk itself), from their module's version."""
    versions = {}
    for distribution in importlib.metadata.distributions():
        name = distribution.metadata["Name"]
        if name:
            versions.setdefault(canonical(name), distribution.version)
    for name, module in SLICER_PACKAGES.items():
        if canonical(name) not in versions:
            version = _module_version(module)
            if version:
                versions[canonical(name)] = version
    return versions


def _module_version(module_name: str) -> str | None:
    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - a broken binary module raises anything on import
        return None
    version = getattr(module, "__version__", None)
    if version is None and module_name == "SimpleITK":
        version = module.Version.VersionString()
    if version is None and module_name == "vtk":
        version = module.vtkVersion.GetVTKVersion()
    return str(version) if version else None


def unsupported_python(version: tuple[int, ...] | None = None) -> str | None:
    """Why AACScore cannot run in this Slicer's Python (older than 3.10), or None."""
    version = tuple(sys.version_info[:2] if version is None else version[:2])
    if version >= MINIMUM_PYTHON:
        return None
    return (f"AACScore needs 3D Slicer {' or '.join(SUPPORTED_SLICER_RELEASES)} (Python 3.12). This Slicer runs "
            f"Python {version[0]}.{version[1]}, for which PyTorch 2.14 and nnU-Net 2.8 publish no packages. "
            "Install a newer Slicer from download.slicer.org.")


def slicer_release_packages(release: str) -> tuple[str, dict[str, str]]:
    """(Python version, {package: version}) that 3D Slicer `release` (e.g. "5.10") bundles."""
    path = CONSTRAINTS_DIR / f"slicer-{release}.txt"
    if not path.is_file():
        raise ValueError(f"no constraints file for Slicer {release} ({path})")
    python, packages = "", {}
    for line in path.read_text().splitlines():
        if line.startswith("# python:"):
            python = line.split(":", 1)[1].strip()
        elif line.strip() and not line.startswith("#"):
            name, version = split_requirement(line)
            packages[canonical(name)] = version
    return python, packages


def applicable_requirements(installed: Mapping[str, str]) -> tuple[str, ...]:
    """REQUIREMENTS less those that cannot install beside the pydicom this Python holds (NEED_PYDICOM_3)."""
    pydicom = {canonical(k): v for k, v in installed.items()}.get("pydicom")
    if pydicom is None or not pydicom.split(".")[0].isdigit() or int(pydicom.split(".")[0]) >= 3:
        return REQUIREMENTS
    return tuple(r for r in REQUIREMENTS if split_requirement(r)[0] not in NEED_PYDICOM_3)


def wanted_requirements(installed: Mapping[str, str], torch_ranges: bool = False) -> list[str]:
    """The requirements to ask pip for in a Python that holds `installed`: each one not installed in any version
    (a different version is reported, never replaced) and none of Slicer's own. With `torch_ranges`, torch and
    torchvision as `TORCH_RANGES` (what PyTorchUtils is given)."""
    applicable = applicable_requirements(installed)
    installed = {canonical(name) for name in installed}
    protected = {canonical(name) for name in SLICER_PACKAGES}
    wanted = []
    for requirement in applicable:
        name = split_requirement(requirement)[0]
        if canonical(name) in installed or canonical(name) in protected:
            continue
        wanted.append(name + TORCH_RANGES[name] if torch_ranges and name in TORCH_RANGES else requirement)
    return wanted


def missing_requirements(installed: Mapping[str, str] | None = None) -> list[str]:
    """Problems with the pinned requirements: "name==version (not installed)" or "(version X installed)".

    A different installed version is reported but never replaced by `pip_install_arguments`.
    """
    installed = installed_versions() if installed is None else {canonical(k): v for k, v in installed.items()}
    problems = []
    for requirement in applicable_requirements(installed):
        name, version = split_requirement(requirement)
        have = installed.get(canonical(name))
        if have is None:
            problems.append(f"{requirement} (not installed)")
        elif have.split("+")[0] != version:
            problems.append(f"{requirement} (version {have} installed)")
    return problems


def cuda_present() -> bool:
    """An NVIDIA GPU with a working driver, asked without torch (it may not be installed yet)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return listing.returncode == 0 and "GPU" in listing.stdout


def torch_index(cuda: bool, system: str | None = None) -> str | None:
    """The wheel index for torch: CPU wheels without CUDA, PyPI (None) or the CUDA index with it."""
    system = system or platform.system()
    if system == "Darwin":
        return None  # PyPI's macOS wheels are the only ones (CPU and Apple MPS)
    if not cuda:
        return TORCH_CPU_INDEX
    return TORCH_CUDA_INDEX if system == "Windows" else None


def pip_install_arguments(constraints_file: str | Path, installed: Mapping[str, str] | None = None,
                          cuda: bool | None = None, system: str | None = None,
                          without_torch: bool = False) -> list[list[str]]:
    """The `slicer.util.pip_install` calls (argument lists) that install what is missing, in order.

    Writes `constraints_file`: every installed distribution (and numpy, SimpleITK, vtk) pinned at its
    installed version, passed to every call with `-c`. Requirements already installed, in any version, are not
    requested, and Slicer's own packages never are. torch and torchvision go in their own call when the
    wheel index differs from PyPI, or in none `without_torch` (PyTorchUtils installed them first).
    Returns [] when nothing is missing.
    """
    installed = installed_versions() if installed is None else {canonical(k): v for k, v in installed.items()}
    wanted = wanted_requirements(installed)
    if without_torch:
        wanted = [r for r in wanted if split_requirement(r)[0] not in TORCH_PACKAGES]
    if not wanted:
        return []
    constraints = Path(constraints_file)
    constraints.parent.mkdir(parents=True, exist_ok=True)
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in sorted(installed.items())
                                   if _valid_version(version)))
    common = ["-c", str(constraints)]
    torch_wanted = [r for r in wanted if split_requirement(r)[0] in TORCH_PACKAGES]
    others = [r for r in wanted if r not in torch_wanted]
    index = torch_index(cuda_present() if cuda is None else cuda, system) if torch_wanted else None
    calls = []
    if torch_wanted and index is not None:
        # the local version (+cpu, +cu128) names the build exactly; the index's pages win over PyPI's torch
        local = "+" + index.rstrip("/").rsplit("/", 1)[-1]
        calls.append([requirement + local for requirement in torch_wanted]
                     + ["--index-url", index, "--extra-index-url", PYPI_INDEX] + common)
        torch_wanted = []
    if torch_wanted or others:
        calls.append(torch_wanted + others + common)
    return calls


def install_missing(constraints_file: str | Path, pip_install: Callable[[list[str]], object] | None = None,
                    log: Callable[[str], None] = print) -> list[list[str]]:
    """Install the missing requirements through Slicer's pip (inside Slicer); returns the calls made."""
    if pip_install is None:
        import slicer.util

        pip_install = slicer.util.pip_install
    calls = pip_install_arguments(constraints_file)
    for arguments in calls:
        log("pip install " + " ".join(arguments))
        pip_install(arguments)
    importlib.invalidate_caches()
    return calls


def pip_work(calls: Sequence[list[str]], python: str | None = None) -> Callable:
    """Work for a `workflow.Job`: each `pip install` call in a subprocess of Slicer's Python (PythonSlicer, as
    `slicer.util.pip_install` does), off the main thread so Slicer stays responsive. pip's output lines are the
    progress text; a cancel stops pip; a failure raises with pip's last lines."""
    from ..worker.client import worker_python

    def work(job) -> None:
        for index, arguments in enumerate(calls):
            command = [python or worker_python(), "-m", "pip", "install", *arguments]
            job.report(index / len(calls), "pip install " + " ".join(arguments)[:100])
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       errors="replace", creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
            tail: collections.deque = collections.deque(maxlen=20)

            def read(process=process, tail=tail, index=index) -> None:
                for line in process.stdout:
                    tail.append(line.rstrip())
                    if line.strip():
                        job.report(index / len(calls), line.strip()[:120])

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            while process.poll() is None:
                if job.is_cancelled():
                    process.terminate()
                    process.wait()
                    return
                time.sleep(0.1)
            reader.join(5)
            if process.returncode != 0:
                raise AACScoreError(f"pip install {' '.join(arguments)} failed (exit code {process.returncode}):\n"
                                    + "\n".join(tail))
        importlib.invalidate_caches()
        job.report(1.0, "packages installed")

    return work
