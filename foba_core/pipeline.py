"""The whole method on one dataset, stage by stage (paper Sec. 3-4, Tables 1-3), resumable.

``ConceptDistillation.run()`` executes, in order:

1. stage 1 on the training and test images (bundle config ``masks.yaml``): M̂ and M_pre;
2. fine-tuning on background inpainting + synthesis (bundle config ``finetune.yaml``);
3. refined masks M (Eq. 5-6) and the M_crop ablation;
4. segmentation U-Nets trained on M_pre, on M (D_s), on D_s ∪ D'_s and on ground truth;
5. foreground/background guidance: backgrounds (w = -1), synthetic D'_s, FID at several w;
6. the results table (Tables 1-2 shape), the FID table, a mask grid and background samples.

Bundle stages run as MONAI workflows (their engines get MLflow from ``--tracking mlflow``); the other
stages log one MLflow run each. Every stage keeps its output in ``output_dir`` and is skipped when
that output exists, so an interrupted pipeline resumes where it stopped.
"""

from __future__ import annotations

import os
import time

import torch

from foba_core import tracking
from foba_core.io import write_csv, write_json, write_torch
from foba_core.masks import upsample_mask
from foba_core.metrics import SegmentationAccumulator
from foba_core.visualize import mask_overlay, save_grid, to_uint8

METHODS = ("M_pre", "M_crop", "M_refined", "unet_M_pre", "unet_M", "unet_M_plus_synthetic", "unet_supervised")
PAPER_CUB = {  # Table 2 (CUB), ACC / IoU / mIoU in %
    "M_pre": (83.5, 29.0, 55.7), "M_crop": (90.0, 30.7, 60.0), "unet_M_pre": (91.7, 66.5, 78.2),
    "M_refined": (92.4, 63.6, 77.4), "unet_M": (95.2, 75.1, 84.8), "unet_M_plus_synthetic": (95.6, 77.2, 86.0),
    "unet_supervised": (97.9, 88.3, 93.0),
}
PAPER_FID_CUB = {1.0: 9.8, 3.0: 11.3, 7.5: 22.3}
BUNDLE_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundles", "foba_toy",
                              "configs")


def segmentation_scores(pred: torch.Tensor, target: torch.Tensor) -> dict:
    """Return pooled ACC / IoU / mIoU (%) of predicted masks (N, H, W) against ground truth."""
    acc = SegmentationAccumulator()
    acc.update(pred, target)
    s = acc.aggregate()
    return {"acc": 100 * s["acc"], "iou": 100 * s["iou"], "miou": 100 * s["miou"]}


