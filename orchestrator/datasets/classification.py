"""Zero-shot classification datasets: torchvision-backed sets and image folders.

Each split carries its images (lazy), labels, class names and prompts
(class name x template, class-major; METHOD.md §8.1). ``extended_prompts``
(default true, as ``use_extended_prompts``) picks the dataset's
CLIP-benchmark template list; false gives the single "a photo of a {c}".
``templates`` overrides the list (a name in ``templates.TEMPLATES`` or a list).

The split's ``texts`` are one "a photo of a {class}" caption per image, so a
classification split can also serve as in-domain paired data (METHOD.md §9).

Torchvision's dataset classes read the files (never ``download=True``: data
is prepared by the user under ``root``); torchvision is imported only when
such a dataset is loaded.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from orchestrator.datasets.base import (
    DatasetError,
    DatasetOptionError,
    Split,
    SplitIndex,
    fingerprint,
    register_dataset,
)
from orchestrator.datasets.files import (
    ImageFiles,
    LazyImages,
    files_identity,
    require,
    require_option,
    tree_identity,
)
from orchestrator.datasets.templates import (
    CLASSNAMES,
    DEFAULT_TEMPLATE,
    TEMPLATES,
    class_prompts,
    resolve_templates,
)

CLASSIFICATION_VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


@dataclass(frozen=True)
class TorchvisionSet:
    """How one torchvision dataset class is found and split."""

    cls: str  # class in torchvision.datasets
    folder: str  # the folder under ``root`` the class reads
    splits: dict  # our split name -> constructor keyword arguments
    files: str  # what the folder holds, for error messages


TORCHVISION: dict[str, TorchvisionSet] = {
    "cifar10": TorchvisionSet("CIFAR10", "cifar-10-batches-py", {"train": {"train": True}, "test": {"train": False}},
                              "data_batch_1..5, test_batch, batches.meta (CIFAR-10 python version)"),
    "cifar100": TorchvisionSet("CIFAR100", "cifar-100-python", {"train": {"train": True}, "test": {"train": False}},
                               "train, test, meta (CIFAR-100 python version)"),
    "stl10": TorchvisionSet("STL10", "stl10_binary", {"train": {"split": "train"}, "test": {"split": "test"}},
                            "train_X.bin, train_y.bin, test_X.bin, test_y.bin, class_names.txt, fold_indices.txt"),
    "food101": TorchvisionSet("Food101", "food-101", {"train": {"split": "train"}, "test": {"split": "test"}},
                              "meta/train.json, meta/test.json, images/<class>/<id>.jpg"),
    "pets": TorchvisionSet("OxfordIIITPet", "oxford-iiit-pet",
                           {"train": {"split": "trainval"}, "trainval": {"split": "trainval"},
                            "test": {"split": "test"}},
                           "images/<Breed>_<n>.jpg, annotations/trainval.txt, annotations/test.txt"),
    "flowers": TorchvisionSet("Flowers102", "flowers-102",
                              {s: {"split": s} for s in ("train", "val", "test")},
                              "jpg/image_00001.jpg ..., imagelabels.mat, setid.mat"),
    "dtd": TorchvisionSet("DTD", "dtd", {s: {"split": s} for s in ("train", "val", "test")},
                          "dtd/images/<class>/<image>.jpg, dtd/labels/{train,val,test}<partition>.txt"),
    "mnist": TorchvisionSet("MNIST", "MNIST", {"train": {"train": True}, "test": {"train": False}},
                            "raw/train-images-idx3-ubyte, raw/train-labels-idx1-ubyte, raw/t10k-*"),
}


def classification_split(dataset: str, *, images: Sequence[Any], labels: np.ndarray,
                         class_names: list[str], templates: list[str], identity: str) -> Split:
    """A Split of labelled images with prompts; ``identity`` keys the images."""
    labels = np.asarray(labels, dtype=np.int64)
    texts = [DEFAULT_TEMPLATE.replace("{c}", class_names[c]) for c in labels]
    return Split(images=images, texts=texts, text_to_image=np.arange(len(labels)), labels=labels,
                 class_names=list(class_names), prompts=class_prompts(class_names, templates),
                 fingerprint=fingerprint(dataset, CLASSIFICATION_VERSION, identity, labels.tolist()),
                 field_fingerprints={"images": fingerprint("images", CLASSIFICATION_VERSION, identity)})


def _templates(dataset: str, templates, extended_prompts: bool) -> list[str]:
    try:
        return resolve_templates(templates if extended_prompts else "default", dataset)
    except ValueError as err:
        raise DatasetError(f"dataset {dataset!r}: {err}") from err


# --- torchvision datasets ---------------------------------------------------------


def torchvision_split(name: str, split: str, *, root: Optional[str] = None, templates=None,
                      extended_prompts: bool = True, max_images: Optional[int] = None,
                      seed: int = 0, **dataset_options: Any) -> Split:
    """``split`` of the torchvision dataset ``name`` read from ``root``.

    ``dataset_options`` go to the torchvision class (e.g. ``partition`` of DTD).
    ``max_images``: a seeded (``seed``), class-stratified subset of that many
    images (:func:`stratified_subset`).
    """
    source = TORCHVISION[name]
    layout = (f"expected layout: <root>/{source.folder}/ holding {source.files}, as read by "
              f"torchvision.datasets.{source.cls} (nothing is downloaded; prepare it once with "
              f"torchvision.datasets.{source.cls}(root, download=True) on a machine with network)")
    folder = require(name, Path(require(name, root, layout, "root")) / source.folder, layout, "folder")
    if split not in source.splits:
        raise DatasetError(f"dataset {name!r} has splits {sorted(source.splits)}, not {split!r}")
    dataset = _open_torchvision(name, source, Path(root).expanduser(), split, dataset_options, layout)
    labels = _labels(dataset)
    keep = list(range(len(labels)))
    if max_images is not None and max_images < len(labels):
        keep = stratified_subset(labels, max_images, seed)
        labels = labels[keep]
    class_names = CLASSNAMES.get(name) or [str(c).replace("_", " ") for c in dataset.classes]
    subset = None if max_images is None else [max_images, seed]
    identity = fingerprint(name, split, dataset_options, subset, tree_identity(folder))
    return classification_split(name, images=LazyImages(len(labels), lambda i: dataset[keep[i]][0]),
                                labels=labels, class_names=class_names,
                                templates=_templates(name, templates, extended_prompts), identity=identity)


def _open_torchvision(name: str, source: TorchvisionSet, root: Path, split: str,
                      options: dict, layout: str) -> Any:
    import torchvision.datasets  # lazily: heavy, and only real datasets need it

    factory = getattr(torchvision.datasets, source.cls)
    try:
        return factory(str(root), download=False, **source.splits[split], **options)
    except (RuntimeError, FileNotFoundError, OSError) as err:  # "Dataset not found or corrupted"
        raise DatasetError(f"dataset {name!r}: torchvision.datasets.{source.cls} cannot read "
                           f"{root / source.folder}: {err}\n{layout}") from err


def _labels(dataset: Any) -> np.ndarray:
    """Class indices without decoding any image (each class names them differently)."""
    for attr in ("targets", "labels", "_labels"):
        if getattr(dataset, attr, None) is not None:
            return np.asarray(getattr(dataset, attr), dtype=np.int64)
    return np.asarray([dataset[i][1] for i in range(len(dataset))], dtype=np.int64)


# The published sizes of the official splits (images; one pair each): what
# validation checks n_train against without opening torchvision's files.
PUBLISHED_SIZES = {
    "cifar10": {"train": 50000, "test": 10000}, "cifar100": {"train": 50000, "test": 10000},
    "stl10": {"train": 5000, "test": 8000}, "food101": {"train": 75750, "test": 25250},
    "pets": {"train": 3680, "trainval": 3680, "test": 3669},
    "flowers": {"train": 1020, "val": 1020, "test": 6149},
    "dtd": {"train": 1880, "val": 1880, "test": 1880}, "mnist": {"train": 60000, "test": 10000},
}


def torchvision_index(name: str, split: str, options: dict, count: bool) -> SplitIndex:
    """The root and its dataset folder exist; the split's published size (capped by ``max_images``)."""
    source = TORCHVISION[name]
    root = require_option(name, options, "root", f"expected <root>/{source.folder}/ ({source.files})")
    if not (root / source.folder).is_dir():
        raise DatasetOptionError(f"dataset {name!r}: {str(root / source.folder)!r} does not exist; "
                                 f"expected <root>/{source.folder}/ holding {source.files}", "options.root")
    if split not in source.splits:
        raise DatasetOptionError(f"dataset {name!r} has splits {sorted(source.splits)}, not {split!r}", "split")
    size, cap = PUBLISHED_SIZES.get(name, {}).get(split), options.get("max_images")
    if size is None:
        return SplitIndex(None, "unknown until run")
    return SplitIndex(size if cap is None else min(size, cap),
                      f"published size of torchvision {source.cls} {split!r}")


