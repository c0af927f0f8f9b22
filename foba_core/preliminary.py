"""Stage 1 over a dataset: heat maps M̂ (Eq. 4) and preliminary masks M_pre for every image.

Runs as a MONAI ``Evaluator``: ``Stage1Step`` is its ``iteration_update`` (one batch of items ->
heat maps and masks) and ``Stage1Writer`` a handler that scores, draws and writes the results, so
progress bars and MLflow tracking come from the usual MONAI/ignite machinery. Under torchrun
(``configs/fragments/multi_gpu_stage1.yaml``) each process takes a contiguous shard of the images
and rank 0 gathers the results (``foba_core.distributed``).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

from foba_core.capture import HeatMaps, authors_timesteps, heat_maps, token_indices, token_weights
from foba_core.diffusion import encode_latents, model_resolution
from foba_core.distributed import gather_to_rank0
from foba_core.io import write_csv, write_json, write_torch
from foba_core.masks import normalise, preliminary_masks, upsample_mask
from foba_core.metrics import accuracy, auc_roc, foreground_iou, mean_iou
from foba_core.models import encode_prompts
from foba_core.seeds import derive_seed
from foba_core.transforms import ResizeCenterCropd
from foba_core.visualize import heat_overlay, mask_overlay, save_grid, to_uint8


def image_heat_maps(pipe, image: torch.Tensor, prompt: str, targets: list[list[int]], timesteps: list[int], seed: int,
                    samples: int = 1, per_timestep: bool = False, budget_bytes: float | None = None) -> HeatMaps:
    """Return the heat maps M̂ (Eq. 4) of one image (3, S, S) for each target, a list of token indices of its prompt.

    The rows of the result are ``samples`` independent draws of the q_sample noise of every timestep (the
    expectation of Eq. 3 estimated by Monte Carlo), all from one generator seeded by ``seed``; ``samples=1`` is
    Eq. 4 as stage 1 computes it. ``per_timestep`` keeps the map of each timestep (``HeatMaps.per_timestep``).
    """
    z0 = encode_latents(pipe, image[None]).expand(samples, -1, -1, -1)  # (samples, C, h, w)
    hidden, key_mask = encode_prompts(pipe, [prompt], device=z0.device)  # (1, L, D), (1, L) or None
    weights = token_weights([targets], hidden.shape[1]).to(z0.device)  # (1, L, n_targets)
    key_mask = None if key_mask is None else key_mask.expand(samples, -1)
    return heat_maps(pipe.unet, pipe.scheduler, z0, hidden.to(z0.dtype).expand(samples, -1, -1),
                     weights.expand(samples, -1, -1), text_mask=key_mask, timesteps=timesteps, seed=seed,
                     per_timestep=per_timestep, budget_bytes=budget_bytes)


def stage1_timesteps(pipe, t0: int = 40, timesteps: list[int] | None = None) -> list[int]:
    """Return the timesteps of M̂ (Eq. 4): ``timesteps`` when given, else the authors' grid for T0 on the model's schedule."""
    return list(timesteps) if timesteps is not None else authors_timesteps(t0, pipe.scheduler.config.num_train_timesteps)


class Stage1Step:
    """``iteration_update``: a list of dataset items -> M̂ and M_pre at latent resolution.

    ``word`` is the object word whose tokens are captured (None: each item's ``label``); its prompt
    is the item's ``caption``. Images are resized (shortest side) and centre-cropped to the model's
    resolution, ground-truth masks with nearest neighbour through exactly the same geometry. Each image's
    q_sample noise is seeded by ``derive_seed(seed, "q_sample", its id)``, whatever batch or shard it comes in.
    """

    def __init__(self, pipe, word: str | None = None, t0: int = 40, timesteps: list[int] | None = None,
                 seed: int = 0, image_size: int | None = None, budget_bytes: float | None = None,
                 n_components: int = 2):
        self.pipe, self.word, self.seed, self.budget, self.n_components = pipe, word, int(seed), budget_bytes, n_components
        self.timesteps = stage1_timesteps(pipe, t0, timesteps)
        self.size = int(image_size) if image_size is not None else model_resolution(pipe)

    def prepare(self, items: list[dict]) -> dict:
        """Return the model-resolution images, masks and prompts of a batch of items."""
        geometry = ResizeCenterCropd(keys=("image", "mask"), size=self.size)  # a mask of None stays None
        cropped = [geometry({"image": it["image"].expand(3, -1, -1), "mask": it.get("mask")}) for it in items]
        images = torch.stack([c["image"] for c in cropped])  # (B, 3, S, S), grey replicated
        masks = [c["mask"] for c in cropped]  # (S, S) bool or None
        words = [self.word if self.word is not None else it["label"] for it in items]
        return {"images": images, "masks": masks, "prompts": [it["caption"] for it in items], "words": words,
                "ids": [str(it["id"]) for it in items], "splits": [it.get("split", "") for it in items]}

    def __call__(self, engine: Engine | None, items: list[dict]) -> dict:
        if not items:  # the empty shard of a distributed run with fewer images than processes
            return {"images": [], "masks": [], "prompts": [], "words": [], "ids": [], "splits": [], "heatmaps": [],
                    "m_pre": []}
        batch = self.prepare(items)
        pipe = self.pipe
        m_hat = []
        for b, image_id in enumerate(batch["ids"]):
            # One image at a time, its q_sample noise seeded by its id: M̂ of an image does not depend on the
            # batch it came in, nor on how a distributed run sharded the data set.
            targets = token_indices(pipe.tokenizer, batch["prompts"][b], [batch["words"][b]])
            maps = image_heat_maps(pipe, batch["images"][b], batch["prompts"][b], targets, self.timesteps,
                                   derive_seed(self.seed, "q_sample", image_id), budget_bytes=self.budget)
            m_hat.append(maps.total[:, 0].float().cpu())  # (1, h, w): one target word per image
        m_hat = torch.cat(m_hat)  # (B, h, w)
        m_pre = preliminary_masks(m_hat, random_state=self.seed, n_components=self.n_components)
        return {**batch, "heatmaps": m_hat, "m_pre": m_pre}


class Stage1Writer:
    """Handler: scores M̂ (pixel AUC-ROC) and M_pre (ACC / IoU / mIoU) against ground truth and writes the outputs.

    Writes ``stage1.pt`` (ids, M̂, M_pre), ``per_image.csv``, ``metrics.json`` (flat keys, see
    :func:`stage1_metrics`) and PNG overlays (image | M̂ | M_pre | ground truth) of the first
    ``n_overlays`` images into ``output_dir/<split>`` for each split the items come from (their ``split``
    key; items without one go to ``output_dir`` itself); sets ``engine.state.metrics``. In a torchrun run
    (``multi_gpu_stage1.yaml``) every process scores its shard and rank 0 gathers the per-image results in
    dataset order and writes them: the same files as a single-process run.
    """

    def __init__(self, output_dir: str, n_overlays: int = 64, grid_rows: int = 16):
        self.output_dir, self.n_overlays, self.grid_rows = output_dir, int(n_overlays), int(grid_rows)
        self.reset()

    def reset(self) -> None:
        self.records: list[dict] = []  # per image of this process: CSV row, M̂, M_pre, ground truth, overlay tiles
        self.counts: dict[str, int] = {}  # images seen per split

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def update(self, engine: Engine) -> None:
        out = engine.state.output
        for i, image_id in enumerate(out["ids"]):
            image, heat, pre, gt = out["images"][i], out["heatmaps"][i], out["m_pre"][i], out["masks"][i]
            row = {"id": image_id, "prompt": out["prompts"][i], "word": out["words"][i]}
            if gt is not None:
                heat_up, pre_up = _at_mask_size(heat, pre, gt)
                row["auc_roc"] = auc_roc(heat_up, gt, image_id=image_id)
                row.update(_scores(pre_up, gt))
            tiles = None
            split = out["splits"][i]
            self.counts[split] = self.counts.get(split, 0) + 1
            if self.counts[split] <= self.n_overlays:  # a process's first images of a split hold the run's first
                tiles = [to_uint8(image), heat_overlay(image, heat), mask_overlay(image, pre)]
                if gt is not None:
                    tiles.append(mask_overlay(image, gt, colour=(40, 255, 40)))
            self.records.append({"row": row, "heat": heat, "m_pre": pre, "gt": gt, "tiles": tiles,
                                 "split": split})

    def write(self, engine: Engine) -> None:
        records = gather_to_rank0(self.records)  # every image of the run, in dataset order, on rank 0
        if records is None:
            return  # rank 0 writes
        for split in dict.fromkeys(r["split"] for r in records):  # items of a split go to output_dir/<split>
            metrics = self.write_split([r for r in records if r["split"] == split], os.path.join(self.output_dir, split))
            engine.state.metrics.update({f"{split}_{k}" if split else k: v for k, v in metrics.items()})

    def write_split(self, records: list[dict], folder: str) -> dict:
        """Write one split's stage1.pt, metrics.json, per_image.csv and overlays into ``folder``; return its metrics."""
        os.makedirs(folder, exist_ok=True)
        metrics = stage1_metrics(records)
        firsts = records[:self.n_overlays]
        for rec in firsts:
            save_grid([rec["tiles"]], os.path.join(folder, "overlays", f"{rec['row']['id']}.png"))
        write_torch({"ids": [r["row"]["id"] for r in records], "heatmaps": torch.stack([r["heat"] for r in records]),
                     "m_pre": torch.stack([r["m_pre"] for r in records])}, os.path.join(folder, "stage1.pt"))
        write_json(metrics, os.path.join(folder, "metrics.json"))
        write_csv([r["row"] for r in records], os.path.join(folder, "per_image.csv"))
        if firsts:
            titles = ["image", "heat map M^", "M_pre", "ground truth"]
            save_grid([r["tiles"] for r in firsts[:self.grid_rows]], os.path.join(folder, "overlays.png"),
                      column_titles=titles)
        print(json.dumps(metrics), flush=True)
        return metrics


def stage1_metrics(records: list[dict]) -> dict:
    """Return the flat stage-1 metrics: M̂'s per-image mean and pooled AUC-ROC (raw and min-max normalised per image),
    M_pre's ACC / IoU / mIoU (pooled and per image).

    ``records`` are :class:`Stage1Writer`'s (CSV ``row`` with per-image scores, ``heat``, ``m_pre``, ``gt``);
    pooled scores count every pixel of every image with ground truth, per-image AUCs skip one-class masks.
    """
    scored = [r for r in records if r["gt"] is not None]
    if not scored:
        return {"n_images": len(records)}
    up = [_at_mask_size(r["heat"], r["m_pre"], r["gt"]) for r in scored]
    heat = torch.cat([h.flatten() for h, _ in up])
    # Sec. 4 reports the pooled AUC of M̂ both raw (97.08) and min-max normalised per image (97.1): normalising puts
    # every image's scores on one scale before they are ranked together
    normalised = torch.cat([normalise(h).flatten() for h, _ in up])
    pre, gt = torch.cat([p.flatten() for _, p in up]), torch.cat([r["gt"].flatten() for r in scored])
    aucs = np.array([r["row"]["auc_roc"] for r in scored], dtype=float)
    finite = aucs[~np.isnan(aucs)]

    def per_image(key: str) -> float:
        return float(np.mean([r["row"][key] for r in scored]))

    return {
        "auc_roc": float(finite.mean()) if finite.size else math.nan, "auc_roc_pooled": auc_roc(heat, gt),
        "auc_roc_pooled_normalised": auc_roc(normalised, gt),
        "auc_skipped": int(aucs.size - finite.size),
        "acc_pre": accuracy(pre, gt), "iou_pre": foreground_iou(pre, gt), "miou_pre": mean_iou(pre, gt),
        "acc_pre_per_image": per_image("acc_pre"), "iou_pre_per_image": per_image("iou_pre"),
        "miou_pre_per_image": per_image("miou_pre"), "n_images": len(records),
    }


def _at_mask_size(heat: torch.Tensor, m_pre: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M̂ (bilinear) and M_pre (nearest) upsampled from latent resolution to the ground-truth mask's size."""
    heat_up = F.interpolate(heat[None, None], size=gt.shape, mode="bilinear", align_corners=False)[0, 0]
    return heat_up, upsample_mask(m_pre, tuple(gt.shape))


def _scores(pred: torch.Tensor, gt: torch.Tensor) -> dict:
    return {"acc_pre": accuracy(pred, gt), "iou_pre": foreground_iou(pred, gt), "miou_pre": mean_iou(pred, gt)}

