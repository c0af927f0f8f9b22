"""Experiments on M̂ and M_pre beyond the main job (configs/experiments/): several concepts in one prompt
(paper Fig. 10), thresholds on M̂ chosen with labels instead of the label-free GMM (Sec. 4, Table 2 text), and the
robustness of M_pre to the prompt (supplement Sec. 6, Fig. 5).

Pure functions score tensors; one small class per experiment reads the cached images (``foba_core.splits``) or
stage 1's outputs, writes ``<name>.csv``, ``<name>.png`` and ``metrics.json`` into its stage folder and keeps the
metrics for MLflow (``foba_core.stages.Stage``). Ground truth is the pixel mask where the data set has one and the
box mask (``foba_core.outputs.box_masks``) where it has boxes only (``box_evaluation``).
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_curve

from foba_core.capture import token_indices
from foba_core.io import write_csv, write_json
from foba_core.masks import normalise, preliminary_masks, upsample_mask
from foba_core.metrics import SegmentationAccumulator, accuracy, auc_roc, foreground_iou
from foba_core.outputs import box_masks, segmentation_scores
from foba_core.preliminary import image_heat_maps, stage1_timesteps
from foba_core.seeds import derive_seed
from foba_core.validate import integer, number
from foba_core.visualize import heat_overlay, mask_overlay, save_grid, save_plot, to_uint8

GT_COLOUR = (40, 255, 40)  # ground truth in every overlay grid, as in stage 1's


def fill(template: str, word: str) -> str:
    """Return ``template`` with ``{word}`` replaced by the object word (e.g. "a photo of a {word}" -> y_f)."""
    return template.replace("{word}", word)


def first_items(split, n: int, word: str | None) -> tuple[list[dict], list[str]]:
    """Return the first ``n`` items of a split and their object words (``word``, or each item's label)."""
    items = [split[i] for i in range(n)]
    return items, [word if word is not None else it["label"] for it in items]


def word_heat_maps(pipe, image: torch.Tensor, prompt: str, words: list[str], image_id: str, timesteps: list[int],
                   seed: int = 0, budget_bytes: float | None = None) -> torch.Tensor:
    """Return M̂ (n_words, h, w) of one image (3, S, S) in [0, 1] for each word of ``prompt`` (Eq. 4).

    One ``heat_maps`` call with one target per word: every word reads the same T0 draws of z_t, whose noise is
    seeded by ``derive_seed(seed, "q_sample", image_id)`` as in stage 1, so prompt y_f with its object word gives
    stage 1's M̂ of that image exactly.
    """
    targets = token_indices(pipe.tokenizer, prompt, words)
    maps = image_heat_maps(pipe, image, prompt, targets, timesteps, derive_seed(seed, "q_sample", image_id),
                           budget_bytes=budget_bytes)
    return maps.total[0].float().cpu()  # (n_words, h, w)


def ground_truth(split, box_evaluation: bool, images: range | None = None) -> torch.Tensor:
    """Return the ground truth (n, S, S) bool of the ``images`` (indices; None: all) of a split
    (``splits.SplitImages``): their masks, or their box masks with ``box_evaluation``."""
    images = range(len(split)) if images is None else images
    if box_evaluation:
        boxes = split.boxes()
        return box_masks([boxes[i] for i in images], split.size)
    masks = [split[i]["mask"] for i in images]
    if any(m is None for m in masks):
        raise ValueError(f"the {split.split} split has no ground-truth masks; a data set with boxes only is scored "
                         "against its box masks with box_evaluation: true (configs/datasets/dogs.yaml)")
    return torch.stack(masks)


def at_size(heat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Return maps (N, h, w) resized bilinearly to the ground truth's ``size`` (H, W), as stage 1 scores M̂."""
    return F.interpolate(heat[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def metric_key(text: str) -> str:
    """Return ``text`` as an MLflow metric-name part: runs of other characters than letters and digits as '_'."""
    return re.sub(r"[^0-9A-Za-z]+", "_", text).strip("_")


# ---- 4. Several concepts in one prompt (Fig. 10) ------------------------------------------------------------------

def concept_scores(heat: torch.Tensor, truth: torch.Tensor) -> dict:
    """Return the AUC-ROC of each word's M̂ against the object's ground truth: per-image mean and pooled.

    ``heat`` (N, n_words, h, w) are the words' maps, ``truth`` (N, H, W) the object's masks; maps are min-max
    normalised per image and resized to the masks. Images whose mask has one class only are left out of the mean.
    Returns {"auc": (n_words,) per-image means, "auc_pooled": (n_words,)}.
    """
    n, n_words = heat.shape[:2]
    per_image = np.full((n, n_words), math.nan)
    pooled = np.full(n_words, math.nan)
    for k in range(n_words):
        maps = at_size(normalise(heat[:, k]), truth.shape[-2:])  # (N, H, W)
        for i in range(n):
            if truth[i].any() and not truth[i].all():
                per_image[i, k] = auc_roc(maps[i], truth[i])
        pooled[k] = auc_roc(maps, truth)
    valid = ~np.isnan(per_image)
    means = np.array([per_image[valid[:, k], k].mean() if valid[:, k].any() else math.nan for k in range(n_words)])
    return {"auc": means, "auc_pooled": pooled}


class ConceptsExperiment:
    """Fig. 10: one heat map M̂ per concept word of one prompt naming the object and other concepts.

    For the first ``n_images`` images of ``split`` the prompt ``prompt`` (``{word}``: the object word, ``word``
    or each item's ``label``) is encoded once and the maps of all ``words`` come from one ``heat_maps`` call.
    A word is the object word when it names the object (its template, filled, is the item's object word); its
    AUC-ROC is against the ground truth. The other words have no ground truth of their own: their AUC is against
    the object's mask too (column ``auc_vs_object_mask``), so a word that localises the surroundings scores < 0.5.
    Writes ``concepts.csv`` (one row per word), ``concepts.png`` (image | one heat overlay per word | ground truth,
    one row per image of the first ``n_rows``) and ``metrics.json`` into ``folder``.
    """

    def __init__(self, pipe, split, folder: str, prompt: str, words: list[str], word: str | None = None,
                 n_images: int = 64, t0: int = 40, timesteps: list[int] | None = None, seed: int = 0,
                 box_evaluation: bool = False, n_rows: int = 8):
        if not words or len(set(words)) != len(words):
            raise ValueError(f"--concept_words must be a non-empty list of distinct words, got {words!r}")
        self.pipe, self.split, self.folder, self.word = pipe, split, folder, word
        self.prompt, self.words = prompt, list(words)
        self.n = min(integer(n_images, "concept_images"), len(split))
        self.timesteps = stage1_timesteps(pipe, t0, timesteps)
        self.seed, self.box_evaluation, self.n_rows = int(seed), bool(box_evaluation), int(n_rows)
        self.metrics: dict = {}

    def run(self) -> None:
        items, objects = first_items(self.split, self.n, self.word)
        heat = torch.stack([
            word_heat_maps(self.pipe, it["image"], fill(self.prompt, obj), [fill(w, obj) for w in self.words],
                           it["id"], self.timesteps, self.seed)
            for it, obj in zip(items, objects)])  # (N, n_words, h, w)
        truth = ground_truth(self.split, self.box_evaluation, range(self.n))
        scores = concept_scores(heat, truth)
        rows = []
        for k, template in enumerate(self.words):
            is_object = all(fill(template, obj) == obj for obj in objects)
            rows.append({"word": template, "role": "object" if is_object else "other",
                         "auc_vs_object_mask": float(scores["auc"][k]),
                         "auc_vs_object_mask_pooled": float(scores["auc_pooled"][k]), "n_images": self.n})
            kind = "auc" if is_object else "auc_vs_object_mask"
            self.metrics[f"{kind}_{metric_key(template)}"] = float(scores["auc"][k])
        os.makedirs(self.folder, exist_ok=True)
        write_csv(rows, os.path.join(self.folder, "concepts.csv"))
        write_json({"prompt": self.prompt, "words": self.words, **self.metrics},
                   os.path.join(self.folder, "metrics.json"))
        grid = [[to_uint8(it["image"])] + [heat_overlay(it["image"], m) for m in maps]
                + [mask_overlay(it["image"], gt, colour=GT_COLOUR)]
                for it, maps, gt in zip(items[:self.n_rows], heat, truth)]
        shown = objects[:self.n_rows]  # one object word for every row: titles name it, else they keep {word}
        words = [fill(w, shown[0]) if len(set(shown)) == 1 else w for w in self.words]
        titles = ["image"] + [f"M^ {w}" for w in words] + ["ground truth"]
        save_grid(grid, os.path.join(self.folder, "concepts.png"), column_titles=titles)


# ---- 5. Thresholds instead of the GMM (Sec. 4, Table 2 text) ------------------------------------------------------

def threshold_at_tpr(scores, target, tpr: float = 0.95) -> float:
    """Return the highest threshold t whose mask ``scores >= t`` reaches a true-positive rate >= ``tpr`` (pixels)."""
    _, tpr_curve, thresholds = roc_curve(np.ravel(target), np.ravel(scores), drop_intermediate=False)
    return float(thresholds[np.argmax(tpr_curve >= tpr)])  # TPR rises as t falls: the first point that reaches it


def accuracy_optimal_threshold(scores, target) -> float:
    """Return the threshold t that maximises the pixel accuracy of the mask ``scores >= t`` (inf: all background)."""
    target = np.ravel(target).astype(bool)
    fpr, tpr, thresholds = roc_curve(target, np.ravel(scores), drop_intermediate=False)
    positives = target.sum()
    correct = tpr * positives + (1 - fpr) * (target.size - positives)  # TP + TN at every threshold
    return float(thresholds[np.argmax(correct)])


class ThresholdsExperiment:
    """Sec. 4: the GMM of M_pre against two thresholds on M̂ that labels choose, applied to the test split.

    Stage 1's M̂ (``stage1_dir/<split>/stage1.pt``) are min-max normalised per image (M_pre's input, Sec. 4) and
    resized bilinearly to the ground truth. On the first ``threshold_images`` training images (reserved, with
    their ground truth) two thresholds are chosen on the pooled pixels: (a) the highest one reaching a 95 %
    true-positive rate, (b) the accuracy-optimal one. Both are applied to every test image's map and scored, pooled,
    next to stage 1's M_pre (GMM + 3x3 mean filter, nearest-upsampled) of the same images. Writes
    ``thresholds.csv`` (method, threshold, acc, iou, miou, tpr; %), ``thresholds.png`` (the reserved images' ROC
    curve with both operating points and the GMM's) and ``metrics.json`` into ``folder``.
    """

    def __init__(self, train, test, stage1_dir: str, folder: str, threshold_images: int = 100, tpr: float = 0.95,
                 box_evaluation: bool = False, chunk: int = 64):
        self.train, self.test, self.stage1_dir, self.folder, self.chunk = train, test, stage1_dir, folder, int(chunk)
        self.n = integer(threshold_images, "threshold_images", 1, len(train))  # at most --n_train
        self.tpr = number(tpr, "threshold_tpr", 0, 1, open_low=True)
        self.box_evaluation = bool(box_evaluation)
        self.metrics: dict = {}

    def _stage1(self, split) -> dict:
        path = os.path.join(self.stage1_dir, split.split, "stage1.pt")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist: stage 1 must run on the {split.split} split "
                                    "(--splits [train, test], the default)")
        out = torch.load(path, map_location="cpu", weights_only=True)
        if list(out["ids"]) != split.ids:
            raise ValueError(f"{path} holds other images than OUT/images/{split.split}: rerun stage 1")
        return out

    def run(self) -> None:
        train, test = self._stage1(self.train), self._stage1(self.test)
        truth_train = ground_truth(self.train, self.box_evaluation, range(self.n)).numpy()  # (n, H, W)
        size = truth_train.shape[-2:]
        reserved = at_size(normalise(train["heatmaps"][:self.n]), size).numpy()  # (n, H, W)
        chosen = {"tpr95": threshold_at_tpr(reserved, truth_train, self.tpr),
                  "max_acc": accuracy_optimal_threshold(reserved, truth_train)}
        scores = {name: SegmentationAccumulator() for name in (*chosen, "gmm")}
        for start in range(0, len(self.test), self.chunk):  # test images in chunks: maps at mask size are large
            stop = min(start + self.chunk, len(self.test))
            truth = ground_truth(self.test, self.box_evaluation, range(start, stop))
            maps = at_size(normalise(test["heatmaps"][start:stop]), size)  # (B, H, W)
            for name, t in chosen.items():
                scores[name].update(maps >= t, truth)
            scores["gmm"].update(upsample_mask(test["m_pre"][start:stop], tuple(size)), truth)
        rows = []
        labels = {"tpr95": f"threshold_tpr{100 * self.tpr:g}", "max_acc": "threshold_max_acc", "gmm": "gmm_M_pre"}
        for name, acc in scores.items():
            s = acc.aggregate()
            tp, _, fn, _ = acc.get_buffer().sum(dim=0).tolist()
            row = {"acc": 100 * s["acc"], "iou": 100 * s["iou"], "miou": 100 * s["miou"],
                   "tpr": 100 * tp / max(tp + fn, 1)}
            rows.append({"method": labels[name], "threshold": chosen.get(name, math.nan), **row})
            self.metrics.update({f"{k}_{name}": v for k, v in row.items()})
        self.metrics.update({f"threshold_{k}": v for k, v in chosen.items()})
        os.makedirs(self.folder, exist_ok=True)
        write_csv(rows, os.path.join(self.folder, "thresholds.csv"))
        write_json({"threshold_images": self.n, "test_images": len(self.test), **self.metrics},
                   os.path.join(self.folder, "metrics.json"))
        gmm_reserved = upsample_mask(train["m_pre"][:self.n], tuple(size)).numpy()
        self._plot(reserved, truth_train, chosen, gmm_reserved, os.path.join(self.folder, "thresholds.png"))

    def _plot(self, scores: np.ndarray, truth: np.ndarray, chosen: dict, gmm: np.ndarray, path: str) -> None:
        """Draw the reserved images' pixel ROC curve with the operating points of both thresholds and the GMM's."""
        truth = truth.astype(bool)
        fpr, tpr, _ = roc_curve(truth.ravel(), scores.ravel())

        def point(mask: np.ndarray) -> tuple[float, float]:
            return (mask & ~truth).sum() / max((~truth).sum(), 1), (mask & truth).sum() / max(truth.sum(), 1)

        def draw(ax) -> None:
            ax.plot(fpr, tpr, color="black", lw=1, label=rf"$\hat{{M}}$ (pooled AUC {auc_roc(scores, truth):.3f})")
            for name, marker, label in (("tpr95", "o", f"{100 * self.tpr:g} % TPR threshold"),
                                        ("max_acc", "s", "accuracy-optimal threshold")):
                ax.plot(*point(scores >= chosen[name]), marker, ms=8, label=f"{label} ({chosen[name]:.3f})")
            ax.plot(*point(gmm), "^", ms=8, label="GMM M_pre (per image)")
            ax.set_xlabel("false-positive rate (pixels)")
            ax.set_ylabel("true-positive rate (pixels)")
            ax.set_title(rf"normalised $\hat{{M}}$, {len(scores)} reserved training images", fontsize=9)
            ax.legend(fontsize=7, loc="lower right")

        save_plot(draw, path, figsize=(4.5, 4.5))


# ---- 6. Prompt robustness (supplement Sec. 6, Fig. 5) -------------------------------------------------------------

def prompt_agreement(m_pre_a: torch.Tensor, m_pre_b: torch.Tensor) -> dict:
    """Return the per-image IoU and pixel agreement of two sets of masks (N, h, w) and their means."""
    iou = np.array([foreground_iou(a, b) for a, b in zip(m_pre_a, m_pre_b, strict=True)])
    agree = np.array([accuracy(a, b) for a, b in zip(m_pre_a, m_pre_b, strict=True)])
    return {"iou": iou, "agreement": agree, "mean_iou": float(iou.mean()), "mean_agreement": float(agree.mean())}


class PromptsExperiment:
    """Supplement Sec. 6 (Fig. 5): M_pre of the same images under two prompts, compared with each other and with
    the ground truth.

    For the first ``n_images`` images of ``split``, M̂ of the object word under ``prompt_a`` and under ``prompt_b``
    (templates; ``{word}``: ``word`` or each item's ``label``), each with stage 1's q_sample noise of that image,
    and their M_pre (GMM + 3x3 mean filter). Writes ``prompts.csv`` (rows: each prompt against the ground truth,
    pooled ACC / IoU / mIoU %; and M_pre A against M_pre B, per-image mean IoU and pixel agreement %),
    ``per_image.csv``, ``prompts.png`` (image | M_pre A | M_pre B | ground truth, first ``n_rows`` images) and
    ``metrics.json`` into ``folder``.
    """

    def __init__(self, pipe, split, folder: str, prompt_a: str, prompt_b: str, word: str | None = None,
                 n_images: int = 128, t0: int = 40, timesteps: list[int] | None = None, seed: int = 0,
                 box_evaluation: bool = False, n_rows: int = 8):
        for name, template in (("prompt_a", prompt_a), ("prompt_b", prompt_b)):
            if "{word}" not in template:
                raise ValueError(f"--{name} must name the object as {{word}}, got {template!r}")
        self.pipe, self.split, self.folder, self.prompts, self.word = pipe, split, folder, (prompt_a, prompt_b), word
        self.n = min(integer(n_images, "prompt_images"), len(split))
        self.timesteps = stage1_timesteps(pipe, t0, timesteps)
        self.seed, self.box_evaluation, self.n_rows = int(seed), bool(box_evaluation), int(n_rows)
        self.metrics: dict = {}

    def run(self) -> None:
        items, objects = first_items(self.split, self.n, self.word)
        m_pre = []
        for template in self.prompts:
            heat = torch.cat([word_heat_maps(self.pipe, it["image"], fill(template, obj), [obj], it["id"],
                                             self.timesteps, self.seed) for it, obj in zip(items, objects)])
            m_pre.append(preliminary_masks(heat, random_state=self.seed))  # (N, h, w), as stage 1 makes M_pre
        truth = ground_truth(self.split, self.box_evaluation, range(self.n))
        up = [upsample_mask(m, tuple(truth.shape[-2:])) for m in m_pre]
        agreement = prompt_agreement(*m_pre)
        rows = []
        for name, template, mask in zip("ab", self.prompts, up):
            s = segmentation_scores(mask, truth)
            rows.append({"comparison": f"M_pre {name.upper()} vs ground truth", "prompt": template, "acc": s["acc"],
                         "iou": s["iou"], "miou": s["miou"]})
            self.metrics.update({f"acc_{name}": s["acc"], f"iou_{name}": s["iou"], f"miou_{name}": s["miou"]})
        rows.append({"comparison": "M_pre A vs M_pre B (per-image mean)", "prompt": " | ".join(self.prompts),
                     "acc": 100 * agreement["mean_agreement"], "iou": 100 * agreement["mean_iou"]})
        self.metrics.update({"iou_a_b": 100 * agreement["mean_iou"],
                             "agreement_a_b": 100 * agreement["mean_agreement"]})
        os.makedirs(self.folder, exist_ok=True)
        write_csv(rows, os.path.join(self.folder, "prompts.csv"))
        write_csv([{"id": it["id"], "iou_a_b": float(i), "agreement_a_b": float(a)}
                   for it, i, a in zip(items, agreement["iou"], agreement["agreement"])],
                  os.path.join(self.folder, "per_image.csv"))
        write_json({"prompt_a": self.prompts[0], "prompt_b": self.prompts[1], "n_images": self.n, **self.metrics},
                   os.path.join(self.folder, "metrics.json"))
        grid = [[to_uint8(it["image"]), mask_overlay(it["image"], a), mask_overlay(it["image"], b),
                 mask_overlay(it["image"], gt, colour=GT_COLOUR)]
                for it, a, b, gt in zip(items[:self.n_rows], m_pre[0], m_pre[1], truth)]
        save_grid(grid, os.path.join(self.folder, "prompts.png"),
                  column_titles=["image", "M_pre, prompt A", "M_pre, prompt B", "ground truth"])
