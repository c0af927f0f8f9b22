"""Disease localisation on MS-CXR (paper Sec. 4, Fig. 9; supplement Sec. 8): multi-token attention heat maps
scored with pixel-wise AUC-ROC against the findings' boxes, averaged per disease.

For every MS-CXR image and finding the prompt (the MS-CXR phrase, or the report's impression) is searched
for the words that express the finding (:func:`foba_med.vocabulary.find_disease_words`); ALL sub-tokens of
those words are captured and their maps summed (multi-token summation, supplement Sec. 8), giving
M̂ = sum_t sum_l sum_k psi_{z_t,l}[:, k] (Eq. 4 over the finding's tokens k). M̂ is min-max normalised per
image and scored against the union mask of the finding's boxes, mapped through exactly the resize and centre
crop that the image goes through (:func:`prepare_item`).

Beyond the paper: the same M̂ binarised by a 2-component GMM (the paper's M_pre) and by a 3-component GMM
keeping the brightest component (background / chest / finding), both scored by IoU against the box mask; the
AUC of each sub-token alone (which sub-token carries the finding); and a word-agnostic control, the AUC of a
centre prior (minus the distance to the image centre): findings sit mostly in the central chest, so an AUC
means localisation only where it beats that control.

``CXREvalStep`` is a MONAI ``Evaluator``'s ``iteration_update`` and ``CXREvalWriter`` its handler; the bundle
``bundles/foba_cxr/configs/evaluate.yaml`` wires them.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

from foba_core.capture import authors_timesteps, heat_maps, span_token_indices, token_weights
from foba_core.diffusion import encode_latents, model_resolution
from foba_core.distributed import gather_to_rank0
from foba_core.io import atomic_write
from foba_core.masks import preliminary_masks, upsample_mask
from foba_core.metrics import auc_roc, foreground_iou
from foba_core.models import encode_prompts, load_pipeline
from foba_core.transforms import ResizeCenterCropd
from foba_core.visualize import draw_boxes, heat_overlay, mask_overlay, save_grid, to_uint8
from foba_med.ms_cxr import MSCXRDataset, _find_image
from foba_med.phantom import STAMP_FILE, write_phantom_mimic
from foba_med.vocabulary import find_disease_words

logger = logging.getLogger(__name__)

PAPER_MEAN_AUC = 79.6  # % pixel AUC-ROC, mean over the eight MS-CXR findings (paper Sec. 4)
TRAIN_COMMAND = "python -m monai.bundle run --config_file bundles/foba_cxr/configs/train.yaml"
GMM_COMPONENTS = (2, 3)
STATUSES = ("scored", "one_class_mask", "no_disease_word", "missing")
METRIC_COLUMNS = ("auc_roc", "iou_gmm2", "iou_gmm3", "auc_centre_prior")  # per image; averaged per disease


def slug(category: str) -> str:
    """Return a file- and metric-name friendly form of a category ("Pleural Effusion" -> "pleural_effusion")."""
    return category.lower().replace(" ", "_")


def load_model(model_dir: str, torch_dtype=torch.float32, device="cpu"):
    """Return the report-conditioned LDM of ``model_dir`` ("toy": the toy LDM before CXR fine-tuning)."""
    if model_dir != "toy" and not Path(model_dir).expanduser().exists():
        raise FileNotFoundError(f"fine-tuned model {model_dir} not found; train it first with `{TRAIN_COMMAND}`, or "
                                "pass --model_dir <a diffusers SD folder> (--model_dir toy: the toy LDM before CXR "
                                "fine-tuning)")
    return load_pipeline(model_dir, torch_dtype=torch_dtype, device=device)


def ensure_phantom(mimic_dir: str, phantom_dir: str, params: dict | None = None) -> Path:
    """Return ``mimic_dir``; when it is ``phantom_dir`` and holds no phantom yet, write the phantom world there."""
    mimic_dir = Path(mimic_dir)
    if mimic_dir.resolve() == Path(phantom_dir).resolve() and not (mimic_dir / STAMP_FILE).is_file():
        logger.warning("no phantom world in %s: generating it (foba_med.phantom.write_phantom_mimic)", mimic_dir)
        write_phantom_mimic(mimic_dir, **(params or {}))
    return mimic_dir


@dataclass
class FindingSet:
    """The MS-CXR findings whose images are on disk (``dataset``) and those whose images are not (``missing``)."""

    dataset: torch.utils.data.Dataset
    missing: list[dict]


def open_findings(ms_cxr_csv: str, mimic_dir: str, split: str = "all", prompt: str = "label_text",
                  reports_dir: str | None = None, image_format: str = "auto") -> FindingSet:
    """Return the MS-CXR findings of ``split`` with their images on disk, and the missing ones by name.

    Missing images are logged by name and counted; it is an error only when every image is missing.
    """
    ds = MSCXRDataset(ms_cxr_csv, mimic_dir, split=split, prompt=prompt, reports_dir=reports_dir,
                      image_format=image_format)
    if len(ds) == 0:
        raise ValueError(f"{ms_cxr_csv} has no findings in split {split!r}; choose --split train|val|test|all")
    present, missing = [], []
    for index, finding in enumerate(ds.findings):
        try:
            _find_image(ds.mimic_dir, finding, ds.image_format)
            present.append(index)
        except FileNotFoundError as err:
            missing.append({"id": f"{finding.dicom_id}__{slug(finding.category_name)}", "dicom_id": finding.dicom_id,
                            "category_name": finding.category_name, "split": finding.split,
                            "prompt": finding.caption, "status": "missing", "error": str(err)})
    if missing:
        names = sorted({m["dicom_id"] for m in missing})
        logger.warning("%d of %d MS-CXR images (%d findings) are missing under %s and are left out: %s",
                       len(names), len({f.dicom_id for f in ds.findings}), len(missing), mimic_dir, ", ".join(names))
    if not present:
        raise FileNotFoundError(f"none of the {len(ds)} MS-CXR findings has its image under {mimic_dir} "
                                f"(first tried: {missing[0]['error']}); is --mimic_dir the folder holding files/?")
    return FindingSet(torch.utils.data.Subset(ds, present), missing)


def finding_tokens(tokenizer, prompt: str, category: str, fallback_all_tokens: bool = False) -> tuple[list[int], str]:
    """Return (token indices, source): ALL sub-tokens of the finding's words in the prompt (multi-token summation).

    ``source`` is "disease_words", "all_tokens" (no disease word and ``fallback_all_tokens``: every prompt
    token), "none" (no disease word) or "truncated" (the words lie beyond the tokenizer's length).
    """
    spans = find_disease_words(prompt, category)
    idx = span_token_indices(tokenizer, prompt, spans)
    if idx:
        return idx, "disease_words"
    if fallback_all_tokens:
        idx = span_token_indices(tokenizer, prompt, [(0, len(prompt))])
        if idx:
            return idx, "all_tokens"
    return [], "truncated" if spans else "none"


def finding_seed(seed: int, finding_id: str) -> int:
    """Return the q_sample noise seed of one (image, finding): independent of batching and split selection."""
    return (int(seed) * 1_000_003 + zlib.crc32(finding_id.encode())) % 2**31


def min_max(heat: torch.Tensor) -> torch.Tensor:
    """Return the heat map scaled to [0, 1] (instance-wise min-max normalisation; a constant map becomes 0)."""
    lo, hi = heat.min(), heat.max()
    return (heat - lo) / (hi - lo) if hi > lo else torch.zeros_like(heat)


def prepare_item(item: dict, size: int, channels: int = 3) -> dict:
    """Return the model input of one MS-CXR item: image (channels, size, size), its box mask and boxes, same crop.

    One geometry for the three (``ResizeCenterCropd``): the radiograph area-averaged (bilinear when enlarged),
    the mask by nearest neighbour, the boxes mapped (those cropped away entirely are dropped).
    """
    geometry = ResizeCenterCropd(keys=("image", "mask", "boxes"), size=size, image_mode="area")
    out = geometry({key: item[key] for key in ("image", "mask", "boxes")})
    image = out["image"].clamp(0, 1).expand(channels, -1, -1)  # grayscale replicated
    return {"image": image, "mask": out["mask"], "boxes": out["boxes"]}


class CXREvalStep:
    """``iteration_update``: a list of MS-CXR items -> the finding's summed heat map M̂ and its per-token maps.

    Each item's output holds ``heat`` (h, w) at latent resolution (None when the prompt names no disease word
    and there is no fallback), ``token_maps`` (k, h, w) one per sub-token, ``tokens`` (their strings) and
    ``token_source`` (see :func:`finding_tokens`), plus the model-resolution image, mask and boxes.
    """

    def __init__(self, pipe, t0: int = 40, timesteps: list[int] | None = None, seed: int = 0,
                 image_size: int | None = None, fallback_all_tokens: bool = False, budget_bytes: float | None = None):
        self.pipe, self.seed, self.budget = pipe, int(seed), budget_bytes
        self.fallback_all_tokens = bool(fallback_all_tokens)
        n_train = pipe.scheduler.config.num_train_timesteps
        self.timesteps = list(timesteps) if timesteps is not None else authors_timesteps(t0, n_train)
        self.size = int(image_size) if image_size is not None else model_resolution(pipe)

    def __call__(self, engine: Engine | None, items: list[dict]) -> dict:
        pipe = self.pipe
        prepared = [prepare_item(it, self.size, pipe.vae.config.in_channels) for it in items]
        records = []
        for it, prep in zip(items, prepared):
            idx, source = finding_tokens(pipe.tokenizer, it["caption"], it["category_name"], self.fallback_all_tokens)
            max_length = pipe.tokenizer.model_max_length
            if source != "disease_words":
                logger.warning("%s: no %s word within the first %d tokens of the prompt %r%s", it["id"],
                               it["category_name"], max_length, it["caption"], "; using all prompt tokens" if idx
                               else "; left out (--fallback_all_tokens uses all prompt tokens instead)")
            ids = pipe.tokenizer(it["caption"], truncation=True, max_length=max_length)["input_ids"]
            tokens = pipe.tokenizer.convert_ids_to_tokens([ids[i] for i in idx])
            records.append({**{k: it[k] for k in ("id", "dicom_id", "category_name", "split")}, **prep,
                            "prompt": it["caption"], "token_source": source, "token_index": idx, "tokens": tokens,
                            "heat": None, "token_maps": None})
        todo = [r for r in records if r["token_index"]]
        if todo:
            z0 = encode_latents(pipe, torch.stack([r["image"] for r in todo]))  # (B, C, h, w)
            hidden, key_mask = encode_prompts(pipe, [r["prompt"] for r in todo], device=z0.device)  # (B, L, D)
            for b, rec in enumerate(todo):
                idx = rec["token_index"]
                # target 0: all sub-tokens summed (supplement Sec. 8); targets 1..k: each sub-token alone
                targets = [idx] + ([[i] for i in idx] if len(idx) > 1 else [])
                weights = token_weights([targets], hidden.shape[1]).to(z0.device)  # (1, L, n)
                maps = heat_maps(pipe.unet, pipe.scheduler, z0[b:b + 1], hidden[b:b + 1].to(z0.dtype), weights,
                                 text_mask=None if key_mask is None else key_mask[b:b + 1],
                                 timesteps=self.timesteps, seed=finding_seed(self.seed, rec["id"]),
                                 budget_bytes=self.budget).total[0].float().cpu()  # (n, h, w)
                rec["heat"] = maps[0]
                rec["token_maps"] = maps[1:] if len(idx) > 1 else maps[:1]
        return {"records": records}


def score_finding(heat: torch.Tensor, mask: torch.Tensor, image_id: str | None = None) -> float:
    """Return the pixel AUC-ROC of the min-max normalised heat map, bilinearly upsampled to the mask's size."""
    up = F.interpolate(min_max(heat)[None, None], size=tuple(mask.shape), mode="bilinear", align_corners=False)[0, 0]
    return auc_roc(up, mask, image_id=image_id)


