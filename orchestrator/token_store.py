"""Token features on disk: every token of one layer, fp16 shards, content-keyed.

A token entry lives in the same cache root as the pooled features
(:class:`~orchestrator.feature_store.FeatureStore`), with the same guarantees:
built in a temporary directory and renamed into place, a manifest with the
byte size and SHA-256 of every file, the store's per-key lock, and partial
entries of killed writers discarded. Its key is the pooled key's recipe with
the field spelled ``"<field>@tokens:<layer>"`` (:func:`token_key`). Files:

* ``local_000.npy``, ``local_001.npy``, ...: the flat local tokens ``[T, D]``
  (patches, or every text token the mask keeps) cut into shards of at most
  ``shard_bytes`` (every shard but the last holds ``rows_per_shard`` rows);
* ``offsets.npy``: int64 ``[N + 1]``, sample ``i`` owns flat rows
  ``offsets[i]:offsets[i+1]``;
* ``prefix.npy``: ``[N, K, D]`` prefix tokens (CLS, registers; K = 0 for text).

Stored as float16 by default (half the bytes; fp16 keeps ~3 significant
digits, a relative error <= 2**-11 per value); ``dtype="float32"`` is the
explicit alternative, and a value beyond fp16's range is refused, not
silently turned into inf. Shards are written with plain sequential writes, so
an extraction never holds a split in memory.

Two readers implement :class:`trials.tokens.TokenSource` and return float32:
:class:`MappedTokens` memory-maps the shards (fast; the pages a trial touches
count towards its resident memory) and :class:`StreamedTokens` reads the rows
it needs with ``os.preadv`` into fresh buffers (resident memory bounded by
one batch, for token caches larger than memory). Both pickle as their path,
so a reader handed to a Ray task reopens the files there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Sequence

import numpy as np

from orchestrator.feature_store import FeatureStore, StagedEntry, feature_key
from trials.tokens import RaggedTokens, TokenBatch, pad_batch

DEFAULT_SHARD_BYTES = 1 << 30
DTYPES = ("float16", "float32")
_FIELD = re.compile(r"^(?P<field>[a-z_]+)@tokens:(?P<layer>-?\d+)$")
_HEADER_BYTES = 128  # every .npy written here has a header of this size (room for any shape)


def token_field(field: str, layer: int) -> str:
    """The spelling of a token field: ``token_field("images", -1) == "images@tokens:-1"``."""
    return f"{field}@tokens:{int(layer)}"


def parse_token_field(field: str) -> tuple[str, int] | None:
    """``"texts@tokens:-1"`` -> ``("texts", -1)``; None for a pooled field like ``"texts"``."""
    match = _FIELD.match(field)
    return (match["field"], int(match["layer"])) if match else None


def token_key(token_identity: dict, split_fingerprint: str, field: str, layer: int) -> str:
    """Cache key of the tokens of ``field`` at ``layer``, a non-negative index
    (resolve ``-1`` first, so that ``-1`` and the last index share an entry)."""
    if layer < 0:
        raise ValueError(f"token_key takes a resolved layer index (>= 0), got {layer}")
    return feature_key(token_identity, split_fingerprint, token_field(field, layer))


def shard_file(index: int) -> str:
    return f"local_{index:03d}.npy"


def _npy_header(shape: tuple, dtype: np.dtype) -> bytes:
    """A version 1.0 ``.npy`` header of exactly :data:`_HEADER_BYTES` bytes (padded
    with spaces, which the format allows), so it can be rewritten in place once
    the number of rows is known."""
    text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                 "shape": tuple(int(s) for s in shape)}).encode("latin1")
    pad = _HEADER_BYTES - 10 - len(text) - 1
    if pad < 0:
        raise ValueError(f"shape {shape} too long for a {_HEADER_BYTES}-byte header")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", _HEADER_BYTES - 10) + text + b" " * pad + b"\n"


class _NpyAppender:
    """An ``.npy`` file of rows ``[n, *tail]`` written sequentially, its header
    fixed up on :meth:`close` (the row count is not known in advance)."""

    def __init__(self, path: Path, dtype: np.dtype, tail: tuple):
        self.path, self.dtype, self.tail, self.rows = path, dtype, tail, 0
        self.file = open(path, "wb")
        self.file.write(_npy_header((0, *tail), dtype))

    def append(self, rows: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(rows, self.dtype).tobytes())
        self.rows += len(rows)

    def close(self) -> None:
        self.file.seek(0)
        self.file.write(_npy_header((self.rows, *self.tail), self.dtype))
        self.file.close()


class TokenWriter(StagedEntry):
    """Builds one token entry batch by batch; :meth:`commit` publishes it.

    Used as a context manager it commits on success and removes the
    temporary directory on error, like the pooled store's writer.
    """

    def __init__(self, store: FeatureStore, key: str, *, dim: int, num_prefix: int, meta: dict | None = None,
                 shard_bytes: int = DEFAULT_SHARD_BYTES, dtype: str = "float16"):
        if dtype not in DTYPES:
            raise ValueError(f"token dtype must be one of {list(DTYPES)}, not {dtype!r}")
        self.store, self.key, self.meta = store, key, meta or {}
        self.dim, self.num_prefix, self.dtype = int(dim), int(num_prefix), np.dtype(dtype)
        self.rows_per_shard = max(1, int(shard_bytes) // (self.dim * self.dtype.itemsize))
        self.tmp = store.temp_dir(key)
        self._prefix = _NpyAppender(self.tmp / "prefix.npy", self.dtype, (self.num_prefix, self.dim))
        self._shards: list[_NpyAppender] = []
        self._lengths: list[np.ndarray] = []

    def write(self, prefix: np.ndarray, local: Sequence[np.ndarray]) -> None:
        """Append B samples: ``prefix`` [B, K, D] and each sample's local tokens [L_i, D]."""
        prefix = np.asarray(prefix)
        if prefix.shape != (len(local), self.num_prefix, self.dim):
            raise ValueError(f"prefix of shape {prefix.shape} for {len(local)} samples; expected "
                             f"[B, K={self.num_prefix}, D={self.dim}]")
        if any(np.ndim(x) != 2 or np.shape(x)[1] != self.dim for x in local):
            raise ValueError(f"local tokens must be [L_i, D={self.dim}] per sample")
        flat = np.concatenate([np.asarray(x) for x in local]) if len(local) else np.zeros((0, self.dim))
        self._check_range(prefix)
        self._check_range(flat)
        self._prefix.append(prefix)
        self._lengths.append(np.array([len(x) for x in local], np.int64))
        while len(flat):
            if not self._shards or self._shards[-1].rows == self.rows_per_shard:
                self._shards.append(_NpyAppender(self.tmp / shard_file(len(self._shards)), self.dtype,
                                                 (self.dim,)))
            room = self.rows_per_shard - self._shards[-1].rows
            self._shards[-1].append(flat[:room])
            flat = flat[room:]

    def _check_range(self, values: np.ndarray) -> None:
        if self.dtype == np.float16 and values.size:
            peak = float(np.abs(values).max())
            if peak > float(np.finfo(np.float16).max):
                raise ValueError(f"token values up to {peak:.4g} exceed float16's range (65504): store "
                                 f"this encoder's tokens with dtype='float32'")

    def commit(self) -> None:
        """Write the offsets, checksum, fsync and rename into place."""
        for appender in (self._prefix, *self._shards):
            appender.close()
        lengths = np.concatenate([np.zeros(0, np.int64), *self._lengths])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        np.save(self.tmp / "offsets.npy", offsets)
        shards = [shard_file(i) for i in range(len(self._shards))]
        fields = {"kind": "tokens", "num_samples": len(lengths), "num_tokens": int(offsets[-1]),
                  "dim": self.dim, "num_prefix": self.num_prefix, "dtype": self.dtype.name,
                  "rows_per_shard": self.rows_per_shard, "shards": shards, "meta": self.meta}
        self.store.publish(self.key, self.tmp, ["offsets.npy", "prefix.npy", *shards], fields)

    def abort(self) -> None:
        for appender in (self._prefix, *self._shards):
            appender.file.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def open_tokens(store: FeatureStore, key: str, *, stream: bool = False) -> "StoredTokens":
    """The token entry ``key`` of ``store``: memory-mapped, or streamed with plain reads."""
    return (StreamedTokens if stream else MappedTokens)(store.path(key))


