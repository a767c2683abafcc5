"""Unpaired data in the regulariser (data.unpaired), end to end on a local Ray cluster."""

import yaml

from orchestrator.driver import run_sweep
from orchestrator.results import ResultsStore
from orchestrator.spec import load_spec


def _spec(root, tiny, unpaired):
    tiny["search"] = [{"name": "grid", "layers": [[1, 2]], "structure_lambda": 10, "n_train": 150}]
    tiny["training"]["epochs"] = 2
    if unpaired:
        tiny["data"]["unpaired"] = {
            "image": {"dataset": "synthetic", "split": "test", "options": {"size": 120}},
            "text": {"dataset": "synthetic", "split": "val", "options": {"size": 90}}}
    file = root / "spec.yaml"
    file.write_text(yaml.safe_dump({**tiny, "output_dir": str(root / "run"),
                                    "cache_dir": str(root.parent / "cache")}))
    return load_spec(file)


def test_a_sweep_with_unpaired_data_runs_and_gets_its_own_fingerprints(ray_cluster, tmp_path, tiny):
    import copy

    lines = []
    (tmp_path / "with").mkdir(), (tmp_path / "without").mkdir()
    with_spec = _spec(tmp_path / "with", copy.deepcopy(tiny), unpaired=True)
    outcome = run_sweep(with_spec, log=lines.append)
    assert outcome.planned == 1 and outcome.finished == 1 and outcome.failed == 0
    # 8 paired entries + one unpaired split per side, each by its own side's encoder only
    assert outcome.features_computed == 10
    text = "\n".join(lines)
    assert "features unpaired/synthetic/images" in text and "features unpaired/synthetic/texts" in text
    with_rows = ResultsStore(with_spec.run_dir).query("trials")
    assert len(with_rows) == 1 and (with_rows["status"] == "done").all()

    without_spec = _spec(tmp_path / "without", copy.deepcopy(tiny), unpaired=False)
    plain = run_sweep(without_spec, log=lambda *_: None)
    assert plain.features_computed == 0 and plain.features_cached == 8  # the shared cache
    without_rows = ResultsStore(without_spec.run_dir).query("trials")
    assert set(with_rows["fingerprint"]).isdisjoint(without_rows["fingerprint"])
    assert with_rows["best_val_loss"].iloc[0] != without_rows["best_val_loss"].iloc[0]
