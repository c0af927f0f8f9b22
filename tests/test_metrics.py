"""Tests of the evaluation metrics and accumulators (foba_core.metrics)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, jaccard_score, roc_auc_score

from foba_core.metrics import (
    BoxIoUAccumulator,
    SegmentationAccumulator,
    accuracy,
    auc_roc,
    box_iou,
    box_iou_best,
    boxes_union,
    confusion_counts,
    feature_statistics,
    foreground_iou,
    frechet_distance,
    mask_to_box,
    mean_iou,
)

PRED = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
TARGET = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
# TP = 2, FP = 2, FN = 1, TN = 3


def test_auc_roc_hand_case_and_sklearn():
    scores = torch.tensor([[0.1, 0.4], [0.35, 0.8]])
    target = torch.tensor([[0, 0], [1, 1]], dtype=torch.bool)
    assert auc_roc(scores, target) == pytest.approx(0.75)  # 3 of 4 positive/negative pairs ordered
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(16, 16, generator=g)
    target = torch.rand(16, 16, generator=g) < scores  # informative but noisy
    assert auc_roc(scores, target) == pytest.approx(roc_auc_score(target.ravel().numpy(), scores.ravel().numpy()))


def test_auc_roc_ignores_non_finite_scores():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(10, 10, generator=g)
    target = torch.rand(10, 10, generator=g) > 0.5
    damaged = scores.clone()
    damaged[0, :5] = float("nan")
    damaged[1, :3] = float("inf")
    keep = torch.isfinite(damaged)
    assert auc_roc(damaged, target) == pytest.approx(roc_auc_score(target[keep].numpy(), scores[keep].numpy()))


def test_auc_roc_single_class_is_nan_with_warning():
    with pytest.warns(UserWarning, match="'bird_007'"):
        value = auc_roc(torch.rand(4, 4), torch.zeros(4, 4, dtype=torch.bool), image_id="bird_007")
    assert np.isnan(value)


def test_auc_roc_rejects_mismatched_sizes_and_soft_targets():
    with pytest.raises(ValueError, match="pixels"):
        auc_roc(torch.rand(4, 4), torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="threshold"):
        auc_roc(torch.rand(4, 4), torch.rand(4, 4))


def test_segmentation_metrics_hand_case():
    assert confusion_counts(PRED, TARGET) == (2, 2, 1, 3)
    assert accuracy(PRED, TARGET) == pytest.approx(5 / 8)
    assert foreground_iou(PRED, TARGET) == pytest.approx(2 / 5)
    assert mean_iou(PRED, TARGET) == pytest.approx((2 / 5 + 3 / 6) / 2)


def test_segmentation_metrics_match_sklearn():
    g = torch.Generator().manual_seed(2)
    pred = torch.rand(12, 12, generator=g) > 0.6
    target = torch.rand(12, 12, generator=g) > 0.5
    p, t = pred.ravel().numpy(), target.ravel().numpy()
    assert accuracy(pred, target) == pytest.approx(accuracy_score(t, p))
    assert foreground_iou(pred, target) == pytest.approx(jaccard_score(t, p))
    assert mean_iou(pred, target) == pytest.approx(jaccard_score(t, p, average="macro"))
    assert foreground_iou(pred.numpy().astype(np.uint8), target.numpy()) == pytest.approx(jaccard_score(t, p))


def test_empty_masks_agree_perfectly():
    empty = torch.zeros(5, 5, dtype=torch.bool)
    full = torch.ones(5, 5, dtype=torch.bool)
    assert foreground_iou(empty, empty) == 1.0
    assert mean_iou(empty, empty) == 1.0
    assert foreground_iou(empty, full) == 0.0
    with pytest.raises(ValueError, match="shape"):
        accuracy(empty, torch.zeros(4, 5, dtype=torch.bool))


def test_mask_to_box_exclusive_end():
    mask = torch.zeros(10, 12, dtype=torch.bool)
    mask[2:5, 3:9] = True
    mask[7, 4] = True
    assert mask_to_box(mask).tolist() == [3, 2, 9, 8]
    assert mask_to_box(torch.zeros(4, 4, dtype=torch.bool)) is None
    assert mask_to_box(None) is None


def test_box_iou_hand_case_and_agreement_with_mask_iou():
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert box_iou(torch.tensor([0, 0, 4, 4]), torch.tensor([0, 0, 4, 4])) == pytest.approx(1.0)
    assert box_iou([0, 0, 2, 2], [5, 5, 6, 6]) == 0.0
    assert box_iou(None, [0, 0, 1, 1]) == 0.0 and box_iou(None, None) == 1.0
    a, b = torch.zeros(16, 16, dtype=torch.bool), torch.zeros(16, 16, dtype=torch.bool)
    a[1:9, 2:7] = True
    b[4:12, 5:15] = True
    assert box_iou(mask_to_box(a), mask_to_box(b)) == pytest.approx(foreground_iou(a, b))
    with pytest.raises(ValueError, match="x1 <= x2"):
        box_iou([3, 0, 1, 2], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="box_iou_best"):
        box_iou([[0, 0, 1, 1], [0, 0, 2, 2]], [0, 0, 1, 1])


def test_union_box_and_best_match_for_several_objects():
    gt = torch.tensor([[0, 0, 4, 4], [10, 10, 14, 14]])
    assert boxes_union(gt).tolist() == [0, 0, 14, 14]
    assert boxes_union(torch.zeros(0, 4)) is None
    pred = torch.tensor([0, 0, 4, 4])  # finds one of the two objects exactly
    assert box_iou_best(pred, gt) == pytest.approx(1.0)
    assert box_iou(pred, boxes_union(gt)) == pytest.approx(16 / 196)
    assert box_iou_best(None, gt) == 0.0


def test_segmentation_accumulator_pooled_differs_from_per_image():
    big_t = torch.zeros(10, 10, dtype=torch.bool)
    big_t[:5] = True  # 50 foreground pixels, found exactly
    small_t = torch.zeros(10, 10, dtype=torch.bool)
    small_t[0, :2] = True  # 2 foreground pixels, missed
    acc = SegmentationAccumulator()
    acc.update(big_t, big_t)
    acc.update(torch.zeros_like(small_t), small_t)
    out = acc.aggregate()
    assert out["count"] == 2
    assert out["iou"] == pytest.approx(50 / 52)
    assert out["iou_per_image"] == pytest.approx(0.5)
    assert out["acc"] == pytest.approx(198 / 200)
    assert out["acc_per_image"] == pytest.approx((1.0 + 0.98) / 2)
    assert out["miou"] == pytest.approx((50 / 52 + 148 / 150) / 2)
    assert out["miou_per_image"] == pytest.approx((1.0 + (0 + 98 / 100) / 2) / 2)


def test_segmentation_accumulator_batches_and_reset():
    g = torch.Generator().manual_seed(3)
    pred = torch.rand(3, 1, 8, 8, generator=g) > 0.5
    target = torch.rand(3, 1, 8, 8, generator=g) > 0.5
    batched, single = SegmentationAccumulator(), SegmentationAccumulator()
    batched.update(pred, target)
    for p, t in zip(pred, target):
        single.update(p[0], t[0])
    assert batched.aggregate() == single.aggregate()
    assert batched.aggregate()["miou_per_image"] == pytest.approx(
        np.mean([mean_iou(p, t) for p, t in zip(pred, target)])
    )
    batched.reset()
    with pytest.raises(ValueError, match="update"):
        batched.aggregate()


def test_box_accumulator_from_masks_and_boxes():
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[0:4, 0:4] = True
    gt = torch.tensor([[0, 0, 4, 4], [10, 10, 14, 14]])
    acc = BoxIoUAccumulator()
    acc.update(mask, gt)  # box of the mask: [0, 0, 4, 4]
    acc.update(torch.tensor([0, 0, 14, 14]), gt)
    acc.update(torch.zeros(20, 20, dtype=torch.bool), gt)  # nothing predicted
    out = acc.aggregate()
    assert out["count"] == 3
    assert out["box_iou"] == pytest.approx((16 / 196 + 1.0 + 0.0) / 3)
    assert out["box_iou_best"] == pytest.approx((1.0 + 16 / 196 + 0.0) / 3)
    with pytest.raises(ValueError, match="no ground-truth box"):
        acc.update(mask, torch.zeros(0, 4))


def test_feature_statistics_match_numpy():
    rng = np.random.default_rng(6)
    feats = rng.normal(size=(40, 5))
    mu, sigma = feature_statistics(torch.from_numpy(feats).float())
    assert mu.shape == (5,) and sigma.shape == (5, 5)
    np.testing.assert_allclose(mu, feats.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(feats.T), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(feats[:1])


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(7)
    a = rng.normal(size=(6, 6))
    sigma = a @ a.T + np.eye(6)
    mu = rng.normal(size=6)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s1, s2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # diagonal covariances: sum over dimensions of the 1-D formula
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = ((m1 - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(expected)


def test_frechet_distance_singular_covariances_and_monai_agreement():
    from monai.metrics.fid import get_fid_score

    rng = np.random.default_rng(8)
    f1, f2 = rng.normal(size=(5, 12)), rng.normal(loc=0.5, size=(5, 12))  # N < D: rank-deficient covariances
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the singular square root is regularised, not left to warn
        fd = frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
        same = frechet_distance(*feature_statistics(f1), *feature_statistics(f1))
    assert np.isfinite(fd) and fd > 0
    assert same == pytest.approx(0.0, abs=1e-4)
    g1, g2 = rng.normal(size=(200, 4)), rng.normal(loc=0.3, scale=1.5, size=(200, 4))
    ours = frechet_distance(*feature_statistics(g1), *feature_statistics(g2))
    assert ours == pytest.approx(float(get_fid_score(torch.from_numpy(g1), torch.from_numpy(g2))), rel=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
