"""The Arrow/Parquet results store of a run directory.

Tables live under ``<run_dir>/results/<table>/`` as Parquet part files. Each
flush writes one new file (never an append): a dot-prefixed temporary file in
the same directory, fsynced, then renamed, so a reader or a crash sees whole
files only. Rows carry a unique key (``fingerprint`` for trials); readers
deduplicate on it, keeping the first finished row, so a trial written twice
(e.g. by a retried flush) still counts once.

Tables:
- ``trials``: one row per finished trial. Columns ``fingerprint``, ``status``
  ("done" | "failed"), ``error``, ``grid``, ``layer_rule``, ``config/<field>``
  for every TrialConfig field, metric columns (``zs/...``, ``ret/...``,
  ``best_val_loss``, ...), ``started_at``, ``finished_at``, ``host``.
- ``layer_similarity``: one row per (image layer, text layer, metric).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

TABLES = ("trials", "layer_similarity")
KEYS = {"trials": "fingerprint", "layer_similarity": "row_key"}


class ResultsStore:
    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir) / "results"

    def table_dir(self, table: str) -> Path:
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; tables: {', '.join(TABLES)}")
        return self.root / table

    def write(self, table: str, rows: list[dict]) -> Path | None:
        """Append ``rows`` as one new part file, atomically."""
        if not rows:
            return None
        directory = self.table_dir(table)
        directory.mkdir(parents=True, exist_ok=True)
        name = f"part-{uuid.uuid4().hex}.parquet"
        tmp, final = directory / f".{name}.tmp", directory / name
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.rename(tmp, final)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return final

    def read(self, table: str, *, columns: list[str] | None = None) -> pd.DataFrame:
        """The table as a DataFrame, one row per key (first success, else first written)."""
        directory = self.table_dir(table)
        files = sorted(directory.glob("part-*.parquet")) if directory.exists() else []
        if not files:
            return pd.DataFrame()
        # Part files may have different columns (new metrics); unify by name.
        dataset = ds.dataset([str(f) for f in files], format="parquet",
                             schema=_unified_schema(files))
        frame = dataset.to_table(columns=columns).to_pandas()
        key = KEYS[table]
        if "status" in frame.columns:  # a success outranks an earlier failure
            frame = frame.sort_values("status", key=lambda s: s != "done", kind="stable")
        if key in frame.columns:
            frame = frame.drop_duplicates(subset=key, keep="first").reset_index(drop=True)
        return frame

    def finished_fingerprints(self) -> set[str]:
        """Fingerprints of trials that finished successfully."""
        frame = self.read("trials", columns=None)
        if frame.empty:
            return set()
        return set(frame.loc[frame["status"] == "done", "fingerprint"])


def _unified_schema(files: list[Path]) -> pa.Schema:
    schemas = [pq.read_schema(f) for f in files]
    return pa.unify_schemas(schemas, promote_options="permissive")


def headline_metric(trials: pd.DataFrame) -> str | None:
    """The metric to lead with: the first zero-shot top-1, else retrieval R@1."""
    columns = [c for c in trials.columns if trials[c].notna().any()]
    for suffix in ("/top1", "/I2T/R@1"):
        found = sorted(c for c in columns if c.endswith(suffix))
        if found:
            return found[0]
    return None