for _name in TORCHVISION:
    register_dataset(_name, kind="classification", index=functools.partial(torchvision_index, _name))(
        functools.partial(torchvision_split, _name))


# --- a generic image folder -------------------------------------------------------

IMAGE_FOLDER_LAYOUT = """expected image-folder layout: <root>/<split>/<class>/<image> (split 'all':
<root>/<class>/<image>); one folder per class, class index = sorted folder order; images with
extensions .jpg .jpeg .png .bmp .gif .webp .tif .tiff .ppm."""


def image_folder_index(split: str, options: dict, count: bool) -> SplitIndex:
    """The split folder exists; with ``count``, its image files (listed, never opened)."""
    base = require_option("image_folder", options, "root", IMAGE_FOLDER_LAYOUT)
    split_dir = base if split == "all" else base / split
    if not split_dir.is_dir():
        raise DatasetOptionError(f"dataset 'image_folder': split folder {str(split_dir)!r} does not "
                                 f"exist. {IMAGE_FOLDER_LAYOUT}", "options.root")
    if not count:
        return SplitIndex(None, "paths checked")
    folders = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    n, cap = len(_folder_images(split_dir, folders)[0]), options.get("max_images")
    return SplitIndex(n if cap is None else min(n, cap), f"image files under {split_dir.name}/")


