"""The foba_natural bundle: its helpers, and the whole main job on a tiny random SD-layout model with tiny copies
of CUB (pixel masks) and Stanford Dogs (boxes, two dogs in the test image) in their real on-disk layouts."""

from __future__ import annotations

import json
import math
import os
import re

import pandas as pd
import pytest
import torch
from test_data_readers import make_cub, make_dogs

from foba_core.data import open_images
from foba_core.outputs import box_masks, box_scores
from foba_core.report import METHODS, PAPER_TABLE3, collect_table3, write_table3
from foba_core.splits import SplitImages, cache_split
from foba_core.synthesis import FID_NOT_COMPUTED

ROOT = os.path.join(os.path.dirname(__file__), "..")
BUNDLE = os.path.join(ROOT, "bundles", "foba_natural", "configs")
STAGES = [f"configs/stages/{s}.yaml" for s in ("stage1", "finetune", "refine", "segment", "guidance", "report")]


def test_open_images_takes_a_fixed_random_subset_of_a_real_split(tmp_path):
    make_dogs(tmp_path)
    full = open_images("dogs", tmp_path, "all")
    assert len(full) == 3
    two, again = open_images("dogs", tmp_path, "all", 2), open_images("dogs", tmp_path, "all", 2)
    ids = [two[i]["id"] for i in range(2)]
    assert ids == [again[i]["id"] for i in range(2)]  # independent of any run seed
    assert ids == sorted(ids, key=[full[i]["id"] for i in range(3)].index)  # kept in the dataset's order
    assert len(open_images("dogs", tmp_path, "all", 1)) == 1 and len(open_images("dogs", tmp_path, "all", 9)) == 3
    assert len(open_images("toy", None, "test", 3)) == 3
    with pytest.raises(ValueError, match="number of images"):
        open_images("toy", None, "test")


def test_the_image_cache_maps_boxes_and_masks_through_the_model_geometry(tmp_path):
    make_dogs(tmp_path)
    dogs = SplitImages(cache_split(open_images("dogs", tmp_path, "test"), str(tmp_path / "c1"), size=15))
    # 40x30 -> 20x15, the centre crop starts at x = 2: both dogs are halved, shifted and clipped to the crop
    assert dogs.ids == ["n02085620_9"] and dogs.masks() is None and dogs[0]["image"].shape == (3, 15, 15)
    assert dogs.boxes()[0].tolist() == [[0, 1, 5, 14], [10, 2, 15, 11]]
    cropped = SplitImages(cache_split(open_images("dogs", tmp_path, "test"), str(tmp_path / "c2"), size=4))
    assert all(((b[:, 2:] > b[:, :2]).all() for b in cropped.boxes()))  # boxes cut to nothing are dropped
    make_cub(tmp_path)
    data = open_images("cub", tmp_path, "train")
    cub = SplitImages(cache_split(data, str(tmp_path / "c3"), size=15, image_dtype="uint8", chunk_size=1))
    assert cub.masks().shape == (2, 15, 15) and cub.masks().dtype == torch.bool
    for mask, box in zip(cub.masks(), cub.boxes()):  # the bird's mask lies inside its box
        x1, y1, x2, y2 = box[0].tolist()
        assert mask.any() and not mask[:y1].any() and not mask[y2:].any()
        assert not mask[:, :x1].any() and not mask[:, x2:].any()
    from foba_core.transforms import resize_center_crop

    exact = resize_center_crop(data[1]["image"], 15)
    assert (cub[1]["image"] - exact).abs().max() <= 0.5 / 255 + 1e-6  # uint8 cache: within half a grey level
    (tmp_path / "c3" / "images_0000001.safetensors").write_bytes(b"broken")
    with pytest.raises(ValueError, match="images_0000001.safetensors is unreadable"):
        SplitImages(str(tmp_path / "c3"))[1]


