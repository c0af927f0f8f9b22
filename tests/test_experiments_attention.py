"""The attention experiments (foba_core.attention_experiments): T0 sweep (Fig. 3), Monte-Carlo Eq. 3 (supp. Fig. 2),
per-token AUC-ROC (supp. Fig. 3); on planted tensors and a tiny random pipeline, and once on the toy main job."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import torch

from foba_core.attention_experiments import (MonteCarlo, T0Sweep, TokenAUC, _image_tokens, auc_scores, ground_truth,
                                             t0_sums)
from foba_core.capture import authors_timesteps, token_indices
from foba_core.preliminary import image_heat_maps

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture(scope="module")
def pipe():
    from tiny_sd import tiny_pipeline

    return tiny_pipeline(seed=0, text_attention_mask=True)


def _split(n: int = 3, size: int = 16) -> list[dict]:
    """Toy-like items at the tiny pipeline's resolution: a bright square on noise, its mask, one prompt."""
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        image = 0.2 * torch.rand(3, size, size, generator=g)
        mask = torch.zeros(size, size, dtype=torch.bool)
        mask[3 + i:10 + i, 4:12] = True
        image[:, mask] = 0.9
        items.append({"image": image, "mask": mask, "boxes": None, "caption": "a photo of a star", "label": "star",
                      "id": f"img{i}"})
    return items


def test_the_grid_of_a_t0_is_the_lowest_t0_timesteps_of_the_50_step_grid_not_its_first():
    grid = authors_timesteps(50)
    assert authors_timesteps(7) == grid[-7:] and authors_timesteps(7) != grid[:7]


def test_t0_sums_add_the_maps_of_each_t0s_own_timesteps():
    grid = authors_timesteps(5)  # 81, 61, 41, 21, 1
    per_t = torch.tensor(grid, dtype=torch.float)[:, None, None].expand(5, 2, 3)  # the map of t is t everywhere
    sums = t0_sums(per_t, grid, [1, 2, 5], 1000)
    assert sums.shape == (3, 2, 3)
    assert sums[:, 0, 0].tolist() == [1.0, 1.0 + 21.0, 81.0 + 61.0 + 41.0 + 21.0 + 1.0]
    with pytest.raises(ValueError, match=r"T0 = 6 needs the timesteps \[101\]"):
        t0_sums(per_t, grid, [6], 1000)


def test_auc_scores_upsample_the_maps_and_leave_one_class_images_out_of_the_mean_only():
    truths = torch.zeros(3, 8, 8, dtype=torch.bool)
    truths[0, :4], truths[1, :, :4] = True, True  # image 2 has no foreground
    maps = torch.zeros(3, 4, 4)
    maps[0, :2], maps[1, :, 2:] = 1.0, 1.0  # image 0 right, image 1 inverted
    mean, pooled = auc_scores(maps, truths)
    assert mean == pytest.approx(0.5, abs=0.05)  # (about 1 + about 0) / 2: bilinear edges blur each a little
    assert 0.3 < pooled < 0.7
    _, pooled_without = auc_scores(maps[:2], truths[:2])
    assert pooled != pooled_without  # image 2's pixels count in the pooled score
    assert auc_scores(maps[:1], truths[:1])[0] > 0.9


def test_ground_truth_is_the_mask_else_the_filled_boxes():
    image, mask = torch.zeros(3, 8, 8), torch.eye(8, dtype=torch.bool)
    boxes = torch.tensor([[1, 2, 4, 5]])
    assert torch.equal(ground_truth({"image": image, "mask": mask, "boxes": boxes, "id": "a"}), mask)
    filled = ground_truth({"image": image, "mask": None, "boxes": boxes, "id": "b"})
    assert filled.sum() == 9 and filled[2:5, 1:4].all()
    with pytest.raises(ValueError, match="'c' has neither a mask nor boxes"):
        ground_truth({"image": image, "mask": None, "boxes": None, "id": "c"})


def test_the_key_mask_hides_the_end_of_text_token_only(pipe):
    tokens, seen = _image_tokens(pipe, "a photo of a star")
    assert tokens == ["<|startoftext|>", "a", "photo", "of", "a", "star", "<|endoftext|>"]
    assert seen == [True] * 6 + [False]
    pipe.text_attention_mask = False
    try:
        assert all(_image_tokens(pipe, "a photo of a star")[1])
    finally:
        pipe.text_attention_mask = True


def test_one_capture_of_every_token_gives_each_token_the_map_of_its_own_capture(pipe):
    item, ts = _split(1)[0], [501, 1]
    star = token_indices(pipe.tokenizer, item["caption"], ["star"])
    alone = image_heat_maps(pipe, item["image"], item["caption"], star, ts, seed=5).total[0, 0]
    every = image_heat_maps(pipe, item["image"], item["caption"], [[k] for k in range(7)], ts, seed=5).total[0]
    assert torch.equal(every[star[0][0]], alone)
    assert every[6].abs().max() == 0  # the hidden end-of-text token gets no attention


def test_noise_samples_are_independent_draws_of_one_seeded_generator(pipe):
    item = _split(1)[0]
    star = token_indices(pipe.tokenizer, item["caption"], ["star"])
    a = image_heat_maps(pipe, item["image"], item["caption"], star, [801], seed=2, samples=3).total[:, 0]
    b = image_heat_maps(pipe, item["image"], item["caption"], star, [801], seed=2, samples=3).total[:, 0]
    assert a.shape == (3, 8, 8) and torch.equal(a, b)
    assert not torch.allclose(a[0], a[1]) and not torch.allclose(a[1], a[2])


