"""Dataset registry: named sources of paired (image, caption) data and
zero-shot classification sets, each split loaded as a :class:`Split`.

A dataset is one decorated factory ``f(split, **options) -> Split``. Inputs in
a split are whatever the encoders take (PIL images, strings, or the planted
latents of the synthetic world); real images are a lazy sequence (paths or
loaders) read one encoder batch at a time. The feature store caches the
encoders' outputs under the split's ``fingerprint``, a cheap hash of the
split's content identity (never of where the files live).

Built in: ``synthetic`` (the planted pair), ``coco``, ``flickr30k``, ``pairs``
(a CSV/Parquet table of image path + caption), ``image_folder``
(``root/<class>/<image>``) and the torchvision-backed classification sets
(``cifar10``, ``cifar100``, ``stl10``, ``food101``, ``pets``, ``flowers``,
``dtd``, ``mnist``). Importing this package imports neither torch nor
torchvision, so a spec is validated without them.
"""

from orchestrator.datasets.base import (  # noqa: F401
    DATASETS,
    KIND_FIELDS,
    DatasetError,
    DatasetOptionError,
    Split,
    SplitIndex,
    dataset_names,
    fingerprint,
    load_split,
    register_dataset,
    split_index,
)

# Importing these registers the built-in datasets.
from orchestrator.datasets import captions, classification, synthetic  # noqa: F401
from orchestrator.datasets import curated  # noqa: F401  (a data stage: freeze-align §3.2)
from orchestrator.datasets import mixture  # noqa: F401  (sources cut to sizes: scaling up, distribution shift)
from orchestrator.datasets.synthetic import SYNTHETIC_VERSION  # noqa: F401
