"""fsync helpers for the atomic writes of the feature and results stores.

A rename is atomic, but only durable once both the renamed file's data and
the directory entry reach the disk: fsync the file, rename, fsync the dir.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import uuid
from pathlib import Path

import numpy as np


FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left / disk quota exceeded


class DiskFull(OSError):
    """A store write failed for lack of space; names the file and the fix.

    An ``OSError`` with the original ``errno`` (code that checks for ENOSPC
    still sees it); ``fix`` says what to do and may be made more specific by
    the caller that knows the run (the driver names ``resume RUN_DIR``).
    """

    def __init__(self, path: Path, cause: OSError):
        super().__init__(cause.errno, os.strerror(cause.errno), str(path))
        self.path = Path(path)
        self.fix = (f"free space on that filesystem (`df -h {self.path.parent}`), then run the "
                    "same command again")

    def __str__(self) -> str:
        return (f"no space left on the device of {self.path.parent} while writing "
                f"{self.path.name} ({self.strerror}); no partial file was left there. "
                f"Fix: {self.fix}")


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories open read-only on Linux)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably.

    The bytes go to a uniquely named temp file next to ``path`` (so two
    writers never share one), which is fsynced, renamed over ``path`` and the
    directory fsynced: a reader sees the old file or the whole new one, never
    a mix, and a crash leaves at most a stray ``.tmp-*`` file. A full disk
    raises :class:`DiskFull` (the temp file removed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno in FULL:
            raise DiskFull(path, err) from err
        raise
    fsync_path(path.parent)


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` of ``array`` to ``path`` via :func:`atomic_write_bytes`."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())
