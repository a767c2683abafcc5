"""Optuna (TPE) search with ASHA early stopping, on a real local Ray cluster."""


import yaml

from orchestrator.results import ResultsStore
from orchestrator.spec import load_spec
from orchestrator.status import run_status
from orchestrator.driver import run_sweep



def test_optuna_asha_stops_poor_trials_early_and_resume_tops_up(ray_cluster, tmp_path, tiny):
    spec = {**tiny, "name": "optuna-asha",
            "training": {**tiny["training"], "epochs": 16, "patience": 16},
            "search": [{"name": "tpe", "layers": "all", "n_train": 300,
                        "lr": {"loguniform": [1e-5, 1e-1]},
                        "structure_lambda": {"choice": [0, 10]}}],
            "tune": {"search": "optuna", "scheduler": "asha", "num_samples": 10,
                     "metric": "zs/classes/top1", "max_concurrent_trials": 2,
                     "asha": {"grace_period": 2, "reduction_factor": 2}},
            "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache")}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    first = run_sweep(load_spec(tmp_path / "spec.yaml"), log=lambda *_: None)
    assert first.planned == 10 and first.finished == 10 and first.failed == 0
    trials = ResultsStore(tmp_path / "run").query("trials")
    assert len(trials) == 10 and trials["fingerprint"].is_unique
    stopped, done = trials[trials["status"] == "stopped"], trials[trials["status"] == "done"]
    assert len(stopped) >= 1 and len(done) >= 1  # ASHA cut some trials short
    assert (stopped["epoch"] < 16).all()
    assert done["zs/classes/top1"].notna().any() and (done["params"] != "").all()
    assert trials["config/lr"].nunique() == 10  # sampled, not a grid
    assert "stopped early" in run_status(tmp_path / "run")

    spec["tune"]["num_samples"] = 12  # resume asks for 2 more; Optuna is told the 10 stored
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    second = run_sweep(load_spec(tmp_path / "spec.yaml"), log=lambda *_: None)
    assert second.skipped == 10 and second.finished == 2
    assert len(ResultsStore(tmp_path / "run").query("trials")) == 12
