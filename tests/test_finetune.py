"""Tests of stage 2: the background-rectangle sampler, the 50/50 fine-tuning mixture and the fine-tuning stage."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from foba_core.finetune import FineTuneDataset, StreamSampler, draws_for, load_stage1, sample_background_rectangle

ROOT = os.path.join(os.path.dirname(__file__), "..")
TOY_JOB = [f"configs/stages/{s}.yaml" for s in ("stage1", "finetune", "refine", "segment", "guidance", "report")] + [
    "configs/datasets/toy.yaml", "bundles/foba_toy/configs/pipeline.yaml"]
Y_B = "a photo of a background"


def _disc(size: int, radius: float) -> torch.Tensor:
    """A centred disc of foreground (a bird-like M_pre) on a size x size latent."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 < radius**2


def _bbox(mask: torch.Tensor) -> tuple[int, int, int, int]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


@pytest.mark.parametrize("size", [64, 16])
@pytest.mark.parametrize("radius_fraction", [0.0, 0.3])
def test_rectangles_follow_the_authors_rules_scaled_to_the_latent_size(size, radius_fraction):
    m_pre = _disc(size, radius_fraction * size)
    background = ~m_pre
    s = size / 64
    gen = torch.Generator().manual_seed(1)
    areas = set()
    for _ in range(200):
        rect = sample_background_rectangle(m_pre, gen)
        assert rect.dtype == torch.bool and rect.shape == (size, size)
        assert not rect.all(), "a valid rectangle exists, the fallback must not be needed"
        y1, x1, y2, x2 = _bbox(rect)
        height, width = y2 - y1, x2 - x1
        assert rect.sum() == height * width  # a filled axis-aligned rectangle
        assert height > 10 * s and width > 10 * s
        assert (16 * s) ** 2 <= height * width <= (32 * s) ** 2
        assert background[rect].float().mean() >= 2 / 3
        # two background pixels are opposite corners
        main = background[y1, x1] and background[y2 - 1, x2 - 1]
        anti = background[y1, x2 - 1] and background[y2 - 1, x1]
        assert main or anti
        areas.add(height * width)
    assert len(areas) > 5  # random, not one fixed rectangle


