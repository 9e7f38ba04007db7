"""The demo radiographs shipped in Resources/SampleData, registered with Slicer's Sample Data module.

Their SHA256 sums are written here (a test checks them against the files), so Slicer's SampleData verifies
each file it copies into its cache, as for any downloaded sample.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SAMPLE_DATA_DIR = Path(__file__).resolve().parents[2] / "Resources" / "SampleData"
CATEGORY = "AACScore"

SAMPLE_SHA256: dict[str, str] = {
    "phantom_alt_s4002_0000.dcm": "eb737e658a40d0d3ddf2925d2e5f5291c6afbe834aeaa44c7513a69acac1d696",
    "phantom_alt_s4003_0000.dcm": "9290eea854f113d51dbb49f8f672da76c7a0f91ff7cf83635c41c3772e525c17",
    "phantom_alt_s4004_0000.dcm": "195cadffc42b88c95b753fa751468404ba06b8d7d6ba42ed37d938f158370cf1",
}
"""File name in SAMPLE_DATA_DIR -> SHA256 (the test prints the dict to paste when files are added)."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sample_name(file_name: str) -> str:
    """The name shown in Sample Data and given to the loaded volume, e.g. "AACScore phantom_s7_0000"."""
    return f"AACScore {Path(file_name).stem}"


def register(sample_data_logic) -> list[str]:
    """Register every demo radiograph with SampleData.SampleDataLogic; returns the sample names.

    The files are local: their file:// URIs are "downloaded" into Slicer's cache, checksum checked.
    """
    names = []
    for file_name, sha256 in sorted(SAMPLE_SHA256.items()):
        path = SAMPLE_DATA_DIR / file_name
        name = sample_name(file_name)
        sample_data_logic.registerCustomSampleDataSource(
            category=CATEGORY,
            sampleName=name,
            uris=path.as_uri(),
            fileNames=file_name,
            nodeNames=name,
            checksums=f"SHA256:{sha256}",
            loadFileType="VolumeFile",
        )
        names.append(name)
    return names
