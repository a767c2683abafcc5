"""On-disk feature cache: one ``.npy`` per layer under a content key.

Features of a frozen encoder are a pure function of (encoder identity,
content fingerprint of the inputs, field), so that triple, hashed, names an
entry. An entry is a directory ``<root>/<key>/`` holding ``layer_000.npy`` ...
and a ``manifest.json`` with shapes, byte sizes and a SHA-256 per file.

Why ``.npy`` per layer and not safetensors: a trial needs two layers, and a
one-array file memory-maps with plain ``np.load(mmap_mode="r")`` (zero copies
until touched, ``allow_pickle=False`` so nothing is ever unpickled), is
written incrementally through ``np.lib.format.open_memmap`` (an extraction
never holds all layers of a dataset in RAM), and needs no extra format
library. Safetensors would add multi-tensor files and a framework-neutral
header, neither of which a one-tensor-per-layer layout uses.

Writes are atomic: an entry is built in a temporary sibling directory, its
files fsynced, and renamed into place, so a reader sees nothing or a complete
entry. Integrity has two levels, because hashing is not free (SHA-256 runs at
~1.7 GB/s here; the COCO train features of a ViT-L are ~8 GB):

* ``has(key)`` checks the manifest and every file's byte size: one ``stat``
  per layer, so a truncated or missing file is caught at no cost;
* ``has(key, verify=True)`` also checks every SHA-256, once per process per
  entry (memoised on each file's size and mtime), so a corrupt file is
  rebuilt, never used, and a long-lived actor does not re-hash on each call.

Two processes asking for the same entry at once serialise on
:meth:`FeatureStore.lock`, an ``fcntl.flock`` on ``<root>/.locks/<key>.lock``:
the second waits, then finds the entry and computes nothing. The kernel drops
the lock when its holder dies, so a crashed extractor never blocks others.

Token entries (:mod:`orchestrator.token_store`) live under the same root and
use the same lock, temporary directories and :meth:`FeatureStore.publish`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np

from orchestrator.durable import fsync_path
from orchestrator.keys import content_key

MANIFEST = "manifest.json"
LOCKS = ".locks"


def default_cache_dir() -> Path:
    """The cache root of a spec without ``cache_dir``: ``$STRUCTURE_SWEEP_CACHE``,
    else ``~/.cache/structure-sweep`` (features, tokens and curated selections)."""
    return Path(os.environ.get("STRUCTURE_SWEEP_CACHE") or Path.home() / ".cache" / "structure-sweep")


def feature_key(encoder_identity: dict, split_fingerprint: str, field: str) -> str:
    return content_key([encoder_identity, split_fingerprint, field], 32)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def layer_file(layer: int) -> str:
    return f"layer_{layer:03d}.npy"


class FeatureStore:
    """Content-keyed per-layer features on disk."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._verified: dict[str, tuple] = {}  # key -> file signature whose checksums passed

    def path(self, key: str) -> Path:
        return self.root / key

    def manifest(self, key: str) -> dict | None:
        try:
            return json.loads((self.path(key) / MANIFEST).read_text())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return None

    def has(self, key: str, *, verify: bool = False) -> bool:
        """True if a complete entry exists: manifest and file sizes always,
        checksums too if ``verify`` (once per process per entry)."""
        manifest = self.manifest(key)
        signature = manifest and self._signature(key, manifest)
        if not signature:
            return False
        return not verify or self._verified.get(key) == signature or self._verify(key, manifest, signature)

    def _signature(self, key: str, manifest: dict) -> tuple | None:
        """(name, size, mtime) of each file, or None if one is missing or of the wrong size."""
        files, sizes = manifest.get("files") or {}, manifest.get("sizes") or {}
        signature = []
        for name in sorted(files):
            try:
                stat = os.stat(self.path(key) / name)
            except FileNotFoundError:
                return None
            if name in sizes and stat.st_size != sizes[name]:
                return None
            signature.append((name, stat.st_size, stat.st_mtime_ns))
        return tuple(signature) or None

    def _verify(self, key: str, manifest: dict, signature: tuple) -> bool:
        ok = all(_sha256(self.path(key) / name) == digest for name, digest in manifest["files"].items())
        if ok:
            self._verified[key] = signature
        return ok

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Exclusive cross-process lock of one key (blocks until acquired).

        Lock files are never deleted: unlinking one while another process
        waits on it would let two holders in.
        """
        (self.root / LOCKS).mkdir(exist_ok=True)
        with open(self.root / LOCKS / f"{key}.lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def writer(self, key: str, shape: tuple[int, int, int], meta: dict | None = None) -> "EntryWriter":
        """An :class:`EntryWriter` for features of ``shape`` [N, L, D], filled batch by batch."""
        return EntryWriter(self, key, shape, meta)

    def temp_dir(self, key: str) -> Path:
        """A new temporary directory in which to build an entry of ``key``."""
        tmp = self.root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        return tmp

    def publish(self, key: str, tmp: Path, names: list[str], fields: dict) -> None:
        """Make the files ``names`` of ``tmp`` the entry ``key``: fsync and checksum
        them, write the manifest (``fields`` + key, checksums and sizes), rename
        the directory into place (replacing a stale entry)."""
        files, sizes = {}, {}
        for name in names:
            fsync_path(tmp / name)
            files[name], sizes[name] = _sha256(tmp / name), (tmp / name).stat().st_size
        manifest = {"key": key, **fields, "files": files, "sizes": sizes}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        fsync_path(tmp / MANIFEST)
        fsync_path(tmp)
        self.discard(key)  # a corrupt old entry is replaced, never merged
        try:
            os.rename(tmp, self.path(key))
        except OSError:  # another writer (without the lock) finished first: its entry is as good
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_path(self.root)

    def discard_partials(self, key: str) -> int:
        """Remove what interrupted writers of ``key`` left (``.tmp-<key>-*``: a
        killed extractor never reaches its cleanup). Call it holding
        :meth:`lock`, so no live writer's directory is removed. Never read
        anyway (only a renamed, complete entry is); this frees the space."""
        partials = list(self.root.glob(f".tmp-{key}-*"))
        for path in partials:
            shutil.rmtree(path, ignore_errors=True)
        return len(partials)

    def discard(self, key: str) -> None:
        """Remove an entry: renamed away first, so no reader sees it half deleted."""
        if self.path(key).exists():
            trash = self.root / f".trash-{key}-{uuid.uuid4().hex[:8]}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.path(key), trash)
                shutil.rmtree(trash, ignore_errors=True)
        self._verified.pop(key, None)

    def layer(self, key: str, layer: int, *, mmap: bool = True) -> np.ndarray:
        """One layer's features [N, D], memory-mapped (no copy until touched)."""
        if layer < 0:
            layer += self.manifest(key)["num_layers"]
        return np.load(self.path(key) / layer_file(layer), mmap_mode="r" if mmap else None,
                       allow_pickle=False)


