"""The token stage: token features of the layers that token-head trials train on.

The second phase of the feature stage. Pooled features of every layer come
first (layer selection scores them); once the trials are planned, the layer
pair of each pending token-head trial (``trials.head_options.needs_tokens``)
is known, and only those layers' tokens are extracted: each encoder once, one
after the other, every split in one actor call, cached under content keys
like pooled features (a second run computes nothing).

Trials read token entries from the cache directory itself, not through Ray's
object store (a token cache can outgrow memory): memory-mapped while a
trial's token sets fit ``tokens.memory_budget_gb``, streamed with plain reads
beyond it (:mod:`orchestrator.token_store`). A multi-node cluster therefore
needs the cache directory on a filesystem every node mounts.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from orchestrator.features import FeatureSet, _field, _jobs, run_encoder
from orchestrator.token_store import MappedTokens, StreamedTokens, token_field
from trials.head_options import needs_tokens
from trials.token_trial import TokenTrialData, TokenZeroShotSet
from trials.tokens import TokenPairs

GIB = 1 << 30


@dataclass(frozen=True)
class TokenEntries:
    """Paths of one encoder's token entries at one layer, one per split (as in FeatureSet)."""

    train: str
    val: str
    zero_shot: dict
    retrieval: dict

    def paths(self) -> list[str]:
        return [self.train, self.val, *self.zero_shot.values(), *self.retrieval.values()]


def token_layers(planned: list) -> dict[tuple, set[tuple[str, int]]]:
    """Encoder pair -> the (role, layer) tokens its pending token-head trials read."""
    needed: dict[tuple, set] = defaultdict(set)
    for trial in planned:
        if needs_tokens(trial.config.head):
            needed[trial.features_key] |= {("image", trial.config.image_layer),
                                           ("text", trial.config.text_layer)}
    return dict(needed)


def extract_tokens(spec, pairs: list, sets: dict, planned: list, cache_root: str, log=print) -> tuple[int, int]:
    """Store the tokens ``planned`` token-head trials need and record their entries in
    each pair's FeatureSet (``FeatureSet.tokens[(role, layer)]``); (computed, cached)."""
    needed = token_layers(planned)
    # (role, candidate index) -> training split -> layers: a training split gets the layers of
    # its own pairs' trials, the evaluation splits those of every pair of the encoder
    wanted: dict[tuple[str, int], dict] = defaultdict(lambda: defaultdict(set))
    for pair in pairs:
        for role, layer in needed.get(pair.key, ()):
            wanted[(role, pair.image if role == "image" else pair.text)][pair.train].add(layer)
    if not wanted:
        return 0, 0
    log("  token features of the layers token-head trials train on")
    computed, cached, entries = 0, 0, {}
    for (role, index), by_split in sorted(wanted.items()):
        variants, every = list(by_split), sorted(set().union(*by_split.values()))
        jobs = _jobs(spec, variants)
        layers = [sorted(by_split[variants[i]]) if group == "train" else every
                  for i, (group, _) in enumerate(jobs)]  # the training splits come first
        tasks = [(asdict(ref), [token_field(_field(role, group), layer) for layer in job_layers])
                 for (group, ref), job_layers in zip(jobs, layers)]
        encoder = spec.encoders.candidates(role)[index]
        outputs, _ = run_encoder(spec.encoders.path(role, index), encoder, cache_root, tasks, log)
        for (group, ref), job_layers, out in zip(jobs, layers, outputs):
            for layer in job_layers:
                name = token_field(_field(role, group), layer)
                fresh = out["computed"][name]
                computed, cached = computed + fresh, cached + (not fresh)
                log(f"  tokens {group}/{ref.name}/{name} [{encoder.title}]: "
                    + (f"computed in {out['seconds'][name]:.1f}s" if fresh else "cached"))
                entries.setdefault((role, index, layer), []).append((group, ref.name, out["keys"][name]))
    for pair in pairs:
        train = pair.train.apply(spec.data.train).name
        for (role, index, layer), rows in entries.items():
            if index == (pair.image if role == "image" else pair.text):
                own = [r for r in rows if r[0] != "train" or r[1] == train]
                if any(r[0] == "train" for r in own):  # this pair's trials read that layer
                    sets[pair].tokens[(role, layer)] = _entries(own, cache_root)
    return computed, cached


def _entries(rows: list[tuple[str, str, str]], cache_root: str) -> TokenEntries:
    """(group, dataset name, store key) rows of one training split -> the split-by-split entry paths."""
    path = {(group, name): str(Path(cache_root) / key) for group, name, key in rows}
    one = {group: p for (group, _), p in path.items() if group in ("train", "val")}
    named = lambda wanted: {name: p for (group, name), p in path.items() if group == wanted}  # noqa: E731
    return TokenEntries(one["train"], one["val"], named("zero_shot"), named("retrieval"))


def token_trial_data(features: FeatureSet, image_layer: int, text_layer: int,
                     memory_budget_gb: float) -> TokenTrialData:
    """The token sets of a trial on layer pair (image_layer, text_layer): memory-mapped
    when they fit the budget, streamed (bounded resident memory) when they do not."""
    image, text = features.tokens[("image", image_layer)], features.tokens[("text", text_layer)]
    reader = MappedTokens if _bytes(image, text) <= memory_budget_gb * GIB else StreamedTokens

    def pairs(image_path: str, text_path: str, text_to_image: np.ndarray) -> TokenPairs:
        return TokenPairs(reader(image_path), reader(text_path), text_to_image)

    return TokenTrialData(
        train=pairs(image.train, text.train, features.train.text_to_image),
        val=pairs(image.val, text.val, features.val.text_to_image),
        zero_shot={name: TokenZeroShotSet(reader(image.zero_shot[name]), split.labels,
                                          reader(text.zero_shot[name]), _templates(split.n_prompts))
                   for name, split in features.zero_shot.items()},
        retrieval={name: pairs(image.retrieval[name], text.retrieval[name], split.text_to_image)
                   for name, split in features.retrieval.items()})


def _templates(n_prompts: list[int]) -> int:
    if len(set(n_prompts)) != 1:
        raise ValueError("every class needs the same number of prompt templates")
    return n_prompts[0]


def _bytes(*entries: TokenEntries) -> int:
    """Bytes of the entries' files on disk (what a memory-mapped trial may touch)."""
    return sum(f.stat().st_size for e in entries for p in e.paths() for f in Path(p).glob("*.npy"))
