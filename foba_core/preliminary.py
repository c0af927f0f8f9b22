"""Stage 1 over a dataset: heat maps M̂ (Eq. 4) and preliminary masks M_pre for every image.

Runs as a MONAI ``Evaluator``: ``Stage1Step`` is its ``iteration_update`` (one batch of items ->
heat maps and masks) and ``Stage1Writer`` a handler that scores, draws and writes the results, so
progress bars, MLflow tracking and sharding come from the usual MONAI/ignite machinery.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

from foba_core.capture import authors_timesteps, heat_maps, token_indices, token_weights
from foba_core.io import write_csv, write_json, write_torch
from foba_core.masks import preliminary_masks, upsample_mask
from foba_core.metrics import AUCAccumulator, SegmentationAccumulator
from foba_core.models import encode_prompts
from foba_core.transforms import resize_center_crop
from foba_core.visualize import heat_overlay, mask_overlay, save_grid, to_uint8


def model_resolution(pipe) -> int:
    """Return the image side length the pipeline's U-Net was built for (sample_size x VAE factor)."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


@torch.no_grad()
def encode_latents(pipe, images: torch.Tensor) -> torch.Tensor:
    """Return z0 = scaling_factor * E[q(z | x)] for images (B, 3, H, W) in [0, 1] (deterministic)."""
    vae = pipe.vae
    x = images.to(vae.device, vae.dtype) * 2 - 1
    return vae.encode(x).latent_dist.mean * vae.config.scaling_factor


class Stage1Step:
    """``iteration_update``: a list of dataset items -> M̂ and M_pre at latent resolution.

    ``word`` is the object word whose tokens are captured (None: each item's ``label``); its prompt
    is the item's ``caption``. Images are resized (shortest side) and centre-cropped to the model's
    resolution, ground-truth masks with nearest neighbour through exactly the same geometry.
    """

    def __init__(self, pipe, word: str | None = None, t0: int = 40, timesteps: list[int] | None = None,
                 seed: int = 0, image_size: int | None = None, budget_bytes: float | None = None,
                 n_components: int = 2):
        self.pipe, self.word, self.seed, self.budget, self.n_components = pipe, word, int(seed), budget_bytes, n_components
        n_train = pipe.scheduler.config.num_train_timesteps
        self.timesteps = list(timesteps) if timesteps is not None else authors_timesteps(t0, n_train)
        self.size = int(image_size) if image_size is not None else model_resolution(pipe)

    def prepare(self, items: list[dict]) -> dict:
        """Return the model-resolution images, masks and prompts of a batch of items."""
        images = torch.stack([resize_center_crop(it["image"].expand(3, -1, -1), self.size) for it in items])
        masks = [resize_center_crop(it["mask"], self.size, is_mask=True) if it.get("mask") is not None else None
                 for it in items]
        words = [self.word if self.word is not None else it["label"] for it in items]
        return {"images": images, "masks": masks, "prompts": [it["caption"] for it in items], "words": words,
                "ids": [str(it["id"]) for it in items]}

    def __call__(self, engine: Engine | None, items: list[dict]) -> dict:
        batch = self.prepare(items)
        pipe = self.pipe
        z0 = encode_latents(pipe, batch["images"])  # (B, C, h, w)
        hidden, key_mask = encode_prompts(pipe, batch["prompts"], device=z0.device)
        index_lists = [token_indices(pipe.tokenizer, p, [w]) for p, w in zip(batch["prompts"], batch["words"])]
        weights = token_weights(index_lists, hidden.shape[1]).to(z0.device)
        maps = heat_maps(pipe.unet, pipe.scheduler, z0, hidden.to(z0.dtype), weights, text_mask=key_mask,
                         timesteps=self.timesteps, seed=self.seed + _batch_offset(engine, len(items)),
                         budget_bytes=self.budget)
        m_hat = maps.total[:, 0].float().cpu()  # (B, h, w): one target word per image
        m_pre = preliminary_masks(m_hat, random_state=self.seed, n_components=self.n_components)
        return {**batch, "heatmaps": m_hat, "m_pre": m_pre}


