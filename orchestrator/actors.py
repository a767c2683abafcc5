"""EncoderActor: a frozen encoder held by a Ray actor, filling the feature store.

One actor per encoder loads the model once and serves every dataset split a
sweep needs. For each (split, field) it computes the feature key; an entry
already in the store costs no forward pass, and an entry another process is
computing right now is waited for (the store's per-key lock), not computed
again. Features of all layers come out of one forward pass per batch and are
streamed into the store batch by batch; the next batch's images are read in a
background thread while the current one runs through the model.

A field spelled ``"<field>@tokens:<layer>"`` (``"images@tokens:11"``,
``"texts@tokens:-1"``: negative counts from the end) asks for every token of
that one layer instead (:mod:`orchestrator.token_store`), cached the same way.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, Callable, Optional, Sequence

import numpy as np

from orchestrator.datasets import load_split
from orchestrator.datasets.files import open_image
from orchestrator.encoders import build_encoder
from orchestrator.feature_store import FeatureStore, feature_key
from orchestrator.token_store import DEFAULT_SHARD_BYTES, TokenWriter, parse_token_field, token_key

LOG_EVERY_S = 30.0  # seconds between progress lines of an extraction (worker and driver)


class EncoderResourcesError(RuntimeError):
    """An encoder asks for more GPUs/CPUs than the whole Ray cluster has."""


class EncoderActorDied(RuntimeError):
    """An encoder's actor process ended while extracting (killed, out of memory, its
    node lost) more often than Ray restarts it; the message names it and the fix."""


RESTARTS = 1  # a killed encoder actor is restarted and its calls retried this often


def resolve_device(device: Optional[str]) -> str:
    """``"auto"`` (or None) -> ``"cuda"`` if torch sees a GPU here, else ``"cpu"``.

    Resolved in the worker, on the machine that runs the encoder. The device
    is not part of an encoder's identity, so "auto" and the device it resolves
    to give the same feature-cache keys.
    """
    if device not in (None, "auto"):
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class EncoderWorker:
    """The actor's logic, usable without Ray (tests, a bare GPU box).

    ``log`` (e.g. ``print``) receives a progress line every ``log_every_s``
    seconds of an extraction and one when it ends; :meth:`progress` returns
    the same numbers on demand (the Ray actor serves it concurrently).
    Token entries are cut into shards of at most ``token_shard_bytes``.
    """

    def __init__(self, encoder_spec: dict, cache_root: str, *, log: Optional[Callable[[str], Any]] = None,
                 log_every_s: float = LOG_EVERY_S, token_shard_bytes: int = DEFAULT_SHARD_BYTES):
        spec = dict(encoder_spec)
        self.batch_size = spec.pop("batch_size")
        spec.pop("num_gpus", None), spec.pop("num_cpus", None)
        spec.pop("label", None)  # the spec's name for a candidate, not the encoder's
        options = spec.pop("options")
        spec["device"] = resolve_device(spec.get("device"))
        self.encoder = build_encoder(spec.pop("name"), **spec, **options)
        self.store = FeatureStore(cache_root)
        self.forward_batches = 0  # forward passes run by this worker
        self.log, self.log_every_s = log, log_every_s
        self.token_shard_bytes = token_shard_bytes
        self._splits: dict[str, Any] = {}
        self._progress: dict = {"task": None, "done": 0, "total": 0, "samples_per_s": 0.0,
                                "eta_s": None, "finished": []}

    def identity(self) -> dict:
        return self.encoder.identity()

    def num_layers(self) -> int:
        return self.encoder.num_layers

    def progress(self) -> dict:
        """The running extraction (task, rows done/total, rate, ETA) and finished ones."""
        return {**self._progress, "forward_batches": self.forward_batches, "pid": os.getpid()}

    def ensure(self, dataset_ref: dict, fields: list[str]) -> dict:
        """Make sure the features of ``fields`` of a split are stored.

        Returns the split's metadata and, per field, its key, whether it was
        computed now (False: a cache hit, possibly after waiting for another
        process), the seconds it took and a timing breakdown.
        """
        split = self._split(dataset_ref)
        out = {"fingerprint": split.fingerprint, "keys": {}, "computed": {}, "seconds": {}, "timings": {},
               "text_to_image": np.asarray(split.text_to_image),
               "labels": None if split.labels is None else np.asarray(split.labels),
               "n_prompts": [len(p) for p in split.prompts or []]}
        for field in fields:
            tokens = parse_token_field(field)
            base = tokens[0] if tokens else field
            inputs = split.inputs(base)  # an unknown field fails here, before any lock
            start = time.perf_counter()
            if tokens:
                key, job = self._token_job(split.field_fingerprint(base), base, tokens[1], dataset_ref, field)
            else:
                key = feature_key(self.identity(), split.field_fingerprint(field), field)
                job = self._pooled_job(key, len(inputs), {"encoder": self.identity(), "dataset": dataset_ref,
                                                          "field": field})
            timings = self._ensure_key(key, inputs, _task_name(dataset_ref, field), job)
            out["keys"][field], out["computed"][field] = key, timings is not None
            out["seconds"][field], out["timings"][field] = time.perf_counter() - start, timings
        return out

    def _pooled_job(self, key: str, n: int, meta: dict):
        """(encode a batch, open the entry's writer given the first output or None)."""
        def open_writer(features):
            shape = (n, self.encoder.num_layers, self.encoder.dim) if features is None else \
                (n, *features.shape[1:])
            return self.store.writer(key, shape, meta)

        return self.encoder.encode, open_writer, lambda writer, features: writer.write(features)

    def _token_job(self, fingerprint: str, base: str, layer: int, dataset_ref: dict, field: str):
        """The key and job of the tokens of ``base`` at ``layer`` (resolved: -1 and
        the last index are one entry, keyed without the encoder's pooling)."""
        layer = self.encoder.resolve_layer(layer)
        identity = self.encoder.token_identity()
        key = token_key(identity, fingerprint, base, layer)
        meta = {"encoder": identity, "dataset": dataset_ref, "field": field, "layer": layer}

        def open_writer(_):
            return TokenWriter(self.store, key, dim=self.encoder.dim, num_prefix=self.encoder.num_prefix,
                               meta=meta, shard_bytes=self.token_shard_bytes)

        job = (lambda batch: self.encoder.encode_tokens(batch, layer)), open_writer, \
            (lambda writer, tokens: writer.write(*tokens))
        return key, job

    def _ensure_key(self, key: str, inputs: Sequence, task: str, job) -> Optional[dict]:
        """Compute ``key`` unless stored (or stored meanwhile by another
        process); returns the timings if computed, None for a cache hit."""
        if self.store.has(key, verify=True):
            return None
        with self.store.lock(key):
            if self.store.has(key, verify=True):  # another extractor finished it while we waited
                return None
            if self.store.discard_partials(key) and self.log:  # an extractor killed mid-entry
                self.log(f"  {task}: removed the partial entry of an interrupted extraction")
            return self._extract(inputs, task, *job)

    def _split(self, ref: dict):
        cache_key = repr(sorted(ref.items()))
        if cache_key not in self._splits:
            self._splits[cache_key] = load_split(ref["dataset"], ref["split"], ref.get("options"))
        return self._splits[cache_key]

    def _extract(self, inputs: Sequence, task: str, encode: Callable, open_writer: Callable,
                 write: Callable) -> dict:
        """Encode ``inputs`` batch by batch into a new store entry: ``open_writer(first
        output or None)`` makes its writer, ``write(writer, output)`` appends a batch."""
        n, timings, writer = len(inputs), {"load_s": 0.0, "encode_s": 0.0, "write_s": 0.0}, None
        started = last_log = time.perf_counter()
        self._progress.update(task=task, done=0, total=n, samples_per_s=0.0, eta_s=None)
        try:
            for first, batch, load_s in self._batches(inputs):
                timings["load_s"] += load_s
                tick = time.perf_counter()
                output = encode(batch)
                self.forward_batches += 1
                timings["encode_s"] += (tock := time.perf_counter()) - tick
                writer = writer or open_writer(output)
                write(writer, output)
                timings["write_s"] += time.perf_counter() - tock
                last_log = self._report(min(n, first + self.batch_size), started, last_log)
            tick = time.perf_counter()
            writer = writer or open_writer(None)
            writer.commit()
            timings["write_s"] += time.perf_counter() - tick
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        timings["total_s"] = time.perf_counter() - started
        self._finish(task, n, timings)
        return timings

    def _batches(self, inputs: Sequence):
        """(first row, encoder-ready batch, seconds spent loading it), the next
        batch loading in a background thread while the caller encodes."""
        starts = list(range(0, len(inputs), self.batch_size))
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="load") as pool:
            pending = pool.submit(self._load, inputs, starts[0]) if starts else None
            for i, first in enumerate(starts):
                batch, load_s = pending.result()
                if i + 1 < len(starts):
                    pending = pool.submit(self._load, inputs, starts[i + 1])
                yield first, batch, load_s

    def _load(self, inputs: Sequence, first: int) -> tuple[Any, float]:
        start = time.perf_counter()
        batch = _batch(inputs[first:first + self.batch_size], self.encoder.modality)
        return batch, time.perf_counter() - start

    def _report(self, done: int, started: float, last_log: float) -> float:
        now = time.perf_counter()
        rate = done / max(now - started, 1e-9)
        total = self._progress["total"]
        self._progress.update(done=done, samples_per_s=rate, eta_s=(total - done) / rate if rate else None)
        if self.log and now - last_log >= self.log_every_s:
            self.log(_progress_line(self._progress))
            return now
        return last_log

    def _finish(self, task: str, n: int, timings: dict) -> None:
        rate = n / max(timings["total_s"], 1e-9)
        self._progress.update(task=None, eta_s=None)
        self._progress["finished"] = [*self._progress["finished"],
                                      {"task": task, "samples": n, "samples_per_s": rate, **timings}]
        if self.log:
            self.log(f"  {task}: {n} samples in {timings['total_s']:.1f}s ({rate:.1f}/s; "
                     f"encode {timings['encode_s']:.1f}s, load {timings['load_s']:.1f}s, "
                     f"write {timings['write_s']:.1f}s)")


