"""trials.trial: one trial end to end on separable paired features."""

import numpy as np
import pytest
import torch

from trials.config import TrialConfig
from trials.evaluate import zero_shot_weights
from trials.csa import fit_csa
from trials.trial import RetrievalSet, TrialData, ZeroShotSet, run_trial, subsample


def make_data(n_classes=4, dim_img=12, dim_txt=10, seed=0) -> TrialData:
    """Class-clustered paired features through random linear maps (alignable)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, 6)) * 3
    to_img, to_txt = rng.standard_normal((6, dim_img)), rng.standard_normal((6, dim_txt))

    def sample(n):
        labels = rng.integers(n_classes, size=n)
        z = centres[labels] + 0.3 * rng.standard_normal((n, 6))
        return (z @ to_img).astype(np.float32), (z @ to_txt).astype(np.float32), labels

    train_i, train_t, _ = sample(300)
    val_i, val_t, _ = sample(100)
    test_i, test_t, test_y = sample(80)
    prompts = (centres[:, None] + 0.1 * rng.standard_normal((n_classes, 3, 6))) @ to_txt
    return TrialData(train_i, train_t, val_i, val_t,
                     zero_shot={"toy": ZeroShotSet(test_i, test_y, prompts.astype(np.float32))},
                     retrieval={"toy": RetrievalSet(test_i, test_t, np.arange(80))})


CONFIG = dict(out_dim=8, epochs=15, batch_size=64, lr=3e-3, patience=5, warmup_steps=10,
              structure_lambda=1.0)


def test_linear_trial_learns_and_reports_every_metric():
    metrics = run_trial(make_data(), TrialConfig(**CONFIG, n_train=200))
    assert metrics["n_train_used"] == 200 and metrics["epochs_run"] >= 1
    assert metrics["zs/toy/top1"] > 0.5  # chance is 0.25
    for protocol in ("official", "standard"):
        for direction in ("I2T", "T2I"):
            for k in (1, 5, 10):
                assert 0 <= metrics[f"ret/toy/{protocol}/{direction}/R@{k}"] <= 1
    assert metrics["ret/toy/standard/I2T/R@10"] > 10 / 80  # better than chance


def test_same_seed_same_numbers_other_seed_other_subset():
    data = make_data()
    a = run_trial(data, TrialConfig(**CONFIG, n_train=100, seed=3))
    b = run_trial(data, TrialConfig(**CONFIG, n_train=100, seed=3))
    assert a["zs/toy/top1"] == b["zs/toy/top1"] and a["best_val_loss"] == b["best_val_loss"]
    assert not torch.equal(subsample(300, 100, 3), subsample(300, 100, 4))


def test_subsample_is_the_head_of_a_seeded_permutation():
    order = torch.randperm(50, generator=torch.Generator().manual_seed(7))
    assert torch.equal(subsample(50, 20, 7), order[:20])
    assert len(subsample(50, None, 7)) == 50 and len(subsample(50, 80, 7)) == 50


def test_csa_trial_uses_raw_template_average_then_cca():
    data = make_data()
    metrics = run_trial(data, TrialConfig(head="csa", out_dim=4, n_train=None))
    assert metrics["stopped"] == "closed_form" and metrics["zs/toy/top1"] > 0.5
    # Independent recomputation of the zero-shot accuracy, §4.4 composition.
    fit = fit_csa(torch.tensor(data.train_image)[subsample(300, None, 0)],
                  torch.tensor(data.train_text)[subsample(300, None, 0)], 4)
    zs = data.zero_shot["toy"]
    image = torch.nn.functional.normalize(fit.transform_x(torch.tensor(zs.image)), dim=1)
    classes = fit.transform_y(zero_shot_weights(torch.tensor(zs.prompts)))
    accuracy = (torch.argmax(image @ classes.T, 1).numpy() == zs.labels).mean()
    assert metrics["zs/toy/top1"] == pytest.approx(accuracy, abs=1e-9)


def test_on_epoch_can_stop_the_trial():
    seen = []
    metrics = run_trial(make_data(), TrialConfig(**CONFIG),
                        on_epoch=lambda epoch, m: seen.append(epoch) or len(seen) == 2)
    assert metrics["stopped"] == "callback" and metrics["epochs_run"] == 2


def test_a_diverged_trial_fails_with_a_message_that_names_the_fix():
    with pytest.raises(FloatingPointError, match="lower `lr`"):
        run_trial(make_data(), TrialConfig(**{**CONFIG, "lr": 1e30, "epochs": 2}))


def test_a_diverged_trial_stops_at_the_first_non_finite_train_loss():
    epochs = []
    config = TrialConfig(**{**CONFIG, "lr": 1e30, "epochs": 100, "patience": 50})
    with pytest.raises(FloatingPointError, match="in 1 epochs"):
        run_trial(make_data(), config, on_epoch=lambda epoch, row: epochs.append(epoch))
    assert epochs == [0]


def test_csa_trial_passes_its_seed_to_the_refinement():
    data = make_data()
    config = dict(head="csa", out_dim=4, head_options=dict(refine=True, refine_epochs=1, batch_size=32))
    a, b = (run_trial(data, TrialConfig(**config, seed=s)) for s in (0, 1))
    assert a["zs/toy/top1"] == run_trial(data, TrialConfig(**config, seed=0))["zs/toy/top1"]
    assert any(a[k] != b[k] for k in a if k.startswith("ret/") and k.endswith("MAP@10"))


def test_read_only_inputs_as_from_rays_object_store(recwarn):
    data = make_data()
    arrays = [data.train_image, data.train_text, data.val_image, data.val_text,
              *(a for z in data.zero_shot.values() for a in (z.image, z.labels, z.prompts)),
              *(a for r in data.retrieval.values() for a in (r.image, r.text, r.text_to_image))]
    for array in arrays:
        array.setflags(write=False)
    run_trial(data, TrialConfig(**{**CONFIG, "epochs": 2}))
    assert not [w for w in recwarn if "not writable" in str(w.message)]


def _with_extras(data: TrialData, seed=5) -> TrialData:
    """Unpaired rows of each side (other draws than the pairs): R_S data only."""
    other = make_data(seed=seed)
    data.extra_image, data.extra_text = other.train_image[:150], other.train_text[150:]
    return data


def test_unpaired_extras_enter_training_as_train_alignment_gets_them():
    from trials.heads import build_head
    from trials.losses import AlignmentLoss
    from trials.train import train_alignment

    config = TrialConfig(**CONFIG, n_train=200, seed=1)
    without = run_trial(make_data(), config)
    data = _with_extras(make_data())
    with_extras = run_trial(data, config)
    assert with_extras["best_val_loss"] != without["best_val_loss"]  # λ = 1: R_S sees the extras

    # the same as train_alignment called directly with the trial's rows, heads and extras
    to = lambda a: torch.tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
    rows = subsample(len(data.train_image), config.n_train, config.seed).numpy()
    torch.manual_seed(config.seed)
    heads = [build_head(config.head, x.shape[1], config.out_dim, **config.head_options)
             for x in (data.train_image, data.train_text)]
    result = train_alignment(*heads, AlignmentLoss(config.loss_options()), to(data.train_image[rows]),
                             to(data.train_text[rows]), to(data.val_image), to(data.val_text),
                             config.train_config("cpu"), extra_image=to(data.extra_image),
                             extra_text=to(data.extra_text))
    assert result.best_val_loss == with_extras["best_val_loss"]
    assert len(result.history) == with_extras["epochs_run"]


def test_unpaired_images_alone_enter_training():
    config = TrialConfig(**CONFIG, n_train=200)
    data = _with_extras(make_data())
    data.extra_text = None  # only unpaired images
    assert run_trial(data, config)["best_val_loss"] != run_trial(make_data(), config)["best_val_loss"]
