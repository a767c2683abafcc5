"""fsync helpers for the atomic writes of the feature and results stores.

A rename is atomic, but only durable once both the renamed file's data and
the directory entry reach the disk: fsync the file, rename, fsync the dir.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories open read-only on Linux)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
