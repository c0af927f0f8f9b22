"""Tests of the experiments on M̂ and M_pre (foba_core.mask_experiments, configs/experiments/{concepts,thresholds,
prompts}.yaml): thresholds from the ROC of labelled pixels, per-word AUCs, agreement of two prompts' masks, one heat-map
call for several words, and the three configs appended to the toy main job."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

from foba_core import mask_experiments as me
from foba_core.outputs import box_masks

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _planted(seed: int = 0, n: int = 3, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy maps (n, size, size) that are brighter inside a planted square mask (n, size, size)."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.zeros(n, size, size, dtype=torch.bool)
    truth[:, 3:8, 2:9] = True
    heat = truth.float() + 0.6 * torch.randn(n, size, size, generator=g)
    return heat, truth


def test_the_tpr_threshold_is_the_highest_that_reaches_the_rate():
    heat, truth = _planted()
    s, t = heat.numpy(), truth.numpy()
    thr = me.threshold_at_tpr(s, t, 0.95)
    assert ((s >= thr) & t).sum() / t.sum() >= 0.95
    higher = np.unique(s[s > thr]).min()  # the next threshold up loses the rate
    assert ((s >= higher) & t).sum() / t.sum() < 0.95
    assert me.threshold_at_tpr(s, t, 1.0) == s[t].min()


def test_the_accuracy_optimal_threshold_beats_every_other_value():
    heat, truth = _planted(seed=1)
    s, t = heat.numpy().ravel(), truth.numpy().ravel()
    thr = me.accuracy_optimal_threshold(s, t)
    best = max(((s >= v) == t).mean() for v in np.append(np.unique(s), np.inf))
    assert ((s >= thr) == t).mean() == pytest.approx(best)
    with pytest.warns(UserWarning, match="No positive samples"):  # sklearn's: no object pixel at all
        assert me.accuracy_optimal_threshold(np.array([0.1, 0.2, 0.9]), np.array([0, 0, 0])) == np.inf


def test_normalise_is_per_image_min_max_and_a_constant_map_stays_finite():
    heat = torch.stack([torch.arange(4.0).reshape(2, 2) * 3 + 5, torch.full((2, 2), 7.0)])
    out = me.normalise(heat)
    assert torch.equal(out[0], torch.tensor([[0, 1 / 3], [2 / 3, 1]]))
    assert torch.equal(out[1], torch.zeros(2, 2))


def test_concept_scores_score_every_word_against_the_object_and_skip_one_class_images():
    heat, truth = _planted(seed=2)
    truth[2] = False  # one image without object: no per-image AUC
    words = torch.stack([truth.float(), (~truth).float(), heat], dim=1)  # (N, 3, h, w): object, surroundings, noisy
    scores = me.concept_scores(words[:, :, ::2, ::2], truth)  # maps at half resolution, resized to the masks
    assert scores["auc"][0] > 0.9 and scores["auc"][1] < 0.1 and 0.5 < scores["auc"][2] < 1
    assert scores["auc_pooled"].shape == (3,) and not np.isnan(scores["auc"]).any()


def test_prompt_agreement_is_the_per_image_iou_and_pixel_agreement():
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    b = a.clone()
    a[0, :2], b[0, :1] = True, True  # 4 of 8 foreground pixels shared
    out = me.prompt_agreement(a, b)
    assert out["iou"].tolist() == [0.5, 1.0] and out["agreement"].tolist() == [0.75, 1.0]
    assert out["mean_iou"] == 0.75


def test_fill_and_metric_keys():
    assert me.fill("a photo of a {word} with wings", "bird") == "a photo of a bird with wings"
    assert me.metric_key("{word}") == "word" and me.metric_key("pleural effusion") == "pleural_effusion"


def test_ground_truth_is_the_box_mask_for_box_data_sets():
    class Split(list):  # two images with boxes only, as SplitImages gives them
        split, size = "test", 6

        def boxes(self):
            return [torch.tensor([[1, 2, 4, 5]]), None]

    split = Split([{"mask": None}, {"mask": None}])
    truth = me.ground_truth(split, box_evaluation=True)
    assert torch.equal(truth, box_masks(split.boxes(), 6)) and truth[0].sum() == 9 and not truth[1].any()
    assert me.ground_truth(split, True, range(1, 2)).shape == (1, 6, 6)
    with pytest.raises(ValueError, match="box_evaluation: true"):
        me.ground_truth(split, box_evaluation=False)


def test_more_reserved_images_than_training_images_are_refused_naming_the_option():
    with pytest.raises(ValueError, match=r"--threshold_images must be an integer in \[1, 6\], got 100"):
        me.ThresholdsExperiment(list(range(6)), [], "stage1", "out", threshold_images=100)


def test_one_call_for_several_words_gives_each_words_map_and_stage_1s():
    from tiny_sd import tiny_pipeline

    from foba_core.preliminary import Stage1Step

    pipe = tiny_pipeline()
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 16, 16, generator=g)
    prompt, timesteps = "a photo of a dog and a background", [501, 1]
    both = me.word_heat_maps(pipe, image, prompt, ["dog", "background"], "img-0", timesteps, seed=3)
    assert both.shape == (2, 8, 8)
    for k, word in enumerate(["dog", "background"]):
        alone = me.word_heat_maps(pipe, image, prompt, [word], "img-0", timesteps, seed=3)
        torch.testing.assert_close(both[k], alone[0])
    assert not torch.allclose(both[0], both[1])
    step = Stage1Step(pipe, word="dog", timesteps=timesteps, seed=3)
    out = step(None, [{"image": image, "caption": prompt, "id": "img-0", "label": "dog"}])
    assert torch.equal(out["heatmaps"][0], both[0])  # the same noise as stage 1's for this image
    with pytest.raises(ValueError, match="'wings' is not in the prompt"):
        me.word_heat_maps(pipe, image, prompt, ["wings"], "img-0", timesteps)


@pytest.mark.slow
def test_the_three_experiments_run_after_the_toy_main_jobs_stage_1(tmp_path, capsys):
    from monai.bundle import run

    files = [f"configs/stages/{s}.yaml" for s in ("stage1", "finetune", "refine", "segment", "guidance", "report")]
    files += ["configs/datasets/toy.yaml", "bundles/foba_toy/configs/pipeline.yaml"]
    tiny = dict(n_train=6, n_test=4, t0=2, n_overlays=2, device="cpu", output_dir=str(tmp_path / "toy"),
                threshold_images=4, concept_images=3, prompt_images=4)
    cwd = os.getcwd()
    os.chdir(ROOT)  # the configs name configs/ relative to the repository root, as the documented commands do
    try:
        for name in ("thresholds", "concepts", "prompts"):
            run(f"run_{name}", config_file=files + [f"configs/experiments/{name}.yaml"], **tiny)
        capsys.readouterr()
        run("run_prompts", config_file=files + ["configs/experiments/prompts.yaml"], **tiny)
        assert "stage prompts: skipped" in capsys.readouterr().out
    finally:
        os.chdir(cwd)
    out = tmp_path / "toy"
    thresholds = pd.read_csv(out / "thresholds" / "thresholds.csv")
    assert thresholds["method"].tolist() == ["threshold_tpr95", "threshold_max_acc", "gmm_M_pre"]
    assert thresholds[["acc", "iou", "tpr"]].apply(lambda c: c.between(0, 100)).all().all()
    assert thresholds["threshold"][:2].between(0, 1).all()
    concepts = pd.read_csv(out / "concepts" / "concepts.csv")
    assert concepts["word"].tolist() == ["{word}", "background", "photo"]
    assert concepts["role"].tolist() == ["object", "other", "other"]
    assert concepts["auc_vs_object_mask"].between(0, 1).all()
    prompts = pd.read_csv(out / "prompts" / "prompts.csv")
    assert prompts["prompt"][:2].tolist() == ["a photo of a {word}", "a photo of a {word} standing in a room"]
    assert prompts["iou"].between(0, 100).all()
    # prompt A is stage 1's y_f with stage 1's noise: on all 4 test images its M_pre scores as stage 1's M_pre
    stage1 = pd.read_json(out / "stage1" / "test" / "metrics.json", typ="series")
    assert prompts["acc"][0] == pytest.approx(100 * stage1["acc_pre"])
    assert prompts["iou"][0] == pytest.approx(100 * stage1["iou_pre"])
    for name in ("thresholds/thresholds.png", "concepts/concepts.png", "prompts/prompts.png",
                 "concepts/metrics.json", "prompts/per_image.csv"):
        assert (out / name).is_file(), name