def test_the_unets_full_frames_are_the_originals_at_the_unets_shortest_side(tmp_path):
    from foba_core.segment import frame_images
    from foba_core.transforms import resize_center_crop, resize_shortest_side

    make_cub(tmp_path)
    data = open_images("cub", tmp_path, "train")
    split = SplitImages(cache_split(data, str(tmp_path / "cache"), size=16), "train")
    frames = frame_images(split, 8, "full", "cub", tmp_path, None)
    assert [tuple(f.shape) for f in frames] == [(3, 8, 11)] * 2 and frames[0].dtype == torch.uint8  # 30x40 -> 8x11
    for frame, i in zip(frames, range(len(data))):
        exact = resize_shortest_side(data[i]["image"].expand(3, -1, -1), 8)  # the 'L' JPEG as three channels
        assert (frame.float() / 255 - exact).abs().max() <= 0.5 / 255 + 1e-6
    squares = frame_images(split, 8, "square")
    assert [tuple(f.shape) for f in squares] == [(3, 8, 8)] * 2  # the cached centre squares, resized
    assert (squares[1] - resize_center_crop(split[1]["image"], 8)).abs().max() < 1e-6
    with pytest.raises(ValueError, match="not the one cached"):
        frame_images(split, 8, "full", "cub", tmp_path, 1)  # another subset than the images stage's
    with pytest.raises(ValueError, match="square"):
        frame_images(split, 8, "whole")


def test_box_masks_and_box_scores_use_the_union_of_several_objects():
    boxes = [torch.tensor([[1, 1, 3, 3], [5, 4, 7, 8]]), torch.zeros(0, 4, dtype=torch.int64)]
    masks = box_masks(boxes, 8)
    assert masks[0].sum() == 4 + 8 and not masks[1].any()
    pred = torch.zeros(2, 8, 8, dtype=torch.bool)
    pred[0, 1:8, 1:7] = True  # exactly the box enclosing both objects
    scores = box_scores(pred, boxes)  # the image without a box is skipped
    assert scores["box_iou"] == pytest.approx(100.0)
    assert scores["box_iou_best"] == pytest.approx(100 * 8 / 42)


def test_table3_has_the_papers_shape_and_merges_runs(tmp_path):
    row = {"dataset": "dogs", "fid": FID_NOT_COMPUTED, "iou": 61.25, "paper_fid": 43.1, "paper_iou": 63.8,
           "iou_kind": "box IoU", "fid_features": "", "fid_samples": 8, "n_train": 4, "n_test": 2}
    write_table3([row], tmp_path / "dogs")
    md = (tmp_path / "dogs" / "table3.md").read_text()
    assert "| Ours (paper, SD v1.4) | 9.8 | 75.1 | 43.1 | 63.8 | 13.4 | 55.2 | 63.7 | 69.2 |" in md
    assert f"| this implementation | – | – | {FID_NOT_COMPUTED} | 61.2 | – | – | – | – |" in md
    write_table3([{**row, "dataset": "cub", "fid": 12.345, "iou": 70.0}], tmp_path / "cub")
    rows = collect_table3([str(tmp_path / "cub"), str(tmp_path / "dogs")], str(tmp_path))
    assert [r["dataset"] for r in rows] == ["cub", "dogs"]
    assert "| this implementation | 12.3 | 70.0 |" in (tmp_path / "table3.md").read_text()
    with pytest.raises(ValueError, match="same dataset"):
        collect_table3([str(tmp_path / "cub"), str(tmp_path / "cub")], str(tmp_path))
    with pytest.raises(FileNotFoundError, match="main job"):
        collect_table3([str(tmp_path / "cars")], str(tmp_path))


TINY = dict(  # every stage, at the size of the tiny model (16 px images, 8x8 latents) and a few steps each
    t0=4, finetune_steps=2, finetune_batch_size=2, inference_steps=2, segment_steps=2, segment_batch_size=2,
    segment_crop=8, segment_size=8, segment_channels=[8, 16], n_synthetic=2, fid_samples=2, n_backgrounds=2,
    stage1_batch_size=2, refine_batch_size=2, sample_batch_size=2, chunk_size=1, device="cpu",
    gradient_checkpointing=True,
)


def _run(dataset: str, capsys=None, **overrides) -> str:
    """Run the natural main job on ``dataset`` from the repository root; return what it printed (with ``capsys``)."""
    from monai.bundle import run

    cwd = os.getcwd()
    os.chdir(ROOT)  # the stage configs name configs/ relative to the repository root
    try:
        files = STAGES + [f"configs/datasets/{dataset}.yaml", os.path.join(BUNDLE, "pipeline.yaml")]
        run(config_file=files, **TINY, **overrides)
    finally:
        os.chdir(cwd)
    return capsys.readouterr().out if capsys is not None else ""


