"""The shipped specs: every one validates offline, and the paper's follow the
official protocol (METHOD.md §5.1, §7, §8) unless a departure is labelled.

Validation runs twice: with the spec's variables unset (paths wait for the run)
and against tiny fake dataset roots whose annotation files have the official
sizes (validation reads annotations and folders, never an image), so the
training split's size, every n_train and every mixture size are checked.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from orchestrator.config import SpecError
from orchestrator.spec import check_runnable, load_spec
from orchestrator.trial_counts import combine, count_pairs, count_plan
from orchestrator.validate_report import report_lines
from orchestrator.validation import check_world

ROOT = Path(__file__).parents[2]
SPACES = ROOT / "search_spaces"
PAPER = SPACES / "paper"
SPECS = sorted(SPACES.glob("*.yaml")) + sorted(PAPER.glob("*.yaml"))
COCO_TRAIN, COCO_VAL, LAION = 82_783, 40_504, 720_000  # official train2014/val2014 first captions
COCO_VAL2017 = 5_000  # freeze-align's probe
# spec file -> (training pairs, trials planned (None: needs the text model's layer count))
PAPER_SPECS = {
    "paper_main_table.yaml": (COCO_TRAIN, 45),
    "data_scaling.yaml": (COCO_TRAIN, 123),
    "layer_grid.yaml": (COCO_TRAIN, None),
    "neighbourhood.yaml": (COCO_TRAIN, 6),
    "scaling_up.yaml": (COCO_TRAIN + LAION, 81),
    "distribution_shift.yaml": (COCO_TRAIN + 3 * 1000, 15),
    "model_combinations.yaml": (COCO_TRAIN, 45),  # 3 presets x 5 seeds x 3 language models
    # a curated training set: its size is known once the selection is made (None); 42 = the
    # count validate prints (top-pairs 2 x 3 x 3 x 2 curation methods + cka-check 6, before
    # the 2 shared trials dedupe)
    "freeze_align.yaml": (None, 42),
}


def _candidates(encoders) -> list[int]:
    return [len(encoders) if isinstance(encoders, list) else 1]


def variables(path: Path) -> set[str]:
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", path.read_text()))


def test_every_paper_spec_is_listed_here():
    assert {p.name for p in PAPER.glob("*.yaml")} == set(PAPER_SPECS)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(SPACES)))
def test_every_spec_validates_with_its_variables_unset(path, monkeypatch):
    for name in variables(path):
        monkeypatch.delenv(name, raising=False)
    spec = load_spec(path)
    world = check_world(spec)  # offline: paths behind unset variables wait, models are not loaded
    assert spec.search and count_plan(spec, world.num_layers).per_grid


# --- fake roots with the official sizes ----------------------------------------------


def coco_annotations(folder: Path, split: str, n: int, year: int = 2014) -> None:
    images = [{"id": i, "file_name": f"COCO_{split}{year}_{i:012d}.jpg"} for i in range(n)]
    captions = [{"image_id": i, "caption": f"picture {i}"} for i in range(n)]
    captions += [{"image_id": i, "caption": f"picture {i} again"} for i in range(0, n, 2)]  # not first
    (folder / f"captions_{split}{year}.json").write_text(json.dumps({"images": images, "annotations": captions}))


@pytest.fixture(scope="module")
def fake_roots(tmp_path_factory) -> dict[str, str]:
    """Every variable the paper specs read, pointing at annotation-only fakes."""
    base = tmp_path_factory.mktemp("data")
    coco = base / "coco"
    (coco / "annotations").mkdir(parents=True)
    for split, n in (("train", COCO_TRAIN), ("val", COCO_VAL)):
        (coco / f"{split}2014").mkdir()
        coco_annotations(coco / "annotations", split, n)
    (coco / "val2017").mkdir()
    coco_annotations(coco / "annotations", "val", COCO_VAL2017, year=2017)
    flickr = base / "flickr30k"
    flickr.mkdir()
    (flickr / "results.csv").write_text("image_name| comment_number| comment| split\n0.jpg| 0| a| test\n")
    zero_shot = base / "torchvision"
    for folder in ("cifar-10-batches-py", "cifar-100-python", "stl10_binary", "food-101",
                   "oxford-iiit-pet", "flowers-102", "dtd", "MNIST"):
        (zero_shot / folder).mkdir(parents=True)
    laion = base / "laion.csv"
    laion.write_text("image,caption\n" + "".join(f"{i}.jpg,a\n" for i in range(LAION)))
    curation = {"CAPTION_FEATURES": "laion_text.npy", "CONCEPT_PROTOTYPES": "prototypes.npz"}
    for name in curation.values():  # read when the curated split loads, not by validation
        (base / name).write_bytes(b"")
    return {"COCO_ROOT": str(coco), "FLICKR_ROOT": str(flickr), "ZERO_SHOT_ROOT": str(zero_shot),
            "LAION_PAIRS": str(laion), "RUN_ROOT": str(base / "runs"),
            **{k: str(base / v) for k, v in curation.items()}}


def with_roots(monkeypatch, roots: dict, **extra) -> None:
    for name, value in {**roots, **extra}.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("name", sorted(PAPER_SPECS))
def test_paper_specs_validate_against_official_sizes(name, fake_roots, monkeypatch):
    with_roots(monkeypatch, fake_roots)
    spec = load_spec(PAPER / name)
    world = check_runnable(spec)  # no variable left unset; paths, n_train, mixture sizes checked
    pairs, trials = PAPER_SPECS[name]
    assert world.train.pairs == pairs, world.train.source
    count = count_plan(spec, world.num_layers)
    if _candidates(spec.encoders.image) + _candidates(spec.encoders.text) != [1, 1]:
        count = combine(count_pairs(spec, world))  # what validate prints for several pairs
    assert (count.total if count.exact else None) == trials
    printed = "\n".join(report_lines(spec, world, count))  # what `structure-sweep validate` prints
    assert pairs is None or f"training split: {spec.data.train.dataset}/train, {pairs} pairs" in printed
    assert "note: set" not in printed  # every variable it reads has a value


def test_a_mixture_step_larger_than_its_source_is_rejected(fake_roots, monkeypatch):
    # Pets has 3,680 train images: a larger in-domain step cannot be cut from it
    with_roots(monkeypatch, fake_roots, INDOMAIN_SIZE="5000")
    with pytest.raises(SpecError, match=r"data.train.options.sources\[3\].size.*3680 pairs, fewer than"):
        check_runnable(load_spec(PAPER / "distribution_shift.yaml"))
    with_roots(monkeypatch, fake_roots, INDOMAIN_SIZE="many")
    with pytest.raises(SpecError, match=r"sources\[1\].size.*size must be an integer"):
        check_runnable(load_spec(PAPER / "distribution_shift.yaml"))


# --- the official protocol ---------------------------------------------------------


def coco_sources(ref) -> list:
    """The COCO references of a training set (itself, or a mixture's sources; none for
    freeze-align's curated set, whose pool is not STRUCTURE's protocol)."""
    if ref.dataset == "curated":
        return []
    if ref.dataset == "mixture":
        return [s for s in ref.options["sources"] if s["dataset"] == "coco"]
    return [{"dataset": ref.dataset, "split": ref.split, "options": ref.options}]


@pytest.mark.parametrize("name", sorted(PAPER_SPECS))
def test_paper_specs_follow_the_official_protocol(name):
    spec = load_spec(PAPER / name)
    image, text = (e if isinstance(e, list) else [e] for e in (spec.encoders.image, spec.encoders.text))
    assert {e.dtype for e in image} == {"float32"} and {e.dtype for e in text} == {"bfloat16"}  # §7
    train = [(ref, "train") for ref in coco_sources(spec.data.train)]
    assert len(train) == (spec.data.train.dataset != "curated")
    for ref, split in train + [({"split": spec.data.val.split, "options": spec.data.val.options}, "val")]:
        assert ref["split"] == split and ref["options"].get("year", 2014) == 2014  # train2014 / val2014
        assert ref["options"].get("captions", "first") == "first" and "karpathy" not in ref["options"]
    retrieval = {r.dataset: r for r in spec.data.retrieval}
    assert retrieval["coco"].options["captions"] == "all" and retrieval["coco"].split == "val"  # §8.2
    assert retrieval["flickr30k"].options.get("captions", "all") == "all"
    assert (spec.similarity.metric, spec.similarity.k, spec.similarity.n_samples) == ("mutual_knn", "rice", 5000)


def test_data_scaling_runs_the_official_sizes_once_each():
    spec = load_spec(PAPER / "data_scaling.yaml")
    sizes = [n for grid in spec.search for n in grid.dims["n_train"]]
    assert sizes == [1000, 2500, 5000, 7500, 10000, 25000, 50000, 75000, None]  # §5.1, no duplicate of full
    assert [grid.dims["seed"] for grid in spec.search] == [[1, 42, 55, 100, 430], [42]]


def test_search_spaces_readme_describes_every_spec():
    readme = (SPACES / "README.md").read_text()
    sections = {part.split("\n", 1)[0]: part for part in readme.split("\n## ")[1:]}
    protocol = sections["The paper's protocol"]  # the variables every paper spec reads
    for path in SPECS:
        heading = f"`{path.relative_to(SPACES)}`"
        assert heading in sections, f"search_spaces/README.md needs a section '## {heading}'"
    for name, (_, trials) in PAPER_SPECS.items():
        section = sections[f"`paper/{name}`"]
        assert trials is None or f"{trials} trials" in section, name
        for variable in variables(PAPER / name) - {"IMAGE_MODEL", "TEXT_MODEL", "ENCODER_DEVICE", "RUN_ROOT"}:
            assert variable in section or variable in protocol, (name, variable)