def _task_name(ref: dict, field: str) -> str:
    return f"{ref.get('name') or ref['dataset']}/{ref['split']}/{field}"


def _progress_line(progress: dict) -> str:
    eta = f", ~{progress['eta_s']:.0f}s left" if progress["eta_s"] is not None else ""
    return (f"  {progress['task']}: {progress['done']}/{progress['total']} "
            f"({progress['samples_per_s']:.1f} samples/s{eta})")


def _batch(items: Sequence, modality: str) -> Any:
    """Encoder input of one batch.

    Array rows (synthetic latents) are stacked; for an image encoder, file
    paths are opened as RGB PIL images (lazy image sequences already give
    PIL images); anything else (PIL images, strings) goes as a list.
    """
    items = list(items) if not isinstance(items, np.ndarray) else items
    if len(items) and isinstance(items[0], np.ndarray):
        return np.stack(items)
    if modality == "image":
        return [open_image(x) if isinstance(x, (str, os.PathLike)) else x for x in items]
    return items


def encoder_actor(encoder_spec, cache_root: str, role: str = "encoder"):
    """Start an EncoderActor for an :class:`~orchestrator.spec.EncoderSpec`.

    The actor takes ``num_gpus``/``num_cpus`` from the spec; a request the
    cluster can never satisfy raises :class:`EncoderResourcesError` instead of
    leaving the actor pending forever. Its ``progress`` method runs in a
    separate concurrency group, so a driver can poll it while ``ensure`` is
    extracting; every other method runs on one thread, in order. An actor
    whose process dies is restarted :data:`RESTARTS` time(s) and its calls
    retried (``ensure`` is idempotent: a content-keyed entry, taken under the
    store's lock, the dead writer's partial entry removed).
    """
    check_encoder_fits(encoder_spec, role)
    options = {"num_cpus": encoder_spec.num_cpus, "num_gpus": encoder_spec.num_gpus,
               "name": None, "max_restarts": RESTARTS, "max_task_retries": RESTARTS}
    return _ray_actor_class().options(**options).remote(asdict(encoder_spec), cache_root)