def test_t0_sweep_writes_one_row_per_t0_and_its_metrics(pipe, tmp_path):
    sweep = T0Sweep(pipe, _split(2), str(tmp_path), n_images=2, t0_max=4, t0=3)
    metrics = sweep.run()
    rows = pd.read_csv(tmp_path / "t0_sweep.csv")
    assert rows["t0"].tolist() == [1, 2, 3, 4] and rows[["auc_roc", "auc_roc_pooled"]].apply(
        lambda c: c.between(0, 1)).all().all()
    assert metrics["auc_roc_t0_default"] == rows["auc_roc"][2] and metrics["auc_roc_max"] == rows["auc_roc"].max()
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics and (tmp_path / "t0_sweep.png").is_file()


def test_monte_carlo_cuts_one_pool_of_draws_into_groups_of_n(pipe, tmp_path):
    mc = MonteCarlo(pipe, _split(2), str(tmp_path), n_images=2, n_samples=[4, 1, 2], seeds=2, t0s=[2, 1])
    mc.run()
    rows = pd.read_csv(tmp_path / "monte_carlo.csv")
    assert list(zip(rows["t0"], rows["n_samples"], rows["n_seeds"])) == [
        (1, 1, 8), (1, 2, 4), (1, 4, 2), (2, 1, 8), (2, 2, 4), (2, 4, 2)]
    assert (rows["auc_roc_std"] > 0).all() and (tmp_path / "monte_carlo.png").is_file()


def test_token_auc_scores_every_attended_token_and_the_inverted_start_of_text_map(pipe, tmp_path):
    metrics = TokenAUC(pipe, _split(2), str(tmp_path), n_images=2, timesteps=[501, 1]).run()
    rows = pd.read_csv(tmp_path / "token_auc.csv")
    assert rows["token"].tolist() == ["<|startoftext|>", "a", "photo", "of", "a", "star", "<|endoftext|>",
                                      "inverted <|startoftext|>"]
    assert rows["object"].tolist() == [0, 0, 0, 0, 0, 1, 0, 0] and rows["n_images"].eq(2).all()
    assert rows["auc_roc"].isna().tolist() == [False] * 6 + [True, False]  # end of text: hidden, no score
    assert rows["auc_roc"][7] == pytest.approx(1 - rows["auc_roc"][0])  # per image, 1 - SOT reverses its order
    assert metrics["auc_roc_object"] == rows["auc_roc"][5] and (tmp_path / "token_auc.png").is_file()


@pytest.mark.parametrize("make, message", [
    (lambda p, s: T0Sweep(p, s, "x", n_images=4), r"--t0_sweep_images must be an integer in \[1, 3\], got 4"),
    (lambda p, s: T0Sweep(p, s, "x", n_images=1, t0_max=10, t0=40), "--t0_sweep_max 10 is below --t0 40"),
    (lambda p, s: MonteCarlo(p, s, "x", n_images=1, seeds=1), r"--monte_carlo_seeds must be an integer >= 2"),
    (lambda p, s: MonteCarlo(p, s, "x", n_images=1, t0s=[]), "--monte_carlo_t0s must be a non-empty list"),
    (lambda p, s: TokenAUC(p, s, "x", n_images=1, t0=51), r"--t0 must be an integer in \[1, 50\]"),
])
def test_settings_are_checked_when_an_experiment_is_built(pipe, make, message):
    with pytest.raises(ValueError, match=message):
        make(pipe, _split(3))


@pytest.mark.slow
def test_the_three_experiments_run_appended_to_the_toy_main_job(tmp_path):
    from monai.bundle import run

    files = [f"configs/stages/{s}.yaml" for s in ("stage1", "finetune", "refine", "segment", "guidance", "report")]
    files += ["configs/datasets/toy.yaml", "bundles/foba_toy/configs/pipeline.yaml"]
    files += [f"configs/experiments/{e}.yaml" for e in ("t0_sweep", "monte_carlo", "token_auc")]
    out = tmp_path / "toy"
    cwd = os.getcwd()
    os.chdir(ROOT)  # the configs name their files relative to the repository root, as the README's commands do
    try:
        for run_id in ("run_t0_sweep", "run_monte_carlo", "run_token_auc"):
            run(run_id, config_file=files, output_dir=str(out), device="cpu", n_train=2, n_test=3, t0=2,
                t0_sweep_images=3, t0_sweep_max=3, monte_carlo_images=2, monte_carlo_n=[1, 2], monte_carlo_seeds=2,
                token_auc_images=3)
    finally:
        os.chdir(cwd)
    assert pd.read_csv(out / "t0_sweep" / "t0_sweep.csv")["t0"].tolist() == [1, 2, 3]
    assert pd.read_csv(out / "monte_carlo" / "monte_carlo.csv")["t0"].tolist() == [1, 1, 2, 2]  # [1, @t0]
    tokens = pd.read_csv(out / "token_auc" / "token_auc.csv")
    assert tokens["object"][5] == 1.0 and tokens["auc_roc"][5] > 0.8  # the toy LDM localises the object word
    for name in ("t0_sweep", "monte_carlo", "token_auc"):
        assert (out / name / f"{name}.png").is_file()
        assert json.loads((out / name / "stage.json").read_text())["complete"]