class StoredTokens:
    """A token entry on disk as a :class:`~trials.tokens.TokenSource` (float32 batches).

    Subclasses say how rows are read (:meth:`_local` and :meth:`_prefix_rows`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()
        manifest = json.loads((self.path / "manifest.json").read_text())
        if manifest.get("kind") != "tokens":
            raise ValueError(f"{self.path} is not a token entry (its manifest has no kind 'tokens')")
        self.manifest = manifest
        self.dim, self.num_prefix = int(manifest["dim"]), int(manifest["num_prefix"])
        self.dtype, self.rows_per_shard = np.dtype(manifest["dtype"]), int(manifest["rows_per_shard"])
        self.offsets = np.load(self.path / "offsets.npy", allow_pickle=False)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __reduce__(self):
        return type(self), (str(self.path),)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def gather(self, rows: np.ndarray) -> TokenBatch:
        rows = np.asarray(rows, np.int64)
        pieces = [self._span(self.offsets[r], self.offsets[r + 1]) for r in rows]
        return pad_batch(pieces, self._prefix_rows(rows))

    def _span(self, start: int, stop: int) -> np.ndarray:
        """Flat local rows ``start:stop``, joined across shard boundaries."""
        parts, per = [], self.rows_per_shard
        while start < stop:
            shard, first = divmod(int(start), per)
            end = min(int(stop), (shard + 1) * per)
            parts.append(self._local(shard, first, first + end - start))
            start = end
        return parts[0] if len(parts) == 1 else np.concatenate(parts or [np.zeros((0, self.dim), self.dtype)])

    def to_resident(self) -> RaggedTokens:
        """Every token in memory, in the stored dtype (a batch still comes out float32)."""
        local = np.empty((int(self.offsets[-1]), self.dim), self.dtype)
        for shard, first in enumerate(range(0, len(local), self.rows_per_shard)):
            stop = min(len(local), first + self.rows_per_shard)
            local[first:stop] = self._local(shard, 0, stop - first)
        return RaggedTokens(local, self.offsets, self._prefix_rows(np.arange(len(self))))

    def _local(self, shard: int, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def _prefix_rows(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class MappedTokens(StoredTokens):
    """Shards memory-mapped: no copy until a batch touches them."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self._shards = [np.load(self.path / name, mmap_mode="r", allow_pickle=False)
                        for name in self.manifest["shards"]]
        self._prefix = np.load(self.path / "prefix.npy", mmap_mode="r", allow_pickle=False)

    def _local(self, shard: int, start: int, stop: int) -> np.ndarray:
        return self._shards[shard][start:stop]

    def _prefix_rows(self, rows: np.ndarray) -> np.ndarray:
        return self._prefix[rows]


