"""A real Orthanc PACS with its DICOMweb plugin, started for the tests on free localhost ports and stopped after.

Debian's `orthanc` and `orthanc-dicomweb` packages provide the server and the plugin (.ci/run installs them).
When they are missing, the tests fail in CI (the environment variable CI is set) and are skipped elsewhere,
naming what is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

PLUGIN_CANDIDATES = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so")
USER, PASSWORD = "aacscore", "test-password"


def orthanc_binary_and_plugin() -> tuple[str, str]:
    """Paths of the Orthanc binary and its DICOMweb plugin; fails in CI and skips elsewhere when missing."""
    binary = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if Path(p).is_file()), None)
    plugin = next((path for path in PLUGIN_CANDIDATES if Path(path).is_file()), None)
    missing = [what for what, found in (("the 'Orthanc' binary (Debian package orthanc)", binary),
                                        ("its DICOMweb plugin libOrthancDicomWeb.so (orthanc-dicomweb)", plugin))
               if not found]
    if missing:
        message = "Orthanc tests need " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message + "; .ci/run installs them with apt-get", pytrace=False)
        pytest.skip(message)
    return binary, plugin


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_orthanc(folder: Path) -> Iterator[str]:
    """Start Orthanc with storage in `folder`, basic authentication (USER, PASSWORD), localhost only; yields
    its DICOMweb root URL and stops it afterwards."""
    import requests

    binary, plugin = orthanc_binary_and_plugin()
    folder.mkdir(parents=True, exist_ok=True)
    http_port = free_port()
    config = {
        "Name": "AACScoreTest", "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
        "HttpPort": http_port, "DicomPort": free_port(), "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "w")
    process = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                log_tail = (folder / "orthanc.log").read_text()[-2000:]
                raise RuntimeError(f"Orthanc exited with {process.returncode}: {log_tail}")
            try:
                if requests.get(f"{base}/system", auth=(USER, PASSWORD), timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("Orthanc did not answer /system within 60 s")
            time.sleep(0.2)
        yield f"{base}/dicom-web"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
