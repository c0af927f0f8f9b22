"""A training killed (SIGKILL) between checkpoints, inside a checkpoint write and before old checkpoints are pruned
ends, after reruns of the same command, with the weights and the loss log of an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from foba_med.phantom import write_phantom_mimic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = "bundles/foba_cxr/configs/train.yaml"


def _train(out, phantom, model, kill: str | None = None) -> subprocess.CompletedProcess:
    """Run the CXR training bundle in a new process (tiny: 12 steps of batch 4, a checkpoint every 2 steps)."""
    runner = [os.path.join(ROOT, "tests", "kill_run.py"), kill] if kill else ["-m", "monai.bundle"]
    args = ["run", "--config_file", TRAIN, "--mimic_dir", str(phantom), "--pretrained", str(model),
            "--output_dir", str(out), "--max_steps", "12", "--batch_size", "4", "--warmup_steps", "2",
            "--lr", "0.002", "--checkpoint_interval", "2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    return subprocess.run([sys.executable, *runner, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def _weights(out) -> dict:
    return load_file(out / "model" / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow
def test_a_training_killed_anywhere_ends_as_the_uninterrupted_run(tmp_path):
    from tiny_sd import save_tiny_sd

    phantom = write_phantom_mimic(tmp_path / "mimic", n_subjects=16, seed=5, size=32)
    model = tmp_path / "sd"
    save_tiny_sd(model, seed=0, text_attention_mask=True)
    whole = _train(tmp_path / "whole", phantom, model)
    assert whole.returncode == 0, whole.stderr[-3000:]

    out = tmp_path / "killed"
    ckpts = out / "checkpoints"
    first = _train(out, phantom, model, kill="iteration:3")
    assert first.returncode == -9 and sorted(os.listdir(ckpts)) == ["checkpoint_iteration=2.pt"]

    second = _train(out, phantom, model, kill="checkpoint-write:2")  # writes 4, dies inside 6
    assert second.returncode == -9 and "resumed from" in second.stdout and "at iteration 2" in second.stdout
    partial = [name for name in os.listdir(ckpts) if name.endswith(".tmp")]
    assert len(partial) == 1 and "checkpoint_iteration=6.pt" in partial[0]
    assert sorted(set(os.listdir(ckpts)) - set(partial)) == ["checkpoint_iteration=4.pt"]  # 4 is whole, 6 not there

    third = _train(out, phantom, model, kill="prune:1")  # writes 6, dies before removing 4
    assert third.returncode == -9 and "a checkpoint write that did not finish" in third.stdout
    assert "at iteration 4" in third.stdout
    assert sorted(os.listdir(ckpts)) == ["checkpoint_iteration=4.pt", "checkpoint_iteration=6.pt"]

    last = _train(out, phantom, model)
    assert last.returncode == 0, last.stderr[-3000:]
    assert f"resumed from {ckpts / 'checkpoint_iteration=6.pt'} at iteration 6" in last.stdout
    a, b = _weights(tmp_path / "whole"), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a, log_b = (json.loads((folder / "train_log.json").read_text()) for folder in (tmp_path / "whole", out))
    assert log_b["losses"] == log_a["losses"] and len(log_a["losses"]) == 12
    assert log_b["loss_final"] == log_a["loss_final"]
