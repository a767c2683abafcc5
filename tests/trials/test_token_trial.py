"""trials.token_trial: a token trial end to end on a planted token world."""

import numpy as np
import pytest
from token_planted import CLASSES, TEMPLATES, planted_data, pooled

from trials.config import TrialConfig
from trials.token_train import MIN_LR, freeze_align_lr
from trials.token_trial import run_token_trial
from trials.trial import EPOCH_ROWS, RetrievalSet, TrialData, ZeroShotSet, run_trial

TOKEN = dict(head="token_projector", head_options={"schedule": "none"}, out_dim=32, batch_size=100,
             lr=3e-3, temperature=0.07, structure_lambda=0.0, weight_decay=0.02, grad_clip=0.0)


@pytest.fixture(scope="module")
def data():
    return planted_data()


def _no_time(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "train_seconds"}


def test_returns_the_metric_names_of_run_trial(data):
    metrics = run_token_trial(data, TrialConfig(**TOKEN, epochs=2, n_train=150))
    assert metrics["n_train_used"] == 150 and metrics["epochs_run"] == 2
    for key in ("best_val_loss", "best_val_clip_loss", "best_epoch", "lr_used", "stopped", "train_seconds",
                "zs/planted/top1", "zs/planted/top1_macro", "zs/planted/f1_macro"):
        assert key in metrics
    for protocol in ("official", "standard"):
        for direction in ("I2T", "T2I"):
            for k in (1, 5, 10):
                for name in ("R", "P", "MAP"):
                    assert 0 <= metrics[f"ret/planted/{protocol}/{direction}/{name}@{k}"] <= 1
    rows = metrics[EPOCH_ROWS]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert {"val_clip_loss", "nbr_image", "nbr_text", "temperature"} <= set(rows[0])
    assert all(0.001 <= r["temperature"] <= 0.5 for r in rows)


def test_read_ahead_changes_no_number(data):
    """Dropout on, several batches an epoch: the background loads must not change RNG use or order."""
    config = TrialConfig(**dict(TOKEN, head_options={"schedule": "freeze_align"}, structure_lambda=1.0),
                         epochs=3, n_train=250, seed=4, warmup_steps=2)
    streamed = run_token_trial(data, config, depth=2)
    plain = run_token_trial(data, config, depth=0)
    assert _no_time(streamed) == _no_time(plain)


def test_rs_with_positive_lambda_runs_and_changes_the_loss(data):
    base = dict(TOKEN, epochs=2, n_train=200, warmup_steps=0)
    plain = run_token_trial(data, TrialConfig(**base))
    with_rs = run_token_trial(data, TrialConfig(**dict(base, structure_lambda=5.0)))
    assert with_rs[EPOCH_ROWS][0]["structure_lambda"] == 5.0
    assert with_rs[EPOCH_ROWS][0]["train_loss"] > plain[EPOCH_ROWS][0]["train_loss"] + 1e-3
    assert with_rs["best_val_loss"] > with_rs["best_val_clip_loss"]


def test_unsupported_settings_are_refused(data):
    for bad in (dict(lr=None), dict(mixup_alpha=0.5), dict(head="linear", head_options={})):
        with pytest.raises(ValueError):
            run_token_trial(data, TrialConfig(**dict(TOKEN, epochs=1, **bad)))


def _pooled_trial_data(data, use_cls: bool) -> TrialData:
    zs, ret = data.zero_shot["planted"], data.retrieval["planted"]
    prompts = pooled(zs.prompts, False).reshape(CLASSES, TEMPLATES, -1)
    return TrialData(pooled(data.train.image, use_cls)[data.train.text_to_image], pooled(data.train.text, False),
                     pooled(data.val.image, use_cls)[data.val.text_to_image], pooled(data.val.text, False),
                     zero_shot={"planted": ZeroShotSet(pooled(zs.image, use_cls), zs.labels, prompts)},
                     retrieval={"planted": RetrievalSet(pooled(ret.image, use_cls), pooled(ret.text, False),
                                                        ret.text_to_image)})


