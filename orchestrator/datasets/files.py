"""Files behind real datasets: lazy image sequences, path checks, fingerprints.

Fingerprints identify content cheaply, never location, so a moved dataset
keeps its cached features:

* metadata files (annotation JSON, caption CSV, a Parquet table) are not
  hashed as files: the split fingerprints hash what was parsed from them
  (caption texts, image/caption pairing, labels), so a reformatted file with
  the same content keeps its key and any edit to that content changes it;
* image files and dataset trees are identified by their relative names,
  sizes and modification times: one ``stat`` per file, no reading. An edited
  image gets a new mtime and so a new key; a copy that does not keep mtimes
  (``cp`` without ``-p``) recomputes rather than risk stale features.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from orchestrator.datasets.base import DatasetError, DatasetOptionError


class LazyImages(Sequence):
    """``n`` images, item ``i`` made by ``load(i)`` only when asked for.

    Slicing returns a list of loaded images, so ``images[a:b]`` is the I/O of
    one encoder batch and no more.
    """

    def __init__(self, n: int, load: Callable[[int], Any]):
        self._n, self._load = n, load

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._load(i) for i in range(*index.indices(self._n))]
        if not -self._n <= index < self._n:
            raise IndexError(index)
        return self._load(index % self._n)


class ImageFiles(LazyImages):
    """Image files by path, opened as RGB PIL images when accessed."""

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.paths = [Path(p) for p in paths]
        super().__init__(len(self.paths), lambda i: open_image(self.paths[i]))


def open_image(path: str | os.PathLike) -> Any:
    """An RGB PIL image, read fully now (the file handle is not kept open)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def require(dataset: str, path: str | os.PathLike | None, layout: str, what: str = "path") -> Path:
    """``path`` as a Path, or a DatasetError naming the dataset and its layout."""
    if path is None:
        raise DatasetError(f"dataset {dataset!r}: option {what!r} is required.\n{layout}")
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset {dataset!r}: {what} {str(path)!r} does not exist.\n{layout}")
    return path


def require_option(dataset: str, options: dict, key: str, layout: str) -> Path:
    """The existing path of option ``key``; a DatasetOptionError naming it otherwise
    (for validation: the same check :func:`require` makes when the split loads)."""
    value = options.get(key)
    if value is None:
        raise DatasetOptionError(f"dataset {dataset!r} needs option {key!r}. {layout}", f"options.{key}")
    path = Path(str(value)).expanduser()
    if not path.exists():
        raise DatasetOptionError(f"dataset {dataset!r}: {key} {str(path)!r} does not exist. {layout}",
                                 f"options.{key}")
    return path


def files_identity(dataset: str, paths: Iterable[Path], base: Path, layout: str) -> str:
    """Hash of (name relative to ``base``, size, mtime) of every path, in order.

    Doubles as the existence check: the first missing files are named in a
    DatasetError before any encoder runs, not halfway through an extraction.
    """
    digest, missing = hashlib.sha256(), []
    for path in paths:
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            missing.append(str(path))
            continue
        digest.update(f"{_relative(path, base)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DatasetError(f"dataset {dataset!r}: {len(missing)} image file(s) missing: {shown}.\n{layout}")
    return digest.hexdigest()


def tree_identity(folder: Path) -> str:
    """Hash of (relative name, size, mtime) of every file under ``folder``."""
    digest = hashlib.sha256()
    for path in sorted(_walk(folder)):
        stat = os.stat(path)
        digest.update(f"{_relative(Path(path), folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _walk(folder: Path) -> Iterable[str]:
    for dirpath, _, names in os.walk(folder):
        for name in names:
            if not name.startswith("."):
                yield os.path.join(dirpath, name)


def _relative(path: Path, base: Path) -> str:
    try:
        return Path(path).relative_to(base).as_posix()
    except ValueError:  # outside the base: its name is the best portable identity
        return Path(path).name
