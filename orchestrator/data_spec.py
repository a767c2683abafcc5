"""The ``data:`` block of a sweep spec: dataset refs, the paired and evaluation
sets, and the optional unpaired data for the regulariser (``data.unpaired``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from orchestrator.config import SpecError, _convert
from trials.registry import did_you_mean


@dataclass
class DatasetRef:
    """A split of a registered dataset; ``options`` go to the dataset (paths...)."""

    dataset: str
    split: str = "train"
    name: Optional[str] = None  # label in results; defaults to the dataset name
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        from orchestrator.datasets import dataset_names

        if self.dataset not in dataset_names():
            raise SpecError(f"unknown dataset {self.dataset!r}{did_you_mean(self.dataset, dataset_names())}; "
                            f"registered: {', '.join(dataset_names())}", path="dataset")
        self.name = self.name or self.dataset


def _optional(cls):
    """A field of type ``Optional[cls]`` whose errors keep their key path (a plain
    ``Optional`` would report only "expected ... or null")."""
    return {"parse": lambda v, at: None if v is None else _convert(v, cls, at),
            "expects": f"a {cls.__name__} mapping or null"}


@dataclass
class UnpairedSpec:
    """Unpaired unimodal data that enters the regulariser R_S only (METHOD.md §5.2):
    the image side uses ``image``'s images (image encoder only), the text side
    ``text``'s captions (text encoder only). Either may be left out."""

    image: Optional[DatasetRef] = field(default=None, metadata=_optional(DatasetRef))
    text: Optional[DatasetRef] = field(default=None, metadata=_optional(DatasetRef))

    def __post_init__(self):
        if self.image is None and self.text is None:
            raise SpecError("neither `image` nor `text` is set; give at least one dataset "
                            "ref (dataset, split, options) or remove `unpaired`")


@dataclass
class DataSpec:
    """Paired train/val data, the evaluation sets and optional unpaired data for R_S."""

    train: DatasetRef
    val: DatasetRef
    zero_shot: list[DatasetRef] = field(default_factory=list)
    retrieval: list[DatasetRef] = field(default_factory=list)
    unpaired: Optional[UnpairedSpec] = field(default=None, metadata=_optional(UnpairedSpec))

    def __post_init__(self):
        # results and metric names are keyed by set name: two sets of one kind
        # with the same name would overwrite each other's metrics
        for kind in ("zero_shot", "retrieval"):
            seen = set()
            for i, ref in enumerate(getattr(self, kind)):
                if ref.name in seen:
                    raise SpecError(f"evaluation set name {ref.name!r} is used twice; set a distinct "
                                    f"`name:` on each {kind} entry (e.g. name: {ref.name}-{ref.split})",
                                    path=f"{kind}[{i}].name")
                seen.add(ref.name)
