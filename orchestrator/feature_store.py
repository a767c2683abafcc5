"""On-disk feature cache: one ``.npy`` per layer under a content key.

Features of a frozen encoder are a pure function of (encoder identity,
dataset split fingerprint, field), so that triple, hashed, names an entry.
An entry is a directory ``<root>/<key>/`` holding ``layer_000.npy`` ... and a
``manifest.json`` with shapes and a SHA-256 per file. It is written into a
temporary sibling directory and renamed into place, so a reader sees either
nothing or a complete entry. A file that fails its checksum makes the entry
count as missing (and it is rebuilt); nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"


def feature_key(encoder_identity: dict, split_fingerprint: str, field: str) -> str:
    blob = json.dumps([encoder_identity, split_fingerprint, field], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


class FeatureStore:
    """Content-keyed per-layer features on disk."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / key

    def manifest(self, key: str) -> dict | None:
        try:
            return json.loads((self.path(key) / MANIFEST).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def has(self, key: str, *, verify: bool = False) -> bool:
        """True if a complete entry exists (checksums too, if ``verify``)."""
        manifest = self.manifest(key)
        if manifest is None:
            return False
        return not verify or self.verify(key)

    def verify(self, key: str) -> bool:
        manifest = self.manifest(key) or {"files": {}}
        return bool(manifest["files"]) and all(
            (self.path(key) / name).is_file() and _sha256(self.path(key) / name) == digest
            for name, digest in manifest["files"].items())

    def put(self, key: str, layers: np.ndarray, meta: dict | None = None) -> None:
        """Store features [N, L, D] (or [L, N, D] with ``layer_major``) atomically."""
        tmp = self.root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        files = {}
        for layer in range(layers.shape[1]):
            name = f"layer_{layer:03d}.npy"
            np.save(tmp / name, np.ascontiguousarray(layers[:, layer], dtype=np.float32))
            files[name] = _sha256(tmp / name)
        manifest = {"key": key, "num_layers": layers.shape[1], "shape": list(layers.shape),
                    "files": files, "meta": meta or {}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        _fsync_dir(tmp)
        self.discard(key)  # a corrupt old entry is replaced, never merged
        try:
            os.rename(tmp, self.path(key))
        except OSError:  # another writer finished first: its entry is as good
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(self.root)

    def discard(self, key: str) -> None:
        if self.path(key).exists():
            shutil.rmtree(self.path(key), ignore_errors=True)

    def layer(self, key: str, layer: int, *, mmap: bool = True) -> np.ndarray:
        """One layer's features [N, D], memory-mapped (no copy until touched)."""
        if layer < 0:
            layer += self.manifest(key)["num_layers"]
        path = self.path(key) / f"layer_{layer:03d}.npy"
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)

    def num_layers(self, key: str) -> int:
        return self.manifest(key)["num_layers"]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
