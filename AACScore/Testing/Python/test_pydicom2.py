"""The DICOM reader with the pydicom that 3D Slicer 5.10 bundles (2.4.4, with its numpy 2.0.2), which AACScore
never replaces: the reader tests run in a fresh venv of exactly those (plus the decoders AACScore installs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SLICER_510 = ["numpy==2.0.2", "pillow==11.2.1", "pydicom==2.4.4"]
AACSCORE_ADDS = ["pylibjpeg==2.1.0", "pylibjpeg-libjpeg==2.5.0", "pylibjpeg-openjpeg==2.6.0", "pylibjpeg-rle==2.2.0",
                 "pyjpegls==1.5.1", "pynrrd==1.1.3", "nibabel==5.4.2", "pytest"]


def test_reader_tests_pass_with_slicer_510s_pydicom(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # not --system-site-packages
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
    env.pop("PIP_FIND_LINKS", None)
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--only-binary=:all:",
                              *SLICER_510, *AACSCORE_ADDS], capture_output=True, text=True, env=env, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    env["PYTHONPATH"] = str(ROOT / "AACScore")
    run = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                          str(ROOT / "AACScore" / "Testing" / "Python" / "test_radiograph.py")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:]
    version = subprocess.run([str(python), "-c", "import pydicom; print(pydicom.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    assert version == "2.4.4"
