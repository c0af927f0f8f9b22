"""Scoring the MS-CXR heat maps (paper Sec. 4, Fig. 9; supplement Sec. 8) and the per-disease report.

Each finding's M̂ is min-max normalised, bilinearly upsampled to the model-resolution box mask
(:func:`normalised_map`) and scored with pixel-wise AUC-ROC (:func:`score_finding`); beyond the paper, the
phrase-grounding metrics of BioViL and others on the same map (:func:`grounding_scores`, ``foba_med.grounding``:
CNR, mIoU, pointing game, centre-of-mass distance), the IoU of its 2- and 3-component GMM masks
(:func:`gmm_masks`) and the AUC of a word-agnostic centre prior (:func:`centre_prior`). ``CXREvalWriter`` is
the handler of the evaluation's MONAI ``Evaluator`` (``foba_med.evaluate``): it averages the scores per disease
and writes the tables, the Markdown report next to the published MS-CXR averages and the overlays.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

from foba_core.distributed import gather_to_rank0
from foba_core.io import atomic_write
from foba_core.masks import preliminary_masks, upsample_mask
from foba_core.metrics import auc_roc, foreground_iou
from foba_core.visualize import draw_boxes, heat_overlay, mask_overlay, save_grid, to_uint8
from foba_med.grounding import compute_cnr, compute_com_distance, compute_miou, compute_pointing_hit
from foba_med.mimic import CXRImageError

PAPER_MEAN_AUC = 79.6  # % pixel AUC-ROC, mean over the eight MS-CXR findings (paper Sec. 4)
# published MS-CXR averages for the report: (model, AUC-ROC %, CNR, mIoU, source)
REFERENCES = (
    ("Stable Diffusion fine-tuned on MIMIC-CXR", PAPER_MEAN_AUC, None, None,
     "Dombrowski et al., Foreground-Background Separation through Concept Distillation from Generative Image "
     "Foundation Models (the paper reproduced here)"),
    ("BioViL", None, 1.07, 0.229, "Boecking et al., Making the Most of Text Semantics to Improve Biomedical "
     "Vision-Language Processing, ECCV 2022"),
    ("BioViL-T", None, 1.33, 0.240, "Bannur et al., Learning to Exploit Temporal Structure for Biomedical "
     "Vision-Language Processing, CVPR 2023"),
)
GMM_COMPONENTS = (2, 3)
STATUSES = ("scored", "one_class_mask", "no_disease_word", "missing", "unreadable")
METRIC_COLUMNS = ("auc_roc", "iou_gmm2", "iou_gmm3", "auc_centre_prior", "auc_wrong_word")  # per image; per disease
# per image (pointing_acc: 1 or 0) and averaged per disease (foba_med.grounding)
GROUNDING_COLUMNS = ("cnr", "cnr_signed", "miou", "pointing_acc", "com_distance", "com_distance_rel")
# per disease: the means and population standard deviations (none for the fraction pointing_acc)
GROUNDING_DISEASE_COLUMNS = ("cnr", "cnr_std", "cnr_signed", "cnr_signed_std", "miou", "miou_std", "pointing_acc",
                             "com_distance", "com_distance_std", "com_distance_rel", "com_distance_rel_std")


def slug(category: str) -> str:
    """Return a file- and metric-name friendly form of a category ("Pleural Effusion" -> "pleural_effusion")."""
    return category.lower().replace(" ", "_")


def min_max(heat: torch.Tensor) -> torch.Tensor:
    """Return the heat map scaled to [0, 1] (instance-wise min-max normalisation; a constant map becomes 0)."""
    lo, hi = heat.min(), heat.max()
    return (heat - lo) / (hi - lo) if hi > lo else torch.zeros_like(heat)


def normalised_map(heat: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Return the heat map min-max normalised, then bilinearly upsampled to ``shape``: the map every score reads."""
    return F.interpolate(min_max(heat)[None, None], size=tuple(shape), mode="bilinear", align_corners=False)[0, 0]


