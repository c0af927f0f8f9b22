"""Phrase-grounding metrics of a heat map against a finding's boxes, beside pixel AUC-ROC (MS-CXR).

Pure functions in MONAI's ``compute_*`` style. ``heat`` is a (H, W) map already at the resolution of the box
mask (``foba_med.scoring`` passes the min-max normalised M̂, bilinearly upsampled to the mask); ``mask`` is the
bool (or 0/1) (H, W) union of the finding's boxes; boxes are (N, 4) x1 y1 x2 y2 with exclusive end, in the
pixels of that mask (pixel (row i, column j) covers [j, j + 1) x [i, i + 1), its centre is (j + 0.5, i + 0.5)).

Definitions:

- CNR (contrast-to-noise ratio) and mIoU follow Boecking et al., "Making the Most of Text Semantics to Improve
  Biomedical Vision-Language Processing", ECCV 2022 (BioViL), also used by Bannur et al., "Learning to Exploit
  Temporal Structure for Biomedical Vision-Language Processing", CVPR 2023 (BioViL-T);
- the pointing game follows Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016;
- the centre-of-mass distance is the distance between the map's intensity-weighted centroid and the nearest
  box centre.

A metric that is undefined for its input (no pixel inside or no pixel outside the box for CNR, an empty box
mask, no box, an all-zero map for the centre of mass) is NaN, as ``foba_core.metrics.auc_roc`` is NaN on a
one-class mask; pandas' means and standard deviations skip it.
"""

from __future__ import annotations

import math

import torch

from foba_core.metrics import foreground_iou

MIOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)  # BioViL's thresholds on the [0, 1] map


def _map_and_mask(heat, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """``heat`` as float64 and ``mask`` as bool, both (H, W) of one shape and ``heat`` finite, or ValueError."""
    heat, mask = torch.as_tensor(heat).double(), torch.as_tensor(mask)
    if heat.ndim != 2 or heat.shape != mask.shape:
        raise ValueError(f"heat map {tuple(heat.shape)} and box mask {tuple(mask.shape)} must be (H, W) of one shape; "
                         "upsample the map to the mask first")
    if not torch.isfinite(heat).all():
        raise ValueError("the heat map holds non-finite values")
    if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
        raise ValueError("the box mask must be bool (or 0/1)")
    return heat, mask.bool()


def compute_cnr(heat, mask, signed: bool = False) -> float:
    """Return the contrast-to-noise ratio of the map inside vs outside the box mask (BioViL, ECCV 2022).

    CNR = |mu_in - mu_out| / sqrt(sigma_in^2 + sigma_out^2), with the means and population variances of the
    pixels inside (``mask``) and outside it; ``signed=True`` drops the absolute value (the signed CNR that the
    BioViL authors' follow-up evaluation code reports), so a map brighter outside the box is negative. A
    constant map has contrast and noise 0: its CNR is 0. A map constant inside and constant outside with
    different values (noise 0, contrast not 0) separates perfectly: +-inf. NaN when the mask has no pixel
    inside (empty) or none outside (covers the image): one of the two regions is missing.
    """
    heat, mask = _map_and_mask(heat, mask)
    if mask.all() or not mask.any():
        return math.nan
    inside, outside = heat[mask], heat[~mask]
    if inside.min() == inside.max() and outside.min() == outside.max():  # noise 0, tested exactly (float means
        contrast = float(inside[0] - outside[0])  # of equal values can differ from them by ~1e-17)
        if contrast == 0:
            return 0.0
        return math.copysign(math.inf, contrast) if signed else math.inf
    contrast = float(inside.mean() - outside.mean())
    noise = math.sqrt(float(inside.var(correction=0) + outside.var(correction=0)))
    return (contrast if signed else abs(contrast)) / noise


def compute_miou(heat, mask, thresholds: tuple[float, ...] = MIOU_THRESHOLDS) -> float:
    """Return BioViL's mIoU (ECCV 2022): the IoU of ``heat >= t`` with the box mask, averaged over ``t``.

    ``heat`` is expected in [0, 1] (the min-max normalised map); the thresholds are BioViL's 0.1 ... 0.5. This is
    not the (IoU_fg + IoU_bg) / 2 of ``foba_core.metrics.mean_iou``. A threshold that no pixel reaches (e.g. an
    all-zero map, what ``min_max`` makes of a constant one) gives IoU 0. NaN for an empty box mask.
    """
    heat, mask = _map_and_mask(heat, mask)
    if not mask.any():
        return math.nan
    return sum(foreground_iou(heat >= t, mask) for t in thresholds) / len(thresholds)


def compute_pointing_hit(heat, mask) -> float:
    """Return 1.0 if the map's maximum lies inside the box mask, else 0.0 (the pointing game, Zhang et al. 2016).

    Ties: the first pixel attaining the maximum in row-major order (``torch.argmax``) decides. Averaged over
    findings this is the pointing accuracy. NaN for an empty box mask.
    """
    heat, mask = _map_and_mask(heat, mask)
    if not mask.any():
        return math.nan
    return float(mask.flatten()[heat.flatten().argmax()])


def compute_com_distance(heat, boxes, relative: bool = False) -> float:
    """Return the distance in pixels from the map's centre of mass to the nearest box centre.

    The centre of mass weighs each pixel centre (j + 0.5, i + 0.5) by its map value (non-negative; the min-max
    normalised map); a box x1 y1 x2 y2 (exclusive end) has its centre at ((x1 + x2) / 2, (y1 + y2) / 2). With
    several boxes the nearest centre counts. ``relative=True`` divides by the map's diagonal sqrt(H^2 + W^2).
    NaN when the map sums to 0 (no centre of mass: the all-zero map ``min_max`` makes of a constant one) or
    when there is no box.
    """
    heat = torch.as_tensor(heat).double()
    if heat.ndim != 2:
        raise ValueError(f"the heat map must be (H, W), got shape {tuple(heat.shape)}")
    if not torch.isfinite(heat).all() or (heat < 0).any():
        raise ValueError("centre of mass: the heat map must be finite and non-negative (min-max normalise it first)")
    boxes = torch.as_tensor(boxes).double().reshape(-1, 4)
    total = float(heat.sum())
    if total == 0 or len(boxes) == 0:
        return math.nan
    height, width = heat.shape
    y = float((heat.sum(1) * (torch.arange(height, dtype=torch.float64) + 0.5)).sum()) / total
    x = float((heat.sum(0) * (torch.arange(width, dtype=torch.float64) + 0.5)).sum()) / total
    centres_x, centres_y = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    distance = float(torch.hypot(centres_x - x, centres_y - y).min())
    return distance / math.hypot(height, width) if relative else distance
