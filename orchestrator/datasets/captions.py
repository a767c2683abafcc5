"""Image-caption datasets: COCO captions, Flickr30k and a generic paired table.

Every source is read into caption rows ``(image path, caption)`` in source
order and turned into a :class:`Split` the same way (:func:`caption_split`):
unique images in order of first appearance, one text row per caption and
``text_to_image`` pointing each caption at its image.

``captions="first"`` keeps the first caption of each image, in annotation
order: the official STRUCTURE training set (``drop_duplicates`` with
``n_dup_samples: 1``, METHOD.md §5.1: ≈82,783 COCO train2014 pairs).
``captions="all"`` keeps every caption, as retrieval evaluation needs
(METHOD.md §8.2). Images are read lazily, one encoder batch at a time.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from orchestrator.datasets.base import (
    DatasetError,
    DatasetOptionError,
    Split,
    SplitIndex,
    fingerprint,
    register_dataset,
)
from orchestrator.datasets.files import ImageFiles, files_identity, require, require_option

CAPTIONS_VERSION = 1  # bump when the meaning of rows or order changes
CAPTION_MODES = ("first", "all")
Rows = list[tuple[Path, str]]

COCO_LAYOUT = """expected COCO layout (https://cocodataset.org):
  <root>/annotations/captions_train2014.json   (options: root, or annotations=<file>)
  <root>/train2014/COCO_train2014_*.jpg        (options: root, or images=<dir>)
  <root>/annotations/captions_val2014.json, <root>/val2014/...
or a Karpathy split file (karpathy=<dataset_coco.json>) with images under <root>/<filepath>/<filename>."""

FLICKR_LAYOUT = """expected Flickr30k layout:
  <root>/flickr30k-images/<image>.jpg   (or the images directly in <root>; option images=<dir>)
  <root>/results.csv                    (image_name| comment_number| comment [| split]; option captions_file=<file>)
or a Karpathy split file <root>/dataset_flickr30k.json (option karpathy=<file>)."""

PAIRS_LAYOUT = """expected a table (CSV, TSV or Parquet; option path=<file>) with one row per
(image, caption) pair: an image column (option image_column, default 'image') holding
paths relative to image_root (default: the table's directory) and a caption column
(option caption_column, default 'caption'); optionally a split column (option split_column)."""


def caption_split(dataset: str, rows: Rows, *, captions: str, base: Path, layout: str,
                  max_images: Optional[int] = None) -> Split:
    """A Split from caption rows in source order (see the module docstring).

    The fingerprint hashes the split's own content (image names, sizes and
    mtimes; the captions and their pairing), so nothing outside the split
    (the rest of an annotation file, the dataset's location) changes it.
    Image features are keyed by the images alone: the "first" and "all"
    variants of a split share them.
    """
    if captions not in CAPTION_MODES:
        raise DatasetError(f"dataset {dataset!r}: captions must be one of {list(CAPTION_MODES)}, "
                           f"not {captions!r}")
    index: dict[Path, int] = {}
    texts, text_to_image = [], []
    for path, caption in rows:
        if path not in index:
            if max_images is not None and len(index) >= max_images:
                continue
            index[path] = len(index)
        elif captions == "first":
            continue
        texts.append(str(caption))
        text_to_image.append(index[path])
    if not index:
        raise DatasetError(f"dataset {dataset!r}: the split has no captioned images.\n{layout}")
    images = list(index)
    image_id = fingerprint("images", CAPTIONS_VERSION, files_identity(dataset, images, base, layout))
    pairing = np.asarray(text_to_image, dtype=np.int64)
    return Split(images=ImageFiles(images), texts=texts, text_to_image=pairing,
                 fingerprint=fingerprint(dataset, CAPTIONS_VERSION, image_id, texts, pairing.tolist()),
                 field_fingerprints={"images": image_id})


def count_pairs(images: Iterable, captions: str, max_images: Optional[int]) -> int:
    """The pairs :func:`caption_split` keeps of rows naming ``images`` (in source
    order), counted without building the split or touching an image."""
    seen: set = set()
    pairs = 0
    for image in images:
        if image not in seen:
            if max_images is not None and len(seen) >= max_images:
                continue
            seen.add(image)
            pairs += 1
        elif captions == "all":
            pairs += 1
    return pairs


def _with_defaults(dataset: str, factory: Callable, options: dict) -> dict:
    """``options`` over the factory's defaults, ``captions`` checked."""
    params = inspect.signature(factory).parameters.items()
    merged = {**{k: p.default for k, p in params if p.default is not inspect.Parameter.empty}, **options}
    if merged["captions"] not in CAPTION_MODES:
        raise DatasetOptionError(f"dataset {dataset!r}: captions must be one of {list(CAPTION_MODES)}, "
                                 f"not {merged['captions']!r}", "options.captions")
    return merged


def _indexed(rows: Rows, o: dict, what: str) -> SplitIndex:
    return SplitIndex(count_pairs((path for path, _ in rows), o["captions"], o["max_images"]),
                      f"{what}, captions: {o['captions']}")


def _default_path(dataset: str, path: Path, why: str, layout: str) -> Path:
    if not path.exists():
        raise DatasetOptionError(f"dataset {dataset!r}: {str(path)!r} ({why}) does not exist. {layout}",
                                 "options.root")
    return path


# --- COCO ------------------------------------------------------------------------


def coco_index(split: str, options: dict, count: bool) -> SplitIndex:
    """COCO's paths; with ``count``, its pairs from the annotation (or Karpathy) JSON."""
    o = _with_defaults("coco", coco, options)
    if o["root"] is not None:
        require_option("coco", o, "root", COCO_LAYOUT)
    if o["karpathy"] is not None:
        file = require_option("coco", o, "karpathy", COCO_LAYOUT)
        if not count:
            return SplitIndex(None, "paths checked")
        rows = _karpathy_rows("coco", str(file), split, o["root"], COCO_LAYOUT, restval=o["restval"])
        return _indexed(rows, o, f"Karpathy file {file.name}")
    if o["root"] is None and (o["annotations"] is None or o["images"] is None):
        raise DatasetOptionError(f"dataset 'coco' needs option 'root' (or 'annotations' and 'images', "
                                 f"or 'karpathy'). {COCO_LAYOUT}", "options.root")
    root, tag = Path(str(o["root"] or "")).expanduser(), f"{split}{o['year']}"
    paths = [require_option("coco", o, key, COCO_LAYOUT) if o[key] is not None
             else _default_path("coco", default, f"split {split!r}, year {o['year']}", COCO_LAYOUT)
             for key, default in (("annotations", root / "annotations" / f"captions_{tag}.json"),
                                  ("images", root / tag))]
    if not count:
        return SplitIndex(None, "paths checked")
    return _indexed(_coco_rows(*paths), o, f"annotations {paths[0].name}")


@register_dataset("coco", index=coco_index)
def coco(split: str, *, root: Optional[str] = None, annotations: Optional[str] = None,
         images: Optional[str] = None, year: int = 2014, karpathy: Optional[str] = None,
         restval: bool = True, captions: str = "first", max_images: Optional[int] = None) -> Split:
    """COCO captions: ``split`` is "train"/"val" of ``<root>/annotations/
    captions_<split><year>.json``, or with ``karpathy=<dataset_coco.json>`` one
    of "train" (plus "restval" if ``restval``), "val", "test", "restval"."""
    if karpathy is not None:
        rows = _karpathy_rows("coco", karpathy, split, root, COCO_LAYOUT, restval=restval)
        base = Path(root) if root else Path(karpathy).parent
    else:
        base = Path(root) if root else None
        ann = require("coco", annotations or (base and base / "annotations" / f"captions_{split}{year}.json"),
                      COCO_LAYOUT, "annotations")
        image_dir = require("coco", images or (base and base / f"{split}{year}"), COCO_LAYOUT, "images")
        rows = _coco_rows(ann, image_dir)
        base = base or image_dir
    return caption_split("coco", rows, captions=captions, base=base, layout=COCO_LAYOUT,
                         max_images=max_images)


def _coco_rows(annotations: Path, image_dir: Path) -> Rows:
    """Rows in annotation order of a COCO captions JSON."""
    data = _read_json("coco", annotations, COCO_LAYOUT)
    files = {image["id"]: image["file_name"] for image in data["images"]}
    return [(image_dir / files[ann["image_id"]], ann["caption"]) for ann in data["annotations"]]


def _karpathy_rows(dataset: str, path: str, split: str, root: Optional[str], layout: str,
                   *, restval: bool) -> Rows:
    """Rows of one split of a Karpathy ``dataset_<name>.json``, in file order."""
    data = _read_json(dataset, require(dataset, path, layout, "karpathy"), layout)
    wanted = {"train", "restval"} if split == "train" and restval else {split}
    known = {image["split"] for image in data["images"]}
    if not wanted & known:
        raise DatasetError(f"dataset {dataset!r}: split {split!r} not in the Karpathy file "
                           f"{path} (it has {sorted(known)})")
    image_root = Path(root) if root else Path(path).parent
    return [(image_root / image.get("filepath", "") / image["filename"], sentence["raw"])
            for image in data["images"] if image["split"] in wanted
            for sentence in image["sentences"]]


def _read_json(dataset: str, path: Path, layout: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"dataset {dataset!r}: {path} is not valid JSON ({err}).\n{layout}") from err


# --- Flickr30k ---------------------------------------------------------------------


def flickr30k_index(split: str, options: dict, count: bool) -> SplitIndex:
    """Flickr30k's paths; with ``count``, its pairs from the caption table or Karpathy file."""
    o = _with_defaults("flickr30k", flickr30k, options)
    base = require_option("flickr30k", o, "root", FLICKR_LAYOUT)
    image_dir = require_option("flickr30k", o, "images", FLICKR_LAYOUT) if o["images"] else \
        _flickr_image_dir(base)
    if o["karpathy"] is not None:
        require_option("flickr30k", o, "karpathy", FLICKR_LAYOUT)
    karpathy = o["karpathy"] or _existing(base / "dataset_flickr30k.json", o["captions_file"])
    table = None if karpathy else (require_option("flickr30k", o, "captions_file", FLICKR_LAYOUT)
                                   if o["captions_file"] else
                                   _default_path("flickr30k", base / "results.csv", "the caption table",
                                                 FLICKR_LAYOUT))
    if not count:
        return SplitIndex(None, "paths checked")
    if karpathy:
        rows = _karpathy_rows("flickr30k", karpathy, split, str(image_dir), FLICKR_LAYOUT, restval=False)
        return _indexed(rows, o, f"Karpathy file {Path(karpathy).name}")
    return _indexed(_flickr_csv_rows(table, image_dir, split), o, f"rows of {table.name}")


@register_dataset("flickr30k", index=flickr30k_index)
def flickr30k(split: str, *, root: Optional[str] = None, images: Optional[str] = None,
              captions_file: Optional[str] = None, karpathy: Optional[str] = None,
              captions: str = "all", max_images: Optional[int] = None) -> Split:
    """Flickr30k: a ``results.csv`` (its ``split`` column selects the split,
    "all" takes every row) or a Karpathy ``dataset_flickr30k.json``
    ("train", "val", "test"). Default ``captions="all"``: a retrieval set."""
    base = require("flickr30k", root, FLICKR_LAYOUT, "root")
    image_dir = Path(images) if images else _flickr_image_dir(base)
    karpathy = karpathy or _existing(base / "dataset_flickr30k.json", captions_file)
    if karpathy:
        rows = _karpathy_rows("flickr30k", karpathy, split, str(image_dir), FLICKR_LAYOUT, restval=False)
    else:
        table = require("flickr30k", captions_file or base / "results.csv", FLICKR_LAYOUT, "captions_file")
        rows = _flickr_csv_rows(table, image_dir, split)
    return caption_split("flickr30k", rows, captions=captions, base=image_dir, layout=FLICKR_LAYOUT,
                         max_images=max_images)


def _flickr_image_dir(root: Path) -> Path:
    return root / "flickr30k-images" if (root / "flickr30k-images").is_dir() else root


def _existing(path: Path, override: Optional[str]) -> Optional[str]:
    """The Karpathy file by default only when no CSV was named explicitly."""
    return str(path) if override is None and path.is_file() else None


def _flickr_csv_rows(table: Path, image_dir: Path, split: str) -> Rows:
    """Rows of ``results.csv`` (pipe- or comma-separated, Kaggle or official form)."""
    frame = _read_table(table)
    image_col = _column(frame, ("image_name", "image", "filename", "file_name", "image_path"), "flickr30k")
    caption_col = _column(frame, ("comment", "caption", "sentence", "raw", "text"), "flickr30k")
    frame = _select_split(frame, "split" if "split" in frame.columns else None, split, "flickr30k")
    return [(image_dir / str(name).strip(), str(text).strip())
            for name, text in zip(frame[image_col], frame[caption_col])]


# --- a generic paired table ------------------------------------------------------


def pairs_index(split: str, options: dict, count: bool) -> SplitIndex:
    """The table's path; with ``count``, its rows of ``split`` (no image is opened)."""
    o = _with_defaults("pairs", pairs, options)
    table = require_option("pairs", o, "path", PAIRS_LAYOUT)
    if o["image_root"] is not None:
        require_option("pairs", o, "image_root", PAIRS_LAYOUT)
    if not count:
        return SplitIndex(None, "paths checked")
    frame = _read_table(table)
    for col in (o["image_column"], o["caption_column"]):
        _column(frame, (col,), "pairs")
    frame = _select_split(frame, o["split_column"], split, "pairs")
    return SplitIndex(count_pairs(frame[o["image_column"]], o["captions"], o["max_images"]),
                      f"rows of {table.name}, captions: {o['captions']}")


@register_dataset("pairs", index=pairs_index)
def pairs(split: str, *, path: Optional[str] = None, image_column: str = "image",
          caption_column: str = "caption", split_column: Optional[str] = None,
          image_root: Optional[str] = None, captions: str = "all",
          max_images: Optional[int] = None) -> Split:
    """A CSV/TSV/Parquet table of (image path, caption) rows. With
    ``split_column`` only rows whose value equals ``split`` are kept ("all"
    keeps every row); without it every row is the split."""
    table = require("pairs", path, PAIRS_LAYOUT, "path")
    frame = _read_table(table)
    for col in (image_column, caption_column):
        _column(frame, (col,), "pairs")
    frame = _select_split(frame, split_column, split, "pairs")
    base = Path(image_root) if image_root else table.parent
    rows = [(base / str(image), caption) for image, caption in zip(frame[image_column], frame[caption_column])]
    return caption_split("pairs", rows, captions=captions, base=base, layout=PAIRS_LAYOUT,
                         max_images=max_images)


def _read_table(path: Path):
    """A pandas frame of a CSV (comma or pipe), TSV or Parquet file; column names stripped."""
    import pandas as pd  # lazily: specs are validated without pandas

    if path.suffix in (".parquet", ".pq"):
        frame = pd.read_parquet(path)
    else:
        with open(path, encoding="utf-8") as f:
            header = f.readline()
        sep = "|" if "|" in header else "\t" if "\t" in header else ","
        frame = pd.read_csv(path, sep=sep, skipinitialspace=True, dtype=str, keep_default_na=False,
                            engine="python" if sep == "|" else "c")
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _column(frame, candidates: Iterable[str], dataset: str) -> str:
    for name in candidates:
        if name in frame.columns:
            return name
    raise DatasetError(f"dataset {dataset!r}: no column among {list(candidates)}; "
                       f"the table has {list(frame.columns)}")


def _select_split(frame, column: Optional[str], split: str, dataset: str):
    if split == "all":
        return frame
    if column is None:
        if dataset == "pairs":
            return frame
        raise DatasetError(f"dataset {dataset!r}: the caption table has no 'split' column, so "
                           f"split {split!r} cannot be chosen; use split 'all' or a Karpathy file.\n"
                           + FLICKR_LAYOUT)
    _column(frame, (column,), dataset)
    values = frame[column].astype(str).str.strip()
    if split not in set(values):
        raise DatasetError(f"dataset {dataset!r}: split {split!r} not in column {column!r} "
                           f"(values: {sorted(set(values))[:10]})")
    return frame[values == split]