def score_finding(heat: torch.Tensor, mask: torch.Tensor, image_id: str | None = None) -> float:
    """Return the pixel AUC-ROC of the min-max normalised heat map, bilinearly upsampled to the mask's size."""
    return auc_roc(normalised_map(heat, mask.shape), mask, image_id=image_id)


def grounding_scores(heat: torch.Tensor, mask: torch.Tensor, boxes: torch.Tensor) -> dict[str, float]:
    """Return the ``GROUNDING_COLUMNS`` of one finding: ``foba_med.grounding``'s metrics of :func:`normalised_map`
    against the box mask and the boxes (x1 y1 x2 y2, exclusive end, in the mask's pixels)."""
    up = normalised_map(heat, mask.shape)
    return {"cnr": compute_cnr(up, mask), "cnr_signed": compute_cnr(up, mask, signed=True),
            "miou": compute_miou(up, mask), "pointing_acc": compute_pointing_hit(up, mask),
            "com_distance": compute_com_distance(up, boxes),
            "com_distance_rel": compute_com_distance(up, boxes, relative=True)}


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
    auc_centre_prior, counts, then ``GROUNDING_DISEASE_COLUMNS``; a final ``mean`` row over the diseases),
    ``auc_per_disease.md`` (next to the paper's 79.6 and the published BioViL / BioViL-T CNR and mIoU),
    ``auc_per_token.csv``, ``per_image.csv`` (with ``GROUNDING_COLUMNS``, and a row, status and error for each
    finding whose image is missing or cannot be decoded; nothing is written, and CXRImageError raised, when no
    image could be decoded) and ``overlays/<disease>.png`` (image | M̂ | 2-GMM | 3-GMM, boxes drawn) for
    ``n_overlays`` images per disease; sets ``engine.state.metrics`` (flat keys) for MLflow. Under torchrun
    (``multi_gpu_evaluate.yaml``) each process scores its contiguous shard and rank 0 gathers the rows and
    overlays in dataset order and writes them: the same files as a single-process run.
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
        """Score one batch of records from :class:`CXREvalStep`; a record with a ``status`` (unread) is kept."""
        for rec in records:
            if "status" in rec:
                self.rows.append(dict(rec))
                continue
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
                if rec.get("heat_wrong_word") is not None:  # another finding's word in the same prompt and image
                    row["auc_wrong_word"] = score_finding(rec["heat_wrong_word"], mask, rec["id"])
                    row["control_prompt"] = rec["control_prompt"]
                m_pre = gmm_masks(rec["heat"], self.seed)
                for k, m in m_pre.items():
                    row[f"iou_gmm{k}"] = foreground_iou(upsample_mask(m, tuple(mask.shape)), mask)
                row.update(grounding_scores(rec["heat"], mask, rec["boxes"]))
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
        for col in ("status", "category_name", *METRIC_COLUMNS, *GROUNDING_COLUMNS):
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
                **{c: scored[c.removesuffix("_std")].std(ddof=0) if c.endswith("_std") else scored[c].mean()
                   for c in GROUNDING_DISEASE_COLUMNS},  # NaN scores (undefined) are skipped
            })
        per_disease = pd.DataFrame(rows, columns=["category_name", "n_images", "auc_roc", "auc_roc_std",
                                                  *METRIC_COLUMNS[1:], *[f"n_{s}" for s in STATUSES[1:]],
                                                  *GROUNDING_DISEASE_COLUMNS])
        mean = {"category_name": "mean", "n_images": int(per_disease["n_images"].sum()),
                **{c: per_disease[c].mean() for c in METRIC_COLUMNS}, "auc_roc_std": np.nan,
                **{f"n_{s}": int(per_disease[f"n_{s}"].sum()) for s in STATUSES[1:]},
                **{c: np.nan if c.endswith("_std") else per_disease[c].mean() for c in GROUNDING_DISEASE_COLUMNS}}
        per_disease = pd.concat([per_disease, pd.DataFrame([mean])], ignore_index=True)
        tokens = pd.DataFrame(self.token_rows, columns=["category_name", "token", "auc_roc"])
        per_token = (tokens.groupby(["category_name", "token"], sort=False)["auc_roc"].agg(["count", "mean"])
                     .reset_index().rename(columns={"count": "n_images", "mean": "auc_roc"})
                     .sort_values("category_name", kind="stable", ignore_index=True))  # tokens in prompt order
        return per_disease, per_token, per_image

    def metrics(self, per_disease: pd.DataFrame) -> dict[str, float]:
        """Return flat, finite metrics for ``engine.state.metrics`` / MLflow: per-disease and mean AUC, IoUs and
        grounding metrics (``<column>_<disease>``, e.g. ``cnr_edema``, ``cnr_std_edema``, ``miou_mean``)."""
        out = {}
        for row in per_disease.itertuples():
            name = slug(row.category_name)
            out.update({f"{c}_{name}": getattr(row, c) for c in (*METRIC_COLUMNS, *GROUNDING_DISEASE_COLUMNS)})
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
        unreadable = [r for r in self.rows if r["status"] == "unreadable"]
        if unreadable and all(r["status"] in ("missing", "unreadable") for r in self.rows):
            folder = os.path.commonpath([os.path.dirname(r["path"]) for r in unreadable])
            n_images = len({r["dicom_id"] for r in unreadable})
            raise CXRImageError(f"nothing to score: all {n_images} MS-CXR images on disk under {folder} cannot be "
                                f"decoded ({len(unreadable)} findings; {len(self.missing)} more have no image), e.g. "
                                f"{unreadable[0]['error']}")
        os.makedirs(self.output_dir, exist_ok=True)
        per_disease, per_token, per_image = self.tables()
        out = Path(self.output_dir)
        atomic_write(out / "auc_per_disease.csv", lambda p: per_disease.to_csv(p, index=False))
        atomic_write(out / "auc_per_token.csv", lambda p: per_token.to_csv(p, index=False))
        atomic_write(out / "per_image.csv", lambda p: per_image.to_csv(p, index=False))
        text = markdown_report(per_disease, per_token, per_image, self.settings)
        atomic_write(out / "auc_per_disease.md", lambda p: p.write_text(text, encoding="utf-8"))
        titles = ["image + boxes", "heat map M^", "M_pre 2-GMM", "M_pre 3-GMM"]
        for category, rows in self.overlays.items():
            if not rows:  # --n_overlays 0 (the length check above makes an empty entry per disease)
                continue
            save_grid(rows, str(out / "overlays" / f"{slug(category)}.png"), column_titles=titles)
        metrics = self.metrics(per_disease)
        if engine is not None:
            engine.state.metrics.update(metrics)
        print(per_disease.to_string(index=False, float_format=lambda v: f"{v:.4f}"), flush=True)
        return metrics