def centre_prior(height: int, width: int) -> torch.Tensor:
    """Return the word-agnostic control heat map (H, W): minus each pixel's distance to the image centre."""
    yy, xx = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    return -torch.hypot(yy - height / 2, xx - width / 2)


def gmm_masks(heat: torch.Tensor, seed: int = 0) -> dict[int, torch.Tensor]:
    """Return M_pre (h, w) of the heat map for each GMM size: 2 components (the paper's) and 3 (brightest kept)."""
    return {k: preliminary_masks(min_max(heat)[None], random_state=seed, n_components=k)[0] for k in GMM_COMPONENTS}


def _overlay_row(image: torch.Tensor, heat: torch.Tensor, m_pre: dict[int, torch.Tensor], boxes: torch.Tensor,
                 min_side: int = 128) -> list[np.ndarray]:
    """Tiles image | M̂ | each M_pre, enlarged (nearest) to at least ``min_side`` so that the drawn boxes stay thin."""
    factor = max(1, math.ceil(min_side / image.shape[-1]))
    big = image.repeat_interleave(factor, -1).repeat_interleave(factor, -2)  # (C, H*f, W*f)
    tiles = [to_uint8(big), heat_overlay(big, heat)] + [mask_overlay(big, m) for m in m_pre.values()]
    return [draw_boxes(t, boxes * factor) for t in tiles]