def _batch_offset(engine: Engine | None, batch_size: int) -> int:
    """A seed offset unique to the batch, so every image draws its own q_sample noise."""
    return 0 if engine is None else (engine.state.iteration - 1) * batch_size * 7919


class Stage1Writer:
    """Handler: scores M̂ (pixel AUC-ROC) and M_pre (ACC / IoU / mIoU) against ground truth and writes the outputs.

    Writes ``stage1.pt`` (ids, M̂, M_pre), ``per_image.csv``, ``metrics.json`` (flat keys) and PNG
    overlays (image | M̂ | M_pre | ground truth) into ``output_dir``; sets ``engine.state.metrics``.
    """

    def __init__(self, output_dir: str, n_overlays: int = 64, grid_rows: int = 16):
        self.output_dir, self.n_overlays, self.grid_rows = output_dir, int(n_overlays), int(grid_rows)
        self.reset()

    def reset(self) -> None:
        self.ids, self.heatmaps, self.m_pre, self.rows, self.grid = [], [], [], [], []
        self.auc, self.seg, self.scored = AUCAccumulator(), SegmentationAccumulator(), 0

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
                heat_up = F.interpolate(heat[None, None], size=gt.shape, mode="bilinear", align_corners=False)[0, 0]
                pre_up = upsample_mask(pre, tuple(gt.shape))
                self.auc.update(heat_up, gt, image_id=image_id)
                self.seg.update(pre_up, gt)
                self.scored += 1
                row["auc_roc"] = float(self.auc.get_buffer()[-1])
                row.update(_scores(pre_up, gt))
            self.rows.append(row)
            self.ids.append(image_id)
            self.heatmaps.append(heat)
            self.m_pre.append(pre)
            if len(self.ids) <= self.n_overlays:
                tiles = [to_uint8(image), heat_overlay(image, heat), mask_overlay(image, pre)]
                if gt is not None:
                    tiles.append(mask_overlay(image, gt, colour=(40, 255, 40)))
                save_grid([tiles], os.path.join(self.output_dir, "overlays", f"{image_id}.png"))
                if len(self.grid) < self.grid_rows:
                    self.grid.append(tiles)

    def metrics(self) -> dict:
        """Return the flat metrics: mean per-image AUC of M̂, pooled AUC, and M_pre's ACC / IoU / mIoU."""
        if not self.scored:
            return {"n_images": len(self.ids)}
        auc, seg = self.auc.aggregate(), self.seg.aggregate()
        return {
            "auc_roc": auc["auc"], "auc_roc_pooled": auc["auc_pooled"], "auc_skipped": auc["skipped"],
            "acc_pre": seg["acc"], "iou_pre": seg["iou"], "miou_pre": seg["miou"],
            "acc_pre_per_image": seg["acc_per_image"], "iou_pre_per_image": seg["iou_per_image"],
            "miou_pre_per_image": seg["miou_per_image"], "n_images": len(self.ids),
        }

    def write(self, engine: Engine) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        metrics = self.metrics()
        engine.state.metrics.update(metrics)
        write_torch({"ids": self.ids, "heatmaps": torch.stack(self.heatmaps), "m_pre": torch.stack(self.m_pre)},
                           os.path.join(self.output_dir, "stage1.pt"))
        write_json(metrics, os.path.join(self.output_dir, "metrics.json"))
        write_csv(self.rows, os.path.join(self.output_dir, "per_image.csv"))
        if self.grid:
            titles = ["image", "heat map M^", "M_pre", "ground truth"]
            save_grid(self.grid, os.path.join(self.output_dir, "overlays.png"), column_titles=titles)
        print(json.dumps(metrics), flush=True)


def _scores(pred: torch.Tensor, gt: torch.Tensor) -> dict:
    from foba_core.metrics import accuracy, foreground_iou, mean_iou

    return {"acc_pre": accuracy(pred, gt), "iou_pre": foreground_iou(pred, gt), "miou_pre": mean_iou(pred, gt)}

