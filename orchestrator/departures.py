"""Every departure from the official code a run can make, named in one registry.

House rule: the official behaviour is the default, and every departure (a
fix, a faster variant, a different protocol) is an explicit, named option.
:data:`DEPARTURES` lists them: for each, where a spec sets it, the value(s)
that depart, what it does, and the official behaviour it replaces
(``shared/reference/METHOD.md``). A few depart by default (``default=True``:
the official behaviour is a quirk or a recipe the code cannot follow, and
a spec asks for it by name); they are listed all the same.
:data:`NOT_DEPARTURES` names the options that look like departures and are
not (fast paths with the same numbers, official ablation switches, a second
evaluation protocol reported beside the official one), so the line between
the two is written down once.

:func:`trial_departures` says which departures one stored trial used, from
its ``config/*`` columns and the run's resolved spec; the report's summary
counts them (``dashboards.departures``).

Home: here, torch- and Ray-free, because a departure is set in either of two
vocabularies, a trial's config (:class:`trials.config.TrialConfig`, its head
options) or the spec (``similarity``, ``encoder_selection``, dataset and
encoder options), and only the orchestrator knows both; ``trials/`` may not
know spec keys, and ``dashboards/`` only reads. Each entry names the
dataclass or function that declares its option (``owner``, ``option``), and a
test checks every one of them, so the registry cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from trials.config import TrialConfig
from trials.head_options import is_closed_form, parse_head_options

# The layer rules that read a similarity matrix (orchestrator.pair_rules); rows written
# before the ``similarity_n`` column carry only ``layer_rule``.
SIMILARITY_RULES = ("similar", "top", "bins")


@dataclass(frozen=True)
class Trial:
    """What one stored trial ran with: its config (defaults filled in), its head's
    options (defaults filled in), the row's other columns, and the run's resolved spec."""

    config: dict
    head_options: dict
    row: Mapping
    spec: Mapping

    @property
    def head(self) -> str:
        return str(self.config["head"])

    @property
    def rs_on(self) -> bool:
        """R_S enters the loss: λ > 0, on a trained (not closed-form) head."""
        return float(self.config["structure_lambda"]) > 0 and not is_closed_form(self.head)


@dataclass(frozen=True)
class Departure:
    """One named departure from the official code.

    ``key``: where a spec sets it, as a user writes it; ``value``: the value(s)
    that depart; ``owner``/``option``: the dataclass, registry or function
    (dotted path) and the field, name or parameter that declares it;
    ``example``: a value of that option that departs; ``in_effect``: whether
    a trial used it (not merely set it: an R_S option with λ = 0 is not in effect).
    """

    name: str
    key: str
    value: str
    meaning: str
    official: str
    owner: str
    option: str
    example: Any
    in_effect: Callable[[Trial], bool]
    default: bool = False  # the default value departs


@dataclass(frozen=True)
class NotADeparture:
    """An option that looks like a departure and is not, and why."""

    key: str
    why: str
    owner: str
    options: tuple[str, ...]  # the fields / parameters of ``owner`` that ``key`` names


# --- reading a trial's settings ------------------------------------------------------

def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _config_defaults() -> dict:
    return {f.name: (f.default_factory() if f.default is dataclasses.MISSING else f.default)
            for f in dataclasses.fields(TrialConfig)}


def _head_options(head: str, stored) -> dict:
    """The head's options with defaults filled in; as stored where the head or an option
    is unknown to this code (a store written by another version)."""
    options = json.loads(stored) if isinstance(stored, str) else dict(stored or {})
    try:
        return dataclasses.asdict(parse_head_options(head, options))
    except ValueError:
        return options


def trial_view(row: Mapping, spec: Mapping) -> Trial:
    """A stored trial row (``config/<field>`` columns; absent or NaN: the field's default)."""
    config = _config_defaults()
    for name in config:
        value = row.get(f"config/{name}")
        if not _missing(value):
            config[name] = value
    return Trial(config, _head_options(str(config["head"]), config["head_options"]), row, spec)


def trial_departures(row: Mapping, spec: Mapping) -> list[str]:
    """Names of the departures a stored trial used, in registry order."""
    trial = trial_view(row, spec)
    return [d.name for d in DEPARTURES if d.in_effect(trial)]


# --- reading the spec ------------------------------------------------------------------

def _section(spec: Mapping, key: str) -> Mapping:
    return spec.get(key) or {}


def _data_refs(spec: Mapping) -> list[Mapping]:
    """Every dataset reference of the spec's ``data:`` block (train, val, evaluation, unpaired)."""
    data = _section(spec, "data")
    refs = [data.get("train"), data.get("val"), *(data.get("zero_shot") or []),
            *(data.get("retrieval") or []), *(_section(data, "unpaired").values())]
    return [r for r in refs if isinstance(r, Mapping)]


def _curated_option(spec: Mapping, option: str, departs: Callable[[Any], bool]) -> bool:
    """Whether a ``curated`` dataset of the spec sets ``option`` (absent: None) to a departing value."""
    return any(departs((ref.get("options") or {}).get(option))
               for ref in _data_refs(spec) if ref.get("dataset") == "curated")


def _text_encoder(trial: Trial) -> Optional[Mapping]:
    """The trial's text encoder in the spec: the candidate its row names, else the only one."""
    value = _section(trial.spec, "encoders").get("text")
    candidates = [c for c in (value if isinstance(value, list) else [value]) if isinstance(c, Mapping)]
    named = trial.row.get("text_encoder")
    for candidate in candidates:
        if named is not None and named in (candidate.get("label"), candidate.get("name")):
            return candidate
    return candidates[0] if len(candidates) == 1 else None


def _used_similarity(trial: Trial) -> bool:
    """Whether the trial's layer pair came from a similarity matrix (unknown: assume so)."""
    n = trial.row.get("similarity_n")
    if not _missing(n):
        return float(n) > 0
    rule = trial.row.get("layer_rule")
    return _missing(rule) or str(rule).startswith(SIMILARITY_RULES)


# --- the predicates ------------------------------------------------------------------

def _option(head: str, option: str, departs: Callable[[Any], bool]) -> Callable[[Trial], bool]:
    return lambda t: t.head == head and departs(t.head_options.get(option))


def _csa_whitens(t: Trial) -> bool:
    o = t.head_options  # the whitening step ends the refinement (trials.csa._refine)
    return (t.head == "csa" and bool(o.get("whiten")) and bool(o.get("refine"))
            and o.get("lambda_rs", 0) > 0 and o.get("refine_epochs", 0) > 0)


def _oracle(t: Trial) -> bool:
    return _section(t.spec, "similarity").get("selection") == "oracle" and _used_similarity(t)


def _per_layer_pairs(t: Trial) -> bool:
    selection = t.spec.get("encoder_selection")
    return isinstance(selection, Mapping) and selection.get("protocol", "per_layer") == "per_layer"


def _mask_positions(t: Trial) -> bool:
    encoder = _text_encoder(t)
    return (encoder is not None and str(encoder.get("name", "")).startswith("hf:")
            and (encoder.get("options") or {}).get("positions", "mask") == "mask")


# --- the registry ------------------------------------------------------------------

_CONFIG, _HEADS = "trials.config.TrialConfig", "trials.head_options.HEAD_OPTIONS"
_TOKEN, _CURATED = "trials.head_options.TokenProjectorOptions", "orchestrator.datasets.curated.curated"

DEPARTURES: tuple[Departure, ...] = (
    Departure(
        "textbook JS divergence", "structure_divergence", '"js"',
        "R_S compares the hop distributions with the textbook Jensen–Shannon divergence "
        "½[KL(P‖M) + KL(Q‖M)]",
        "½[KL(M‖Q) + KL(M‖P)] with ε = 1e-12 inside the logs, unbounded (METHOD.md §3 step 5, §13.1)",
        _CONFIG, "structure_divergence", "js",
        lambda t: t.rs_on and t.config["structure_divergence"] == "js"),
    Departure(
        "R_S terms summed (paper)", "paper_sum", "true",
        "the image and text R_S terms are summed, as the paper writes the objective",
        "the two terms are averaged: the code's λ = 10 is the paper's λ = 5 (§3, §13.2)",
        _CONFIG, "paper_sum", True,
        lambda t: t.rs_on and bool(t.config["paper_sum"])),
    Departure(
        "plain MLP head (ours)", "head", '"mlp"',
        "a plain MLP shaped like the official MLPAlignmentLayer, which no official config uses",
        'the "MLP" configs train res_low_rank, whose residual gate is stuck shut (§4.2, §4.3)',
        _HEADS, "mlp", "mlp", lambda t: t.head == "mlp"),
    Departure(
        "res_low_rank gate open", "head_options.gate_init (head res_low_rank)", "> 0",
        "the residual branch's gate starts at g and trains: a real low-rank residual MLP",
        "gate_init 0 in every config: α = sigmoid(−∞) = 0 for ever, so the head is a "
        "bias-free linear map (§4.3, §13.4)",
        "trials.head_options.ResLowRankOptions", "gate_init", 0.5,
        _option("res_low_rank", "gate_init", lambda g: g is not None and g > 0)),
    Departure(
        "CSA whitened", "head_options.whiten (head csa)", "true",
        "CSA's R_S refinement ends with the whitening step the official code meant to apply",
        "the whitening step is a silent no-op (W @= M rebinds a loop variable): the refined "
        "weights stay unwhitened (§4.4 step 3)",
        "trials.head_options.CSAOptions", "whiten", True, _csa_whitens),
    Departure(
        "un-augmented tokens", "head", '"token_projector" (inherent)',
        "the token projector trains on token features cached once, without image augmentation",
        "freeze-align augments the images every epoch, a new encoder pass each time (§4.5)",
        _HEADS, "token_projector", "token_projector", lambda t: t.head == "token_projector"),
    Departure(
        "token projector precision", "head_options.mixed_precision (head token_projector)",
        "any (true: bf16 autocast on CUDA, fp32 on CPU; false: fp32)",
        "the projector's forward runs in bf16 without a loss scaler on CUDA, else in fp32",
        "fp16 autocast with a GradScaler (§4.5)",
        _TOKEN, "mixed_precision", True, lambda t: t.head == "token_projector", default=True),
    Departure(
        "fixed temperature", "head_options.learn_temperature (head token_projector)", "false",
        "the CLIP temperature stays at `temperature` instead of being trained",
        "a learnable temperature, initial 0.07, clamped to [0.001, 0.5] (§4.5)",
        _TOKEN, "learn_temperature", False,
        _option("token_projector", "learn_temperature", lambda v: v is False)),
    Departure(
        "constant LR (ours)", "head_options.schedule (head token_projector)", '"none"',
        "the token projector trains at a constant LR",
        "ALBEF-style warm-up over epoch 0's first 1000 steps, then the cosine read literally (§4.5)",
        _TOKEN, "schedule", "none", _option("token_projector", "schedule", lambda v: v == "none")),
    Departure(
        "oracle layer selection", "similarity.selection", '"oracle"',
        "a similarity rule (similar, topK, bins) picks layers on one matrix of the FULL training "
        "split: data a low-data trial was not given (a labelled comparison)",
        "per_trial: each training subsample scores its own pairs (§5.1, §6.1)",
        "orchestrator.spec.SimilaritySpec", "selection", "oracle", _oracle),
    Departure(
        "per-layer encoder-pair ranking", "encoder_selection.protocol", '"per_layer"',
        "candidate encoder pairs are ranked by their best layer pair on the pooled layer "
        "features (ours)",
        "freeze_align: one CKA per pair on the last-layer embeddings (all-token mean; "
        "sentence-transformers text) (§10.1)",
        "orchestrator.spec.EncoderSelectionSpec", "protocol", "per_layer", _per_layer_pairs,
        default=True),
    Departure(
        "curation on float scores", "data.<role>.options.faithful (dataset curated)", "false",
        "concept-balanced curation ranks captions by exact float32 cosines (ties by sample id) "
        "and keeps max candidates per concept",
        "faithful: true, the official int8 scores (clipped to [−0.3, 0.4] with the batch-wide "
        "quirk) and candidate lists of max − 1 (§10.2)",
        _CURATED, "faithful", False,
        lambda t: _curated_option(t.spec, "faithful", lambda v: not v), default=True),
    Departure(
        "prompt prototypes (fallback)", "data.<role>.options.prototypes (dataset curated)",
        "{from: prompts}",
        "each concept's prototype is the mean of its class prompts embedded in the caption "
        "space: a labelled fallback",
        "prototypes from images: the mean of CLIP image embeddings per concept (a file, or "
        "{from: images}) (§10.2 step 1)",
        _CURATED, "prototypes", {"from": "prompts"},
        lambda t: _curated_option(t.spec, "prototypes", lambda v: v in (None, {"from": "prompts"})),
        default=True),
    Departure(
        "text positions past pads", "encoders.text.options.positions (hf encoders)", '"mask"',
        "position ids count from each text's first real token, so a text's features do not "
        "depend on its batch's padding (no effect on RoBERTa, XLM-R, MPNet: they do so themselves)",
        '"model": no position ids, so with left padding BERT-like models see positions '
        "shifted by the pads (§7)",
        "orchestrator.encoders.hf_encoder.build_hf_encoder", "positions", "mask", _mask_positions,
        default=True),
)

NOT_DEPARTURES: tuple[NotADeparture, ...] = (
    NotADeparture("tune.pack", "auto trains trials of equal shapes as one batched computation: "
                  "the same numbers within 1e-5", "orchestrator.tune_settings.RunConfig", ("pack",)),
    NotADeparture("impl (trials.train.train_heads)", "the fused loss computes the same loss with "
                  "analytic gradients, equal up to float rounding; not a spec key",
                  "trials.trial.run_trial", ("impl",)),
    NotADeparture("ret/<set>/standard/...", "every trial reports both retrieval protocols; "
                  "the unique-image one is labelled by its column name, and tables lead with "
                  "the official one (§8.2)", "trials.evaluate.retrieval_metrics", ("protocol",)),
    NotADeparture("mixup_alpha, fixed_structure", "ablation switches of the official loop "
                  "(FuseMix, the reviewer ablation; §5.3)", _CONFIG,
                  ("mixup_alpha", "fixed_structure")),
    NotADeparture("structure_centering, structure_distance, structure_center_first",
                  "the official ablation configs (configs/ablations/*; §3)", _CONFIG,
                  ("structure_centering", "structure_distance", "structure_center_first")),
)


def by_name(name: str) -> Departure:
    """The registry entry called ``name``; KeyError naming the entries if there is none."""
    for departure in DEPARTURES:
        if departure.name == name:
            return departure
    raise KeyError(f"no departure {name!r}; registered: {', '.join(d.name for d in DEPARTURES)}")