class ConceptDistillation:
    """Runs every stage of the method on the toy world with a pretrained LDM; see the module docstring."""

    def __init__(self, output_dir: str, pretrained: str = "toy", pretrained_config: str | None = None,
                 n_train: int = 512, n_test: int = 256, t0: int = 40, seed: int = 0, finetune_steps: int = 400,
                 finetune_batch_size: int = 32, finetune_lr: float = 1e-4, scheduler: str = "DDIMScheduler",
                 inference_steps: int = 20, segment_steps: int = 500, segment_batch_size: int = 32,
                 segment_lr: float = 2e-3, segment_crop: int = 24, segment_channels=(16, 32, 64),
                 n_synthetic: int = 256, fid_samples: int = 256, fid_ws=(1.0, 3.0, 7.5), n_backgrounds: int = 16,
                 feature_steps: int = 600, device=None, experiment_name: str = "foba_toy_pipeline",
                 tracking_uri: str | None = None):
        self.out = os.path.abspath(output_dir)
        self.pretrained, self.pretrained_config = pretrained, pretrained_config
        self.n_train, self.n_test, self.t0, self.seed = int(n_train), int(n_test), int(t0), int(seed)
        self.finetune_steps, self.finetune_batch_size, self.finetune_lr = finetune_steps, finetune_batch_size, finetune_lr
        self.scheduler, self.inference_steps = scheduler, int(inference_steps)
        self.segment = dict(steps=segment_steps, batch_size=segment_batch_size, lr=segment_lr, crop=segment_crop)
        self.segment_channels = tuple(segment_channels)
        self.n_synthetic, self.fid_samples, self.fid_ws = int(n_synthetic), int(fid_samples), tuple(fid_ws)
        self.n_backgrounds, self.feature_steps = int(n_backgrounds), int(feature_steps)
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.experiment = experiment_name
        self.tracking = tracking.requested_tracking()
        self.uri = tracking.tracking_uri(self.out, tracking_uri)
        self.timings: dict[str, float] = {}

    # ----------------------------------------------------------------- helpers
    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def _stage(self, name: str, params: dict | None = None):
        return tracking.stage_run(name, self.uri, self.experiment, params)

    def _workflow(self, config: str, **overrides) -> None:
        """Run a bundle config of foba_toy as a MONAI workflow (with this run's --tracking)."""
        from monai.bundle import ConfigWorkflow

        kwargs = {"tracking": self.tracking} if self.uri and self.tracking else {}
        wf = ConfigWorkflow(config_file=os.path.join(BUNDLE_CONFIGS, config), workflow_type="infer", **kwargs,
                            **{k: v for k, v in overrides.items() if v is not None})
        wf.initialize()
        wf.run()
        wf.finalize()

    def _timed(self, name: str, fn):
        start = time.perf_counter()
        out = fn()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        return out

    def _images(self, split: str, n: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        from foba_core.data import open_dataset

        ds = open_dataset("toy", None, split=split, size=n)
        items = [ds[i] for i in range(len(ds))]
        return [it["id"] for it in items], torch.stack([it["image"] for it in items]), torch.stack([it["mask"] for it in items])

    def _cached(self, name: str, compute):
        path = self.path("stages", f"{name}.pt")
        if os.path.exists(path):
            return torch.load(path, map_location="cpu", weights_only=False)
        result = self._timed(name, compute)
        write_torch(result, path)
        return result

    # ----------------------------------------------------------------- stages
    def stage1(self, split: str, n: int) -> dict:
        """Stage 1 (masks.yaml) on ``n`` images of ``split``: returns the contents of its stage1.pt."""
        out = self.path(f"stage1_{split}")
        if not os.path.exists(os.path.join(out, "stage1.pt")):
            self._timed(f"stage1_{split}", lambda: self._workflow(
                "masks.yaml", output_dir=out, pretrained=self.pretrained, pretrained_config=self.pretrained_config,
                split=split, n_images=n, t0=self.t0, seed=self.seed, experiment_name=self.experiment))
        return torch.load(os.path.join(out, "stage1.pt"), map_location="cpu", weights_only=False)

    def finetune(self) -> str:
        """Fine-tune the LDM on background inpainting + synthesis (finetune.yaml); return the model folder m'."""
        out = self.path("finetune")
        model = os.path.join(out, "model")
        if not os.path.exists(os.path.join(model, "model_index.json")):
            self._timed("finetune", lambda: self._workflow(
                "finetune.yaml", output_dir=out, stage1=self.path("stage1_train", "stage1.pt"),
                pretrained=self.pretrained, pretrained_config=self.pretrained_config, max_steps=self.finetune_steps,
                batch_size=self.finetune_batch_size, lr=self.finetune_lr, seed=self.seed))
        return model

    def refine(self, pipe, name: str, images: torch.Tensor, m_pre: torch.Tensor, batch_size: int = 64) -> dict:
        """Refined masks M (Eq. 5-6) for ``images`` with the fine-tuned model; cached under stages/."""
        from foba_core.refine import refine_masks

        def compute():
            masks, filled = [], []
            for s in range(0, len(images), batch_size):
                m, f = refine_masks(pipe, images[s:s + batch_size], m_pre[s:s + batch_size], scheduler=self.scheduler,
                                    num_inference_steps=self.inference_steps, seed=self.seed + s)
                masks.append(m)
                filled.append(f)
            return {"masks": torch.cat(masks), "inpainted": torch.cat(filled)}

        return self._cached(f"refine_{name}", compute)

    def train_unet(self, name: str, images: torch.Tensor, masks: torch.Tensor, test_images: torch.Tensor) -> torch.Tensor:
        """Train one segmentation U-Net (supplement Sec. 1 recipe) and return its test predictions."""
        from foba_core.segment import predict_masks, segmentation_network, train_segmenter

        def compute():
            net = segmentation_network(channels=self.segment_channels, seed=self.seed)
            net = train_segmenter(images, masks, seed=self.seed, device=self.device, output_dir=self.path("unets", name),
                                  network=net, progress=True, **self.segment)
            return predict_masks(net, test_images)

        return self._cached(f"unet_{name}", compute)

    def stage1_on(self, pipe, images: torch.Tensor, captions: list[str], labels: list[str], batch_size: int = 32):
        """M_pre of images that are not in a dataset split (the synthetic D'_s), with the same stage-1 step."""
        from foba_core.preliminary import Stage1Step

        step = Stage1Step(pipe, t0=self.t0, seed=self.seed)
        out = []
        for s in range(0, len(images), batch_size):
            items = [{"image": images[k], "caption": captions[k], "label": labels[k], "id": f"synthetic-{k}"}
                     for k in range(s, min(s + batch_size, len(images)))]
            out.append(step(None, items)["m_pre"])
        return torch.cat(out)

    def synthesise(self, pipe, n: int, w: float, seed: int) -> tuple[torch.Tensor, list[str]]:
        """``n`` images synthesised with fg/bg guidance scale ``w``, spread evenly over the toy classes."""
        from foba_core.guidance import sample_images
        from foba_core.toy.world import OBJECT_CLASSES, object_prompt

        per_class = [n // len(OBJECT_CLASSES) + (k < n % len(OBJECT_CLASSES)) for k in range(len(OBJECT_CLASSES))]
        images, labels = [], []
        for k, (name, m) in enumerate(zip(OBJECT_CLASSES, per_class)):
            if m:
                images.append(sample_images(pipe, m, w, object_prompt(name), scheduler=self.scheduler,
                                            num_inference_steps=self.inference_steps, seed=seed + 1000 * k))
                labels += [name] * m
        return torch.cat(images), labels

    def feature_network(self):
        """The toy FID feature network (trained once on toy training images, TorchScript)."""
        from foba_core.fid import load_feature_network, train_toy_feature_network
        from foba_core.toy.world import ToyWorld

        path = self.path("fid", "toy_feature_net.pt")
        if not os.path.exists(path):
            self._timed("feature_network", lambda: train_toy_feature_network(
                ToyWorld("train", size=20000, seed=self.seed + 1), steps=self.feature_steps, seed=self.seed,
                out_path=path, device=self.device))
        return load_feature_network(path, device=self.device)

    # ----------------------------------------------------------------- run
    def run(self) -> list[dict]:
        """Run every stage; write results.csv/.md, fid.csv, mask_grid.png, backgrounds.png; return the table rows."""
        from foba_core.fid import fid, fid_label, object_score
        from foba_core.guidance import guidance_strip
        from foba_core.models import load_pipeline
        from foba_core.refine import crop_masks
        from foba_core.toy.world import object_prompt

        start = time.perf_counter()
        train = self.stage1("train", self.n_train)
        test = self.stage1("test", self.n_test)
        train_ids, train_images, train_gt = self._images("train", self.n_train)
        test_ids, test_images, test_gt = self._images("test", self.n_test)
        if train["ids"] != train_ids or test["ids"] != test_ids:
            raise RuntimeError(f"the stage-1 outputs in {self.out} belong to other images; use a new --output_dir")
        size = tuple(test_gt.shape[-2:])
        pipe = load_pipeline(self.finetune(), device=self.device)

        with self._stage("refine", {"scheduler": self.scheduler, "steps": self.inference_steps}) as log:
            ref_train = self.refine(pipe, "train", train_images, train["m_pre"])
            ref_test = self.refine(pipe, "test", test_images, test["m_pre"])
            crop = self._cached("crop_test", lambda: crop_masks(test_images, test["m_pre"])[0])
            per_image = self.timings.get("refine_test", float("nan")) / self.n_test
            log({"refine_seconds_per_image": per_image})
        masks = {
            "M_pre": upsample_mask(test["m_pre"], size), "M_crop": crop, "M_refined": ref_test["masks"],
        }

        with self._stage("synthetic", {"n": self.n_synthetic, "w": 1.0}):
            def make_synthetic():
                images, labels = self.synthesise(pipe, self.n_synthetic, 1.0, self.seed + 7)
                m_pre = self.stage1_on(pipe, images, [object_prompt(c) for c in labels], labels)
                return {"images": images, "labels": labels, "m_pre": m_pre,
                        "masks": self.refine(pipe, "synthetic", images, m_pre)["masks"]}
            synthetic = self._cached("synthetic", make_synthetic)

        unet_labels = {
            "unet_M_pre": (train_images, upsample_mask(train["m_pre"], size)),
            "unet_M": (train_images, ref_train["masks"]),
            "unet_M_plus_synthetic": (torch.cat([train_images, synthetic["images"]]),
                                      torch.cat([ref_train["masks"], synthetic["masks"]])),
            "unet_supervised": (train_images, train_gt),
        }
        for name, (images, labels) in unet_labels.items():
            with self._stage(name, {**self.segment, "n_train": len(images)}) as log:
                masks[name] = self.train_unet(name, images, labels, test_images)
                log(segmentation_scores(masks[name], test_gt))

        rows = [{"method": m, **segmentation_scores(masks[m], test_gt)} for m in METHODS]
        fids = self.guidance(pipe, fid, fid_label, object_score)
        guidance_strip(pipe, self.path("guidance_strip.png"), object_prompt("star"), seed=self.seed,
                       scheduler=self.scheduler, num_inference_steps=self.inference_steps)
        self.write(rows, fids, masks, test_images, test_gt, time.perf_counter() - start)
        return rows

    def guidance(self, pipe, fid, fid_label, object_score) -> list[dict]:
        """FID of synthesis at each w against real toy images, object scores, and background samples (w = -1)."""
        from foba_core.toy.world import ToyWorld

        net = self.feature_network()
        real = torch.stack([ToyWorld("val", size=self.fid_samples, seed=self.seed)[i]["image"] for i in range(self.fid_samples)])
        rows = []
        with self._stage("guidance_fid", {"ws": self.fid_ws, "n": self.fid_samples, "features": fid_label(net)}) as log:
            for w in self.fid_ws:
                fake = self._cached(f"samples_w{w:g}", lambda w=w: self.synthesise(pipe, self.fid_samples, w, self.seed)[0])
                rows.append({"w": w, "fid": fid(net, real, fake), "object_score": float(object_score(net, fake).mean()),
                             "features": fid_label(net), "paper_cub_fid": PAPER_FID_CUB.get(w)})
            backgrounds = self._cached("samples_w-1", lambda: self.synthesise(pipe, max(self.n_backgrounds, 6 * 8), -1.0,
                                                                             self.seed)[0])
            rows.append({"w": -1.0, "fid": float("nan"), "object_score": float(object_score(net, backgrounds).mean()),
                         "features": fid_label(net), "paper_cub_fid": None})
            rows.append({"w": "real", "fid": 0.0, "object_score": float(object_score(net, real).mean()),
                         "features": fid_label(net), "paper_cub_fid": None})
            log({f"fid_w{r['w']}": r["fid"] for r in rows[:len(self.fid_ws)]})
            log({f"object_score_w{r['w']}": r["object_score"] for r in rows})
        tiles = [to_uint8(x) for x in backgrounds[: self.n_backgrounds]]
        save_grid([tiles[i:i + 8] for i in range(0, len(tiles), 8)], self.path("backgrounds.png"))
        return rows

    def write(self, rows, fids, masks, test_images, test_gt, seconds: float) -> None:
        """Write the results table (CSV + Markdown next to the paper's CUB numbers), FIDs and the mask grid."""
        write_csv(rows, self.path("results.csv"))
        write_csv(fids, self.path("fid.csv"))
        lines = ["| method | ACC | IoU | mIoU | paper (CUB) ACC / IoU / mIoU |", "|---|---|---|---|---|"]
        for r in rows:
            paper = " / ".join(f"{v:.1f}" for v in PAPER_CUB[r["method"]])
            lines.append(f"| {r['method']} | {r['acc']:.1f} | {r['iou']:.1f} | {r['miou']:.1f} | {paper} |")
        lines += ["", f"FID ({fids[0]['features']}) of synthesis from the fine-tuned model, {self.fid_samples} samples:",
                  "", "| w | FID | object score | paper (CUB, Inception) |", "|---|---|---|---|"]
        for r in fids:
            fid_text = "" if r["fid"] != r["fid"] else f"{r['fid']:.2f}"
            lines.append(f"| {r['w']} | {fid_text} | {r['object_score']:.3f} | {r['paper_cub_fid'] or ''} |")
        lines += ["", f"Stage timings (s): {', '.join(f'{k} {v:.0f}' for k, v in self.timings.items())}; "
                      f"total {seconds:.0f} s on {self.device}."]
        from foba_core.io import atomic_write

        atomic_write(self.path("results.md"), lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
        write_json({"seconds": seconds, "timings": self.timings, "device": str(self.device)}, self.path("timings.json"))
        order = ["M_pre", "M_crop", "M_refined", "unet_M", "unet_M_plus_synthetic", "unet_supervised"]
        grid = [[to_uint8(test_images[i]), mask_overlay(test_images[i], test_gt[i], colour=(40, 255, 40))]
                + [mask_overlay(test_images[i], masks[m][i]) for m in order] for i in range(8)]
        save_grid(grid, self.path("mask_grid.png"), column_titles=["image", "truth"] + order)
        print("\n".join(lines), flush=True)