@register_dataset("image_folder", kind="classification", index=image_folder_index)
def image_folder(split: str, *, root: Optional[str] = None, class_names=None, templates=None,
                 extended_prompts: bool = True, max_images: Optional[int] = None,
                 seed: int = 0) -> Split:
    """Labelled images from ``<root>/<split>/<class>/<image>`` (``split="all"``:
    ``<root>/<class>/<image>``). ``class_names``: a list in sorted folder order,
    a mapping folder -> name, or a name in ``templates.CLASSNAMES``; default:
    the folder names with ``_`` as spaces. ``templates`` default to the single
    "a photo of a {c}" prompt. ``max_images``: a seeded (``seed``),
    class-stratified subset of that many images (see :func:`stratified_subset`)."""
    base = require("image_folder", root, IMAGE_FOLDER_LAYOUT, "root")
    split_dir = base if split == "all" else require("image_folder", base / split, IMAGE_FOLDER_LAYOUT,
                                                    f"split folder for {split!r}")
    folders = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    paths, labels = _folder_images(split_dir, folders)
    if not paths:
        raise DatasetError(f"dataset 'image_folder': no images under {split_dir}.\n{IMAGE_FOLDER_LAYOUT}")
    if max_images is not None and max_images < len(paths):
        keep = stratified_subset(labels, max_images, seed)
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    names = _folder_class_names(folders, class_names)
    identity = fingerprint(folders, files_identity("image_folder", paths, split_dir, IMAGE_FOLDER_LAYOUT))
    return classification_split("image_folder", images=ImageFiles(paths), labels=np.asarray(labels),
                                class_names=names, identity=identity,
                                templates=_templates("image_folder", templates, extended_prompts))


def stratified_subset(labels: Sequence[int], n: int, seed: int = 0) -> list[int]:
    """Indices of ``n`` items spread evenly over the classes of ``labels``.

    Each class's items are shuffled, and the classes are visited round-robin
    in a shuffled order (both from ``seed``), one item per class per round,
    until ``n`` are taken: class sizes differ by at most one unless a class
    runs out, and with ``n >= #classes`` no class is dropped. Returned in
    ascending index order (the input's class-sorted order).
    """
    if n < 0:
        raise DatasetError(f"max_images must be >= 0, not {n}")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    queues = [list(rng.permutation(by_class[c])) for c in rng.permutation(sorted(by_class))]
    keep: list[int] = []
    while len(keep) < n and queues:
        for queue in queues:
            if len(keep) == n:
                break
            keep.append(int(queue.pop()))
        queues = [q for q in queues if q]
    return sorted(keep)


def _folder_images(split_dir: Path, folders: list[str]) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for label, folder in enumerate(folders):
        for name in sorted(os.listdir(split_dir / folder)):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                paths.append(split_dir / folder / name)
                labels.append(label)
    return paths, labels


def _folder_class_names(folders: list[str], class_names) -> list[str]:
    if class_names is None:
        return [f.replace("_", " ") for f in folders]
    if isinstance(class_names, str):
        if class_names not in CLASSNAMES:
            raise DatasetError(f"dataset 'image_folder': unknown class-name list {class_names!r}; "
                               f"known: {sorted(CLASSNAMES)}")
        class_names = CLASSNAMES[class_names]
    if isinstance(class_names, dict):
        missing = [f for f in folders if f not in class_names]
        if missing:
            raise DatasetError(f"dataset 'image_folder': class_names has no entry for folders {missing[:5]}")
        return [str(class_names[f]) for f in folders]
    if len(class_names) != len(folders):
        raise DatasetError(f"dataset 'image_folder': {len(class_names)} class names for "
                           f"{len(folders)} class folders")
    return [str(c) for c in class_names]


__all__ = ["TORCHVISION", "TEMPLATES", "classification_split", "image_folder", "stratified_subset",
           "torchvision_split"]
