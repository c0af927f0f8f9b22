"""Evaluation metrics of the paper: pixel AUC-ROC of heat maps, ACC / IoU / mIoU of masks
(Tables 1-2), box IoU (Table 3 for Dogs, Cars, Human3.6m) and the Fréchet distance behind FID.

Pure functions on tensors or arrays, plus accumulators in MONAI's ``Cumulative`` style:
``update`` per image, ``aggregate`` for the data set, ``reset`` to start again.

Conventions: a prediction or target mask is bool (or 0/1) of shape (H, W); boxes are
(x1, y1, x2, y2) in pixels with exclusive end. Two empty masks agree perfectly: their IoU is 1.0.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from monai.data.box_utils import box_iou as _pairwise_box_iou
from monai.metrics import Cumulative
from scipy.linalg import LinAlgWarning, sqrtm
from sklearn.metrics import roc_auc_score


def _numpy(x) -> np.ndarray:
    """``x`` as a numpy array (tensors are detached and moved to the CPU)."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _as_mask(x, name: str) -> np.ndarray:
    """``x`` as a bool array; refuses values other than 0/1 so that scores are never cast silently."""
    a = _numpy(x)
    if a.dtype != bool:
        if not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name} must be a bool (or 0/1) mask; got values other than 0/1 - threshold it first")
        a = a.astype(bool)
    return a


