"""The results schema: one home for what a run directory holds and how it is named.

The orchestrator writes by these names and the dashboards read by them:
run-directory files, results tables and their keys, trial statuses, the
metric-name grammar (builders and a parser) and the headline-metric rule.
Torch- and Ray-free, so every reader can import it.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Optional

# --- run directory ---------------------------------------------------------------
SPEC_FILE = "spec.json"  # the resolved spec, plus the raw one resume reloads
PLAN_FILE = "plan.json"  # planned fingerprints (grid) or counts per grid (optuna)
LOCK_FILE = ".driver.lock"  # held by the one driver of a run directory
RESULTS_DIR = "results"  # the Parquet store: results/<table>/part-*.parquet
REPORT_FILE = "report.html"

# --- tables --------------------------------------------------------------------------
TABLES = ("trials", "layer_similarity", "epochs", "encoder_pairs", "curation")
KEYS = {"trials": "fingerprint", "layer_similarity": "row_key",  # deduplication key per table
        "epochs": "row_key", "encoder_pairs": "row_key", "curation": "row_key"}

# ``epochs``: one row per (trial, recorded epoch), written with the trial's row by the
# results sink (orchestrator.results_sink). Every trained trial records epoch 0 and every
# ``max(1, epochs // 50)``-th epoch after it (trials.neighbourhood.record_stride), so a trial
# holds at most ~50 rows; closed-form heads and ASHA-stopped trials (no final report) hold none.
EPOCH_COLUMNS = {
    "row_key": "fingerprint/epoch (deduplication key)",
    "fingerprint": "the trial's", "epoch": "0-based epoch",
    "train_loss": "mean training loss of the epoch (CLIP + λ·R_S)",
    "val_loss": "validation loss the trainer selects on (CLIP + λ·R_S)",
    "val_clip_loss": "its CLIP part alone: what ASHA ranks on",
    "structure_lambda": "the trial's λ (config/structure_lambda)",
    "lambda_now": "λ in effect that epoch (after the warm-up)",
    "n_train": "config/n_train", "seed": "config/seed",
    "nbr_image": "mutual-kNN agreement (k=10) of the frozen image features and the image "
                 "head's output on the probe set: the first min(500, n_val) validation pairs",
    "nbr_text": "the same for the text encoder and head",
}


def epoch_row_key(fingerprint: str, epoch: int) -> str:
    return f"{fingerprint}/{int(epoch)}"


# --- encoder pairs (orchestrator.pair_rules, orchestrator.encoder_pairs) -----------------
# Columns of ``trials`` (and of a multi-encoder run's ``layer_similarity``) naming the encoder
# pair: each candidate's label (its ``label:``, else its name). Not in the fingerprint: the
# feature keys there already carry each encoder's identity.
ENCODER_COLUMNS = ("image_encoder", "text_encoder")
# Column of ``trials`` (and ``layer_similarity``) naming the training split a trial trained on
# where a grid varies it (``train_data``, orchestrator.train_data): the TrainVariant's label,
# "method=random, per_concept=500"; "" for data.train as written.
TRAIN_DATA = "train_data"
PAIR_PROTOCOLS = ("per_layer", "freeze_align")  # encoder_selection.protocol
# ``encoder_pairs``: the selection stage's table (freeze-align §3.1), one row per scored pair.
ENCODER_PAIRS_COLUMNS = {
    "row_key": "selection_key/pair_key (deduplication key)",
    "selection_key": "content key of the whole selection (every pair's key): rows of one ranking",
    "pair_key": "content key of this pair's score (cache file name)",
    "image_encoder": "image candidate's label", "text_encoder": "text candidate's label",
    "image_name": "image encoder name", "text_name": "text encoder name",
    "protocol": "per_layer | freeze_align", "metric": "encoder_selection.metric",
    "image_layer": "image layer of `score` (per_layer: of the best layer pair; freeze_align: the last)",
    "text_layer": "text layer of `score`",
    "score": "metric at (image_layer, text_layer); cka: linear CKA without eps",
    "last_score": "metric of the last layers (freeze_align: = score)",
    "rank": "1 = the best pair of this selection (by score)",
    "probe": "the probe set: dataset/split (name)", "probe_fingerprint": "the probe split's content key",
    "n_samples": "probe rows scored (images; captions averaged per image)",
    "normalize": "rows L2-normalised first (false: raw features, as freeze-align)",
    "written_at": "unix time the selection was stored",
}

# --- curated data (orchestrator.datasets.curated, orchestrator.curation_stage) -------------
# ``curation``: one row per (curated dataset the sweep reads, concept), written by the driver's
# data stage before any encoder runs: the coverage of the concept-balanced subset against the
# equal-size random control (freeze-align §3.2), whichever of the two the sweep trains on.
CURATION_COLUMNS = {
    "row_key": "selection_key/control_key/concept (deduplication key)",
    "dataset": "the curated set's name in the spec", "role": "where the spec reads it: train, val, "
    "retrieval/<name>, unpaired/<image|text>",
    "method": "what the sweep trains on: concept_balanced | random (the control)",
    "selection_key": "content key of the concept-balanced selection (its cache file)",
    "control_key": "content key of the random control (the curated set's seed)",
    "pool": "the caption pool: dataset/split", "n_pool": "captions in the pool",
    "prototypes": "file | images | prompts (the labelled fallback)",
    "per_concept": "captions a concept may take", "max": "length of each concept's top list",
    "faithful": "the official int8 scores (true) or exact float ones",
    "concept": "concept index (prototype row)", "concept_name": "its name",
    "curated": "captions the concept-balanced subset assigned to this concept (the greedy pick)",
    "curated_nearest": "captions of the concept-balanced subset whose nearest prototype (cosine, "
                       "trials.curation.nearest_counts) is this concept",
    "random_nearest": "the same count for the random control (equal size)",
    "n_selected": "captions in either subset", "written_at": "unix time the rows were stored",
}

# --- layer selection (orchestrator.similarity_stage, orchestrator.planning) -------------
# Columns of a ``trials`` row about how its layer pair was chosen (not in its fingerprint):
LAYER_RULE = "layer_rule"  # the rule that named the pair (the first, when two grids or rules
#   name the same trial: one row per fingerprint), canonical str(LayerRule): "similar",
#   "last", "all", "top3", "last2", "bins", "[3, 4]", ...; absent in rows written before it
SIMILARITY_N = "similarity_n"  # training pairs the matrix behind the choice was scored on:
#   min(similarity.n_samples, N) of the trial's own N pairs (selection per_trial), or of the
#   whole split (oracle); 0 for a rule that needs no similarity (all, last, lastK, [i, j])
SELECTIONS = ("per_trial", "oracle")  # similarity.selection
# ``layer_similarity``: one row per (matrix, image layer, text layer); a per-trial run holds
# one matrix per training subsample (n_train, seed), an oracle run one for the whole split.
LAYER_SIMILARITY_COLUMNS = {
    "row_key": "similarity_key/image_layer/text_layer (deduplication key)",
    "similarity_key": "the matrix's content key (cache file name)",
    "metric": "similarity.metric", "k": "similarity.k as written (rule name or integer)",
    "k_value": "the k used at that sample size (rule applied, clipped to n-1); 0 without k",
    "n_samples": "similarity.n_samples",
    "selection": "per_trial | oracle",
    "n_train": "training pairs the rows were drawn from: the subsample's N (= a trial's "
               "n_train_used); oracle: the whole split",
    "seed": "the subsample's seed = the draw's and the bins rule's (oracle: similarity.seed)",
    "similarity_n": "pairs scored", "image_layer": "i", "text_layer": "j", "score": "metric(i, j)",
}

# --- trial statuses --------------------------------------------------------------
DONE, STOPPED, FAILED = "done", "stopped", "failed"  # stopped: cut short by ASHA
STATUSES = (DONE, STOPPED, FAILED)
STATUS_RANK = {DONE: 0, STOPPED: 1}  # which duplicate row a reader keeps (lowest; failed last)


def finished_statuses(include_stopped: bool = True) -> list[str]:
    """Statuses a re-run skips; "stopped" only counts for ASHA runs."""
    return [DONE, STOPPED] if include_stopped else [DONE]


# --- metric names ------------------------------------------------------------------
# zero-shot (trials.evaluate.zero_shot_metrics): micro/macro top-1 accuracy, macro F1,
# micro/macro top-5 accuracy (top-5 only with >= 5 classes)
ZS_METRICS = ("top1", "top1_macro", "f1_macro", "top5", "top5_macro")
RET_PROTOCOLS = ("official", "standard")
RET_DIRECTIONS = ("I2T", "T2I")
RET_METRICS = tuple(f"{m}@{k}" for m in ("R", "P", "MAP") for k in (1, 5, 10))
VAL_LOSS = "best_val_loss"  # CLIP + λ·R_S at the best epoch: favours λ = 0 by construction
# Fair objectives (no λ·R_S term), so schedulers compare λ settings on equal terms:
VAL_CLIP_LOSS = "best_val_clip_loss"  # the CLIP part of the validation loss, best epoch
ASHA_METRIC = "val_clip_loss"  # per-epoch CLIP part of the validation loss: ASHA's rank


def fair_objective(metric: str) -> str:
    """Optuna's objective for a spec's metric: ``best_val_loss`` (the spec default when
    it has no evaluation set) contains λ·R_S, so it is replaced by ``best_val_clip_loss``."""
    return VAL_CLIP_LOSS if metric == VAL_LOSS else metric


def zs_metric(dataset: str, metric: str) -> str:
    return f"zs/{dataset}/{metric}"


def ret_metric(dataset: str, protocol: str, direction: str, metric: str) -> str:
    return f"ret/{dataset}/{protocol}/{direction}/{metric}"


class MetricName(NamedTuple):
    kind: str  # "zs" | "ret"
    dataset: str
    metric: str  # top1 | R@1 | ...
    protocol: Optional[str] = None  # retrieval only
    direction: Optional[str] = None  # retrieval only


def parse_metric(name: str) -> Optional[MetricName]:
    """The parts of an evaluation metric name, or None for any other column."""
    parts = name.split("/")
    if len(parts) == 3 and parts[0] == "zs":
        return MetricName("zs", parts[1], parts[2])
    if len(parts) == 5 and parts[0] == "ret":
        return MetricName("ret", parts[1], parts[4], parts[2], parts[3])
    return None


def metric_names(zero_shot: Iterable[str], retrieval: Iterable[str]) -> list[str]:
    """Every metric name a trial reports for these evaluation sets."""
    return ([zs_metric(s, m) for s in zero_shot for m in ZS_METRICS]
            + [ret_metric(s, p, d, m) for s in retrieval for p in RET_PROTOCOLS
               for d in RET_DIRECTIONS for m in RET_METRICS]
            + [VAL_LOSS, VAL_CLIP_LOSS])


def default_mode(metric: str) -> str:
    return "min" if "loss" in metric else "max"


def choose_headline(names: Iterable[str]) -> Optional[str]:
    """The one headline-metric rule (report, ``status``, the default Optuna
    objective): among ``names``, the alphabetically first zero-shot top-1,
    else the first retrieval I2T R@1 (official protocol first), else None."""
    parsed = [(n, p) for n in names if (p := parse_metric(n))]
    for wanted in (("zs", "top1", None), ("ret", "R@1", "official"), ("ret", "R@1", None)):
        found = sorted(n for n, p in parsed if (p.kind, p.metric) == wanted[:2]
                       and (p.kind == "zs" or p.direction == "I2T")
                       and wanted[2] in (None, p.protocol))
        if found:
            return found[0]
    return None


def headline_metric(trials) -> Optional[str]:
    """The metric to lead with: :func:`choose_headline` on the columns of a
    trials DataFrame that hold values."""
    return choose_headline(c for c in trials.columns if trials[c].notna().any())


def config_column(field: str) -> str:
    """The results column of a TrialConfig field."""
    return f"config/{field}"