class CXREvalWriter:
    """Handler: scores each (image, finding), averages per disease and writes the outputs into ``output_dir``.

    Writes ``auc_per_disease.csv`` (category_name, n_images, auc_roc, auc_roc_std, iou_gmm2, iou_gmm3,
    auc_centre_prior, counts; a final ``mean`` row over the diseases), ``auc_per_disease.md`` (next to the
    paper's 79.6), ``auc_per_token.csv``, ``per_image.csv`` and ``overlays/<disease>.png`` (image | M̂ | 2-GMM |
    3-GMM, boxes drawn) for ``n_overlays`` images per disease; sets ``engine.state.metrics`` (flat keys) for
    MLflow. Under torchrun (``multi_gpu_evaluate.yaml``) each process scores its contiguous shard and rank 0
    gathers the rows and overlays in dataset order and writes them: the same files as a single-process run.
    """

    def __init__(self, output_dir: str, missing: list[dict] | None = None, n_overlays: int = 4, seed: int = 0,
                 settings: dict | None = None):
        self.output_dir, self.missing, self.n_overlays = str(output_dir), list(missing or []), int(n_overlays)
        self.seed, self.settings = int(seed), dict(settings or {})
        self.reset()

    def reset(self) -> None:
        """Forget all scored findings."""
        self.rows: list[dict] = [dict(m) for m in self.missing]
        self.token_rows: list[dict] = []
        self.overlays: dict[str, list[list[np.ndarray]]] = defaultdict(list)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: self.update(e.state.output["records"]))
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def update(self, records: list[dict]) -> None:
        """Score one batch of records from :class:`CXREvalStep`."""
        for rec in records:
            mask = rec["mask"]
            row = {k: rec[k] for k in ("id", "dicom_id", "category_name", "split", "prompt", "token_source")}
            row.update(tokens=" ".join(rec["tokens"]), mask_fraction=float(mask.float().mean()))
            if rec["heat"] is None:
                row["status"] = "no_disease_word"
            elif mask.all() or not mask.any():
                warnings.warn(f"{rec['id']}: the finding's box mask has one class only after the resize/crop to "
                              f"{tuple(mask.shape)} (foreground fraction {row['mask_fraction']:.2f}); skipped",
                              stacklevel=2)
                row["status"] = "one_class_mask"
            else:
                row["status"] = "scored"
                row["auc_roc"] = score_finding(rec["heat"], mask, rec["id"])
                row["auc_centre_prior"] = auc_roc(centre_prior(*mask.shape), mask, rec["id"])
                m_pre = gmm_masks(rec["heat"], self.seed)
                for k, m in m_pre.items():
                    row[f"iou_gmm{k}"] = foreground_iou(upsample_mask(m, tuple(mask.shape)), mask)
                per_token = []
                for token, tmap in zip(rec["tokens"], rec["token_maps"]):
                    auc = score_finding(tmap, mask, rec["id"])
                    per_token.append(f"{token}={auc:.4f}")
                    self.token_rows.append({"category_name": rec["category_name"], "token": token, "auc_roc": auc})
                row["per_token_auc"] = " ".join(per_token)
                if len(self.overlays[rec["category_name"]]) < self.n_overlays:
                    self.overlays[rec["category_name"]].append(_overlay_row(rec["image"], rec["heat"], m_pre,
                                                                            rec["boxes"]))
            self.rows.append(row)

    def tables(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """Return (per-disease table with a final ``mean`` row, per-token table, per-image table)."""
        per_image = pd.DataFrame(self.rows)
        for col in ("status", "category_name", *METRIC_COLUMNS):
            if col not in per_image:
                per_image[col] = np.nan
        rows = []
        for category, group in per_image.groupby("category_name", sort=True):
            scored = group[group["status"] == "scored"]
            rows.append({
                "category_name": category, "n_images": len(scored), "auc_roc": scored["auc_roc"].mean(),
                "auc_roc_std": scored["auc_roc"].std(ddof=0),
                **{c: scored[c].mean() for c in METRIC_COLUMNS[1:]},
                **{f"n_{s}": int((group["status"] == s).sum()) for s in STATUSES[1:]},
            })
        per_disease = pd.DataFrame(rows, columns=["category_name", "n_images", "auc_roc", "auc_roc_std",
                                                  *METRIC_COLUMNS[1:], *[f"n_{s}" for s in STATUSES[1:]]])
        mean = {"category_name": "mean", "n_images": int(per_disease["n_images"].sum()),
                **{c: per_disease[c].mean() for c in METRIC_COLUMNS}, "auc_roc_std": np.nan,
                **{f"n_{s}": int(per_disease[f"n_{s}"].sum()) for s in STATUSES[1:]}}
        per_disease = pd.concat([per_disease, pd.DataFrame([mean])], ignore_index=True)
        tokens = pd.DataFrame(self.token_rows, columns=["category_name", "token", "auc_roc"])
        per_token = (tokens.groupby(["category_name", "token"], sort=False)["auc_roc"].agg(["count", "mean"])
                     .reset_index().rename(columns={"count": "n_images", "mean": "auc_roc"})
                     .sort_values("category_name", kind="stable", ignore_index=True))  # tokens in prompt order
        return per_disease, per_token, per_image

    def metrics(self, per_disease: pd.DataFrame) -> dict[str, float]:
        """Return flat, finite metrics for ``engine.state.metrics`` / MLflow: per-disease and mean AUC and IoUs."""
        out = {}
        for row in per_disease.itertuples():
            name = slug(row.category_name)
            out.update({f"{c}_{name}": getattr(row, c) for c in METRIC_COLUMNS})
            out[f"n_images_{name}"] = float(row.n_images)
        for status in STATUSES[1:]:
            out[f"n_{status}"] = float(per_disease.iloc[-1][f"n_{status}"])
        return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}

    def gather(self) -> bool:
        """Collect every process's rows and overlays on rank 0, in dataset order; return whether this is rank 0."""
        parts = gather_to_rank0([(self.rows[len(self.missing):], self.token_rows, dict(self.overlays))])
        if parts is None:
            return False
        self.reset()
        for rows, token_rows, overlays in parts:
            self.rows += rows
            self.token_rows += token_rows
            for category, tiles in overlays.items():
                self.overlays[category] += tiles[:self.n_overlays - len(self.overlays[category])]
        return True

    def write(self, engine: Engine | None = None) -> dict[str, float]:
        """Write every output file, set ``engine.state.metrics`` and print the per-disease table; return the metrics.

        Every process calls it; only rank 0 writes (the others return no metrics).
        """
        if not self.gather():
            return {}
        os.makedirs(self.output_dir, exist_ok=True)
        per_disease, per_token, per_image = self.tables()
        out = Path(self.output_dir)
        atomic_write(out / "auc_per_disease.csv", lambda p: per_disease.to_csv(p, index=False))
        atomic_write(out / "auc_per_token.csv", lambda p: per_token.to_csv(p, index=False))
        atomic_write(out / "per_image.csv", lambda p: per_image.to_csv(p, index=False))
        text = markdown_report(per_disease, per_token, self.settings)
        atomic_write(out / "auc_per_disease.md", lambda p: p.write_text(text, encoding="utf-8"))
        titles = ["image + boxes", "heat map M^", "M_pre 2-GMM", "M_pre 3-GMM"]
        for category, rows in self.overlays.items():
            save_grid(rows, str(out / "overlays" / f"{slug(category)}.png"), column_titles=titles)
        metrics = self.metrics(per_disease)
        if engine is not None:
            engine.state.metrics.update(metrics)
        print(per_disease.to_string(index=False, float_format=lambda v: f"{v:.4f}"), flush=True)
        return metrics


