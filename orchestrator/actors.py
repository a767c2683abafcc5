"""EncoderActor: a frozen encoder held by a Ray actor, filling the feature store.

One actor per encoder loads the model once and serves every dataset split a
sweep needs. For each (split, field) it computes the feature key; an entry
already in the store costs no forward pass. Features of all layers come out of
one forward pass per batch.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import numpy as np

from orchestrator.datasets import load_split
from orchestrator.encoders import build_encoder
from orchestrator.feature_store import FeatureStore, feature_key


class EncoderWorker:
    """The actor's logic, usable without Ray (tests, a bare GPU box)."""

    def __init__(self, encoder_spec: dict, cache_root: str):
        spec = dict(encoder_spec)
        self.batch_size = spec.pop("batch_size")
        spec.pop("num_gpus", None), spec.pop("num_cpus", None)
        options = spec.pop("options")
        self.encoder = build_encoder(spec.pop("name"), **spec, **options)
        self.store = FeatureStore(cache_root)
        self.forward_batches = 0  # forward passes run by this worker
        self._splits: dict[str, Any] = {}

    def identity(self) -> dict:
        return self.encoder.identity()

    def num_layers(self) -> int:
        return self.encoder.num_layers

    def ensure(self, dataset_ref: dict, fields: list[str]) -> dict:
        """Make sure the features of ``fields`` of a split are stored.

        Returns the split's metadata and, per field, its key and whether it
        was computed now (False: a cache hit).
        """
        split = self._split(dataset_ref)
        out = {"fingerprint": split.fingerprint, "keys": {}, "computed": {}, "seconds": {},
               "text_to_image": np.asarray(split.text_to_image),
               "labels": None if split.labels is None else np.asarray(split.labels),
               "n_prompts": [len(p) for p in split.prompts or []]}
        for field in fields:
            key = feature_key(self.identity(), split.fingerprint, field)
            out["keys"][field] = key
            fresh = not self.store.has(key, verify=True)
            start = time.perf_counter()
            if fresh:
                self.store.put(key, self._encode_all(split.inputs(field)),
                               meta={"encoder": self.identity(), "dataset": dataset_ref,
                                     "field": field})
            out["computed"][field] = fresh
            out["seconds"][field] = time.perf_counter() - start
        return out

    def _split(self, ref: dict):
        cache_key = repr(sorted(ref.items()))
        if cache_key not in self._splits:
            self._splits[cache_key] = load_split(ref["dataset"], ref["split"], ref["options"])
        return self._splits[cache_key]

    def _encode_all(self, inputs: list) -> np.ndarray:
        chunks = []
        for start in range(0, len(inputs), self.batch_size):
            chunks.append(self.encoder.encode(_batch(inputs[start:start + self.batch_size])))
            self.forward_batches += 1
        return np.concatenate(chunks, axis=0)


def _batch(items: list) -> Any:
    """Stack array inputs (synthetic latents); pass others (PIL, str) as a list."""
    return np.stack(items) if items and isinstance(items[0], np.ndarray) else items


def encoder_actor(encoder_spec, cache_root: str):
    """Start an EncoderActor for an :class:`~orchestrator.spec.EncoderSpec`."""
    import ray

    options = {"num_cpus": encoder_spec.num_cpus, "num_gpus": encoder_spec.num_gpus,
               "name": None, "max_restarts": 1}
    return ray.remote(EncoderWorker).options(**options).remote(asdict(encoder_spec), cache_root)
