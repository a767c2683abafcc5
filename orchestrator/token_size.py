"""How big a token cache will be, known before any weights are loaded.

``validate`` prints it per (encoder, split), e.g. ``timm:vit_large_patch14_dinov2
at 256 px: 325 tokens (1 prefix + 324 local) x 1024 x 2 B = 0.666 MB per image,
55.1 GB for 82,783 images``, and refuses a spec whose token cache does not fit
the free space of the cache directory (:func:`token_space_error`). Token counts
come from each encoder prefix's registered ``tokens`` function
(:func:`orchestrator.encoders.count_tokens`): timm from the architecture on the
meta device, Hugging Face from config.json and the local tokenizer.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Sequence

from orchestrator.encoders import TokenCount, count_tokens

BYTES_PER_VALUE = {"float16": 2, "float32": 4}


@dataclasses.dataclass(frozen=True)
class TokenEstimate:
    """The token cache of one encoder over ``num_samples`` samples."""

    label: str
    count: TokenCount
    num_samples: int
    bytes_per_value: int = 2

    @property
    def tokens(self) -> int:
        """Tokens over all samples (prefix + local); an upper bound if ``count.bound``."""
        local = int(self.count.lengths.sum()) if self.count.lengths is not None \
            else self.count.local * self.num_samples
        return local + self.count.num_prefix * self.num_samples

    @property
    def bytes(self) -> int:
        return self.tokens * self.count.dim * self.bytes_per_value

    def message(self, unit: str = "sample") -> str:
        """One line: tokens per sample x width x bytes = per sample, total."""
        count, n = self.count, max(self.num_samples, 1)
        per_sample = self.tokens / n
        tokens = f"{per_sample:.0f}" if per_sample == int(per_sample) else f"{per_sample:.1f}"
        parts = f" ({count.num_prefix} prefix + {tokens_local(count, n)} local)" if count.num_prefix else ""
        average = "" if count.lengths is None else " on average"
        where = f" at {count.detail}" if count.detail and count.lengths is None and not count.bound else ""
        bound = f" ({count.detail}: an upper bound)" if count.bound else ""
        return (f"{self.label}{where}: {'at most ' if count.bound else ''}{tokens} tokens{average}{parts} "
                f"x {count.dim} x {self.bytes_per_value} B = {human_bytes(self.bytes / n)} per {unit}, "
                f"{human_bytes(self.bytes)} for {self.num_samples:,} {unit}s{bound}")


def tokens_local(count: TokenCount, n: int) -> str:
    local = count.lengths.sum() / n if count.lengths is not None else count.local
    return f"{local:.0f}" if local == int(local) else f"{local:.1f}"


def estimate_tokens(name: str, options: dict | None = None, *, num_samples: int, texts: Sequence[str] | None = None,
                    dtype: str = "float16", label: str | None = None) -> TokenEstimate | str:
    """The token cache of encoder ``name`` over ``num_samples`` samples (``texts``:
    the texts themselves, counted exactly when the tokenizer is local); a
    string saying why when it cannot be known before the run."""
    count = count_tokens(name, options, texts)
    if isinstance(count, str):
        return count
    return TokenEstimate(label or name, count, int(num_samples), BYTES_PER_VALUE[dtype])


def token_bytes(name: str, options: dict | None = None, *, num_samples: int, texts: Sequence[str] | None = None,
                dtype: str = "float16") -> int | None:
    """Bytes of the token cache of ``name`` over ``num_samples`` samples; None if unknowable."""
    estimate = estimate_tokens(name, options, num_samples=num_samples, texts=texts, dtype=dtype)
    return None if isinstance(estimate, str) else estimate.bytes


def token_space_error(needed: int, cache_dir: str | Path, *, what: str = "the token cache") -> str | None:
    """Why ``needed`` bytes cannot be written under ``cache_dir`` (its file
    system's free space, the directory need not exist yet); None if they fit."""
    path = Path(cache_dir).expanduser().resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if needed <= free:
        return None
    return (f"{what} needs {human_bytes(needed)} but {path} has {human_bytes(free)} free "
            f"({needed:,} > {free:,} bytes): free space, point cache_dir at a larger disk, or use fewer "
            f"samples or a smaller input size")


def human_bytes(size: Any) -> str:
    """Decimal units, three significant digits: ``human_bytes(665600) == "0.666 MB"``."""
    size = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 500 or unit == "TB":
            return f"{size:.0f} B" if unit == "B" else f"{size:,.0f} {unit}" if size >= 1000 else f"{size:.3g} {unit}"
        size /= 1000
    raise AssertionError("unreachable")