def _pct(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def markdown_report(per_disease: pd.DataFrame, per_token: pd.DataFrame, settings: dict | None = None) -> str:
    """Return the Markdown report: per-disease AUC-ROC (%) and GMM IoUs next to the paper's 79.6 % mean."""
    lines = ["# MS-CXR disease localisation: pixel AUC-ROC of the finding's attention", ""]
    if settings:
        lines += [", ".join(f"{k}: `{v}`" for k, v in settings.items()), ""]
    lines += ["| finding | images | AUC-ROC (%) | centre prior AUC (%) | IoU 2-GMM (%) | IoU 3-GMM (%) "
              "| skipped: one class / no word |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in per_disease.itertuples():
        name = "**mean**" if row.category_name == "mean" else row.category_name
        lines.append(f"| {name} | {row.n_images} | {_pct(row.auc_roc)} | {_pct(row.auc_centre_prior)} "
                     f"| {_pct(row.iou_gmm2)} | {_pct(row.iou_gmm3)} "
                     f"| {row.n_one_class_mask} / {row.n_no_disease_word} |")
    lines.append(f"| paper (Stable Diffusion fine-tuned on MIMIC-CXR), mean of 8 | | {PAPER_MEAN_AUC} | | | | |")
    missing = int(per_disease.iloc[-1]["n_missing"])
    lines += ["", "The mean row averages the per-disease means (as the paper's mean over eight diseases). "
              "IoU: M_pre (GMM + 3x3 mean filter) against the box mask; the 3-GMM keeps the brightest of three "
              "components (background, chest, finding), where the paper notes the 2-GMM fails. Centre prior: the "
              "AUC of a word-agnostic map (minus the distance to the image centre) on the same masks, a control for "
              "where the boxes lie."]
    if missing:
        lines += ["", f"{missing} finding(s) left out because their image is missing on disk (see per_image.csv)."]
    if len(per_token):
        lines += ["", "## Per sub-token AUC-ROC (%)", "", "| finding | token | images | AUC-ROC (%) |",
                  "|---|---|---:|---:|"]
        lines += [f"| {r.category_name} | `{r.token}` | {r.n_images} | {_pct(r.auc_roc)} |"
                  for r in per_token.itertuples()]
    return "\n".join(lines) + "\n"


def settings_summary(model_dir: str, split: str, prompt: str, t0: int, timesteps, seed: int,
                     fallback_all_tokens: bool) -> dict:
    """Return the run settings shown at the top of the Markdown report."""
    return {"model": model_dir, "split": split, "prompt": prompt,
            "timesteps": f"T0={t0} (authors' grid)" if timesteps is None else list(timesteps), "seed": seed,
            "fallback_all_tokens": bool(fallback_all_tokens)}

