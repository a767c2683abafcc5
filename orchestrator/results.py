"""The Arrow/Parquet results store of a run directory.

Tables live under ``<run_dir>/results/<table>/`` as Parquet part files. Each
flush writes one new file (never an append): a dot-prefixed temporary file in
the same directory, fsynced, then renamed, so a reader or a crash sees whole
files only. Rows carry a unique key (``fingerprint`` for trials); readers
deduplicate on it, keeping a finished row ("done", then "stopped") over a
failed one, so a trial written twice (e.g. by a retried flush, or by a
compaction interrupted between its rename and its deletes) still counts once.

Schema of the ``trials`` table (one row per trial attempt that ended):

=====================  ===================================================
``fingerprint``        trial identity (hash of config, feature keys, code)
``grid``               name of the search grid that asked for it
``status``             "done" | "stopped" (early-stopped by ASHA) | "failed"
``error``              traceback tail of a failed trial, else ""
``retries``            times Tune retried it before this outcome
``config/<field>``     every :class:`trials.config.TrialConfig` field
                       (dicts such as ``head_options`` as JSON text)
``params``             Optuna's suggestion (JSON) for optuna grids, else ""
``image_encoder``,     the encoder pair: each candidate's label (its
``text_encoder``       ``label:``, else its name)
``train_data``         the training split's options a grid varied
                       (``method=random, per_concept=500``), else ""
metrics                ``zs/<set>/top1|top1_macro|top5``,
                       ``ret/<set>/<protocol>/<I2T|T2I>/<R@k|P@k|MAP@k>``,
                       ``best_val_loss``, ``best_val_clip_loss`` (its CLIP
                       part: Optuna's loss objective), ``best_epoch``, ``epochs_run``,
                       ``lr_used``, ``stopped`` (why training ended),
                       ``n_train_used``; stopped trials carry ``val_loss``
                       and ``epoch`` of their last report
timings                ``started_at``, ``finished_at`` (unix seconds),
                       ``train_seconds`` (trial compute), ``trial_seconds``
                       (compute + fetching features)
``host``               machine that ran it
=====================  ===================================================

``layer_similarity``: one row per (image layer, text layer, metric), key
``row_key``. ``encoder_pairs``: the encoder-pair selection's ranking, one row
per candidate pair, key ``row_key`` (columns: ``orchestrator.schema.
ENCODER_PAIRS_COLUMNS``).

``epochs``: one row per (trial, recorded epoch), key ``row_key`` =
``fingerprint/epoch``: losses (``val_clip_loss``: ASHA's metric) and the
neighbourhood agreement ``nbr_image``/``nbr_text``; columns in
:data:`orchestrator.schema.EPOCH_COLUMNS`.

Compaction (:meth:`ResultsStore.compact`) merges part files into one, guarded
by ``_compaction.json``: written before the merged file becomes visible and
removed after the inputs are deleted, so :meth:`recover` can finish an
interrupted compaction (merged file present: delete the inputs) or undo it
(merged file absent: delete its temp file). Either way every row is readable
at every moment, at most twice, and readers deduplicate.

Damage from outside (a truncated copy, flipped bytes): part files carry a
CRC per data page, checked on every read, and a footer Parquet checks
itself; a part that fails either raises :class:`DamagedPartFile`, which names
it and the fix. Never a silent skip: its rows would count as pending, and a
resume would run them again next to the damaged file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from pathlib import Path
from typing import Iterable, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from orchestrator.durable import FULL, DiskFull, atomic_write_bytes, fsync_path
from orchestrator.schema import (KEYS, PLAN_FILE, RESULTS_DIR, STATUS_RANK, TABLES,
                                 finished_statuses)

MANIFEST = "_compaction.json"
DAMAGED_DIR = "damaged"  # where the fix moves a damaged part file (outside results/)
# Written with a CRC per data page, checked on read (files written without them still
# read), and without min/max statistics: nothing checks those, and a damaged one would
# silently prune rows from a filtered read.
WRITE_OPTIONS = {"write_page_checksum": True, "write_statistics": False}
_PARQUET_FORMAT = ds.ParquetFileFormat(
    default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True))


class DamagedPartFile(RuntimeError):
    """A part file of the store cannot be read: changed outside structure-sweep."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = Path(path), reason
        run_dir = self.path.parents[2]  # RUN_DIR/results/<table>/part-*.parquet
        aside = run_dir / DAMAGED_DIR
        super().__init__(
            f"results part file {self.path} is damaged ({reason}); it was changed outside "
            "structure-sweep (truncated copy, disk error, an editor), so its rows cannot be "
            f"counted. Fix: move it aside (mkdir -p {aside} && mv {self.path} {aside}/), then "
            f"`structure-sweep resume {run_dir}` recomputes what it held; every other stored "
            "trial is kept")


