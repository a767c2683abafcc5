"""The feature stage: every (encoder, split, field) a sweep needs, in the store.

:func:`extract_features` runs one EncoderActor per encoder and returns a
:class:`FeatureSet`: the store keys and the split metadata that trials need
(which caption belongs to which image, class labels). :func:`trial_data`
turns a FeatureSet and one layer pair into the in-memory
:class:`~trials.trial.TrialData` of a trial.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from trials.trial import RetrievalSet, TrialData, ZeroShotSet

LOG_EVERY_S = 30.0  # seconds between progress lines while encoders extract


@dataclass
class SplitFeatures:
    """Store keys of one split's features plus its pairing metadata."""

    image: str  # key of the image features (unique images)
    text: str  # key of caption features, or of the class prompts for zero-shot sets
    text_to_image: np.ndarray
    labels: np.ndarray | None = None
    n_prompts: list[int] = field(default_factory=list)


@dataclass
class FeatureSet:
    train: SplitFeatures
    val: SplitFeatures
    zero_shot: dict[str, SplitFeatures]
    retrieval: dict[str, SplitFeatures]
    num_layers: tuple[int, int]  # (image, text)
    computed: int = 0  # entries computed now (the rest were cache hits)
    cached: int = 0

    def keys(self) -> list[str]:
        splits = [self.train, self.val, *self.zero_shot.values(), *self.retrieval.values()]
        return sorted({k for s in splits for k in (s.image, s.text)})


def extract_features(spec, cache_root: str, log=print) -> FeatureSet:
    """Fill the store for every split of ``spec`` with one actor per encoder."""
    import ray

    from orchestrator.actors import encoder_actor

    actors = {role: encoder_actor(getattr(spec.encoders, role), cache_root)
              for role in ("image", "text")}
    text_field = {"train": "texts", "val": "texts", "retrieval": "texts", "zero_shot": "prompts"}
    jobs = []  # (group, name, {role: future})
    for group, refs in (("train", [spec.data.train]), ("val", [spec.data.val]),
                        ("zero_shot", spec.data.zero_shot), ("retrieval", spec.data.retrieval)):
        for ref in refs:
            futures = {"image": actors["image"].ensure.remote(asdict(ref), ["images"]),
                       "text": actors["text"].ensure.remote(asdict(ref), [text_field[group]])}
            jobs.append((group, ref.name, futures, text_field[group]))
    num_layers = tuple(ray.get([actors[r].num_layers.remote() for r in ("image", "text")]))
    splits: dict[str, dict[str, SplitFeatures]] = {"zero_shot": {}, "retrieval": {}}
    computed = cached = 0
    for group, name, futures, field_name in jobs:
        image, text = _get_reporting([futures["image"], futures["text"]], actors, log)
        for out, fld in ((image, "images"), (text, field_name)):
            fresh = out["computed"][fld]
            computed, cached = computed + fresh, cached + (not fresh)
            log(f"  features {group}/{name}/{fld}: "
                + (f"computed in {out['seconds'][fld]:.1f}s" if fresh else "cached"))
        item = SplitFeatures(image=image["keys"]["images"], text=text["keys"][field_name],
                             text_to_image=text["text_to_image"], labels=image["labels"],
                             n_prompts=text["n_prompts"])
        if group in ("train", "val"):
            splits[group] = item
        else:
            splits[group][name] = item
    for actor in actors.values():
        ray.kill(actor)  # free their CPUs/GPUs for the trials
    return FeatureSet(train=splits["train"], val=splits["val"], zero_shot=splits["zero_shot"],
                      retrieval=splits["retrieval"], num_layers=num_layers,
                      computed=computed, cached=cached)


def _get_reporting(refs: list, actors: dict, log, every_s: float = LOG_EVERY_S) -> list:
    """``ray.get(refs)``, logging the actors' running extractions every ``every_s`` seconds."""
    import ray

    from orchestrator.actors import _progress_line

    pending = list(refs)
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=every_s)
        if pending:  # still extracting: say where each actor is
            for role, progress in zip(actors, ray.get([a.progress.remote() for a in actors.values()])):
                if progress["task"]:
                    log(f"  [{role}]" + _progress_line(progress))
    return ray.get(refs)


Fetch = Callable[[str, int], np.ndarray]  # (store key, layer) -> features [N, D]


def trial_data(features: FeatureSet, fetch: Fetch, image_layer: int, text_layer: int) -> TrialData:
    """The in-memory inputs of a trial on layer pair (image_layer, text_layer)."""

    def paired(split: SplitFeatures):
        return fetch(split.image, image_layer)[split.text_to_image], fetch(split.text, text_layer)

    train_image, train_text = paired(features.train)
    val_image, val_text = paired(features.val)
    zero_shot = {name: ZeroShotSet(image=fetch(s.image, image_layer), labels=s.labels,
                                   prompts=_prompt_grid(fetch(s.text, text_layer), s.n_prompts))
                 for name, s in features.zero_shot.items()}
    retrieval = {name: RetrievalSet(image=fetch(s.image, image_layer),
                                    text=fetch(s.text, text_layer), text_to_image=s.text_to_image)
                 for name, s in features.retrieval.items()}
    return TrialData(train_image, train_text, val_image, val_text, zero_shot, retrieval)


def _prompt_grid(flat: np.ndarray, n_prompts: list[int]) -> np.ndarray:
    """[C*T, D] class-major prompt features -> [C, T, D] (T equal per class)."""
    if len(set(n_prompts)) != 1:
        raise ValueError("every class needs the same number of prompt templates")
    return np.asarray(flat).reshape(len(n_prompts), n_prompts[0], -1)
