"""Atomic file writes: an output is either the old complete file or the new complete file, never half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, IO


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed.

    The temporary file keeps the target's suffix (or `suffix`) so that writers choosing a format by extension
    (Pillow, matplotlib, pynrrd) behave as they would on the real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(handle)
    temporary_path = Path(temporary)
    os.chmod(temporary_path, 0o666 & ~_current_umask())  # mkstemp makes 0600; outputs get the usual mode
    try:
        yield temporary_path
        os.replace(temporary_path, path)
    finally:
        temporary_path.unlink(missing_ok=True)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, write: Callable[[IO], None], mode: str = "w") -> None:
    """Open a temporary file beside `path`, let `write` fill it, flush it to disk, then move it into place."""
    with atomic_path(path) as temporary:
        with open(temporary, mode, **({"newline": ""} if "b" not in mode else {})) as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda stream: stream.write(text))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    write_atomic(path, lambda stream: stream.write(data), mode="wb")