class ResultsStore:
    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir) / RESULTS_DIR

    def table_dir(self, table: str) -> Path:
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; tables: {', '.join(TABLES)}")
        return self.root / table

    def write(self, table: str, rows: list[dict]) -> Path | None:
        """Add ``rows`` as one new part file, atomically."""
        if not rows:
            return None
        directory = self.table_dir(table)
        directory.mkdir(parents=True, exist_ok=True)
        return _write_atomic(directory, f"part-{uuid.uuid4().hex}.parquet", _to_table(rows))

    def files(self, table: str) -> list[Path]:
        directory = self.table_dir(table)
        return sorted(directory.glob("part-*.parquet")) if directory.exists() else []

    def query(self, table: str = "trials", filters: dict | None = None, *,
              columns: Iterable[str] | None = None, where=None, dedup: bool = True) -> pd.DataFrame:
        """Rows of ``table`` as a DataFrame, filtered while reading.

        ``filters`` maps a column to a value or a list of allowed values
        (``{"status": "done", "config/head": ["linear", "csa"]}``); ``where``
        is any ``pyarrow.compute`` expression; ``columns`` limits what is read
        (the key and ``status`` are always read for deduplication). Filters
        apply before deduplication, so ``status="failed"`` returns trials
        that have a failed attempt, even if they later finished.
        """
        for attempt in range(2):
            files = self.files(table)
            if not files:
                return pd.DataFrame()
            try:
                return self._query(table, files, filters, columns, where, dedup)
            except (OSError, ValueError, pa.ArrowException) as err:  # ValueError: bad UTF-8 too
                # a concurrent compaction removed a listed part: its rows are in the
                # merged file now, so one fresh listing reads them all
                if not attempt and not all(f.exists() for f in files):
                    continue
                damaged = find_damaged(files)
                if damaged is None:
                    raise
                raise damaged from err
        raise AssertionError("unreachable")

    def check(self) -> None:
        """Raise :class:`DamagedPartFile` for the first part file of any table
        that does not read whole (footer and every page checksum)."""
        for table in TABLES:
            damaged = find_damaged(self.files(table))
            if damaged is not None:
                raise damaged

    def _query(self, table: str, files: list[Path], filters, columns, where,
               dedup: bool) -> pd.DataFrame:
        schema = _unified_schema(files)
        dataset = ds.dataset([str(f) for f in files], format=_PARQUET_FORMAT, schema=schema)
        expr = where
        for column, value in (filters or {}).items():
            if column not in schema.names:
                return pd.DataFrame(columns=list(columns) if columns else schema.names)
            values = value if isinstance(value, (list, tuple, set)) else [value]
            term = pc.field(column).isin(list(values))
            expr = term if expr is None else expr & term
        key = KEYS[table]
        wanted = None
        if columns is not None:
            wanted = list(dict.fromkeys(c for c in columns if c in schema.names))
            extra = [c for c in (key, "status") if c in schema.names and c not in wanted]
            read_columns = wanted + extra
        else:
            read_columns = None
        frame = dataset.to_table(columns=read_columns, filter=expr).to_pandas()
        if dedup and key in frame.columns:
            if "status" in frame.columns:  # a finished row outranks a failed one
                rank = frame["status"].map(STATUS_RANK).fillna(len(STATUS_RANK))
                frame = frame.iloc[rank.argsort(kind="stable")]
            frame = frame.drop_duplicates(subset=key, keep="first").reset_index(drop=True)
        if wanted is not None:
            frame = frame[[c for c in wanted if c in frame.columns]]
        return frame

    def finished_fingerprints(self, include_stopped: bool = True) -> set[str]:
        """Fingerprints of trials that finished: "done", and early-"stopped" ones
        if ``include_stopped`` (a run whose scheduler is ASHA; a FIFO run re-runs
        them in full)."""
        statuses = finished_statuses(include_stopped)
        frame = self.query("trials", {"status": statuses}, columns=["fingerprint"])
        return set(frame["fingerprint"]) if not frame.empty else set()

    # --- compaction -------------------------------------------------------------

    def compact(self, table: str = "trials", *, min_files: int = 2) -> Path | None:
        """Merge the table's part files into one (deduplicated) file; see module doc."""
        directory = self.table_dir(table)
        if not directory.exists():
            return None
        with _lock(directory):
            _recover(directory)
            files = self.files(table)
            if len(files) < min_files:
                return None
            merged = self.query(table)  # deduplicated
            name = f"part-c{uuid.uuid4().hex}.parquet"
            table_ = pa.Table.from_pandas(merged, preserve_index=False)
            tmp = directory / f".{name}.tmp"
            _write_parquet_file(table_, tmp)
            _write_json(directory / MANIFEST, {"output": name, "inputs": [f.name for f in files]})
            os.rename(tmp, directory / name)
            fsync_path(directory)
            for f in files:
                f.unlink(missing_ok=True)
            fsync_path(directory)
            (directory / MANIFEST).unlink()
            fsync_path(directory)
            return directory / name

    def recover(self) -> None:
        """Finish or undo an interrupted compaction of every table."""
        for table in TABLES:
            directory = self.table_dir(table)
            if (directory / MANIFEST).exists():
                with _lock(directory):
                    _recover(directory)