@pytest.mark.slow
def test_natural_bundle_runs_cub_and_dogs_end_to_end_and_writes_table3(tmp_path, capsys, monkeypatch):
    from tiny_sd import save_tiny_sd

    from foba_core.toy.features import ToyFeatureNet

    save_tiny_sd(tmp_path / "sd")
    torch.jit.save(torch.jit.script(ToyFeatureNet(["bird", "background"], image_size=16).eval()), tmp_path / "net.pt")
    make_cub(tmp_path / "cub")
    make_dogs(tmp_path / "dogs")

    cub = tmp_path / "runs" / "cub"
    common = dict(dataset_dir=str(tmp_path / "cub"), pretrained=str(tmp_path / "sd"), output_dir=str(cub),
                  fid_network=str(tmp_path / "net.pt"))
    _run("cub", **common)
    results = pd.read_csv(cub / "results.csv")
    assert list(results.columns) == ["method", "acc", "iou", "miou"]
    assert tuple(results["method"]) == tuple(m for m in METHODS if m != "M_refined_paper_eq5")  # M is the paper's
    assert "M_refined_unfinetuned: the same Eq. 5 with the un-fine-tuned model m" in (cub / "results.md").read_text()
    assert results[["acc", "iou", "miou"]].apply(lambda c: c.between(0, 100)).all().all()
    table = pd.read_csv(cub / "table3.csv")
    assert len(table) == 1 and table.loc[0, "dataset"] == "cub" and table.loc[0, "iou_kind"] == "pixel IoU"
    assert (table.loc[0, "paper_fid"], table.loc[0, "paper_iou"]) == PAPER_TABLE3["cub"]
    assert table.loc[0, "iou"] == pytest.approx(results.set_index("method").loc["unet_M", "iou"])
    assert math.isfinite(float(table.loc[0, "fid"])) and (table.loc[0, "n_train"], table.loc[0, "n_test"]) == (2, 1)
    stage1 = torch.load(cub / "stage1" / "train" / "stage1.pt", weights_only=True)
    assert stage1["m_pre"].shape == (2, 8, 8)  # images were resized to the model's 16 px before stage 1
    finetuned = json.loads((cub / "finetune" / "model" / "foba.json").read_text())
    assert finetuned["finetune"]["training"]["iterations"] == 2
    assert sorted(os.listdir(cub / "refine" / "parts")) == [  # one stored batch per split (refine_batch_size 2)
        "test_0000000-0000001.safetensors", "train_0000000-0000002.safetensors"]
    for picture in ("mask_grid.png", "backgrounds.png", "guidance_strip.png", "table3.md", "results.md"):
        assert (cub / picture).is_file()
    report = (cub / "results.md").read_text()
    assert "Refinement (Eq. 5): |x - x_hat| of 1 inpainting(s) per image, g fitted on the whole difference map " \
           "(the paper)." in report
    throughput = re.search(r"Refinement throughput: ([0-9.]+) s per image \((\d+) images, DDIMScheduler with (\d+) steps",
                           report)
    assert throughput and float(throughput[1]) > 0 and int(throughput[2]) == 3  # 2 train + 1 test images
    recorded = {n: json.loads((cub / n / "stage.json").read_text())["settings"]
                for n in ("refine", "synthetic", "guidance", "unet_M")}
    assert (recorded["unet_M"]["frame"], recorded["unet_M"]["size"], recorded["unet_M"]["flip"]) == ("full", 8, True)
    assert (recorded["refine"]["refine_samples"], recorded["refine"]["refine_gmm_fit"]) == (1, "image")  # Eq. 5
    assert recorded["synthetic"]["stage1_model"] == "base" and recorded["guidance"]["fid_ws"] == [1.0, 3.0, 7.5]
    fid = pd.read_csv(cub / "fid.csv")
    guided = fid[fid["w"] != "vae_reconstruction"]
    assert list(guided["w"].astype(float)) == [1.0, 3.0, 7.5] and list(guided["paper_fid"]) == [9.8, 11.3, 22.3]

    records = {n: (cub / n / "stage.json").read_text() for n in os.listdir(cub) if (cub / n / "stage.json").exists()}
    import foba_core.segment as segment

    frame_reads = []
    monkeypatch.setattr(segment, "frame_images", lambda *a, **k: frame_reads.append(a))
    out = _run("cub", capsys, **common)  # a rerun: every stage is read back, nothing recomputed
    monkeypatch.undo()
    assert frame_reads == []  # the U-Nets' training images are not read again for stages that are skipped
    assert {n: (cub / n / "stage.json").read_text() for n in records} == records
    assert out.count(": skipped,") == len(records) == 12 and pd.read_csv(cub / "results.csv").equals(results)
    assert "stage refine_eq5: not run, the refinement is Eq. 5 as the paper states it already" in out

    out = _run("cub", capsys, **common, refine_samples=2)  # one changed setting: exactly its dependants rerun
    rerun = sorted(re.findall(r"stage (\S+): rerun", out))
    assert rerun == ["refine", "refine_base", "synthetic", "unet_M", "unet_M_plus_synthetic"], out
    assert "stage refine_eq5: running" in out  # the paper's Eq. 5 beside K = 2, first time
    assert "M_refined_paper_eq5" in set(pd.read_csv(cub / "results.csv")["method"])
    assert "refine_samples: 1 -> 2" in out
    skipped = set(re.findall(r"stage (\S+): skipped", out))
    assert skipped == {"images", "stage1", "finetune", "crop", "unet_M_pre", "unet_supervised", "guidance"}

    dogs = tmp_path / "runs" / "dogs"
    _run("dogs", dataset_dir=str(tmp_path / "dogs"), pretrained=str(tmp_path / "sd"), output_dir=str(dogs),
         max_images=2, amp=True)  # autocast is CUDA-only: on the CPU the option must leave training intact
    results = pd.read_csv(dogs / "results.csv")
    assert list(results.columns) == ["method", "box_iou", "box_iou_best"]
    assert tuple(results["method"]) == tuple(m for m in METHODS if m != "M_refined_paper_eq5")
    assert (results["box_iou"].between(0, 100) & results["box_iou_best"].between(0, 100)).all()
    table = pd.read_csv(dogs / "table3.csv", keep_default_na=False)
    assert table.loc[0, "fid"] == FID_NOT_COMPUTED and table.loc[0, "iou_kind"].startswith("box IoU")
    assert (table.loc[0, "n_train"], table.loc[0, "n_test"]) == (2, 1)  # max_images 2 of the 2 + 1 images
    assert pd.read_csv(dogs / "fid.csv", keep_default_na=False)["fid"].tolist() == [FID_NOT_COMPUTED] * 3  # w = 1, 3, 7.5

    from monai.bundle import run

    run(config_file=os.path.join(BUNDLE, "table3.yaml"), runs=[str(cub), str(dogs)], output_dir=str(tmp_path))
    merged = pd.read_csv(tmp_path / "table3.csv", keep_default_na=False)
    assert merged["dataset"].tolist() == ["cub", "dogs"]
    assert "Stanford Dogs FID ↓" in (tmp_path / "table3.md").read_text()


