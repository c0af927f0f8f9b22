"""The one geometry (shortest side resized, centre crop): array functions and the ResizeCenterCropd dict transform."""

from __future__ import annotations

import pytest
import torch

from foba_core.transforms import ResizeCenterCropd, map_boxes, resize_center_crop, square_geometry


def _scene(height: int, width: int, boxes) -> dict:
    """An item whose image is bright exactly on its mask, the union of its boxes."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes:
        mask[y1:y2, x1:x2] = True
    image = torch.full((3, height, width), 0.1)
    image[:, mask] = 0.9
    return {"image": image, "mask": mask, "boxes": torch.tensor(boxes, dtype=torch.int64), "id": "a"}


def _box_mask(boxes, size: int) -> torch.Tensor:
    out = torch.zeros(size, size, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes.tolist():
        out[y1:y2, x1:x2] = True
    return out


@pytest.mark.parametrize("height, width", [(60, 90), (90, 60), (37, 53), (40, 40)])
def test_image_mask_and_boxes_go_through_one_geometry(height, width):
    item = _scene(height, width, [(30, 20, 50, 35)] if width >= height else [(20, 30, 35, 50)])
    out = ResizeCenterCropd(keys=("image", "mask", "boxes"), size=30)(item)
    assert out["image"].shape == (3, 30, 30) and out["mask"].shape == (30, 30) and out["mask"].dtype == torch.bool
    assert out["id"] == "a" and item["image"].shape == (3, height, width)  # other keys kept, input untouched
    # exactly the array functions
    assert torch.equal(out["image"], resize_center_crop(item["image"], 30))
    assert torch.equal(out["mask"], resize_center_crop(item["mask"], 30, is_mask=True))
    assert torch.equal(out["boxes"], map_boxes(item["boxes"], height, width, 30))
    # and consistent with each other: the bright pixels are the mask, the box encloses it (boxes round outwards)
    bright, mask = out["image"][0] > 0.5, out["mask"]
    assert (bright & mask).sum() / (bright | mask).sum() > 0.75  # up to the edge pixels the filters treat apart
    assert not (out["mask"] & ~_box_mask(out["boxes"], 30)).any()
    assert (_box_mask(out["boxes"], 30) & ~out["mask"]).sum() <= 2 * 30  # at most a pixel row / column more


def test_box_outside_the_centre_crop_is_dropped():
    # 40 x 80 -> resized 30 x 60, crop columns 15..45: the box on the far left lies in the cut margin
    item = _scene(40, 80, [(0, 5, 10, 30), (35, 10, 50, 30)])
    scale, top, left = square_geometry(40, 80, 30)
    assert (scale, top, left) == (0.75, 0, 15)
    out = ResizeCenterCropd(keys=("image", "mask", "boxes"), size=30)(item)
    assert out["boxes"].tolist() == [[11, 7, 23, 23]]  # 35*0.75-15 = 11.25 -> 11, 50*0.75-15 = 22.5 -> 23
    only_outside = ResizeCenterCropd(keys=("image", "boxes"), size=30)(_scene(40, 80, [(0, 5, 10, 30)]))
    assert only_outside["boxes"].shape == (0, 4)


def test_missing_keys_none_values_kinds_and_the_box_reference():
    item = _scene(20, 30, [(2, 2, 10, 10)])
    image_only = {"image": item["image"]}
    with pytest.raises(KeyError):
        ResizeCenterCropd(keys=("image", "mask"), size=16)(image_only)
    out = ResizeCenterCropd(keys=("image", "mask", "boxes"), size=16, allow_missing_keys=True)(image_only)
    assert set(out) == {"image"} and out["image"].shape == (3, 16, 16)
    assert ResizeCenterCropd(keys=("image", "mask"), size=16)({"image": item["image"], "mask": None})["mask"] is None
    # keys with other names say what they hold; boxes are mapped from the pixels of box_reference
    renamed = {"x": item["image"], "seg": item["mask"], "b": item["boxes"]}
    out = ResizeCenterCropd(keys=("x", "seg", "b"), size=16, kinds=("image", "mask", "boxes"), box_reference="x")(renamed)
    assert torch.equal(out["seg"], resize_center_crop(item["mask"], 16, is_mask=True))
    assert torch.equal(out["b"], map_boxes(item["boxes"], 20, 30, 16))
    with pytest.raises(ValueError, match="kinds"):
        ResizeCenterCropd(keys=("x",), size=16)
    with pytest.raises(KeyError, match="box_reference"):
        ResizeCenterCropd(keys="boxes", size=16)({"boxes": item["boxes"]})


@pytest.mark.parametrize("height, width, size", [(61, 100, 32), (100, 57, 31), (20, 30, 64), (32, 32, 32)])
def test_area_mode_is_the_monai_resize_and_crop_of_the_radiographs(height, width, size):
    """image_mode="area": MONAI Resize (area when shrinking, bilinear when enlarging) + SpatialCrop, bit for bit."""
    from monai.transforms import Resize, SpatialCrop

    image = torch.rand(1, height, width, generator=torch.Generator().manual_seed(0))
    scale, top, left = square_geometry(height, width, size)
    shape = (max(size, round(height * scale)), max(size, round(width * scale)))
    resized = Resize(shape, mode="area" if min(height, width) >= size else "bilinear")(image)
    expected = SpatialCrop(roi_start=(top, left), roi_end=(top + size, left + size))(resized)
    out = ResizeCenterCropd(keys="image", size=size, image_mode="area")({"image": image})["image"]
    assert type(out) is torch.Tensor and torch.equal(out, expected.as_tensor())
    with pytest.raises(ValueError, match="antialias"):
        resize_center_crop(image, size, mode="bicubic")