def _recover(directory: Path) -> None:
    manifest = directory / MANIFEST
    if not manifest.exists():
        return
    plan = json.loads(manifest.read_text())
    if (directory / plan["output"]).exists():  # committed: finish it
        for name in plan["inputs"]:
            (directory / name).unlink(missing_ok=True)
    else:  # not committed: undo it
        (directory / f".{plan['output']}.tmp").unlink(missing_ok=True)
    fsync_path(directory)
    manifest.unlink()
    fsync_path(directory)


def _write_parquet_file(table: pa.Table, path: Path) -> None:
    """Write and fsync ``path``; on failure remove it (a full disk: :class:`DiskFull`)."""
    try:
        pq.write_table(table, path, **WRITE_OPTIONS)
        fsync_path(path)
    except OSError as err:
        path.unlink(missing_ok=True)
        full = err.errno in FULL or "No space left" in str(err)  # Arrow drops errno
        if full:
            raise DiskFull(path, OSError(FULL[0], str(err))) from err
        raise


def find_damaged(files: list[Path]) -> DamagedPartFile | None:
    """A :class:`DamagedPartFile` for the first of ``files`` that does not read
    whole (footer, schema, every page and its checksum), else None."""
    for path in files:
        try:
            pq.ParquetFile(path, page_checksum_verification=True).read()
        except FileNotFoundError:
            continue  # removed meanwhile (a compaction): not damage
        except Exception as err:  # noqa: BLE001 -- any failure to read it whole is damage
            return DamagedPartFile(path, str(err).strip().splitlines()[0] or type(err).__name__)
    return None


def _write_atomic(directory: Path, name: str, table: pa.Table) -> Path:
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, **WRITE_OPTIONS)
    atomic_write_bytes(directory / name, buffer.getvalue().to_pybytes())
    return directory / name


def _to_table(rows: list[dict]) -> pa.Table:
    """Rows with different keys as one table (``from_pylist`` alone would keep
    only the first row's keys and silently drop the others)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows])


def _write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, json.dumps(data).encode())


@contextlib.contextmanager
def _lock(directory: Path) -> Iterator[None]:
    with open(directory / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _unified_schema(files: list[Path]) -> pa.Schema:
    schemas = [pq.read_schema(f) for f in files]
    return pa.unify_schemas(schemas, promote_options="permissive")


def plan_progress(plan: str | Path | dict | None, trials: pd.DataFrame) -> dict[str, int]:
    """``{"planned": n, "pending": n}`` of a run: its plan (a run directory, whose
    plan.json is read, or the plan dict) against the stored ``trials``.

    Grid search plans fingerprints: pending = planned ones not stored (in any
    status). Optuna plans counts per grid (``"optuna": {grid: num_samples}``):
    planned is their sum, pending what each grid still lacks in stored rows.
    The one count behind ``status``, the report and ``report --watch``.
    """
    if plan is None:
        plan = {}
    elif not isinstance(plan, dict):
        file = Path(plan) / PLAN_FILE
        plan = json.loads(file.read_text()) if file.is_file() else {}
    fingerprints = set(plan.get("fingerprints") or [])
    stored = set(trials["fingerprint"]) if "fingerprint" in trials else set()
    planned, pending = len(fingerprints), len(fingerprints - stored)
    for grid, wanted in (plan.get("optuna") or {}).items():  # sampled trials: counts only
        mine = int((trials["grid"] == grid).sum()) if "grid" in trials else 0
        planned += int(wanted)
        pending += max(0, int(wanted) - mine)
    return {"planned": planned, "pending": pending}