class StagedEntry:
    """An entry built in a temporary directory. Used as a context manager it commits
    (publishes the entry) on success and aborts (removes the directory) on error."""

    def commit(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class EntryWriter(StagedEntry):
    """Builds one entry in a temporary directory; :meth:`commit` publishes it.

    Rows are written in order with :meth:`write` straight into one memory-
    mapped ``.npy`` per layer. Used as a context manager it commits on success
    and removes the temporary directory on error.
    """

    def __init__(self, store: FeatureStore, key: str, shape: tuple[int, int, int], meta: dict | None):
        self.store, self.key, self.shape, self.meta = store, key, tuple(int(s) for s in shape), meta or {}
        n, num_layers, dim = self.shape
        self.tmp = store.temp_dir(key)
        self._arrays = [np.lib.format.open_memmap(self.tmp / layer_file(i), mode="w+", dtype=np.float32,
                                                  shape=(n, dim)) for i in range(num_layers)]
        self.rows = 0

    def write(self, block: np.ndarray) -> None:
        """Append rows [B, L, D] (features of the next B samples)."""
        end = self.rows + len(block)
        if end > self.shape[0] or tuple(block.shape[1:]) != self.shape[1:]:
            raise ValueError(f"rows {self.rows}:{end} of shape {block.shape[1:]} do not fit {self.shape}")
        for layer, array in enumerate(self._arrays):
            array[self.rows:end] = block[:, layer]
        self.rows = end

    def commit(self) -> None:
        """Checksum, fsync and rename into place (replacing a stale entry)."""
        if self.rows != self.shape[0]:
            raise ValueError(f"entry {self.key}: {self.rows} of {self.shape[0]} rows written")
        for array in self._arrays:
            array.flush()
        self._arrays = []
        names = [layer_file(layer) for layer in range(self.shape[1])]
        self.store.publish(self.key, self.tmp, names, {"num_layers": self.shape[1], "shape": list(self.shape),
                                                       "meta": self.meta})

    def abort(self) -> None:
        self._arrays = []
        shutil.rmtree(self.tmp, ignore_errors=True)

