"""The toy bundle's main job at a tiny size with the shipped toy LDM: every stage, the toy-only evaluation it
attaches (feature network, object scores), the report files, and a rerun of one stage alone."""

from __future__ import annotations

import os

import pandas as pd
import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
FILES = [f"configs/stages/{s}.yaml" for s in ("stage1", "finetune", "refine", "segment", "guidance", "report")] + [
    "configs/datasets/toy.yaml", "bundles/foba_toy/configs/pipeline.yaml"]
TINY = dict(n_train=6, n_test=4, t0=2, finetune_steps=2, finetune_batch_size=2, inference_steps=2, refine_samples=2,
            refine_batch_size=4, segment_steps=2, segment_batch_size=2, n_synthetic=2, fid_samples=6, n_backgrounds=3,
            feature_steps=2, sample_batch_size=3, device="cpu")


def _run(tmp_path, run_id: str = "run", **overrides) -> None:
    from monai.bundle import run

    cwd = os.getcwd()
    os.chdir(ROOT)  # the stage configs name configs/ relative to the repository root, as the README's commands do
    try:
        run(run_id, config_file=FILES, output_dir=str(tmp_path / "toy"), **{**TINY, **overrides})
    finally:
        os.chdir(cwd)


@pytest.mark.slow
def test_the_toy_main_job_runs_every_stage_and_one_stage_reruns_alone(tmp_path, capsys):
    _run(tmp_path)
    out = tmp_path / "toy"
    results = pd.read_csv(out / "results.csv")
    assert tuple(results["method"]) == ("M_pre", "M_crop", "M_refined_unfinetuned", "M_refined_paper_eq5", "M_refined",
                                        "unet_M_pre", "unet_M", "unet_M_plus_synthetic", "unet_supervised")
    assert results[["acc", "iou", "miou"]].apply(lambda c: c.between(0, 100)).all().all()
    fid = pd.read_csv(out / "fid.csv")
    assert fid["w"].tolist() == ["1.0", "3.0", "7.5", "vae_reconstruction", "-1.0", "real",
                                 "vae_reconstruction_backgrounds"]
    assert list(fid.columns) == ["w", "fid", "object_score", "features", "paper_cub_fid"]
    assert fid["object_score"].between(0, 1).all() and fid["paper_cub_fid"].tolist()[:3] == [9.8, 11.3, 22.3]
    for name in ("mask_grid.png", "backgrounds.png", "guidance_strip.png", "results.md", "timings.json",
                 "stage1/test/overlays.png", "stage1/test/metrics.json", "features/toy_feature_net.pt"):
        assert (out / name).is_file(), name
    assert not (out / "table3.csv").exists()  # the toy world is not a dataset of Table 3

    capsys.readouterr()
    _run(tmp_path, "run_refine", refine_gmm_fit="image")  # the refinement stage alone, with another g fit
    printed = capsys.readouterr().out
    assert "stage refine: rerun (refine_gmm_fit: 'm_pre' -> 'image')" in printed
    assert "stage crop: rerun" in printed and "stage1" not in printed