def test_recipe_command_line_values_reach_the_stage_configs_as_the_pipeline_passes_them():
    """docs/README.md "Several GPUs (torchrun)": Fire reads True/False as booleans, false/null as strings, and
    monai.bundle drops None; '$None' is how the command line sets n_images to null (every image, as max_images null)."""
    from fire.parser import DefaultParseValue
    from monai.bundle import ConfigParser
    from monai.bundle.scripts import update_kwargs

    assert DefaultParseValue("True") is True and DefaultParseValue("False") is False
    assert DefaultParseValue("false") == "false" and DefaultParseValue("null") == "null"
    assert "n_images" not in update_kwargs(n_images=DefaultParseValue("None"))  # the config's default would apply
    parser = ConfigParser({"n_images": 256})
    parser.update(update_kwargs(n_images=DefaultParseValue("$None")))
    assert parser.get_parsed_content("n_images") is None

@pytest.mark.slow
def test_stage1_and_finetuning_under_torchrun_are_reused_by_the_main_job(tmp_path):
    """docs/README.md "Several GPUs": stage 1 and fine-tuning with 2 processes (the main job's files plus the
    multi-GPU fragments); the one-process main job then skips both (same records: the fine-tuning record holds the
    effective batch, 1 per process x 2 processes)."""
    from test_distributed import _torchrun
    from tiny_sd import save_tiny_sd

    save_tiny_sd(tmp_path / "sd")
    make_cub(tmp_path / "cub")
    out = tmp_path / "runs" / "cub"
    files = STAGES + ["configs/datasets/cub.yaml", "bundles/foba_natural/configs/pipeline.yaml"]
    common = [f"--pretrained={tmp_path / 'sd'}", f"--dataset_dir={tmp_path / 'cub'}", f"--output_dir={out}",
              f"--t0={TINY['t0']}", f"--stage1_batch_size={TINY['stage1_batch_size']}"]
    _torchrun(files + ["configs/fragments/multi_gpu_stage1.yaml"], "run_stage1", *common)
    stdout = _torchrun(files + ["configs/fragments/multi_gpu_finetune.yaml"], "run_finetune", *common,
                       f"--finetune_steps={TINY['finetune_steps']}", "--finetune_batch_size=1",
                       "--gradient_checkpointing=True")
    assert "effective batch 2 = batch 1 per process x 2 process(es)" in stdout
    assert torch.load(out / "stage1" / "train" / "stage1.pt", weights_only=True)["m_pre"].shape == (2, 8, 8)
    model_time = os.path.getmtime(out / "finetune" / "model" / "model_index.json")

    _run("cub", dataset_dir=str(tmp_path / "cub"), pretrained=str(tmp_path / "sd"), output_dir=str(out))
    for name in ("images", "stage1", "finetune"):
        assert json.loads((out / name / "stage.json").read_text())["complete"]
    assert os.path.getmtime(out / "finetune" / "model" / "model_index.json") == model_time  # reused, not retrained
    finetuned = json.loads((out / "finetune" / "model" / "foba.json").read_text())
    assert finetuned["finetune"]["training"]["iterations"] == TINY["finetune_steps"]
    table = pd.read_csv(out / "table3.csv", keep_default_na=False)
    assert table.loc[0, "dataset"] == "cub" and (table.loc[0, "n_train"], table.loc[0, "n_test"]) == (2, 1)