def check_encoder_fits(encoder_spec, role: str = "encoder", resources: Optional[dict] = None) -> None:
    """Raise :class:`EncoderResourcesError` if the cluster's totals
    (``ray.cluster_resources()`` unless ``resources`` is given) can never hold
    the encoder's actor: a single actor needs all its GPUs/CPUs on one node,
    but the totals catch the common case (GPUs asked, none in the cluster)."""
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    asks = {"GPU": float(encoder_spec.num_gpus or 0), "CPU": float(encoder_spec.num_cpus or 0)}
    short = {r: n for r, n in asks.items() if n > float(resources.get(r, 0.0)) + 1e-9}
    if not short:
        return
    has = ", ".join(f"{float(resources.get(r, 0.0)):g} {r}" for r in asks)
    wants = ", ".join(f"num_{r.lower()}s={n:g}" for r, n in asks.items())
    fixes = []
    if "GPU" in short:
        fixes.append(f"lower encoders.{role}.num_gpus (0 runs it on CPU) or run against a "
                     f"cluster with GPUs (--address <head>:6379 / ray://<head>:10001)")
    if "CPU" in short:
        fixes.append(f"lower encoders.{role}.num_cpus or use a larger cluster")
    raise EncoderResourcesError(
        f"{role} encoder {encoder_spec.name!r} asks for {wants}, but the Ray cluster has only "
        f"{has} in total, so its actor could never start. Fix: {'; '.join(fixes)}.")


def _ray_actor_class():
    """EncoderWorker as a Ray actor class whose ``progress`` answers mid-extraction."""
    import ray

    class EncoderActor(EncoderWorker):
        @ray.method(concurrency_group="monitor")
        def progress(self) -> dict:
            return EncoderWorker.progress(self)

    return ray.remote(concurrency_groups={"monitor": 1})(EncoderActor)