def _pct(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def _mean_std(mean: float, std: float, digits: int) -> str:
    """``mean ± std`` with ``digits`` decimals; the mean alone when the std is NaN (the mean row), n/a for NaN."""
    if mean is None or math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None and math.isfinite(std) else "")


def _reference(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown_report(per_disease: pd.DataFrame, per_token: pd.DataFrame, per_image: pd.DataFrame,
                    settings: dict | None = None) -> str:
    """Return the Markdown report: per-disease AUC-ROC (%), GMM IoUs and grounding metrics next to the paper's
    79.6 % mean, the published MS-CXR averages to read them against, and the findings left out because their
    image is missing or cannot be decoded."""
    lines = ["# MS-CXR disease localisation: pixel AUC-ROC of the finding's attention", ""]
    if settings:
        lines += [", ".join(f"{k}: `{v}`" for k, v in settings.items()), ""]
    lines += ["| finding | images | AUC-ROC (%) | centre prior AUC (%) | wrong-word AUC (%) | IoU 2-GMM (%) "
              "| IoU 3-GMM (%) | CNR | mIoU | pointing (%) | CoM distance, px (% of diagonal) "
              "| skipped: one class / no word |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in per_disease.itertuples():
        name = "**mean**" if row.category_name == "mean" else row.category_name
        lines.append(f"| {name} | {row.n_images} | {_pct(row.auc_roc)} | {_pct(row.auc_centre_prior)} "
                     f"| {_pct(row.auc_wrong_word)} "
                     f"| {_pct(row.iou_gmm2)} | {_pct(row.iou_gmm3)} | {_mean_std(row.cnr, row.cnr_std, 2)} "
                     f"| {_mean_std(row.miou, row.miou_std, 3)} | {_pct(row.pointing_acc)} "
                     f"| {_mean_std(row.com_distance, row.com_distance_std, 1)} ({_pct(row.com_distance_rel)}) "
                     f"| {row.n_one_class_mask} / {row.n_no_disease_word} |")
    lines.append(f"| paper (Stable Diffusion fine-tuned on MIMIC-CXR), mean of 8 | | {PAPER_MEAN_AUC} |" + " |" * 9)
    missing = int(per_disease.iloc[-1]["n_missing"])
    lines += ["", "The mean row averages the per-disease means (as the paper's mean over eight diseases); ± is the "
              "population standard deviation over a disease's findings. "
              "IoU: M_pre (GMM + 3x3 mean filter) against the box mask (`iou_gmm2` is the box IoU of the paper's "
              "GMM mask; no separate box IoU column); the 3-GMM keeps the brightest of three "
              "components (background, chest, finding), where the paper notes the 2-GMM fails. Centre prior: the "
              "AUC of a word-agnostic map (minus the distance to the image centre) on the same masks, a control for "
              "where the boxes lie. Wrong-word: the AUC, on the same boxes, of the map of another finding's word put "
              "in the finding's place in the same prompt (`control_prompt` in per_image.csv; `--wrong_word_control`), "
              "what the place alone earns.",
              "",
              "Grounding metrics (`foba_med.grounding`), all on the min-max normalised M̂ bilinearly upsampled to the "
              "box mask: CNR = |mu_in - mu_out| / sqrt(var_in + var_out) over the pixels inside vs outside the box "
              "mask (population variances; 0 for a constant map; the signed CNR, without the absolute value, is in "
              "the CSV); mIoU = the IoU of the map >= t with the box mask averaged over t = 0.1, 0.2, 0.3, 0.4, 0.5 "
              "(BioViL's mIoU, not the (IoU_fg + IoU_bg) / 2 of the paper's Tables 1-2; 0 for a constant map); "
              "pointing = the share of findings whose map maximum (the first in row-major order on ties) lies in "
              "the box mask; CoM distance = from the map-weighted centre of mass to the nearest box centre, in "
              "mask pixels and as % of the image diagonal (a constant map has none and is left out of it). "
              "Findings whose box mask covers the whole image or none of it are skipped (one class): CNR needs "
              "pixels on both sides."]
    if missing:
        lines += ["", f"{missing} finding(s) left out because their image is missing on disk (see per_image.csv)."]
    unreadable = per_image[per_image["status"] == "unreadable"]
    if len(unreadable):
        names = sorted(set(unreadable["dicom_id"]))
        lines += ["", f"{len(unreadable)} finding(s) left out because their image cannot be decoded: {len(names)} "
                  f"image(s), {', '.join(names)} (see per_image.csv)."]
    lines += ["", "## Published MS-CXR averages", "",
              "For orientation: other models, maps, resolutions and evaluation splits.", "",
              "| model | AUC-ROC (%) | CNR | mIoU | source |", "|---|---:|---:|---:|---|"]
    lines += [f"| {model} | {_reference(auc, 1)} | {_reference(cnr, 2)} | {_reference(miou, 3)} | {source} |"
              for model, auc, cnr, miou, source in REFERENCES]
    if len(per_token):
        lines += ["", "## Per sub-token AUC-ROC (%)", "", "| finding | token | images | AUC-ROC (%) |",
                  "|---|---|---:|---:|"]
        lines += [f"| {r.category_name} | `{r.token}` | {r.n_images} | {_pct(r.auc_roc)} |"
                  for r in per_token.itertuples()]
    return "\n".join(lines) + "\n"
