"""--tracking mlflow on a trainer whose output stays one dict: run parameters and the loss of every iteration."""

import json
import os
import warnings

import pytest

PRETRAIN = os.path.join(os.path.dirname(__file__), "..", "bundles", "foba_toy", "configs", "pretrain.yaml")
ROOT = os.path.join(os.path.dirname(__file__), "..")
TOY_JOB = str([f"configs/stages/{s}.yaml" for s in ("stage1", "finetune", "refine", "segment", "guidance", "report")]
              + ["configs/datasets/toy.yaml", "bundles/foba_toy/configs/pipeline.yaml"])


def _experiment_runs(store, name: str) -> tuple:
    """Return (MlflowClient of the SQLite ``store``, the runs of experiment ``name``)."""
    from mlflow.tracking import MlflowClient
    from monai.utils import path_to_sqlite_uri

    client = MlflowClient(path_to_sqlite_uri(str(store)))
    return client, client.search_runs([client.get_experiment_by_name(name).experiment_id])


def test_pretraining_logs_its_parameters_and_loss_curve_to_mlflow(tmp_path):
    from monai.bundle import ConfigWorkflow

    small = dict(n_train=32, vae_steps=2, max_steps=5, batch_size=8, warmup_steps=1, checkpoint_interval=5)
    wf = ConfigWorkflow(config_file=PRETRAIN, workflow_type="train", tracking="mlflow", output_dir=str(tmp_path),
                        model_dir=str(tmp_path / "model"), **small,
                        log_interval=1)  # StatsHandler: print every iteration
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wf.initialize()
        wf.run()
    assert not [w for w in caught if "non-scalar output" in str(w.message)]  # StatsHandler reads the loss

    client, runs = _experiment_runs(tmp_path / "mlruns.db", "foba_toy_pretrain")
    assert len(runs) == 1
    expected = {**{key: str(value) for key, value in small.items() if key != "checkpoint_interval"},
                "lr": "0.001", "seed": "0", "caption_dropout": "0.1"}
    assert {key: runs[0].data.params.get(key) for key in expected} == expected
    curve = sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, "train_loss"))
    assert [step for step, _ in curve] == [1, 2, 3, 4, 5]  # one point per iteration
    losses = json.loads((tmp_path / "train_log.json").read_text())["losses"]
    assert [value for _, value in curve] == pytest.approx(losses)


def test_stage1_logs_the_metrics_it_writes_to_mlflow(tmp_path):
    import subprocess
    import sys

    from tiny_sd import save_tiny_sd

    save_tiny_sd(tmp_path / "model", seed=0, text_attention_mask=True)
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "monai.bundle", "run", "run_stage1", "--config_file", TOY_JOB,
                    "--tracking", "mlflow", f"--output_dir={out}", f"--pretrained={tmp_path / 'model'}",
                    "--splits=['test']", "--n_test=4", "--stage1_batch_size=2", "--timesteps=[501, 1]",
                    "--n_overlays=2"], cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": ROOT})
    written = json.loads((out / "stage1" / "test" / "metrics.json").read_text())
    _, runs = _experiment_runs(out / "mlruns.db", "foba_toy_pipeline")
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"images", "stage1"}  # one MLflow run per stage
    for key in ("auc_roc", "iou_pre", "miou_pre"):
        assert by_name["stage1"].data.metrics[f"test_{key}"] == pytest.approx(written[key])
    assert by_name["stage1"].data.params["t0"] == "40" and by_name["images"].data.params["dataset"] == "toy"
