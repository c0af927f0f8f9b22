"""The embedded toy world as an oracle: a broken stage shows in its numbers.

Toy scenes come with exact masks, so each stage of the method can be scored against the truth. Each check runs
a stage twice on the same scenes with the shipped toy LDM: as the pipeline runs it, and with the stage's input
sabotaged in the way a wiring bug would (the heat map of the wrong token, a random M_pre, masks of other
images). It asserts that the good path is good and that the sabotaged one is clearly worse in the metric
the stage feeds. A change that silently breaks a stage fails here, before it reaches the results tables.

The thresholds leave a clear margin under the values measured on these scenes with these seeds (comments).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from foba_core.metrics import auc_roc, foreground_iou
from foba_core.toy.world import ToyWorld

TOY_LDM = os.path.join(os.path.dirname(__file__), "..", "bundles", "foba_toy", "models", "toy_ldm")
N_SCENES = 16  # toy test scenes 0..15 (seed 0): scored by every check
T0 = 5  # stage 1's timesteps 81, 61, ..., 1 (the bundle: 40); the object's mean AUC: 0.959-0.960 at T0 = 2, 3, 5, 10


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run the module on one CPU thread: these tiny networks are as fast on one, and do not stall on a shared CPU.

    Measured under load on 2 shared cores: a training step of the check-3 U-Net took 6 ms on one thread, 128 ms on two.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    from foba_core.models import load_pipeline

    return load_pipeline(TOY_LDM)


@pytest.fixture(scope="module")
def scenes() -> list[dict]:
    world = ToyWorld("test", size=N_SCENES, seed=0)
    return [world[i] for i in range(len(world))]


@pytest.fixture(scope="module")
def stage1(pipe, scenes) -> dict:
    """Stage 1 on the scenes, as the pipeline runs it: M̂ and M_pre of each scene's own object word."""
    from foba_core.preliminary import Stage1Step

    return Stage1Step(pipe, word=None, t0=T0, seed=0)(None, scenes)


def _mean_auc(heatmaps: torch.Tensor, masks: torch.Tensor) -> float:
    """Mean per-image AUC-ROC of M̂ (B, h, w), upsampled bilinearly to the masks (B, H, W) as stage 1 scores it."""
    up = F.interpolate(heatmaps[:, None].float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return float(np.mean([auc_roc(h, m) for h, m in zip(up, masks)]))


def _mean_iou(pred: torch.Tensor, masks: torch.Tensor) -> float:
    """Mean per-image foreground IoU of masks (B, H, W) against the truth."""
    return float(np.mean([foreground_iou(p, m) for p, m in zip(pred, masks)]))


def _truth(scenes: list[dict]) -> torch.Tensor:
    return torch.stack([s["mask"] for s in scenes])  # (B, 32, 32) bool


def test_stage1_heat_maps_of_the_wrong_token_lose_the_object(pipe, scenes, stage1):
    """Stage 1 pointed at another word of y_f ("photo") instead of the object word: the AUC-ROC of M̂ collapses."""
    from foba_core.preliminary import Stage1Step

    wrong = Stage1Step(pipe, word="photo", t0=T0, seed=0)(None, scenes)
    truth = _truth(scenes)
    good, bad = _mean_auc(stage1["heatmaps"], truth), _mean_auc(wrong["heatmaps"], truth)
    # measured on these 16 scenes: object word 0.959 (worst image 0.912), "photo" 0.336
    # (bundles/foba_toy/docs, token_auc on 256 test scenes at T0 = 40: 0.963 and 0.224)
    assert good > 0.9, good
    assert bad < good - 0.3, (good, bad)


def test_refinement_from_a_random_m_pre_misses_the_object(pipe, scenes, stage1):
    """Eq. 5-6 fed a random M_pre of stage 1's foreground fraction: the IoU of the refined masks M drops."""
    from foba_core.refine import refine_masks

    m_pre = stage1["m_pre"]  # (B, 16, 16) bool, latent resolution
    g = torch.Generator().manual_seed(0)
    # the same number of foreground pixels per image as stage 1's M_pre, placed uniformly at random
    random_pre = torch.stack([torch.randperm(m.numel(), generator=g).reshape(m.shape) < int(m.sum()) for m in m_pre])
    assert torch.equal(random_pre.sum((1, 2)), m_pre.sum((1, 2)))
    images, truth = torch.stack([s["image"] for s in scenes]), _truth(scenes)
    # RefineStep's settings (fit "image", one inpainting) with 5 DDIM steps instead of 50; the un-fine-tuned toy LDM
    kwargs = dict(num_inference_steps=5, seed=0, n_samples=1, fit="image")
    good = _mean_iou(refine_masks(pipe, images, m_pre, **kwargs)[0], truth)
    bad = _mean_iou(refine_masks(pipe, images, random_pre, **kwargs)[0], truth)
    # measured: from stage 1's M_pre (itself IoU 0.452) 0.761; from the random M_pre 0.122
    assert good > 0.6, good
    assert bad < good - 0.4, (good, bad)


def test_segmenter_trained_on_other_images_masks_does_not_segment(scenes):
    """The U-Net trained on the masks of other images (labels shifted by one): its IoU on held-out scenes drops."""
    from foba_core.segment import predict_masks, segmentation_network, train_segmenter

    world = ToyWorld("train", size=128, seed=0)
    train = [world[i] for i in range(len(world))]
    images, masks = torch.stack([s["image"] for s in train]), torch.stack([s["mask"] for s in train])
    test_images, truth = torch.stack([s["image"] for s in scenes]), _truth(scenes)

    def trained_on(labels: torch.Tensor) -> float:
        net = segmentation_network((8, 16, 32), num_res_units=1, seed=0)
        net = train_segmenter(images, labels, steps=200, batch_size=16, lr=1e-2, crop=None, seed=0, device="cpu",
                              network=net, progress=False)
        return _mean_iou(predict_masks(net, test_images), truth)

    good = trained_on(masks)
    bad = trained_on(masks.roll(1, dims=0))  # image i learns the mask of image i - 1: no image keeps its own
    # measured on the 16 test scenes: true masks 0.659, shifted masks 0.239 (a blob where objects tend to be)
    assert good > 0.55, good
    assert bad < good - 0.25, (good, bad)
