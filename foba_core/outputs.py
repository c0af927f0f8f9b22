"""What the mask-making stages write: masks per split, their scores against ground truth, resumable batches.

Refinement (Eq. 5-6), the M_crop ablation and the segmentation U-Nets' test predictions are MONAI
``Evaluator`` runs whose step returns ``{"items": [...], "masks": (B, S, S)}``; :class:`MaskWriter` is
their handler. Masks are at the model's resolution and scored on that square like the paper's tables:
pooled ACC / IoU / mIoU where the data has pixel masks, the box IoU of Table 3 where it has boxes only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
from ignite.engine import Engine, Events
from safetensors.torch import load_file, save_file

from foba_core.io import atomic_write, write_json
from foba_core.metrics import BoxIoUAccumulator, SegmentationAccumulator


def save_tensors(tensors: dict[str, torch.Tensor], path: str) -> str:
    """Write tensors as one safetensors file, atomically (bool tensors are stored as uint8); return the path."""
    stored = {k: (v.to(torch.uint8) if v.dtype == torch.bool else v).contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(stored, str(tmp)))
    return path


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file of :func:`save_tensors`; a missing or truncated file names itself."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: run the stage that writes it first")
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path} is unreadable ({err}); delete it and rerun the stage that writes it") from err


def load_masks(path: str) -> torch.Tensor:
    """Return the masks (N, S, S) bool stored in a stage's ``masks.safetensors``."""
    return load_tensors(path)["masks"].bool()


def cached(path: str, compute: Callable[[], dict]) -> dict:
    """Return the tensors stored at ``path``, computing and storing them first when the file is absent."""
    if os.path.exists(path):
        return load_tensors(path)
    out = compute()
    save_tensors(out, path)
    return out


def segmentation_scores(pred: torch.Tensor, target: torch.Tensor) -> dict:
    """Return pooled ACC / IoU / mIoU (%) of predicted masks (N, H, W) against ground truth."""
    acc = SegmentationAccumulator()
    acc.update(pred, target)
    s = acc.aggregate()
    return {"acc": 100 * s["acc"], "iou": 100 * s["iou"], "miou": 100 * s["miou"]}


def box_scores(pred: torch.Tensor, boxes: list) -> dict:
    """Return the mean box IoU (%) of the predicted masks' bounding boxes against each image's boxes (Table 3).

    ``box_iou`` compares with the box enclosing all ground-truth objects of an image (several dogs are one
    foreground), ``box_iou_best`` with the best-matching single object; images without a box are skipped.
    """
    acc = BoxIoUAccumulator()
    for p, b in zip(pred, boxes, strict=True):
        if b is not None and len(b):
            acc.update(p, b)
    s = acc.aggregate()
    return {"box_iou": 100 * s["box_iou"], "box_iou_best": 100 * s["box_iou_best"]}


def box_masks(boxes: list, size: int) -> torch.Tensor:
    """Return masks (N, size, size) bool filled inside every box of each image (the label of a box-supervised U-Net)."""
    out = torch.zeros(len(boxes), size, size, dtype=torch.bool)
    for i, b in enumerate(boxes):
        for x1, y1, x2, y2 in ([] if b is None else b.tolist()):
            out[i, y1:y2, x1:x2] = True
    return out


def score_masks(pred: torch.Tensor, split, box_evaluation: bool) -> dict:
    """Return the scores of masks (N, S, S) of a split (``splits.SplitImages``): box IoU or pixel ACC / IoU / mIoU."""
    if box_evaluation:
        return box_scores(pred, split.boxes())
    truth = split.masks()
    if truth is None:
        raise ValueError(f"the {split.split} split has no ground-truth masks for pixel scores; box data sets are "
                         "scored with box_evaluation: true (configs/datasets/dogs.yaml)")
    return segmentation_scores(pred, truth)


class MaskWriter:
    """Handler: gathers the masks a step returns per split; at the end writes ``<split>/masks.safetensors`` and
    ``<split>/scores.json`` into ``output_dir`` and puts the ``score_split``'s scores in ``engine.state.metrics``.

    ``truth`` maps split names to their ``SplitImages`` (scored where ground truth exists).
    """

    def __init__(self, output_dir: str, truth: dict, box_evaluation: bool = False, score_split: str = "test"):
        self.output_dir, self.truth, self.box_evaluation = output_dir, truth, bool(box_evaluation)
        self.score_split = score_split
        self.parts: dict[str, list[torch.Tensor]] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.parts.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def update(self, engine: Engine) -> None:
        out = engine.state.output
        for item, mask in zip(out["items"], out["masks"], strict=True):
            self.parts.setdefault(item["split"], []).append(mask.bool().cpu())

    def write(self, engine: Engine) -> None:
        for split, masks in self.parts.items():
            masks = torch.stack(masks)  # (N, S, S)
            folder = os.path.join(self.output_dir, split)
            save_tensors({"masks": masks}, os.path.join(folder, "masks.safetensors"))
            if split in self.truth:
                scores = score_masks(masks, self.truth[split], self.box_evaluation)
                write_json(scores, os.path.join(folder, "scores.json"))
                if split == self.score_split:
                    engine.state.metrics.update(scores)


def read_scores(path: str) -> dict:
    """Return a stage's ``scores.json``."""
    with open(path) as f:
        return json.load(f)


def test_split_evaluator(step, images: dict, output_dir: str, batch_size: int, box_evaluation: bool, device):
    """Return the MONAI ``Evaluator`` of a mask step (``refine.MaskStep``) on the test split alone: its masks and
    scores written by ``MaskWriter`` into ``output_dir/test`` (the ablations beside M: M_crop, M from the
    un-fine-tuned model, the paper's Eq. 5)."""
    from ignite.handlers import ProgressBar
    from monai.engines import Evaluator

    from foba_core.splits import collate_items

    loader = torch.utils.data.DataLoader(images["test"], batch_size=int(batch_size), collate_fn=collate_items)
    return Evaluator(device=device, val_data_loader=loader, iteration_update=step, decollate=False,
                     val_handlers=[MaskWriter(output_dir, images, box_evaluation), ProgressBar(persist=True)])