def _mask_pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    p, t = _as_mask(pred, "pred"), _as_mask(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target differ in shape: {p.shape} vs {t.shape}; resize with nearest neighbour")
    if p.size == 0:
        raise ValueError("pred and target are empty arrays")
    return p, t


def auc_roc(scores, target, image_id: str | None = None) -> float:
    """Return the pixel-wise AUC-ROC of a heat map against a mask (nan if the mask has one class only).

    Pixels whose score is not finite are left out. A single-class target has no ROC curve: the
    function warns (naming ``image_id``) and returns nan.
    """
    s, t = _numpy(scores).astype(np.float64).ravel(), _as_mask(target, "target").ravel()
    if s.shape != t.shape:
        raise ValueError(f"scores and target hold {s.size} and {t.size} pixels; resize the heat map to the mask")
    keep = np.isfinite(s)
    s, t = s[keep], t[keep]
    if t.all() or not t.any():
        where = f" of image {image_id!r}" if image_id is not None else ""
        warnings.warn(f"auc_roc: the target{where} has one class only; AUC-ROC is undefined (nan)", stacklevel=2)
        return float("nan")
    return float(roc_auc_score(t, s))


def confusion_counts(pred, target) -> tuple[int, int, int, int]:
    """Return the pixel counts (TP, FP, FN, TN) of a predicted foreground mask against the target."""
    p, t = _mask_pair(pred, target)
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    return tp, fp, fn, p.size - tp - fp - fn


def _iou(inter: int, union: int) -> float:
    return 1.0 if union == 0 else inter / union  # nothing predicted, nothing there: perfect agreement


def _segmentation_scores(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """ACC, foreground IoU, background IoU and mIoU from confusion counts."""
    fg, bg = _iou(tp, tp + fp + fn), _iou(tn, tn + fp + fn)
    return {"acc": (tp + tn) / (tp + fp + fn + tn), "iou": fg, "iou_bg": bg, "miou": (fg + bg) / 2}


def accuracy(pred, target) -> float:
    """Return the pixel accuracy ACC = (TP + TN) / #pixels."""
    return _segmentation_scores(*confusion_counts(pred, target))["acc"]


def foreground_iou(pred, target) -> float:
    """Return the foreground IoU = TP / (TP + FP + FN); 1.0 when both masks are empty."""
    return _segmentation_scores(*confusion_counts(pred, target))["iou"]


def mean_iou(pred, target) -> float:
    """Return mIoU = (IoU_fg + IoU_bg) / 2 (paper Tables 1-2)."""
    return _segmentation_scores(*confusion_counts(pred, target))["miou"]


def mask_to_box(mask) -> torch.Tensor | None:
    """Return the bounding box (4,) int64 x1 y1 x2 y2 (exclusive end) of a mask; None if it is empty."""
    if mask is None:
        return None
    m = _as_mask(mask, "mask")
    if m.ndim != 2:
        raise ValueError(f"mask_to_box: expected a (H, W) mask, got shape {m.shape}")
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        return None
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.int64)


def _boxes(boxes, name: str) -> torch.Tensor:
    """``boxes`` as an (N, 4) tensor (dtype kept), checked for x1 <= x2 and y1 <= y2."""
    if boxes is None:
        raise ValueError(f"{name} is None; expected boxes x1 y1 x2 y2 of shape (4,) or (N, 4)")
    b = torch.as_tensor(_numpy(boxes))
    if b.numel() == 0:
        return b.reshape(0, 4)
    if b.ndim > 2 or b.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (4,) or (N, 4), got {tuple(b.shape)}")
    b = b.reshape(-1, 4)
    if (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
        raise ValueError(f"{name} must satisfy x1 <= x2 and y1 <= y2 (x1 y1 x2 y2 order), got {b.tolist()}")
    return b


def _one_box(box, name: str) -> torch.Tensor:
    """``box`` as a (1, 4) tensor; refuses several boxes or none."""
    b = _boxes(box, name)
    if b.shape[0] != 1:
        raise ValueError(f"{name} must be one box x1 y1 x2 y2, got {b.shape[0]} boxes; use box_iou_best for several")
    return b


def box_iou(box_a, box_b) -> float:
    """Return the IoU of two boxes (x1 y1 x2 y2, exclusive end); 0.0 if one is None, 1.0 if both are."""
    if box_a is None or box_b is None:
        return float(box_a is None and box_b is None)
    return float(_pairwise_box_iou(_one_box(box_a, "box_a"), _one_box(box_b, "box_b"))[0, 0])


def boxes_union(boxes) -> torch.Tensor | None:
    """Return the smallest box (4,) enclosing all ``boxes`` (N, 4), in their dtype; None when N = 0."""
    b = _boxes(boxes, "boxes")
    if b.shape[0] == 0:
        return None
    return torch.cat([b[:, :2].min(dim=0).values, b[:, 2:].max(dim=0).values])


def box_iou_best(pred_box, gt_boxes) -> float:
    """Return the highest IoU of ``pred_box`` with any one of ``gt_boxes`` (N, 4); 0.0 if either is missing."""
    gt = _boxes(gt_boxes, "gt_boxes")
    if pred_box is None or gt.shape[0] == 0:
        return 0.0
    return float(_pairwise_box_iou(_one_box(pred_box, "pred_box"), gt).max())


def _pred_box(pred) -> torch.Tensor | None:
    """The predicted box of ``pred``: the bounding box of a mask (H, W), or a box given as (4,) or (1, 4)."""
    if pred is None:
        return None
    a = _numpy(pred)
    if a.dtype == bool or (a.ndim == 2 and a.shape != (1, 4)):  # a mask; a (1, 4) bool array too
        return mask_to_box(a)
    return _one_box(a, "pred")[0]


def mask_box_iou(pred, gt_boxes) -> dict[str, float]:
    """Return the box IoUs of one image (paper Table 3): ``pred`` is the predicted mask (H, W) (or its box), the
    ground truth is ``gt_boxes`` (N, 4), x1 y1 x2 y2 with exclusive end, N >= 1.

    The predicted box is the bounding box of all foreground pixels of the mask (no component selection).
    Several objects (e.g. two dogs): a foreground mask covers every object at once, so ``box_iou`` compares the
    predicted box with the box enclosing all N ground-truth boxes; ``box_iou_best`` is the IoU with the best-matching
    single object, for reference. With one object both are the same. An empty prediction scores 0.
    """
    gt = _boxes(gt_boxes, "gt_boxes")
    union = boxes_union(gt)
    if union is None:
        raise ValueError("mask_box_iou: the image has no ground-truth box")
    box = _pred_box(pred)
    return {"box_iou": box_iou(box, union), "box_iou_best": box_iou_best(box, gt)}


def _images(x, name: str) -> np.ndarray:
    """A mask of shape (..., H, W) as (N, H, W): the leading dimensions enumerate images."""
    a = _as_mask(x, name)
    if a.ndim < 2:
        raise ValueError(f"{name} must have shape (..., H, W), got {a.shape}")
    return a.reshape(-1, *a.shape[-2:])


class SegmentationAccumulator(Cumulative):
    """Accumulates ACC, foreground IoU and mIoU over a data set, pooled and per image.

    ``aggregate()`` returns ``acc``, ``iou``, ``iou_bg``, ``miou`` computed from the TP/FP/FN/TN sums
    over all pixels of all images (pooled), the same keys with suffix ``_per_image`` as means of the
    per-image values, and ``count`` (images).
    """

    def update(self, pred, target) -> None:
        """Add one image (H, W) or several (..., H, W) of predicted and target masks."""
        p, t = _images(pred, "pred"), _images(target, "target")
        if p.shape != t.shape:
            raise ValueError(f"pred and target differ in shape: {p.shape} vs {t.shape}")
        for pi, ti in zip(p, t):
            self.append(torch.tensor(confusion_counts(pi, ti), dtype=torch.int64))  # (4,) TP FP FN TN

    def aggregate(self) -> dict[str, float]:
        """Return pooled and per-image mean ACC, IoU, background IoU and mIoU, and the image count."""
        counts = self.get_buffer()  # (N, 4)
        if counts is None:
            raise ValueError("SegmentationAccumulator.aggregate: no images; call update() first")
        pooled = _segmentation_scores(*counts.sum(dim=0).tolist())
        per_image = [_segmentation_scores(*row) for row in counts.tolist()]
        result = dict(pooled)
        for key in pooled:
            result[f"{key}_per_image"] = float(np.mean([s[key] for s in per_image]))
        result["count"] = len(per_image)
        return result


class BoxIoUAccumulator(Cumulative):
    """Accumulates box IoU of predicted masks against ground-truth boxes (paper Table 3), see :func:`mask_box_iou`.

    With several ground-truth objects in an image the predicted box (of the whole mask) is compared with the
    box enclosing all of them (``box_iou``, the reported number), because a foreground mask covers every object
    at once; the best match over single objects is kept as well (``box_iou_best``). An empty prediction
    scores 0. ``aggregate`` averages over images and also counts the images with several objects.
    """

    def update(self, pred, gt_boxes) -> None:
        """Add one image: a predicted mask (H, W) or box of shape (4,) / (1, 4) (or None), and its boxes (N, 4)."""
        gt = _boxes(gt_boxes, "gt_boxes")
        if gt.shape[0] == 0:
            raise ValueError("BoxIoUAccumulator.update: the image has no ground-truth box")
        scores = mask_box_iou(pred, gt)
        self.append(torch.tensor([scores["box_iou"], scores["box_iou_best"], float(gt.shape[0] > 1)],
                                 dtype=torch.float64))

    def aggregate(self) -> dict[str, float]:
        """Return the mean union-box IoU, the mean best-match IoU, the image count and the several-object count."""
        ious = self.get_buffer()  # (N, 3)
        if ious is None:
            raise ValueError("BoxIoUAccumulator.aggregate: no images; call update() first")
        return {"box_iou": float(ious[:, 0].mean()), "box_iou_best": float(ious[:, 1].mean()), "count": len(ious),
                "several_objects": int(ious[:, 2].sum())}


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Return the mean (D,) and covariance (D, D) of features (N, D), the Gaussian fitted for FID."""
    f = _numpy(features).astype(np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must have shape (N, D) with N >= 2, got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Return the Fréchet distance ||μ1 − μ2||² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) between two Gaussians (FID).

    When the product of the covariances is singular (scipy warns, or the root is not finite), ``eps``
    is added to both diagonals; a root with a negligible imaginary part is replaced by its real part.
    """
    mu1, mu2 = _numpy(mu1).astype(np.float64).ravel(), _numpy(mu2).astype(np.float64).ravel()
    s1, s2 = np.atleast_2d(_numpy(sigma1).astype(np.float64)), np.atleast_2d(_numpy(sigma2).astype(np.float64))
    d = mu1.size
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes {mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape} do not match")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LinAlgWarning)
        covmean = sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all() or any(issubclass(w.category, LinAlgWarning) for w in caught):
        offset = eps * np.eye(d)  # singular product: regularise both covariances
        covmean = sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"frechet_distance: (Σ1 Σ2)^½ has imaginary diagonal up to {np.abs(covmean.imag).max():.3g}; "
                "are the covariances symmetric positive semi-definite?"
            )
        covmean = covmean.real
    diff = mu1 - mu2
    # never negative in exact arithmetic; a difference of traces can round to about -1e-14: report 0
    return max(0.0, float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)))
