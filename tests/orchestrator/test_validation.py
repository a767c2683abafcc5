"""A corpus of broken specs: each a small mutation of the tiny offline spec
(tests/conftest.py), each rejected by ``validate`` with ONE line naming the
file and the key path (exit 2), and by ``run`` before any Ray work."""

from __future__ import annotations

import math

import pytest
import yaml
from test_registry_conformance import DATASET_CASES  # a tiny on-disk instance of every dataset
from tiny_models import TINY_VIT, offline_hub, save_tiny_text_model, save_tiny_vit

from orchestrator import cli


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 3-block timm ViT and a 2-layer BERT (3 hidden states), saved locally."""
    root = tmp_path_factory.mktemp("models")
    return {"vit": str(save_tiny_vit(root / "vit")), "bert": str(save_tiny_text_model(root / "bert", "bert"))}


class Ctx:
    """What a mutation may need: a scratch folder and (lazily) the tiny models."""

    def __init__(self, tmp_path, request):
        self.tmp, self._request = tmp_path, request

    @property
    def models(self) -> dict:
        return self._request.getfixturevalue("models")


def grid(d, i, **values):
    d["search"][i].update(values)


def vit(d, ctx, **options):
    d["encoders"]["image"] = {"name": f"timm:{ctx.models['vit']}", "options": {**TINY_VIT, **options}}


def bert(d, ctx):
    d["encoders"]["text"] = {"name": f"hf:{ctx.models['bert']}"}


def pairs_table(d, ctx):
    (ctx.tmp / "pairs.csv").write_text("image,caption\na.png,an a\nb.png,a b\n")  # images never opened
    d["data"]["train"] = {"dataset": "pairs", "split": "train", "options": {"path": str(ctx.tmp / "pairs.csv")}}


def csa_lr_sampled(d, ctx):
    d["search"][0] = {"name": "grid", "head": "csa", "layers": "last", "lr": {"loguniform": [1e-4, 1e-2]},
                      "num_samples": 2}


def zero_shot(**ref):
    return lambda d, ctx: d["data"]["zero_shot"].append({"name": "extra", "split": "test", **ref})


# (id, mutation, key path ("" when the file as a whole is wrong), words in the message)
CORPUS = [
    ("pair-out-of-range", lambda d, c: grid(d, 0, layers=[99, 99]), "search[0].layers", ["3 layers", "0..2"]),
    ("negative-pair-out-of-range", lambda d, c: grid(d, 1, layers=[0, -4]), "search[1].layers", ["text"]),
    ("pair-beyond-timm-blocks", lambda d, c: (vit(d, c), grid(d, 0, layers=[3, 0])), "search[0].layers",
     ["3 layers", "config.json"]),
    ("pair-beyond-hf-layers", lambda d, c: (bert(d, c), grid(d, 0, layers=[0, 3])), "search[0].layers",
     ["3 layers", "num_hidden_layers + 1"]),
    ("n-train-over-split", lambda d, c: grid(d, 1, n_train=[150, 601]), "search[1].n_train", ["600 pairs"]),
    ("n-train-default-over-split", lambda d, c: d["training"].update(n_train=5000), "training.n_train",
     ["600 pairs"]),
    ("n-train-randint-over-split", lambda d, c: grid(d, 0, n_train={"randint": [100, 2000]}),
     "search[0].n_train", ["1999"]),
    ("n-train-over-table-rows", pairs_table, "search[0].n_train", ["2 pairs", "pairs.csv"]),
    ("unknown-timm-model", lambda d, c: d["encoders"]["image"].update(name="timm:vit_tiny_patch16_225"),
     "encoders.image.name", ["unknown timm model", "did you mean"]),
    ("unknown-timm-tag", lambda d, c: d["encoders"]["image"].update(name="timm:vit_tiny_patch16_224.nosuch"),
     "encoders.image.name", ["no pretrained tag"]),
    ("missing-hf-path", lambda d, c: d["encoders"]["text"].update(name="hf:/nonexistent/model"),
     "encoders.text.name", ["does not exist"]),
    ("missing-timm-file", lambda d, c: d["encoders"]["image"].update(name="timm:/nonexistent/w.safetensors"),
     "encoders.image.name", ["do not exist"]),
    ("unknown-synthetic-modality", lambda d, c: d["encoders"]["image"].update(name="synthetic:audio"),
     "encoders.image.name", ["'synthetic:image'"]),
    ("synthetic-planted-layer", lambda d, c: d["encoders"]["text"]["options"].update(planted_layer=7),
     "encoders.text.options.planted_layer", ["[0, 3)"]),
    ("encoder-device", lambda d, c: d["encoders"]["image"].update(device="gpu"), "encoders.image.device",
     ["cuda:N"]),
    ("encoder-device-index", lambda d, c: d["encoders"]["text"].update(device="cuda:x"),
     "encoders.text.device", ["not a device"]),
    ("trial-device", lambda d, c: d["tune"].update(device="tpu"), "tune.device", ["not a device"]),
    ("encoder-batch-size", lambda d, c: d["encoders"]["image"].update(batch_size=0),
     "encoders.image.batch_size", [">= 1"]),
    ("k-zero", lambda d, c: d["similarity"].update(k=0), "similarity.k", [">= 1"]),
    ("k-over-n-samples", lambda d, c: d["similarity"].update(k=400), "similarity.k", ["[1, 399]"]),
    ("k-over-train-split", lambda d, c: d["similarity"].update(k=700, n_samples=5000), "similarity.k",
     ["600 training pairs"]),
    ("duplicate-grid-name", lambda d, c: grid(d, 1, name="grid"), "search[1].name", ["search[0]", "unique"]),
    ("empty-dimension", lambda d, c: grid(d, 1, n_train=[]), "search[1].n_train", ["empty list"]),
    ("empty-layers", lambda d, c: grid(d, 0, layers=[]), "search[0].layers", ["empty list"]),
    ("infinite-lambda", lambda d, c: grid(d, 1, structure_lambda=[0, math.inf]),
     "search[1].structure_lambda[1]", ["finite"]),
    ("nan-lr", lambda d, c: d["training"].update(lr=math.nan), "training.lr", ["finite"]),
    ("infinite-cpus", lambda d, c: d["tune"].update(cpus_per_trial=math.inf), "tune.cpus_per_trial", ["finite"]),
    ("negative-concurrency", lambda d, c: d["tune"].update(max_concurrent_trials=-1),
     "tune.max_concurrent_trials", [">= 0"]),
    ("asha-reduction-factor", lambda d, c: d["tune"].update(scheduler="asha", asha={"reduction_factor": 1}),
     "tune.asha.reduction_factor", ["> 1"]),
    ("missing-root", zero_shot(dataset="image_folder", options={"root": "/nonexistent/folder"}),
     "data.zero_shot[1].options.root", ["does not exist"]),
    ("missing-cifar-root", zero_shot(dataset="cifar10", options={"root": "/nonexistent/cifar"}),
     "data.zero_shot[1].options.root", ["does not exist"]),
    ("missing-coco-root", lambda d, c: d["data"]["val"].update(dataset="coco", options={"root": "/nonexistent"}),
     "data.val.options.root", ["does not exist"]),
    ("missing-table", lambda d, c: d["data"]["retrieval"].append(
        {"dataset": "pairs", "name": "t", "options": {"path": "/nonexistent.csv"}}),
     "data.retrieval[1].options.path", ["does not exist"]),
    ("unknown-dataset-option", lambda d, c: d["data"]["val"]["options"].update(sise=5),
     "data.val.options.sise", ["did you mean 'size'"]),
    ("unknown-split", lambda d, c: d["data"]["train"].update(split="trian"), "data.train.split", ["'train'"]),
    ("csa-lambda-sweep", lambda d, c: d["training"].update(head="csa"), "search[1].structure_lambda",
     ["closed form", "refine: true"]),
    ("csa-sampled-lr", csa_lr_sampled, "search[0].lr", ["closed form"]),
    ("head-options-mixed-with-training", lambda d, c: (
        d["training"].update(head="res_low_rank", head_options={"rank": 4}), grid(d, 1, head=["linear"])),
     "search[1]", ["head 'linear' has no option(s) ['rank']"]),
    ("layer-in-training", lambda d, c: d["training"].update(image_layer=1), "training.image_layer", ["layers:"]),
    ("train-data-unknown-option", lambda d, c: grid(d, 1, train_data={"sise": [100, 200]}),
     "search[1].train_data.sise", ["did you mean 'size'", "sise=100"]),
    ("train-data-n-train-over-split", lambda d, c: grid(d, 1, train_data={"size": [300, 600]}),
     "search[1].n_train", ["with size=300 has 300 pairs"]),
    ("train-data-empty", lambda d, c: grid(d, 1, train_data={"size": []}), "search[1].train_data.size",
     ["empty list"]),
    ("train-data-not-scalar", lambda d, c: grid(d, 1, train_data={"size": [[300]]}),
     "search[1].train_data.size[0]", ["scalar"]),
    ("train-data-not-mapping", lambda d, c: grid(d, 1, train_data=["random"]), "search[1].train_data",
     ["mapping"]),
    ("train-data-under-optuna", lambda d, c: (d.update(tune={"search": "optuna"}), d["search"].pop(),
                                              grid(d, 0, train_data={"size": [300, 400]})),
     "search", ["one training split"]),
]
FILE_LEVEL = [("not-utf8", b"name: d\xe9mo\n", "not UTF-8"), ("bad-yaml", b"name: [demo\nsearch: 1\n", "line 2")]


def write(ctx: Ctx, tiny: dict, mutate) -> str:
    mutate(tiny, ctx)
    path = ctx.tmp / "spec.yaml"
    path.write_text(yaml.safe_dump({**tiny, "output_dir": str(ctx.tmp / "run")}))
    return str(path)


def test_the_corpus_is_large_enough():
    assert len(CORPUS) + len(FILE_LEVEL) >= 25
    assert len({case[0] for case in CORPUS}) == len(CORPUS)


@pytest.fixture
def no_ray(monkeypatch):
    """``run`` may not get as far as Ray: starting a cluster fails the test."""
    import orchestrator.driver

    def refuse(*args, **kwargs):
        raise AssertionError("a broken spec reached ray_session")

    monkeypatch.setattr(orchestrator.driver, "ray_session", refuse)


def assert_rejected(path: str, key: str, words: list[str], capsys, tmp_path) -> None:
    capsys.readouterr()  # what building the fixtures printed
    assert cli.main(["validate", path]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: invalid spec: {path}:{key}: " if key else f"error: invalid spec: {path}: ")
    for word in words:
        assert word in err, (word, err)
    assert cli.main(["run", path, "--no-report"]) == 2
    assert f"{path}:{key}" in capsys.readouterr().err
    # no_ray fails the test if the run reached ray_session (another test may have Ray up)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mutate, key, words", [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_broken_spec_is_rejected_naming_file_and_key(tiny, tmp_path, request, capsys, no_ray,
                                                     mutate, key, words):
    path = write(Ctx(tmp_path, request), tiny, mutate)
    assert_rejected(path, key, words, capsys, tmp_path)


@pytest.mark.parametrize("content, words", [c[1:] for c in FILE_LEVEL], ids=[c[0] for c in FILE_LEVEL])
def test_unreadable_spec_file_is_named(tmp_path, capsys, no_ray, content, words):
    path = tmp_path / "spec.yaml"
    path.write_bytes(content)
    assert_rejected(str(path), "", [words], capsys, tmp_path)


def test_real_encoders_validate_with_their_layer_counts(tiny, tmp_path, request, capsys):
    ctx = Ctx(tmp_path, request)
    path = write(ctx, tiny, lambda d, c: (vit(d, c), bert(d, c)))
    capsys.readouterr()
    assert cli.main(["validate", path]) == 0
    out = capsys.readouterr().out
    assert "OK, 17 trials in 2 grid(s) (3 image x 3 text layers)" in out
    assert "3 layers (config.json of the local model)" in out and "3 layers (config.json of the local folder" in out


def test_what_only_the_run_knows_is_said(tiny, tmp_path, request, capsys):
    """A Hub model not in the local cache: validate never downloads, and says so."""
    ctx = Ctx(tmp_path, request)
    with offline_hub(tmp_path / "hf"):
        path = write(ctx, tiny, lambda d, c: d["encoders"]["text"].update(
            name="hf:sentence-transformers/all-MiniLM-L6-v2"))
        assert cli.main(["validate", path]) == 0
    out = capsys.readouterr().out
    assert "the trial count depends on the encoders' layer counts" in out  # the 'all' grid
    assert "not in the local Hugging Face cache (validate never downloads)" in out


def test_unset_variables_are_listed_not_checked(tiny, tmp_path, request, capsys, monkeypatch):
    monkeypatch.delenv("SS_NOWHERE", raising=False)
    path = write(Ctx(tmp_path, request), tiny, lambda d, c: d["data"]["zero_shot"].append(
        {"dataset": "cifar10", "split": "test", "options": {"root": "${SS_NOWHERE}"}}))
    assert cli.main(["validate", path]) == 0
    out = capsys.readouterr().out
    assert "data.zero_shot[1]: checked once their variables are set" in out and "set SS_NOWHERE" in out


def test_knn_table_matches_the_metrics_registry():
    from orchestrator.validation import KNN_MIN_K
    from trials.similarity import METRICS

    assert KNN_MIN_K == {name: METRICS.get(name).min_k for name in METRICS if METRICS.get(name).uses_k}


@pytest.mark.parametrize("name", sorted(DATASET_CASES))
def test_every_dataset_index_agrees_with_its_split(name, tmp_path, monkeypatch):
    """The cheap index counts what loading the split gives (published sizes for
    torchvision's sets, whose fixtures are two-image fakes)."""
    from orchestrator.datasets import load_split, split_index
    from orchestrator.datasets.base import DATASETS
    from orchestrator.datasets.classification import PUBLISHED_SIZES

    split, options = DATASET_CASES[name](tmp_path, monkeypatch)
    variants = [options] + ([{**options, "captions": "all"}, {**options, "max_images": 1}]
                            if name == "coco" else [])
    if DATASETS.meta(name).get("index") is None:  # e.g. curated: its size is the selection's
        index = split_index(name, split, options, count=True)
        assert index.pairs is None and "unknown until run" in index.source
        return
    for opts in variants:
        index = split_index(name, split, opts, count=True)
        expected = PUBLISHED_SIZES[name][split] if name in PUBLISHED_SIZES else \
            len(load_split(name, split, opts).text_to_image)
        assert index.pairs == expected, (opts, index)
        assert split_index(name, split, opts, count=False).source  # paths only: no error