def test_rectangle_sampler_is_deterministic_given_the_generator():
    m_pre = _disc(64, 14)
    a = [sample_background_rectangle(m_pre, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    others = [sample_background_rectangle(m_pre, torch.Generator().manual_seed(s)) for s in range(6, 12)]
    assert any(not torch.equal(a[0], o) for o in others)


def test_no_background_gives_an_empty_mask():
    rect = sample_background_rectangle(torch.ones(16, 16, dtype=torch.bool), torch.Generator().manual_seed(0))
    assert rect.shape == (16, 16) and not rect.any()


def test_tiny_background_falls_back_to_the_whole_background():
    m_pre = torch.ones(64, 64, dtype=torch.bool)
    m_pre[0:2, 0:3] = False  # six background pixels: no rectangle can be large enough
    rect = sample_background_rectangle(m_pre, torch.Generator().manual_seed(0))
    assert rect.all()
    assert torch.equal(rect & ~m_pre, ~m_pre)  # the supervised region is the whole background


def test_fragmented_background_falls_back_after_the_retries():
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    m_pre = (yy + xx) % 2 == 0  # a checkerboard: no rectangle of >= 3 x 3 pixels is 2/3 background
    assert sample_background_rectangle(m_pre, torch.Generator().manual_seed(0)).all()


def test_sampler_rejects_a_non_boolean_mask():
    with pytest.raises(ValueError, match="bool"):
        sample_background_rectangle(torch.zeros(8, 8), torch.Generator())


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_mixture_is_half_inpainting_half_synthesis_with_the_right_loss_masks():
    n = 400
    m_pre = torch.stack([_disc(16, 3 + (i % 4)) for i in range(n)])
    ds = FineTuneDataset(_images(n), m_pre, object_prompt="a photo of a bird", seed=3)
    tasks = {"inpaint": 0, "synthesis": 0}
    seen = set()
    for k in range(len(ds)):
        item = ds[k]
        tasks[item["task"]] += 1
        i = int(item["id"])
        seen.add(i)
        assert torch.equal(item["image"], ds.items[i])
        mask = item["loss_mask"]
        assert mask.shape == (16, 16) and mask.dtype == torch.float32
        if item["task"] == "inpaint":
            assert item["caption"] == Y_B
            supervised = mask.bool()
            assert supervised.any() and not (supervised & m_pre[i]).any()  # rectangle minus M_pre
            y1, x1, y2, x2 = _bbox(supervised)
            assert (y2 - y1) * (x2 - x1) <= 64  # inside one rectangle of at most (32 s)^2 pixels
        else:
            assert item["caption"] == "a photo of a bird" and bool((mask == 1).all())
    assert seen == set(range(n))  # one draw visits every image once
    assert abs(tasks["inpaint"] / n - 0.5) < 0.08


def test_items_are_deterministic_and_draws_differ():
    m_pre = torch.stack([_disc(16, 4)] * 8)
    a = FineTuneDataset(_images(8), m_pre, object_prompt="a photo of a bird", seed=1, draws=3)
    b = FineTuneDataset(_images(8), m_pre, object_prompt="a photo of a bird", seed=1, draws=3)
    assert len(a) == 24
    for k in (0, 5, 13, 23):
        x, y = a[k], b[k]
        assert x["id"] == y["id"] and x["task"] == y["task"] and torch.equal(x["loss_mask"], y["loss_mask"])
    # each draw visits every image once, in its own order and with its own tasks and rectangles
    orders = [[a.locate(d * 8 + j)[1] for j in range(8)] for d in range(3)]
    assert all(sorted(o) == list(range(8)) for o in orders) and len({tuple(o) for o in orders}) > 1
    per_draw = [{a[d * 8 + j]["id"]: a[d * 8 + j]["loss_mask"] for j in range(8)} for d in range(3)]
    assert any(not torch.equal(per_draw[0][i], per_draw[1][i]) for i in per_draw[0])
    c = FineTuneDataset(_images(8), m_pre, object_prompt="a photo of a bird", seed=2, draws=3)
    assert any(c[k]["task"] != a[k]["task"] or c[k]["id"] != a[k]["id"] for k in range(24))


def test_image_without_background_is_trained_on_synthesis():
    m_pre = torch.ones(20, 8, 8, dtype=torch.bool)
    ds = FineTuneDataset(_images(20), m_pre, object_prompt="a photo of a bird", p_inpaint=1.0)
    assert all(ds[k]["task"] == "synthesis" for k in range(20))


def test_dataset_items_resize_use_their_captions_and_check_ids():
    from foba_core.toy.world import ToyWorld

    world = ToyWorld("train", size=4, seed=0)
    m_pre = torch.zeros(4, 8, 8, dtype=torch.bool)
    ids = [world[i]["id"] for i in range(4)]
    ds = FineTuneDataset(world, m_pre, image_size=16, ids=ids, p_inpaint=0.0)
    item = ds[0]
    assert item["image"].shape == (3, 16, 16)
    assert item["caption"] == world[ds.locate(0)[1]]["caption"]
    wrong = FineTuneDataset(world, m_pre, image_size=16, ids=ids[::-1])
    with pytest.raises(ValueError, match="stage-1"):
        [wrong[k] for k in range(4)]
    with pytest.raises(ValueError, match="multiple"):
        FineTuneDataset(world, m_pre, image_size=20)
    with pytest.raises(ValueError, match="preliminary masks"):
        FineTuneDataset(world, m_pre[:3])
    with pytest.raises(ValueError, match="object_prompt"):
        FineTuneDataset(_images(4), m_pre)


def test_stream_sampler_continues_after_a_resume():
    ds = list(range(10))
    sampler = StreamSampler(ds)
    assert list(sampler) == list(range(10))
    assert sampler.set_start(4) == 4 and list(sampler) == list(range(4, 10)) and len(sampler) == 6
    assert sampler.set_start(99) == 10 and list(sampler) == []
    assert draws_for(10, 4, 8) == 5 and draws_for(1, 1, 100) == 1


def test_load_stage1_reads_masks_and_explains_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="run_stage1"):
        load_stage1(tmp_path / "stage1.pt")
    torch.save({"ids": ["a", "b"], "heatmaps": torch.rand(2, 4, 4), "m_pre": torch.rand(2, 4, 4) > 0.5},
               tmp_path / "stage1.pt")
    out = load_stage1(tmp_path / "stage1.pt")
    assert out["ids"] == ["a", "b"] and out["m_pre"].dtype == torch.bool and out["m_pre"].shape == (2, 4, 4)


def _workflow(tmp_path, run_id: str = "run_finetune", **overrides):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=TOY_JOB, workflow_type="train", run_id=run_id, output_dir=str(tmp_path / "run"),
                        pretrained=str(tmp_path / "base"), splits=["train"], n_train=8, t0=2, **overrides)
    wf.initialize()
    return wf


