"""sha256 of files, read in chunks: model packages pin their files with it, results rows recognise moved inputs."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, read in chunks so that large weights and radiographs need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_or_empty(path: str | Path) -> str:
    """sha256 of a readable file, "" for a missing or unreadable one (which then simply is not recognised)."""
    try:
        return sha256_file(path)
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        return ""
