"""Box evaluation (paper Table 3) on reader items: the box of a predicted mask against the ground-truth boxes,
with several objects per image (Stanford Dogs) scored against the box enclosing all of them."""

from __future__ import annotations

import pytest
import torch
from test_data_readers import DOG_ITEMS, H, W, make_dogs

from foba_core.data import open_dataset
from foba_core.metrics import BoxIoUAccumulator, mask_box_iou


def _mask(*boxes) -> torch.Tensor:
    m = torch.zeros(H, W, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes:
        m[y1:y2, x1:x2] = True
    return m


def test_several_dogs_are_scored_against_their_enclosing_box(tmp_path):
    make_dogs(tmp_path)
    item = open_dataset("dogs", tmp_path, split="test")[0]  # two dogs
    first, second = DOG_ITEMS[1][4]
    red = (item["image"][0] > 0.6) & (item["image"][1] < 0.4)  # the dogs' pixels of the returned JPEG
    assert mask_box_iou(red, item["boxes"])["box_iou"] > 0.9
    both = mask_box_iou(_mask(first, second), item["boxes"])
    area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
    enclosing = area((first[0], first[1], second[2], first[3]))
    assert both == {"box_iou": pytest.approx(1.0), "box_iou_best": pytest.approx(max(area(first), area(second)) / enclosing)}
    one = mask_box_iou(_mask(first), item["boxes"])  # only the first dog found
    assert one["box_iou_best"] == pytest.approx(1.0)
    assert one["box_iou"] == pytest.approx(area(first) / enclosing)
    assert mask_box_iou(torch.zeros(H, W, dtype=torch.bool), item["boxes"]) == {"box_iou": 0.0, "box_iou_best": 0.0}

    acc = BoxIoUAccumulator()
    acc.update(_mask(first, second), item["boxes"])
    train = open_dataset("dogs", tmp_path, split="train")[0]  # one dog: both scores agree
    acc.update(_mask(train["boxes"][0].tolist()), train["boxes"])
    out = acc.aggregate()
    assert out == {"box_iou": pytest.approx(1.0), "box_iou_best": pytest.approx(both["box_iou_best"] / 2 + 0.5),
                   "count": 2, "several_objects": 1}


def test_box_predictions_in_either_shape_and_missing_ground_truth():
    gt = torch.tensor([[0, 0, 10, 10]])
    assert mask_box_iou(torch.tensor([[0, 0, 10, 5]]), gt)["box_iou"] == pytest.approx(0.5)  # (1, 4): a box
    assert mask_box_iou(torch.tensor([0, 0, 10, 5]), gt)["box_iou"] == pytest.approx(0.5)
    assert mask_box_iou(None, gt)["box_iou"] == 0.0
    with pytest.raises(ValueError, match="no ground-truth box"):
        mask_box_iou(torch.tensor([0, 0, 1, 1]), torch.zeros(0, 4))
    with pytest.raises(ValueError, match="no ground-truth box"):
        BoxIoUAccumulator().update(torch.tensor([0, 0, 1, 1]), torch.zeros(0, 4))