@pytest.mark.parametrize("dataset", ["cub", "dogs", "cars", "h36m"])
def test_the_natural_defaults_are_the_papers_and_the_preset_turns_the_measured_variants_on(dataset):
    from monai.bundle import ConfigParser

    files = [os.path.join(ROOT, f) for f in STAGES + [f"configs/datasets/{dataset}.yaml"]] + [
        os.path.join(BUNDLE, "pipeline.yaml")]
    paper = ConfigParser()
    paper.read_config(files)
    assert (paper["refine_samples"], paper["refine_gmm_fit"]) == (1, "image")  # Eq. 5: one inpainting, whole map
    assert paper["synthetic_stage1_model"] == "base"  # D'_s's M_pre from m, as for D
    assert paper["fid_ws"] == [1.0, 3.0, 7.5] and paper["inference_steps"] == 50 and paper["t0"] == 40
    # the authors' U-Net augmentation: shortest side 128, random 128 crops along the long side, flips
    assert (paper["segment_size"], paper["segment_crop"], paper["segment_frame"], paper["segment_flip"]) == (
        128, 128, "full", True)
    variants = ConfigParser()
    variants.read_config(files + [os.path.join(BUNDLE, "refine_variants.yaml")])
    assert (variants["refine_samples"], variants["refine_gmm_fit"]) == (4, "m_pre")


@pytest.mark.slow
@pytest.mark.parametrize("dataset, maker", [("cub", make_cub), ("dogs", make_dogs)])
def test_every_experiment_runs_appended_to_the_natural_main_job(tmp_path, dataset, maker):
    """The six experiments of configs/experiments on a real layout: pixel masks (CUB) and boxes (Dogs)."""
    from tiny_sd import save_tiny_sd

    save_tiny_sd(tmp_path / "sd")
    maker(tmp_path / dataset)
    out = tmp_path / "run"
    common = dict(dataset_dir=str(tmp_path / dataset), pretrained=str(tmp_path / "sd"), output_dir=str(out), t0=2,
                  t0_sweep_images=1, t0_sweep_max=3, monte_carlo_images=1, monte_carlo_n=[1, 2], monte_carlo_seeds=2,
                  token_auc_images=1, threshold_images=1, concept_images=1, prompt_images=1)
    names = ("t0_sweep", "monte_carlo", "token_auc", "thresholds", "concepts", "prompts")
    from monai.bundle import run

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for name in names:
            files = STAGES + [f"configs/datasets/{dataset}.yaml", os.path.join(BUNDLE, "pipeline.yaml"),
                              f"configs/experiments/{name}.yaml"]
            run(f"run_{name}", config_file=files, **{**TINY, **common})
    finally:
        os.chdir(cwd)
    for name in names:
        table = pd.read_csv(out / name / f"{name}.csv")
        assert len(table) and json.loads((out / name / "stage.json").read_text())["complete"], name
        assert (out / name / f"{name}.png").is_file(), name
    assert pd.read_csv(out / "t0_sweep" / "t0_sweep.csv")["t0"].tolist() == [1, 2, 3]
    thresholds = pd.read_csv(out / "thresholds" / "thresholds.csv")
    assert thresholds["method"].tolist() == ["threshold_tpr95", "threshold_max_acc", "gmm_M_pre"]
