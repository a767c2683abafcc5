"""The registry of departures: every entry names an option the code declares, and says
rightly when a trial used it (a departing setting, the official one, the defaults)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import typing

import pytest

from orchestrator.departures import DEPARTURES, NOT_DEPARTURES, by_name, trial_departures, trial_view
from trials.config import TrialConfig
from trials.registry import Registry


def resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def declares(owner, option: str) -> bool:
    """Whether ``owner`` (a registry, a dataclass or a function) declares ``option``."""
    if isinstance(owner, Registry):
        return option in owner
    if dataclasses.is_dataclass(owner):
        return option in {f.name for f in dataclasses.fields(owner)}
    return option in inspect.signature(owner).parameters


@pytest.mark.parametrize("departure", DEPARTURES, ids=lambda d: d.name)
def test_every_departure_names_an_option_the_code_declares(departure):
    owner = resolve(departure.owner)
    assert declares(owner, departure.option), f"{departure.owner} has no {departure.option!r}"
    if not dataclasses.is_dataclass(owner):
        return
    hint = typing.get_type_hints(owner)[departure.option]
    if typing.get_origin(hint) is typing.Literal:  # a spec choice: the departing value is allowed
        assert departure.example in typing.get_args(hint)
    if owner.__module__.startswith("trials."):  # the options validate themselves: it must pass
        owner(**{departure.option: departure.example})


@pytest.mark.parametrize("entry", NOT_DEPARTURES, ids=lambda d: d.key)
def test_every_non_departure_names_options_the_code_declares(entry):
    owner = resolve(entry.owner)
    assert entry.options and all(declares(owner, o) for o in entry.options)


def test_names_are_unique_and_found_by_name():
    names = [d.name for d in DEPARTURES]
    assert len(set(names)) == len(names)
    assert by_name(names[3]) is DEPARTURES[3]
    with pytest.raises(KeyError, match="registered"):
        by_name("no such thing")


RS = {"config/structure_lambda": 10.0}


def head(name: str, **options) -> dict:
    return {"config/head": name, "config/head_options": json.dumps(options)}


def curated(**options) -> dict:
    return {"data": {"train": {"dataset": "curated", "split": "train",
                               "options": {"pool": "synthetic", **options}}}}


def text_encoder(**options) -> dict:
    return {"encoders": {"text": {"name": "hf:sentence-transformers/all-MiniLM-L6-v2",
                                  "options": options}}}


CSA = dict(refine=True, lambda_rs=10.0)
PROBE = {"probe": {"dataset": "coco"}}
# name -> (a departing setting, the official setting or None where none exists, the
# defaults), each (row, spec); "defaults" leaves the departure's option unwritten.
CASES = {
    "textbook JS divergence": (({**RS, "config/structure_divergence": "js"}, {}),
                               ({**RS, "config/structure_divergence": "official"}, {}), (RS, {})),
    "R_S terms summed (paper)": (({**RS, "config/paper_sum": True}, {}),
                                 ({**RS, "config/paper_sum": False}, {}), (RS, {})),
    "plain MLP head (ours)": ((head("mlp"), {}), (head("res_low_rank"), {}), ({}, {})),
    "res_low_rank gate open": ((head("res_low_rank", gate_init=0.5), {}),
                               (head("res_low_rank", gate_init=0.0), {}), (head("res_low_rank"), {})),
    "CSA whitened": ((head("csa", whiten=True, **CSA), {}), (head("csa", whiten=False, **CSA), {}),
                     (head("csa", **CSA), {})),
    "un-augmented tokens": ((head("token_projector"), {}), None, ({}, {})),
    "token projector precision": ((head("token_projector", mixed_precision=False), {}), None,
                                  (head("token_projector"), {})),
    "fixed temperature": ((head("token_projector", learn_temperature=False), {}),
                          (head("token_projector", learn_temperature=True), {}),
                          (head("token_projector"), {})),
    "constant LR (ours)": ((head("token_projector", schedule="none"), {}),
                           (head("token_projector", schedule="freeze_align"), {}),
                           (head("token_projector"), {})),
    "oracle layer selection": (({"similarity_n": 100}, {"similarity": {"selection": "oracle"}}),
                               ({"similarity_n": 100}, {"similarity": {"selection": "per_trial"}}),
                               ({"similarity_n": 100}, {})),
    "per-layer encoder-pair ranking": (({}, {"encoder_selection": {**PROBE, "protocol": "per_layer"}}),
                                       ({}, {"encoder_selection": {**PROBE, "protocol": "freeze_align"}}),
                                       ({}, {"encoder_selection": PROBE})),
    "curation on float scores": (({}, curated(faithful=False)), ({}, curated(faithful=True)),
                                 ({}, curated())),
    "prompt prototypes (fallback)": (({}, curated(prototypes={"from": "prompts"})),
                                     ({}, curated(prototypes="/data/prototypes.npz")), ({}, curated())),
    "text positions past pads": (({}, text_encoder(positions="mask")),
                                 ({}, text_encoder(positions="model")), ({}, text_encoder())),
}


def test_every_departure_has_its_cases():
    assert set(CASES) == {d.name for d in DEPARTURES}


@pytest.mark.parametrize("departure", DEPARTURES, ids=lambda d: d.name)
def test_a_departure_is_in_effect_exactly_when_its_setting_departs(departure):
    departing, official, defaults = CASES[departure.name]
    assert departure.in_effect(trial_view(*departing))
    if official is not None:
        assert not departure.in_effect(trial_view(*official))
    assert departure.in_effect(trial_view(*defaults)) == departure.default


def test_a_stored_row_of_defaults_is_faithful():
    """TrialConfig's defaults are the official ones: an all-default row departs nowhere."""
    row = {f"config/{k}": v for k, v in dataclasses.asdict(TrialConfig()).items()}
    assert trial_departures({**row, "config/head_options": "{}"}, {}) == []


def test_r_s_options_are_not_in_effect_without_r_s():
    """λ = 0, or a closed-form head (which ignores the loss fields), never computes R_S."""
    js = {"config/structure_divergence": "js", "config/paper_sum": True}
    assert trial_departures({**js, "config/structure_lambda": 0.0}, {}) == []
    assert trial_departures({**js, **RS, **head("csa")}, {}) == []
    assert trial_departures({**js, **RS}, {}) == ["textbook JS divergence", "R_S terms summed (paper)"]


def test_oracle_counts_only_layers_a_similarity_rule_picked():
    spec = {"similarity": {"selection": "oracle"}}
    assert trial_departures({"similarity_n": 0, "layer_rule": "similar"}, spec) == []
    assert trial_departures({"layer_rule": "last"}, spec) == []
    assert trial_departures({"layer_rule": "top3"}, spec) == ["oracle layer selection"]


def test_the_text_encoder_of_the_trial_decides_among_candidates():
    spec = {"encoders": {"text": [{"name": "hf:a", "label": "fixed", "options": {"positions": "model"}},
                                  {"name": "hf:b", "label": "masked"}, {"name": "synthetic:text"}]}}
    assert trial_departures({"text_encoder": "fixed"}, spec) == []
    assert trial_departures({"text_encoder": "masked"}, spec) == ["text positions past pads"]
    assert trial_departures({"text_encoder": "synthetic:text"}, spec) == []
