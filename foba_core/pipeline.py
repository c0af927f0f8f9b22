"""The whole method on one dataset, stage by stage (paper Sec. 3-4, Tables 1-3), resumable.

``ConceptDistillation.run()`` executes, in order:

1. stage 1 on the training and test images (stage config ``masks.yaml``): M̂ and M_pre;
2. fine-tuning on background inpainting + synthesis (stage config ``finetune.yaml``);
3. refined masks M (Eq. 5-6) and the M_crop ablation;
4. segmentation U-Nets trained on M_pre, on M (D_s), on D_s ∪ D'_s and on the ground truth;
5. foreground/background guidance: backgrounds (w = -1), synthetic D'_s, FID at several w;
6. the results table (Tables 1-2 shape), the FID table, Table 3 (real datasets), a mask grid and
   background samples.

The dataset is any name of ``foba_core.data.open_dataset``. The toy world and CUB have pixel masks
and are scored with ACC / IoU / mIoU; Stanford Dogs, Stanford Cars and Human3.6M are scored, as in the
paper's Table 3, with the box IoU between the bounding box of the predicted mask and the ground-truth
box (several objects: the box enclosing all of them, ``metrics.BoxIoUAccumulator``). Every image goes
through ``transforms.resize_center_crop`` to the model's resolution (512 for SD v1.4), masks and boxes
through the same geometry, and all metrics are computed on that centre square at that resolution.

Bundle stages run as MONAI workflows (their engines get MLflow from ``--tracking mlflow``); the other
stages log one MLflow run each. Every stage keeps its output in ``output_dir`` and is skipped when
that output exists, so an interrupted pipeline resumes where it stopped; the long stages (refinement,
M_crop, D'_s, FID samples) are stored in chunks of ``chunk_size`` images and resume chunk by chunk.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.utils import look_up_option

from foba_core import tracking
from foba_core.data import open_images
from foba_core.io import atomic_write, write_csv, write_json, write_torch
from foba_core.masks import GMM_FITS, upsample_mask
from foba_core.metrics import BoxIoUAccumulator, SegmentationAccumulator
from foba_core.transforms import map_boxes, resize_center_crop
from foba_core.visualize import draw_boxes, mask_overlay, save_grid, to_uint8

METHODS = ("M_pre", "M_crop", "M_refined", "unet_M_pre", "unet_M", "unet_M_plus_synthetic", "unet_supervised")
PAPER_CUB = {  # Table 2 (CUB), ACC / IoU / mIoU in %
    "M_pre": (83.5, 29.0, 55.7), "M_crop": (90.0, 30.7, 60.0), "unet_M_pre": (91.7, 66.5, 78.2),
    "M_refined": (92.4, 63.6, 77.4), "unet_M": (95.2, 75.1, 84.8), "unet_M_plus_synthetic": (95.6, 77.2, 86.0),
    "unet_supervised": (97.9, 88.3, 93.0),
}
PAPER_FID_CUB = {1.0: 9.8, 3.0: 11.3, 7.5: 22.3}
PAPER_TABLE3 = {  # Table 3, "Ours": FID of synthesis (w = 1) and IoU (%) of the U-Net trained on D_s
    "cub": (9.8, 75.1), "dogs": (43.1, 63.8), "cars": (13.4, 55.2), "h36m": (63.7, 69.2),
}
TABLE3_TITLES = {"cub": "CUB", "dogs": "Stanford Dogs", "cars": "Stanford Cars", "h36m": "Human3.6m"}
CLASS_WORDS = {"cub": "bird", "dogs": "dog", "cars": "car", "h36m": "human"}  # y_f = "a photo of a {word}"
BOX_DATASETS = ("dogs", "cars", "h36m")  # scored by box IoU (Table 3); the others by pixel ACC / IoU / mIoU
TOY_FEATURES = "toy"  # fid_network value: train the toy feature network (toy world only)
FID_NOT_COMPUTED = "not computed (pass --fid_network)"
VAE_RECONSTRUCTION = "vae_reconstruction"  # fid.csv row: real images encoded and decoded by the VAE alone
VAE_BACKGROUNDS = "vae_reconstruction_backgrounds"  # fid.csv row (toy): object-free toy textures through the VAE
GRID_TILE = 256  # mask-grid tiles are at most this many pixels wide
_EVERYTHING = "every stage (use a new --output_dir)"
_AFTER_FINETUNING = "finetune/ and stages/"
_REFINED = "stages/refine_*, stages/synthetic, stages/fid_w*, stages/samples_w-1.pt, stages/unet_*.pt and unets/"
_UNETS = "stages/unet_*.pt and unets/"
SETTING_OUTPUTS = {  # setting -> the outputs of OUT computed with it, which a rerun with another value must not reuse
    **dict.fromkeys(("pretrained", "pretrained_config", "dataset", "dataset_dir", "word", "n_train", "n_test", "t0",
                     "seed", "dtype"), _EVERYTHING),
    **dict.fromkeys(("finetune_steps", "finetune_batch_size", "finetune_lr", "amp", "amp_dtype"), _AFTER_FINETUNING),
    **dict.fromkeys(("scheduler", "inference_steps", "refine_samples"), _REFINED),
    "refine_gmm_fit": "stages/crop_*, " + _REFINED,
    **dict.fromkeys(("segment_steps", "segment_batch_size", "segment_lr", "segment_crop", "segment_size",
                     "segment_channels"), _UNETS),
    "n_synthetic": "stages/synthetic, stages/unet_unet_M_plus_synthetic.pt and unets/unet_M_plus_synthetic",
    "fid_network": "fid/ and stages/fid_*", "feature_steps": "fid/ and stages/fid_*",
    "fid_samples": "stages/fid_*", "n_backgrounds": "stages/samples_w-1.pt",
}
BUNDLE_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundles", "foba_toy",
                              "configs")  # the stage configs masks.yaml and finetune.yaml serve every dataset


def class_word(dataset: str) -> str | None:
    """Return the object word of a dataset's y_f (bird, dog, car, human); None for the toy (each item's label)."""
    from foba_core.data import DATASETS
    from foba_core.data._io import check_option

    return CLASS_WORDS.get(check_option(dataset, DATASETS, "dataset"))


def load_images(data, start: int, stop: int, size: int) -> torch.Tensor:
    """Return items ``start`` .. ``stop - 1`` of ``data`` as images (B, 3, size, size): resized, centre-cropped."""
    return torch.stack([resize_center_crop(data[i]["image"], size) for i in range(start, stop)])


def ground_truth(data, size: int, masks: bool) -> dict:
    """Return the ids, ground-truth masks (N, size, size) (when ``masks``) and boxes [(k, 4)] at the model's resolution.

    Masks and boxes go through exactly the geometry of ``resize_center_crop``; boxes that fall outside the
    centre square (zero area after clipping) are dropped, so an image can end up with no box.
    """
    ids, gt_masks, boxes = [], [], []
    for i in range(len(data)):
        item = data[i]
        ids.append(str(item["id"]))
        if masks:
            if "mask" not in item:
                raise ValueError(f"item {item['id']!r} has no ground-truth mask; pixel scores need masks for every "
                                 "test and training image (CUB: keep segmentations/ next to CUB_200_2011/)")
            gt_masks.append(resize_center_crop(item["mask"], size, is_mask=True))
        b = item.get("boxes")
        if b is not None:
            b = map_boxes(b, *item["image"].shape[-2:], size)
            b = b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])]
        boxes.append(b)
    return {"ids": ids, "masks": torch.stack(gt_masks) if masks else None, "boxes": boxes}


def box_masks(boxes: list, size: int) -> torch.Tensor:
    """Return masks (N, size, size) bool filled inside every box of each image (the label of a box-supervised U-Net)."""
    out = torch.zeros(len(boxes), size, size, dtype=torch.bool)
    for i, b in enumerate(boxes):
        for x1, y1, x2, y2 in ([] if b is None else b.tolist()):
            out[i, y1:y2, x1:x2] = True
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


@dataclass
class Split:
    """One split of a run: its images (``data``, loaded on demand), stage-1 M_pre and the ground truth."""

    name: str
    data: torch.utils.data.Dataset
    m_pre: torch.Tensor  # (N, h, w) bool at latent resolution
    truth: dict  # ground_truth(): ids, masks (N, S, S) | None, boxes

    def __len__(self) -> int:
        return len(self.truth["ids"])


class ConceptDistillation:
    """Runs every stage of the method on one dataset with a pretrained LDM; see the module docstring.

    ``dataset`` / ``dataset_dir`` name the data (``open_dataset``); ``n_train`` / ``n_test`` are the
    toy split sizes, or for real data the number of images per split (a fixed random subset; None: all).
    ``word`` is the object word of y_f (default: the dataset's class word; toy: each item's label).
    ``segment_size`` is the side the segmentation U-Net works at (None: the model's resolution);
    its test predictions are upsampled to the model's resolution for scoring. ``fid_network`` is the
    path of a TorchScript FID network (Inception for real data), ``"toy"`` for the toy feature network,
    or None (no FID: the tables say ``FID_NOT_COMPUTED``).
    """

    def __init__(self, output_dir: str, pretrained: str = "toy", pretrained_config: str | None = None,
                 dataset: str = "toy", dataset_dir: str | None = None, word: str | None = None,
                 n_train: int | None = 512, n_test: int | None = 256, t0: int = 40, seed: int = 0,
                 dtype: str = "float32", stage1_batch_size: int = 16, finetune_steps: int = 400,
                 finetune_batch_size: int = 32, finetune_lr: float = 1e-4, gradient_checkpointing: bool = False,
                 amp: bool = False, amp_dtype: str = "bfloat16", scheduler: str = "DDIMScheduler",
                 inference_steps: int = 20, refine_samples: int = 4, refine_gmm_fit: str = "m_pre",
                 refine_batch_size: int = 64, segment_steps: int = 500,
                 segment_batch_size: int = 32, segment_lr: float = 2e-3, segment_crop: int = 24,
                 segment_size: int | None = None, segment_channels=(16, 32, 64), n_synthetic: int = 256,
                 sample_batch_size: int = 16, fid_network: str | None = TOY_FEATURES, fid_samples: int = 256,
                 fid_ws=(1.0, 3.0, 7.5), n_backgrounds: int = 16, feature_steps: int = 600, chunk_size: int = 256,
                 device=None, experiment_name: str = "foba_toy_pipeline", tracking_uri: str | None = None):
        self.word = word if word is not None else class_word(dataset)  # also validates the dataset name
        if pretrained is None:
            raise ValueError("pretrained is not set: pass --pretrained <a Stable Diffusion v1.4 diffusers folder or "
                             ".ckpt/.safetensors file> (a single file also needs --pretrained_config <SD folder>)")
        if dataset != "toy" and dataset_dir is None:
            raise ValueError(f"dataset {dataset!r} needs --dataset_dir: its folder, laid out as docs/datasets.md says")
        if fid_network == TOY_FEATURES and dataset != "toy":
            raise ValueError(f"the toy feature network only measures toy images; for {dataset} pass --fid_network "
                             "<inception-2015-12-05.pt> (foba_core.fid.load_feature_network) or leave it unset")
        for key, value in (("n_synthetic", n_synthetic), ("fid_samples", fid_samples), ("chunk_size", chunk_size),
                           ("refine_samples", refine_samples),
                           ("refine_batch_size", refine_batch_size), ("sample_batch_size", sample_batch_size)):
            if int(value) < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        self.out = os.path.abspath(output_dir)
        self.pretrained, self.pretrained_config = pretrained, pretrained_config
        self.dataset, self.dataset_dir = dataset, dataset_dir
        self.box_evaluation = dataset in BOX_DATASETS
        self.n_train = None if n_train is None else int(n_train)
        self.n_test = None if n_test is None else int(n_test)
        self.t0, self.seed, self.dtype, self.stage1_batch_size = int(t0), int(seed), dtype, int(stage1_batch_size)
        self.finetune_steps, self.finetune_batch_size, self.finetune_lr = finetune_steps, finetune_batch_size, finetune_lr
        self.gradient_checkpointing, self.amp, self.amp_dtype = bool(gradient_checkpointing), bool(amp), amp_dtype
        self.scheduler, self.inference_steps = scheduler, int(inference_steps)
        self.refine_samples, self.refine_gmm_fit = int(refine_samples), look_up_option(refine_gmm_fit, GMM_FITS)
        self.refine_batch_size, self.sample_batch_size = int(refine_batch_size), int(sample_batch_size)
        self.segment = dict(steps=segment_steps, batch_size=segment_batch_size, lr=segment_lr, crop=segment_crop)
        self.segment_size = None if segment_size is None else int(segment_size)
        self.segment_channels = tuple(segment_channels)
        self.n_synthetic, self.fid_samples, self.fid_ws = int(n_synthetic), int(fid_samples), tuple(fid_ws)
        self.fid_network = fid_network
        self.n_backgrounds, self.feature_steps = int(n_backgrounds), int(feature_steps)
        self.chunk_size = int(chunk_size)
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.settings = {
            "pretrained": pretrained, "pretrained_config": pretrained_config, "dataset": dataset,
            "dataset_dir": dataset_dir, "word": self.word, "n_train": self.n_train, "n_test": self.n_test,
            "t0": self.t0, "seed": self.seed, "dtype": dtype, "finetune_steps": int(finetune_steps),
            "finetune_batch_size": int(finetune_batch_size), "finetune_lr": float(finetune_lr), "amp": self.amp,
            "amp_dtype": amp_dtype, "scheduler": scheduler, "inference_steps": self.inference_steps,
            "refine_samples": self.refine_samples, "refine_gmm_fit": self.refine_gmm_fit,
            "segment_steps": int(segment_steps), "segment_batch_size": int(segment_batch_size),
            "segment_lr": float(segment_lr), "segment_crop": int(segment_crop), "segment_size": self.segment_size,
            "segment_channels": list(self.segment_channels), "n_synthetic": self.n_synthetic,
            "fid_network": fid_network, "feature_steps": self.feature_steps, "fid_samples": self.fid_samples,
            "n_backgrounds": self.n_backgrounds,
        }
        self.experiment = experiment_name
        self.tracking = tracking.requested_tracking()
        self.uri = tracking.tracking_uri(self.out, tracking_uri)
        self.timings: dict[str, float] = {}
        self.computed: dict[str, int] = {}  # images computed (not read from the cache) per chunked stage
        self.size: int | None = None  # the model's resolution, known once the fine-tuned model is loaded

    # ----------------------------------------------------------------- helpers
    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def _stage(self, name: str, params: dict | None = None):
        return tracking.stage_run(name, self.uri, self.experiment, params)

    def _workflow(self, config: str, **overrides) -> None:
        """Run a stage config (masks.yaml, finetune.yaml) as a MONAI workflow (with this run's --tracking and store)."""
        from monai.bundle import ConfigWorkflow

        kwargs = {}
        if self.uri and self.tracking:  # MONAI's handlers log into this run's store, not one per stage folder
            kwargs = {"tracking": self.tracking, "tracking_uri": self.uri, "experiment_name": self.experiment}
        wf = ConfigWorkflow(config_file=os.path.join(BUNDLE_CONFIGS, config), workflow_type="infer", **kwargs,
                            **overrides)
        wf.initialize()
        wf.run()
        wf.finalize()

    def _timed(self, name: str, fn):
        start = time.perf_counter()
        out = fn()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        return out

    def _cached(self, name: str, compute, timing: str | None = None, count: int = 0):
        path = self.path("stages", f"{name}.pt")
        if os.path.exists(path):
            return torch.load(path, map_location="cpu", weights_only=False)
        result = self._timed(timing or name, compute)
        self.computed[timing or name] = self.computed.get(timing or name, 0) + count
        write_torch(result, path)
        return result

    def _chunked(self, name: str, n: int, compute) -> dict:
        """Return ``compute(start, stop)`` over chunks of ``chunk_size`` of n items (cached in stages/name/), joined."""
        parts = []
        for start in range(0, n, self.chunk_size):
            stop = min(start + self.chunk_size, n)
            parts.append(self._cached(f"{name}/{start:07d}-{stop:07d}", lambda s=start, e=stop: compute(s, e),
                                      timing=name, count=stop - start))
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

    def _load(self, split: Split, start: int, stop: int, size: int | None = None) -> torch.Tensor:
        return load_images(split.data, start, stop, size or self.size)

    def _unet_size(self) -> int:
        return self.segment_size or self.size

    def _to_unet_size(self, masks: torch.Tensor) -> torch.Tensor:
        """Masks at the model's resolution resized (nearest neighbour) to the U-Net's, in slices to bound memory."""
        if self._unet_size() == masks.shape[-1]:
            return masks
        return torch.cat([upsample_mask(masks[s:s + 256], self._unet_size()) for s in range(0, len(masks), 256)])

    def _unet_images(self, split: Split) -> torch.Tensor:
        """All images of a split at the U-Net's resolution (resized once from the original files)."""
        return torch.cat([self._load(split, s, min(s + 256, len(split)), self._unet_size())
                          for s in range(0, len(split), 256)])

    def _prompt(self, label: str) -> str:
        from foba_core.prompts import object_prompt

        return object_prompt(label)

    def check_settings(self) -> None:
        """Record this run's settings in OUT/settings.json, or raise if OUT holds results of other settings.

        Every stage reuses what OUT already holds, so a rerun with, say, another ``segment_steps`` would
        silently report the old U-Nets; the error names each changed setting and the outputs it shapes.
        """
        path = self.path("settings.json")
        if os.path.exists(path):
            try:
                with open(path) as f:
                    before = json.load(f)
            except (OSError, ValueError) as err:
                raise ValueError(f"{path} is unreadable ({err}); delete it if the outputs in {self.out} belong to "
                                 "the current settings, or use a new --output_dir") from err
            changed = [k for k, v in self.settings.items() if k in before and before[k] != v]
            if changed:
                lines = [f"  {k}: {before[k]!r} before, {self.settings[k]!r} now -> {SETTING_OUTPUTS[k]}"
                         for k in changed]
                raise ValueError(f"{self.out} holds results computed with other settings:\n" + "\n".join(lines)
                                 + "\nDelete those outputs to recompute them (or use a new --output_dir), or rerun "
                                   "with the settings recorded in settings.json.")
            if before == self.settings:
                return
        write_json(self.settings, path)

    # ----------------------------------------------------------------- stages
    def stage1(self, split: str, n: int | None) -> dict:
        """Stage 1 (masks.yaml) on the images of ``split``: returns the contents of its stage1.pt."""
        out = self.path(f"stage1_{split}")
        if not os.path.exists(os.path.join(out, "stage1.pt")):
            self._timed(f"stage1_{split}", lambda: self._workflow(
                "masks.yaml", output_dir=out, pretrained=self.pretrained, pretrained_config=self.pretrained_config,
                dataset=self.dataset, dataset_dir=self.dataset_dir, split=split, n_images=n, word=self.word,
                t0=self.t0, seed=self.seed, dtype=self.dtype, batch_size=self.stage1_batch_size))
        return torch.load(os.path.join(out, "stage1.pt"), map_location="cpu", weights_only=False)

    def finetune(self) -> str:
        """Fine-tune the LDM on background inpainting + synthesis (finetune.yaml); return the model folder m'."""
        out = self.path("finetune")
        model = os.path.join(out, "model")
        if not os.path.exists(os.path.join(model, "model_index.json")):
            self._timed("finetune", lambda: self._workflow(
                "finetune.yaml", output_dir=out, stage1=self.path("stage1_train", "stage1.pt"),
                pretrained=self.pretrained, pretrained_config=self.pretrained_config, dataset=self.dataset,
                dataset_dir=self.dataset_dir, max_steps=self.finetune_steps, batch_size=self.finetune_batch_size,
                lr=self.finetune_lr, seed=self.seed, gradient_checkpointing=self.gradient_checkpointing,
                amp=self.amp, amp_dtype=self.amp_dtype))
        return model

    def split(self, name: str, n: int | None, stage1: dict) -> Split:
        """The images of a split with their stage-1 masks and ground truth (cached), checked to be the same images."""
        data = open_images(self.dataset, self.dataset_dir, name, n)
        truth = self._cached(f"truth_{name}", lambda: ground_truth(data, self.size, masks=not self.box_evaluation))
        if stage1["ids"] != truth["ids"]:
            raise RuntimeError(f"the stage-1 outputs in {self.out} belong to other images; use a new --output_dir")
        return Split(name, data, stage1["m_pre"], truth)

    def _refine_batches(self, pipe, images: torch.Tensor, m_pre: torch.Tensor, offset: int) -> torch.Tensor:
        """Refined masks M (Eq. 5-6) of images (B, 3, S, S); image i draws its noise from seed + offset + i."""
        from foba_core.refine import refine_masks

        out = []
        for s in range(0, len(images), self.refine_batch_size):
            m, _ = refine_masks(pipe, images[s:s + self.refine_batch_size], m_pre[s:s + self.refine_batch_size],
                                scheduler=self.scheduler, num_inference_steps=self.inference_steps,
                                seed=self.seed + offset + s, n_samples=self.refine_samples, fit=self.refine_gmm_fit)
            out.append(m)
        return torch.cat(out)

    def refine(self, pipe, split: Split) -> torch.Tensor:
        """Refined masks M (N, S, S) of a split with the fine-tuned model; cached in chunks."""
        return self._chunked(f"refine_{split.name}", len(split), lambda s, e: {"masks": self._refine_batches(
            pipe, self._load(split, s, e), split.m_pre[s:e], offset=s)})["masks"]

    def crop(self, split: Split) -> torch.Tensor:
        """The M_crop ablation masks (N, S, S) of a split (no model); cached in chunks."""
        from foba_core.refine import crop_masks

        return self._chunked(f"crop_{split.name}", len(split), lambda s, e: {
            "masks": crop_masks(self._load(split, s, e), split.m_pre[s:e], fit=self.refine_gmm_fit)[0]})["masks"]

    def predict(self, net, images: torch.Tensor) -> torch.Tensor:
        """Return the U-Net's masks (N, S, S) at the model's resolution for images at the U-Net's resolution."""
        from foba_core.segment import predict_masks, segmentation_logits

        if images.shape[-1] == self.size:
            return predict_masks(net, images)
        out = []
        for s in range(0, len(images), 64):
            logits = segmentation_logits(net, images[s:s + 64])[:, None]  # (B, 1, s, s)
            up = F.interpolate(logits, size=(self.size, self.size), mode="bilinear", align_corners=False)
            out.append(up[:, 0] > 0)  # (B, S, S)
        return torch.cat(out)

    def train_unet(self, name: str, images: torch.Tensor, masks: torch.Tensor,
                   test_images: torch.Tensor) -> torch.Tensor:
        """Train one segmentation U-Net (supplement Sec. 1 recipe); return its test masks at the model's resolution."""
        from foba_core.segment import segmentation_network, train_segmenter

        def compute():
            net = segmentation_network(channels=self.segment_channels, seed=self.seed)
            net = train_segmenter(images, masks, seed=self.seed, device=self.device, network=net, progress=True,
                                  output_dir=self.path("unets", name), **self.segment)
            return self.predict(net, test_images)

        return self._cached(f"unet_{name}", compute)

    def stage1_on(self, pipe, images: torch.Tensor, labels: list[str], batch_size: int = 32) -> torch.Tensor:
        """M_pre of images that are not in a dataset split (the synthetic D'_s), with the same stage-1 step."""
        from foba_core.preliminary import Stage1Step

        step = Stage1Step(pipe, word=self.word, t0=self.t0, seed=self.seed)
        out = []
        for s in range(0, len(images), batch_size):
            items = [{"image": images[k], "caption": self._prompt(labels[k]), "label": labels[k],
                      "id": f"synthetic-{k}"} for k in range(s, min(s + batch_size, len(images)))]
            out.append(step(None, items)["m_pre"])
        return torch.cat(out)

    def synthesise(self, pipe, n: int, w: float, seed: int) -> tuple[torch.Tensor, list[str]]:
        """``n`` images synthesised with fg/bg guidance scale ``w``, and their object words (toy: all classes)."""
        from foba_core.guidance import sample_images
        from foba_core.toy.world import OBJECT_CLASSES

        kwargs = dict(scheduler=self.scheduler, num_inference_steps=self.inference_steps,
                      batch_size=self.sample_batch_size)
        if self.word is not None:
            return sample_images(pipe, n, w, self._prompt(self.word), seed=seed, **kwargs), [self.word] * n
        per_class = [n // len(OBJECT_CLASSES) + (k < n % len(OBJECT_CLASSES)) for k in range(len(OBJECT_CLASSES))]
        images, labels = [], []
        for k, (name, m) in enumerate(zip(OBJECT_CLASSES, per_class)):
            if m:
                images.append(sample_images(pipe, m, w, self._prompt(name), seed=seed + 1000 * k, **kwargs))
                labels += [name] * m
        return torch.cat(images), labels

    def synthetic(self, pipe) -> dict:
        """D'_s: images synthesised under y_f (w = 1) at the U-Net's resolution with their refined masks M (Sec. 3)."""
        def compute(start, stop):
            images, labels = self.synthesise(pipe, stop - start, 1.0, self.seed + 7 + start)
            m_pre = self.stage1_on(pipe, images, labels)
            masks = self._refine_batches(pipe, images, m_pre, offset=start)
            if self._unet_size() != self.size:
                images = torch.stack([resize_center_crop(x, self._unet_size()) for x in images])
            return {"images": images, "masks": self._to_unet_size(masks)}

        return self._chunked("synthetic", self.n_synthetic, compute)

    def feature_network(self):
        """The FID feature network: a TorchScript file, the toy network (trained once on toy images), or None."""
        from foba_core.fid import load_feature_network, train_toy_feature_network
        from foba_core.toy.world import ToyWorld

        if self.fid_network is None:
            return None
        if self.fid_network != TOY_FEATURES:
            return load_feature_network(self.fid_network, device=self.device)
        path = self.path("fid", "toy_feature_net.pt")
        if not os.path.exists(path):
            self._timed("feature_network", lambda: train_toy_feature_network(
                ToyWorld("train", size=20000, seed=self.seed + 1), steps=self.feature_steps, seed=self.seed,
                out_path=path, device=self.device))
        return load_feature_network(path, device=self.device)

    # ----------------------------------------------------------------- run
    def score(self, pred: torch.Tensor, test: Split) -> dict:
        """Scores of test masks (N, S, S): ACC / IoU / mIoU (%) with masks, box IoU (%) on box datasets."""
        if self.box_evaluation:
            return box_scores(pred, test.truth["boxes"])
        return segmentation_scores(pred, test.truth["masks"])

    def run(self) -> list[dict]:
        """Run every stage; write results.csv/.md, fid.csv, table3.csv/.md (real data) and the PNGs; return the rows."""
        from foba_core.diffusion import model_resolution
        from foba_core.guidance import guidance_strip
        from foba_core.models import load_pipeline

        start = time.perf_counter()
        self.check_settings()
        train_s1 = self.stage1("train", self.n_train)
        test_s1 = self.stage1("test", self.n_test)
        pipe = load_pipeline(self.finetune(), torch_dtype=self.dtype, device=self.device)
        self.size = model_resolution(pipe)
        train = self.split("train", self.n_train, train_s1)
        test = self.split("test", self.n_test, test_s1)
        scores, shown = {}, {}  # method -> scores; method -> its first test masks (for the grid)
        n_shown = min(8, len(test))

        def evaluate(method: str, pred: torch.Tensor) -> dict:
            scores[method], shown[method] = self.score(pred, test), pred[:n_shown]
            return scores[method]

        with self._stage("refine", {"scheduler": self.scheduler, "steps": self.inference_steps}) as log:
            ref_train = self.refine(pipe, train)
            evaluate("M_refined", self.refine(pipe, test))
            evaluate("M_crop", self.crop(test))
            log({"refine_seconds_per_image": self.refinement_speed()[1]})
        evaluate("M_pre", upsample_mask(test.m_pre, (self.size, self.size)))

        with self._stage("synthetic", {"n": self.n_synthetic, "w": 1.0}):
            synthetic = self.synthetic(pipe)

        train_images, test_images = self._unet_images(train), self._unet_images(test)
        truth = train.truth["masks"] if not self.box_evaluation else box_masks(train.truth["boxes"], self.size)
        ref_small = self._to_unet_size(ref_train)
        unet_labels = {
            "unet_M_pre": (train_images, self._to_unet_size(upsample_mask(train.m_pre, (self.size, self.size)))),
            "unet_M": (train_images, ref_small),
            "unet_M_plus_synthetic": (torch.cat([train_images, synthetic["images"]]),
                                      torch.cat([ref_small, synthetic["masks"]])),
            "unet_supervised": (train_images, self._to_unet_size(truth)),
        }
        for name, (images, labels) in unet_labels.items():
            with self._stage(name, {**self.segment, "n_train": len(images), "size": self._unet_size()}) as log:
                log(evaluate(name, self.train_unet(name, images, labels, test_images)))

        rows = [{"method": m, **scores[m]} for m in METHODS]
        fids = self.guidance(pipe, train)
        strip_word = self.word if self.word is not None else "star"
        guidance_strip(pipe, self.path("guidance_strip.png"), self._prompt(strip_word), seed=self.seed,
                       scheduler=self.scheduler, num_inference_steps=self.inference_steps,
                       batch_size=self.sample_batch_size)
        self.write(rows, fids, shown, test, len(train), time.perf_counter() - start)
        return rows

    def _features(self, net, images: torch.Tensor) -> dict:
        from foba_core.fid import BACKGROUND_CLASS, extract_features, object_score

        out = {"features": extract_features(net, images)}
        if BACKGROUND_CLASS in list(getattr(net, "classes", [])):
            out["object_score"] = object_score(net, images)
        return out

    def _paper_fid(self, w: float) -> float | None:
        if self.dataset in ("toy", "cub"):
            return PAPER_FID_CUB.get(w)
        return PAPER_TABLE3[self.dataset][0] if w == 1.0 else None

    def guidance(self, pipe, train: Split) -> list[dict]:
        """FID of synthesis at each w against real images, object scores (toy), and background samples (w = -1).

        Real images: the toy world's val split, or the training images D of a real dataset (at the model's
        resolution). Without a feature network the FID rows say ``FID_NOT_COMPUTED``.
        """
        from foba_core.diffusion import reconstruct
        from foba_core.fid import fid_label, frechet_distance, object_score
        from foba_core.metrics import feature_statistics
        from foba_core.toy.world import ToyWorld, toy_backgrounds

        net = self.feature_network()
        label = fid_label(net) if net is not None else ""
        paper_key = "paper_cub_fid" if self.dataset == "toy" else "paper_fid"
        rows = []
        with self._stage("guidance_fid", {"ws": self.fid_ws, "n": self.fid_samples, "features": label}) as log:
            if net is None:
                rows = [{"w": w, "fid": FID_NOT_COMPUTED, "features": label, paper_key: self._paper_fid(w)}
                        for w in self.fid_ws]
                n_backgrounds, scored = self.n_backgrounds, False
            else:
                if self.dataset == "toy":
                    world = ToyWorld("val", size=self.fid_samples, seed=self.seed)
                    n_real = self.fid_samples

                    def real_images(s, e):
                        return torch.stack([world[i]["image"] for i in range(s, e)])
                else:
                    n_real = min(self.fid_samples, len(train))

                    def real_images(s, e):
                        return self._load(train, s, e)
                real = self._chunked("fid_real", n_real, lambda s, e: self._features(net, real_images(s, e)))
                real_stats = feature_statistics(real["features"])

                def fid_row(w, computed: dict, paper) -> dict:
                    """fid.csv row of the images whose features (and object scores) ``computed`` holds."""
                    row = {"w": w, "fid": frechet_distance(*real_stats, *feature_statistics(computed["features"]))}
                    if "object_score" in computed:
                        row["object_score"] = float(computed["object_score"].mean())
                    return {**row, "features": label, paper_key: paper}

                # the same real images through the VAE alone: what the decoder lets any sample reach
                recon = self._chunked("fid_vae_reconstruction", n_real, lambda s, e: self._features(
                    net, reconstruct(pipe, real_images(s, e))))
                for w in self.fid_ws:
                    fake = self._chunked(f"fid_w{w:g}", self.fid_samples, lambda s, e, w=w: self._features(
                        net, self.synthesise(pipe, e - s, w, self.seed + s)[0]))
                    rows.append(fid_row(w, fake, self._paper_fid(w)))
                rows.append(fid_row(VAE_RECONSTRUCTION, recon, None))
                log({f"fid_w{r['w']}": r["fid"] for r in rows})
                scored = "object_score" in real
                n_backgrounds = max(self.n_backgrounds, 6 * 8) if scored else self.n_backgrounds
            backgrounds = self._cached("samples_w-1", lambda: self.synthesise(pipe, n_backgrounds, -1.0, self.seed)[0])
            if net is not None and scored:  # the toy feature network tells objects from backgrounds
                rows.append({"w": -1.0, "fid": float("nan"), "object_score": float(self._features(
                    net, backgrounds)["object_score"].mean()), "features": label, paper_key: None})
                rows.append({"w": "real", "fid": 0.0, "object_score": float(real["object_score"].mean()),
                             "features": label, paper_key: None})
                if self.dataset == "toy":  # what a perfect background sample (w = -1) scores after the decoder
                    rows.append({"w": VAE_BACKGROUNDS, "fid": float("nan"), "object_score": float(object_score(
                        net, reconstruct(pipe, toy_backgrounds(n_backgrounds, self.seed))).mean()),
                        "features": label, paper_key: None})
                log({f"object_score_w{r['w']}": r["object_score"] for r in rows})
        tiles = [to_uint8(_thumbnail(x)) for x in backgrounds[: self.n_backgrounds]]
        save_grid([tiles[i:i + 8] for i in range(0, len(tiles), 8)], self.path("backgrounds.png"))
        return rows

    def table3_row(self, rows: list[dict], fids: list[dict], n_train: int, n_test: int) -> dict:
        """Return this run's row of Table 3: FID of synthesis at w = 1 and the IoU (%) of the U-Net trained on D_s."""
        unet = next(r for r in rows if r["method"] == "unet_M")
        at_1 = [r for r in fids if r["w"] == 1.0]
        paper_fid, paper_iou = PAPER_TABLE3[self.dataset]
        return {
            "dataset": self.dataset,
            "fid": at_1[0]["fid"] if at_1 else "not computed (w = 1 not in fid_ws)",
            "iou": unet["box_iou"] if self.box_evaluation else unet["iou"],
            "paper_fid": paper_fid, "paper_iou": paper_iou,
            "iou_kind": "box IoU (union of the ground-truth boxes)" if self.box_evaluation else "pixel IoU",
            "fid_features": at_1[0]["features"] if at_1 else "", "fid_samples": self.fid_samples,
            "n_train": n_train, "n_test": n_test,
        }

    def refinement_speed(self) -> tuple[int, float]:
        """Return (images refined in this run, seconds per image of inpainting + Eq. 5; NaN when none)."""
        names = ("refine_train", "refine_test")
        n = sum(self.computed.get(k, 0) for k in names)
        return n, sum(self.timings.get(k, 0.0) for k in names) / n if n else float("nan")

    def refinement_throughput(self) -> str:
        """One line for results.md: refinement speed with its scheduler and step count."""
        n, seconds = self.refinement_speed()
        if not n:
            return "Refinement throughput: not measured (every refined mask was loaded from an earlier run)."
        return (f"Refinement throughput: {seconds:.3f} s per image ({n} images, {self.scheduler} with "
                f"{self.inference_steps} steps, batch {self.refine_batch_size}, on {self.device}).")

    def write(self, rows, fids, shown, test: Split, n_train: int, seconds: float) -> None:
        """Write the results table (CSV + Markdown next to the paper's numbers), FIDs, Table 3 and the mask grid."""
        write_csv(rows, self.path("results.csv"))
        write_csv(fids, self.path("fid.csv"))
        if self.box_evaluation:
            skipped = sum(b is None or len(b) == 0 for b in test.truth["boxes"])
            lines = ["| method | box IoU | best single-box IoU | paper (Table 3, U-Net on D_s) |", "|---|---|---|---|"]
            for r in rows:
                paper = f"{PAPER_TABLE3[self.dataset][1]:.1f}" if r["method"] == "unet_M" else ""
                lines.append(f"| {r['method']} | {r['box_iou']:.1f} | {r['box_iou_best']:.1f} | {paper} |")
            lines += ["", "Box IoU: the bounding box of each predicted mask against the box enclosing all ground-truth "
                          f"objects (best single object in the second column), {len(test) - skipped} test images"
                          + (f" ({skipped} without a box inside the centre crop skipped)." if skipped else ".")]
        else:
            lines = ["| method | ACC | IoU | mIoU | paper (CUB) ACC / IoU / mIoU |", "|---|---|---|---|---|"]
            for r in rows:
                paper = " / ".join(f"{v:.1f}" for v in PAPER_CUB[r["method"]])
                lines.append(f"| {r['method']} | {r['acc']:.1f} | {r['iou']:.1f} | {r['miou']:.1f} | {paper} |")
        if self.fid_network is None:
            lines += ["", "FID of synthesis: not computed (pass --fid_network <TorchScript Inception, "
                          "inception-2015-12-05.pt>); background samples (w = -1) are in backgrounds.png.", ""]
        else:
            title = fids[0]["features"] if self.fid_network == TOY_FEATURES else os.path.basename(self.fid_network)
            lines += ["", f"FID ({title}) of synthesis from the fine-tuned model, {self.fid_samples} samples:", ""]
        has_score = any("object_score" in r for r in fids)
        paper_key = "paper_cub_fid" if self.dataset == "toy" else "paper_fid"
        lines += ["| w | FID | object score | paper (CUB, Inception) |" if has_score else "| w | FID | paper |",
                  "|---|---|---|---|" if has_score else "|---|---|---|"]
        for r in fids:
            fid_text = _number(r["fid"], 2)
            paper = r[paper_key] if r[paper_key] is not None else ""
            lines.append(f"| {r['w']} | {fid_text} | {r['object_score']:.3f} | {paper} |" if has_score
                         else f"| {r['w']} | {fid_text} | {paper} |")
        lines += ["", self.refinement_throughput()]
        lines += ["", f"Stage timings (s): {', '.join(f'{k} {v:.0f}' for k, v in self.timings.items())}; "
                      f"total {seconds:.0f} s on {self.device}."]
        atomic_write(self.path("results.md"), lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
        write_json({"seconds": seconds, "timings": self.timings, "device": str(self.device),
                    "images_computed": self.computed}, self.path("timings.json"))
        if self.dataset != "toy":
            write_table3([self.table3_row(rows, fids, n_train, len(test))], self.out)
        self.write_grid(shown, test)
        print("\n".join(lines), flush=True)

    def write_grid(self, shown: dict, test: Split) -> None:
        """mask_grid.png: the first test images, their ground truth and the masks of each method."""
        order = ["M_pre", "M_crop", "M_refined", "unet_M", "unet_M_plus_synthetic", "unet_supervised"]
        images = self._load(test, 0, len(shown["M_pre"]))
        grid = []
        for i, image in enumerate(images):
            small = _thumbnail(image)
            if self.box_evaluation:
                scale = small.shape[-1] / self.size
                truth = draw_boxes(to_uint8(small), (test.truth["boxes"][i].float() * scale).tolist())
            else:
                truth = mask_overlay(small, test.truth["masks"][i], colour=(40, 255, 40))
            grid.append([to_uint8(small), truth] + [mask_overlay(small, shown[m][i]) for m in order])
        save_grid(grid, self.path("mask_grid.png"), column_titles=["image", "truth"] + order)


def _thumbnail(image: torch.Tensor) -> torch.Tensor:
    """The image (3, S, S) at most GRID_TILE pixels wide, for pictures."""
    return image if image.shape[-1] <= GRID_TILE else resize_center_crop(image, GRID_TILE)


def _number(value, digits: int) -> str:
    """A table cell: numbers rounded, NaN empty, text (e.g. FID_NOT_COMPUTED) as it is."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "" if math.isnan(value) else f"{value:.{digits}f}"


def write_table3(rows: list[dict], output_dir: str) -> list[dict]:
    """Write table3.csv (one row per dataset) and table3.md (the paper's Table 3 shape, next to its numbers)."""
    write_csv(rows, os.path.join(output_dir, "table3.csv"))
    by_dataset = {r["dataset"]: r for r in rows}
    head = "| | " + " | ".join(f"{TABLE3_TITLES[d]} FID ↓ | {TABLE3_TITLES[d]} IoU ↑" for d in PAPER_TABLE3) + " |"
    lines = [head, "|---" * (1 + 2 * len(PAPER_TABLE3)) + "|",
             "| Ours (paper, SD v1.4) | " + " | ".join(f"{f} | {i}" for f, i in PAPER_TABLE3.values()) + " |"]
    cells = []
    for d in PAPER_TABLE3:
        r = by_dataset.get(d)
        cells += [_number(r["fid"], 1), _number(r["iou"], 1)] if r else ["–", "–"]
    lines += ["| this implementation | " + " | ".join(cells) + " |", ""]
    for r in rows:
        features = f"{r['fid_features']}, {r['fid_samples']} samples" if r["fid_features"] else "no feature network"
        lines.append(f"- {TABLE3_TITLES[r['dataset']]}: {r['iou_kind']} of the U-Net trained on D_s "
                     f"({r['n_train']} training, {r['n_test']} test images); FID at w = 1 ({features}).")
    atomic_write(os.path.join(output_dir, "table3.md"), lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    return rows


def collect_table3(runs: list[str], output_dir: str) -> list[dict]:
    """Merge the table3.csv of several runs (one per dataset) into one Table 3 in ``output_dir``; return its rows."""
    import pandas as pd

    rows = []
    for run in runs:
        path = os.path.join(run, "table3.csv")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"missing {path}: run bundles/foba_natural/configs/pipeline.yaml with "
                                    f"--output_dir {run} first")
        rows += pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")
    seen = [r["dataset"] for r in rows]
    if len(set(seen)) != len(seen):
        raise ValueError(f"several runs report the same dataset ({seen}); pass one run per dataset")
    return write_table3(rows, output_dir)