@pytest.mark.slow
def test_finetune_stage_trains_resumes_in_stream_and_saves_the_model(tmp_path, monkeypatch):
    from ignite.engine import Events
    from tiny_sd import save_tiny_sd

    from foba_core.models import load_pipeline

    monkeypatch.chdir(ROOT)  # the stage configs name configs/ relative to the repository root
    base = save_tiny_sd(tmp_path / "base", text_attention_mask=True)
    _workflow(tmp_path, run_id="run_stage1").run()  # the images and M_pre of the training split

    small = dict(finetune_steps=6, finetune_batch_size=4, checkpoint_interval=2, finetune_warmup_steps=1,
                 finetune_lr=1e-3)
    wf = _workflow(tmp_path, **small)
    trainer = wf.parser.get_parsed_content("train#trainer")
    seen_first = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen_first.append(list(e.state.batch["id"])))
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=4), lambda e: e.terminate())  # an interruption
    with pytest.raises(RuntimeError) as err:
        wf.run()
    assert "stopped before the end of its training" in str(err.value.__cause__)  # MONAI wraps what the stage raised
    assert trainer.state.iteration == 4 and not (tmp_path / "run" / "finetune" / "model").exists()

    wf = _workflow(tmp_path, **small)  # a new process would do exactly this
    trainer = wf.parser.get_parsed_content("train#trainer")
    seen_second = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen_second.append(list(e.state.batch["id"])))
    wf.run()
    assert trainer.state.iteration == 6 and len(seen_second) == 2
    dataset = wf.parser.get_parsed_content("train#dataset")
    stream = [dataset[k]["id"] for k in range(24)]
    assert sum(seen_first + seen_second, []) == stream  # the resumed run continued the data stream
    out = tmp_path / "run" / "finetune"
    log = json.loads((out / "train_log.json").read_text())
    assert log["iterations"] == 6 and all(math.isfinite(x) for x in log["losses"])
    assert json.loads((out / "stage.json").read_text())["complete"]

    tuned = load_pipeline(str(out / "model"))
    assert tuned.text_attention_mask is True
    changed = [not torch.equal(p, q) for p, q in zip(base.unet.parameters(), tuned.unet.parameters())]
    assert any(changed)
    assert all(torch.equal(p, q) for p, q in zip(base.vae.parameters(), tuned.vae.parameters()))  # VAE frozen
    foba = json.loads((out / "model" / "foba.json").read_text())
    assert foba["finetune"]["training"]["iterations"] == 6 and foba["finetune"]["stage1"].endswith("stage1.pt")

    # another learning rate on the finished run: the stage starts over from the base model, not from its checkpoints
    _workflow(tmp_path, **{**small, "finetune_lr": 1e-4}).run()
    retuned = load_pipeline(str(out / "model"))
    assert json.loads((out / "stage.json").read_text())["settings"]["lr"] == 1e-4
    assert json.loads((out / "train_log.json").read_text())["iterations_this_run"] == 6  # all 6 steps trained again
    assert not all(torch.equal(p, q) for p, q in zip(tuned.unet.parameters(), retuned.unet.parameters()))