def test_token_projector_beats_a_pooled_linear_head_where_few_patches_carry_the_signal(data):
    """Only 2 of 16 patches carry the shared latent, among loud noise; the CLS is noise.
    The linear heads get 100 epochs at lr 1e-2 (their validation loss has bottomed out by then)."""
    token = run_token_trial(data, TrialConfig(**TOKEN, epochs=25))
    keys = ("zs/planted/top1", "ret/planted/standard/I2T/R@10", "ret/planted/standard/T2I/R@10")
    for use_cls in (False, True):
        linear = run_trial(_pooled_trial_data(data, use_cls),
                           TrialConfig(head="linear", out_dim=32, epochs=100, batch_size=100, lr=1e-2,
                                       temperature=0.07, structure_lambda=0.0))
        for key in keys:
            assert token[key] > linear[key] + 0.15, (key, use_cls, token[key], linear[key])
    assert token["zs/planted/top1"] > 0.8  # chance: 0.25


def test_freeze_align_schedule_read_literally():
    lr = [freeze_align_lr(1e-3, 15, 0, step) for step in (0, 100, 101, 201, 1001, 5000)]
    assert lr[0] == lr[1] == pytest.approx(1e-5)  # t = 0 until the step after iteration 100
    assert lr[2] == pytest.approx(1e-5 + 0.99e-3 / 10) and lr[3] == pytest.approx(1e-5 + 2 * 0.99e-3 / 10)
    cosine = lambda t: 1e-5 + 0.5 * 0.99e-3 * (1 + np.cos(np.pi * t / 15))
    assert lr[4] == lr[5] == pytest.approx(cosine(10))
    assert freeze_align_lr(1e-3, 15, 1, 0) == pytest.approx(cosine(11))
    assert freeze_align_lr(1e-3, 15, 5, 0) == MIN_LR  # t = 15: past the single cycle


class _Recording:
    """A token source that records the size of every gather (a stand-in for a disk-backed one)."""

    def __init__(self, source, sizes: list):
        self.source, self.sizes = source, sizes
        self.dim, self.num_prefix = source.dim, source.num_prefix

    def __len__(self):
        return len(self.source)

    def lengths(self):
        return self.source.lengths()

    def gather(self, rows):
        self.sizes.append(len(rows))
        return self.source.gather(rows)


def test_every_set_is_read_in_batches(data, monkeypatch):
    import trials.token_trial as token_trial

    monkeypatch.setattr(token_trial, "EVAL_BATCH", 32)
    sizes = []
    wrap = lambda s: _Recording(s, sizes)
    pairs = lambda p: type(p)(wrap(p.image), wrap(p.text), p.text_to_image)
    zs = data.zero_shot["planted"]
    recorded = type(data)(pairs(data.train), pairs(data.val),
                          {"planted": type(zs)(wrap(zs.image), zs.labels, wrap(zs.prompts), zs.templates)},
                          {"planted": pairs(data.retrieval["planted"])})
    config = TrialConfig(**dict(TOKEN, batch_size=50), epochs=1)
    metrics = run_token_trial(recorded, config)
    assert max(sizes) <= 50 and len(sizes) > 20
    monkeypatch.undo()  # evaluation batches of 256: the same numbers up to rounding
    whole = run_token_trial(data, config)
    evaluation = {k: v for k, v in whole.items() if k.startswith(("zs/", "ret/"))}
    assert {k: metrics[k] for k in evaluation} == pytest.approx(evaluation, abs=1e-6)


def test_freeze_align_presets_are_the_official_recipe():
    from trials.presets import get_preset

    preset = get_preset("freeze_align")
    assert preset["head"] == "token_projector" and preset["out_dim"] == 1024 and preset["layer_rule"] == "last"
    assert preset["loss"]["temperature"] == 0.07 and preset["loss"]["structure_lambda"] == 0.0
    assert preset["train"] == {"lr": 1e-3, "weight_decay": 0.02, "epochs": 15, "batch_size": 1800, "grad_clip": 0.0}
    assert preset["head_options"] == {"dropout_p": 0.1, "learn_temperature": True, "mixed_precision": True,
                                      "schedule": "freeze_align"}
    assert get_preset("freeze_align+rs")["loss"]["structure_lambda"] == 10.0