class StreamedTokens(StoredTokens):
    """Rows read with ``os.preadv`` into new arrays: no mapping, so resident
    memory holds the batches being used and nothing else (the kernel's page
    cache is not the process's memory)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self._files = [self._open(name) for name in self.manifest["shards"]]
        self._prefix = self._open("prefix.npy")
        self._prefix_row_bytes = self.num_prefix * self.dim * self.dtype.itemsize

    def _open(self, name: str) -> tuple[int, int]:
        """(file descriptor, byte offset of the data) of one ``.npy`` file."""
        with open(self.path / name, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            read_header(f)
            data = f.tell()
        return os.open(self.path / name, os.O_RDONLY), data

    def _read(self, file: tuple[int, int], byte_offset: int, out: np.ndarray) -> np.ndarray:
        if not out.size:
            return out
        view, fd = memoryview(out).cast("B"), file[0]
        done = 0
        while done < len(view):  # preadv may return fewer bytes than asked
            got = os.preadv(fd, [view[done:]], file[1] + byte_offset + done)
            if got <= 0:
                raise EOFError(f"{self.path}: token file shorter than its manifest says")
            done += got
        return out

    def _local(self, shard: int, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self.dim), self.dtype)
        return self._read(self._files[shard], start * self.dim * self.dtype.itemsize, out)

    def _prefix_rows(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.num_prefix, self.dim), self.dtype)
        for i, row in enumerate(rows):
            self._read(self._prefix, int(row) * self._prefix_row_bytes, out[i])
        return out

    def close(self) -> None:
        """Close the files (also done when the reader is garbage collected)."""
        for fd, _ in (*self._files, self._prefix):
            os.close(fd)
        self._files, self._prefix = [], (-1, 0)

    def __del__(self) -> None:
        if getattr(self, "_prefix", (-1, 0))[0] >= 0:
            self.close()
