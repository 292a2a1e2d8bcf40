"""Crash-safe file writes: a temp file in the target's directory, fsync, then ``os.replace``.

A reader (or a resumed run) sees the old file or the new one, never half of one, even after a
``kill -9`` or a power cut mid-write. The temp file sits in the SAME directory so the final
rename never crosses a filesystem (a cross-device "rename" is a copy, and a copy can be cut).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

TMP_MARK = ".tmp-"


def temp_name(path: Path) -> Path:
    """``dir/.name.tmp-<pid>``: hidden, per process, next to ``path``."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def stale_temps(path: Path) -> list[Path]:
    """Temp files of ``path`` left behind by killed writers (any pid)."""
    return sorted(path.parent.glob(f".{path.name}{TMP_MARK}*"))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """``with atomic_open(p) as f: f.write(...)``: ``p`` appears complete, or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in stale_temps(path):
        old.unlink(missing_ok=True)  # an earlier writer of this file was killed mid-write
    tmp = temp_name(path)
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, write: Callable[[IO], object], mode: str = "wb") -> None:
    """Call ``write(f)`` on a temp file and move it into place atomically."""
    with atomic_open(path, mode) as f:
        write(f)


def fsync_dir(directory: Path) -> None:
    """Persist a rename (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
