"""Token features of one layer: every token of every sample, ragged.

A sample's tokens are its *prefix* tokens (a ViT's CLS and register tokens;
none for text) and its *local* tokens (image patches, or every text token the
attention mask keeps). Local tokens are stored flat, ``[sum of lengths, D]``,
with ``offsets`` ``[N + 1]``: sample ``i`` owns rows ``offsets[i]:offsets[i+1]``.
Images have a fixed number of patches, so their offsets step evenly.

:class:`TokenSource` is what a token trial reads: anything that gathers a
batch of samples as padded arrays. :class:`RaggedTokens` is the resident one
(numpy arrays in memory); the orchestrator's token store provides one that
reads fp16 shards from disk, so a trial can stream tokens that do not fit
memory. Plain numpy: a batch becomes a tensor on the trial's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class TokenBatch:
    """Tokens of B samples: ``local`` [B, Lmax, D] zero-padded, ``mask`` [B, Lmax]
    (True on real tokens), ``prefix`` [B, K, D] (K = 0 for text). float32."""

    local: np.ndarray
    mask: np.ndarray
    prefix: np.ndarray


@runtime_checkable
class TokenSource(Protocol):
    """Samples whose tokens can be gathered by row index."""

    dim: int
    num_prefix: int

    def __len__(self) -> int: ...

    def lengths(self) -> np.ndarray:
        """Local tokens per sample, int64 [N]."""

    def gather(self, rows: np.ndarray) -> TokenBatch:
        """The batch of samples ``rows`` (in that order), padded to its longest sample."""


def pad_batch(pieces: list[np.ndarray], prefix: np.ndarray) -> TokenBatch:
    """A :class:`TokenBatch` from each sample's local tokens [L_i, D] and prefixes [B, K, D]."""
    dim = prefix.shape[-1]
    width = max((len(p) for p in pieces), default=0)
    local = np.zeros((len(pieces), width, dim), np.float32)
    mask = np.zeros((len(pieces), width), bool)
    for i, piece in enumerate(pieces):
        local[i, : len(piece)] = piece
        mask[i, : len(piece)] = True
    return TokenBatch(local, mask, np.asarray(prefix, np.float32))


class RaggedTokens:
    """Resident token features: ``local`` [T, D], ``offsets`` [N + 1], ``prefix`` [N, K, D]."""

    def __init__(self, local: np.ndarray, offsets: np.ndarray, prefix: np.ndarray):
        offsets = np.asarray(offsets, np.int64)
        if offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != len(local) or np.any(np.diff(offsets) < 0):
            raise ValueError(f"offsets must rise from 0 to {len(local)} (the number of local tokens)")
        if prefix.ndim != 3 or len(prefix) != len(offsets) - 1 or prefix.shape[2] != local.shape[1]:
            raise ValueError(f"prefix must be [N={len(offsets) - 1}, K, D={local.shape[1]}], got {prefix.shape}")
        self.local, self.offsets, self.prefix = local, offsets, prefix
        self.dim, self.num_prefix = int(local.shape[1]), int(prefix.shape[1])

    @classmethod
    def from_padded(cls, local: np.ndarray, mask: np.ndarray, prefix: np.ndarray | None = None) -> "RaggedTokens":
        """From padded [N, L, D] tokens and their mask [N, L] (True = real token)."""
        mask = np.asarray(mask, bool)
        offsets = np.concatenate([[0], np.cumsum(mask.sum(1))])
        if prefix is None:
            prefix = np.zeros((len(local), 0, local.shape[-1]), local.dtype)
        return cls(np.asarray(local)[mask], offsets, np.asarray(prefix))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def gather(self, rows: np.ndarray) -> TokenBatch:
        rows = np.asarray(rows, np.int64)
        pieces = [self.local[self.offsets[r]: self.offsets[r + 1]] for r in rows]
        return pad_batch(pieces, self.prefix[rows])


@dataclass
class TokenPairs:
    """Paired token features: caption row ``c`` of ``text`` pairs with image row
    ``text_to_image[c]`` of ``image`` (an image may have several captions)."""

    image: TokenSource
    text: TokenSource
    text_to_image: np.ndarray

    def __post_init__(self):
        self.text_to_image = np.array(self.text_to_image, np.int64)  # a writable copy (torch reads it)
        if self.text_to_image.shape != (len(self.text),):
            raise ValueError(f"text_to_image must hold one image row per caption ({len(self.text)}), "
                             f"got shape {self.text_to_image.shape}")
        if len(self.text_to_image) and not 0 <= self.text_to_image.min() <= self.text_to_image.max() < len(self.image):
            raise ValueError(f"text_to_image must name image rows in [0, {len(self.image)})")

    def __len__(self) -> int:
        return len(self.text)

    def gather(self, rows: np.ndarray) -> tuple[TokenBatch, TokenBatch]:
        """(image batch, text batch) of the pairs ``rows`` (caption rows), in that order."""
        rows = np.asarray(rows, np.int64)
        return self.image.gather(self.text_to_image[rows]), self.text.gather(rows)
