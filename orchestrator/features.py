"""The feature stage: every (encoder, split, field) a sweep needs, in the store.

:func:`extract_pairs` runs one EncoderActor per encoder (each candidate of a
multi-encoder sweep once), one encoder after the other (so GPU-hungry encoders
can share one GPU), and returns a :class:`FeatureSet` per encoder pair: the
store keys and the split metadata that trials need (which caption belongs to
which image, class labels). :func:`trial_data`
turns a FeatureSet and one layer pair into the in-memory
:class:`~trials.trial.TrialData` of a trial.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from orchestrator.actors import LOG_EVERY_S
from orchestrator.train_data import DEFAULT
from trials.trial import RetrievalSet, TrialData, ZeroShotSet


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
    # store keys of the unpaired data (``data.unpaired``) that enters R_S only:
    # the image encoder's features of its images, the text encoder's of its captions
    unpaired_image: str | None = None
    unpaired_text: str | None = None
    # (role, layer) -> TokenEntries: filled by the token stage (orchestrator.token_features)
    # for token-head trials; not in keys(), which pooled trials' fingerprints hash
    tokens: dict = field(default_factory=dict)

    def keys(self) -> list[str]:
        """Every store key a trial reads. Unpaired keys only when set: a sweep
        without unpaired data keeps its trial fingerprints (they hash these keys)."""
        splits = [self.train, self.val, *self.zero_shot.values(), *self.retrieval.values()]
        keys = {k for s in splits for k in (s.image, s.text)}
        keys |= {k for k in (self.unpaired_image, self.unpaired_text) if k is not None}
        return sorted(keys)

    def image_keys(self) -> set[str]:
        """The keys of image-encoder features (the rest are the text encoder's)."""
        splits = (self.train, self.val, *self.zero_shot.values(), *self.retrieval.values())
        return {s.image for s in splits} | ({self.unpaired_image} if self.unpaired_image else set())


@dataclass
class PairFeatures:
    """The FeatureSet of each encoder pair, and what the extraction computed vs found."""

    sets: dict  # EncoderPair -> FeatureSet
    computed: int = 0
    cached: int = 0


_TEXT_FIELD = {"train": "texts", "val": "texts", "retrieval": "texts", "zero_shot": "prompts",
               "unpaired": "texts"}


def _jobs(spec, variants: list = ()) -> list[tuple[str, object]]:
    """(group, dataset ref) of every split a trial reads: first the training split of each
    of ``variants`` in order (:mod:`orchestrator.train_data`; none: ``data.train``)."""
    variants = list(dict.fromkeys(variants)) or [DEFAULT]
    return [(group, ref) for group, refs in (("train", [v.apply(spec.data.train) for v in variants]),
                                             ("val", [spec.data.val]),
                                             ("zero_shot", spec.data.zero_shot),
                                             ("retrieval", spec.data.retrieval))
            for ref in refs]


def _unpaired_jobs(spec, role: str) -> list[tuple[str, object]]:
    """The unpaired split of ``role`` (``data.unpaired.<role>``), for that role's encoder only."""
    unpaired = getattr(spec.data, "unpaired", None)
    ref = None if unpaired is None else getattr(unpaired, role)
    return [] if ref is None else [("unpaired", ref)]


def extract_features(spec, cache_root: str, log=print) -> FeatureSet:
    """The features of a single-encoder spec's one pair (see :func:`extract_pairs`)."""
    from orchestrator.pair_rules import all_pairs

    (pair,) = all_pairs(spec.encoders)
    extracted = extract_pairs(spec, [pair], cache_root, log)
    return dataclasses.replace(extracted.sets[pair], computed=extracted.computed,
                               cached=extracted.cached)


def extract_pairs(spec, pairs: list, cache_root: str, log=print) -> PairFeatures:
    """Fill the store for every split of ``spec`` and every encoder of ``pairs``.

    Each encoder runs once, one after the other: its actor is started, runs
    every split and is killed before the next starts, so they never hold
    resources at once (two ``num_gpus: 1`` encoders on a one-GPU box). An
    encoder whose resources the cluster can never provide fails at once with a
    clear error. Image candidates first, then text, in the spec's order.
    """
    jobs, runs, computed, cached = _jobs(spec, [p.train for p in pairs]), {}, 0, 0
    needed = sorted({("image", p.image) for p in pairs} | {("text", p.text) for p in pairs})
    for role, index in needed:
        role_jobs = jobs + _unpaired_jobs(spec, role)  # unpaired data: the encoder of its side only
        tasks = [(asdict(ref), [_field(role, group)]) for group, ref in role_jobs]
        encoder = spec.encoders.candidates(role)[index]
        runs[(role, index)] = run_encoder(spec.encoders.path(role, index), encoder, cache_root, tasks, log)
        fresh = _log_fields("" if spec.encoders.single else encoder.title, role, role_jobs,
                            runs[(role, index)][0], log)
        computed, cached = computed + fresh, cached + len(role_jobs) - fresh
    sets = {pair: _pair_set(jobs, runs[("image", pair.image)], runs[("text", pair.text)],
                            pair.train.apply(spec.data.train)) for pair in pairs}
    return PairFeatures(sets, computed, cached)


def _field(role: str, group: str) -> str:
    return "images" if role == "image" else _TEXT_FIELD[group]


def _log_fields(name: str, role: str, jobs: list, outputs: list, log) -> int:
    """One line per (split, field) of one encoder's run; returns how many were computed."""
    computed = 0
    for (group, ref), out in zip(jobs, outputs):
        fld = _field(role, group)
        fresh = out["computed"][fld]
        computed += fresh
        log(f"  features {group}/{ref.name}/{fld}" + (f" [{name}]" if name else "") + ": "
            + (f"computed in {out['seconds'][fld]:.1f}s" if fresh else "cached"))
    return computed


def _pair_set(jobs: list, image_run: tuple, text_run: tuple, train_ref) -> FeatureSet:
    """One pair's FeatureSet from its image encoder's and its text encoder's outputs
    (each run's outputs: ``jobs`` in order, then its side's unpaired split if any), on
    training split ``train_ref``."""
    splits: dict = {"zero_shot": {}, "retrieval": {}}
    unpaired = {role: run[0][len(jobs)]["keys"][_field(role, "unpaired")] if len(run[0]) > len(jobs) else None
                for role, run in (("image", image_run), ("text", text_run))}
    for (group, ref), image, text in zip(jobs, image_run[0], text_run[0]):
        if group == "train" and ref != train_ref:
            continue  # another pair's training split
        item = SplitFeatures(image=image["keys"]["images"], text=text["keys"][_TEXT_FIELD[group]],
                             text_to_image=text["text_to_image"], labels=image["labels"],
                             n_prompts=text["n_prompts"])
        if group in ("train", "val"):
            splits[group] = item
        else:
            splits[group][ref.name] = item
    return FeatureSet(train=splits["train"], val=splits["val"], zero_shot=splits["zero_shot"],
                      retrieval=splits["retrieval"], num_layers=(image_run[1], text_run[1]),
                      unpaired_image=unpaired["image"], unpaired_text=unpaired["text"])


def run_encoder(role: str, encoder_spec, cache_root: str, tasks: list, log) -> tuple[list, int]:
    """Start ``role``'s actor, ``ensure`` every (dataset ref, fields) of ``tasks``
    on it, kill it; returns the outputs (in order) and its number of layers."""
    import ray

    from orchestrator.actors import encoder_actor

    actor = encoder_actor(encoder_spec, cache_root, role=role)
    futures = []
    try:
        futures = [actor.ensure.remote(ref, fields) for ref, fields in tasks]
        outputs = _get_reporting(futures, {role: actor}, log)
        return outputs, ray.get(actor.num_layers.remote())
    except ray.exceptions.RayActorError as err:  # its process died more often than it restarts
        raise _actor_died(role, encoder_spec, tasks, futures) from err
    finally:
        ray.kill(actor)  # free its CPUs/GPUs for the next encoder and the trials


def _actor_died(role: str, encoder_spec, tasks: list, futures: list):
    """The error of an encoder actor that died for good: which encoder, which
    splits it did not finish, and what to do."""
    from orchestrator.actors import RESTARTS, EncoderActorDied, _task_name

    finished = _finished(futures)
    left = [_task_name(ref, fields[0]) for (ref, fields), future in zip(tasks, futures)
            if future not in finished]
    return EncoderActorDied(
        f"{role} encoder {encoder_spec.name!r} died while extracting features "
        f"({len(tasks) - len(left)} of {len(tasks)} splits done; not done: {', '.join(left)}): "
        f"its actor process ended {RESTARTS + 1} times (killed, out of memory, or its node was "
        "lost). Nothing partial is used: finished splits stay cached and an interrupted one "
        "is extracted again from the start. Fix: run the same command again (or "
        "`structure-sweep resume RUN_DIR`); if it dies again, look for the reason in the "
        f"worker's log (/tmp/ray/session_latest/logs, `dmesg` for the OOM killer) and give it "
        f"more memory or lower encoders.{role}.batch_size")


def _finished(futures: list) -> set:
    """The futures that completed without an error (none block)."""
    import ray

    ready, _ = ray.wait(futures, num_returns=len(futures), timeout=0)
    ok = set()
    for future in ready:
        try:
            ray.get(future, timeout=0)
            ok.add(future)
        except Exception:  # noqa: BLE001 -- failed: not finished
            pass
    return ok


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
    extra_image = None if features.unpaired_image is None else fetch(features.unpaired_image, image_layer)
    extra_text = None if features.unpaired_text is None else fetch(features.unpaired_text, text_layer)
    return TrialData(train_image, train_text, val_image, val_text, zero_shot, retrieval,
                     extra_image=extra_image, extra_text=extra_text)


def _prompt_grid(flat: np.ndarray, n_prompts: list[int]) -> np.ndarray:
    """[C*T, D] class-major prompt features -> [C, T, D] (T equal per class)."""
    if len(set(n_prompts)) != 1:
        raise ValueError("every class needs the same number of prompt templates")
    return np.asarray(flat).reshape(len(n_prompts), n_prompts[0], -1)
