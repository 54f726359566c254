"""Files wattprint writes: whole or not at all (the one atomic-write helper), private by default
(0600 files, 0700 directories: what we write holds request ids, strata and usage)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def private_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and missing parents) as 0700 directories; an existing one is left as it is."""
    path = Path(path)
    missing = []
    for d in (path, *path.parents):
        if d.is_dir():
            break
        missing.append(d)
    for d in reversed(missing):  # parents too (``mkdir(parents=True)`` gives them the umask's mode)
        d.mkdir(mode=PRIVATE_DIR, exist_ok=True)
    return path


def open_private(path: str | os.PathLike):
    """Open ``path`` for writing (truncated) as a 0600 file, refusing to follow a symbolic link."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE)
    os.fchmod(fd, PRIVATE_FILE)  # an existing file keeps its mode through O_CREAT
    return os.fdopen(fd, "wb")


def atomic_write(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> None:
    """Write ``path`` whole or not at all (a temporary file in the same directory, then a rename).

    ``mode``: the file's permission bits; private (0600) by default. ``None`` is the same; pass e.g.
    ``0o644`` for a file meant to be shared. Missing parent directories are created 0700.
    """
    path = Path(path)
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, PRIVATE_FILE if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
