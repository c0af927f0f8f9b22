"""The one geometric transform images go through before a model sees them, applied identically to masks and boxes.

Shortest side resized to ``size``, then the centre ``size`` x ``size`` crop. The array functions
(:func:`resize_center_crop`, :func:`map_boxes`, :func:`square_geometry`) and their MONAI dictionary transform
:class:`ResizeCenterCropd` share one geometry (:func:`resize_shortest_side` is its first half, the whole frame
kept); masks are resampled with nearest neighbour (a bilinear-resized mask thresholded afterwards grows), and boxes
follow the pixels they cover.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_tensor, ensure_tuple_rep, look_up_option

# How images are resampled: "antialias" = antialiased bilinear, clamped to [0, 1] (natural images);
# "area" = area averaging when shrinking, plain bilinear when enlarging (the chest X-rays of foba_med).
IMAGE_MODES = ("antialias", "area")
KINDS = ("image", "mask", "boxes")  # what a key of ResizeCenterCropd holds


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Return (new_h, new_w): the image size after resizing the shortest side to ``size`` (both sides >= size)."""
    scale = size / min(height, width)
    return max(size, round(height * scale)), max(size, round(width * scale))


def square_geometry(height: int, width: int, size: int) -> tuple[float, int, int]:
    """Return (scale, top, left): resize the shortest side to ``size``, then centre-crop ``size`` x ``size``."""
    new_h, new_w = resized_shape(height, width, size)
    return size / min(height, width), (new_h - size) // 2, (new_w - size) // 2


def _resample(t: torch.Tensor, shape: tuple[int, int], is_mask: bool, mode: str) -> torch.Tensor:
    """``t`` (1, C, H, W) resampled to ``shape``: masks by nearest neighbour (bool), images by ``mode``."""
    if is_mask:
        return F.interpolate(t.float(), size=shape, mode="nearest-exact") > 0.5
    if mode == "area" and shape[0] <= t.shape[-2] and shape[1] <= t.shape[-1]:  # shrinking
        return F.interpolate(t.float(), size=shape, mode="area")
    if mode == "area":  # enlarging: area averaging would only repeat pixels
        return F.interpolate(t.float(), size=shape, mode="bilinear", align_corners=False)
    return F.interpolate(t.float(), size=shape, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def resize_shortest_side(x: torch.Tensor, size: int, is_mask: bool = False, mode: str = "antialias") -> torch.Tensor:
    """Return ``x`` (C, H, W) or a mask (H, W) resized so that its shortest side is ``size``, the whole frame kept.

    Images use ``mode`` (``IMAGE_MODES``: antialiased bilinear by default, or area averaging); masks use
    nearest neighbour so that they do not grow (a bilinear-resized mask thresholded afterwards does).
    """
    mode = look_up_option(mode, IMAGE_MODES)
    squeeze = x.ndim == 2
    t = x[None, None] if squeeze else x[None]
    shape = resized_shape(*t.shape[-2:], size)
    if shape != tuple(t.shape[-2:]):
        t = _resample(t, shape, is_mask, mode)
    t = t.bool() if is_mask else t
    return t[0, 0] if squeeze else t[0]


def resize_center_crop(x: torch.Tensor, size: int, is_mask: bool = False, mode: str = "antialias") -> torch.Tensor:
    """Return ``x`` (C, H, W) or a mask (H, W) resized (shortest side = size) and centre-cropped to size x size
    (``resize_shortest_side``, then the crop of ``square_geometry``)."""
    _, top, left = square_geometry(*x.shape[-2:], size)
    return resize_shortest_side(x, size, is_mask, mode)[..., top:top + size, left:left + size]


def map_boxes(boxes: torch.Tensor, height: int, width: int, size: int) -> torch.Tensor:
    """Return boxes (N, 4; x1 y1 x2 y2, exclusive end) mapped through ``resize_center_crop`` and clipped to the crop."""
    scale, top, left = square_geometry(height, width, size)
    b = boxes.float() * scale - torch.tensor([left, top, left, top], dtype=torch.float32)
    b = b.clamp(0, size)
    return torch.stack([b[:, 0].floor(), b[:, 1].floor(), b[:, 2].ceil(), b[:, 3].ceil()], 1).long()


class ResizeCenterCropd(MapTransform):
    """Dictionary version of :func:`resize_center_crop` and :func:`map_boxes`: one geometry for image, mask and boxes.

    ``kinds`` says what each key holds ("image", "mask" or "boxes"; default: the key's own name, so
    ``keys=("image", "mask", "boxes")`` needs none). Images are resampled with ``image_mode``, masks with
    nearest neighbour; boxes (N, 4; x1 y1 x2 y2, exclusive end, in the pixels of ``data[box_reference]`` as
    it was before this transform) are mapped and clipped to the crop, and boxes left with zero area (outside
    the centre square) are dropped, so an item can end up with no box. A key whose value is None stays None.
    """

    def __init__(self, keys: KeysCollection, size: int, kinds: Sequence[str] | str | None = None,
                 image_mode: str = "antialias", box_reference: Hashable = "image", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if int(size) < 1:
            raise ValueError(f"ResizeCenterCropd: size must be a positive int, got {size!r}")
        kinds = self.keys if kinds is None else ensure_tuple_rep(kinds, len(self.keys))
        for key, kind in zip(self.keys, kinds):
            if kind not in KINDS:
                raise ValueError(f"ResizeCenterCropd: key {key!r} has kind {kind!r}; pass kinds= with one of {KINDS} "
                                 "per key")
        self.size, self.kinds = int(size), tuple(kinds)
        self.image_mode, self.box_reference = look_up_option(image_mode, IMAGE_MODES), box_reference

    def __call__(self, data: Mapping) -> dict:
        """Return a copy of ``data`` with every key's image, mask or boxes at ``size`` x ``size``."""
        d = dict(data)
        reference = d.get(self.box_reference)
        hw = tuple(reference.shape[-2:]) if reference is not None else None
        for key, kind in self.key_iterator(d, self.kinds):
            if d[key] is None:
                continue
            if kind == "boxes":
                d[key] = self._boxes(key, d[key], hw)
            else:
                x = convert_to_tensor(d[key], track_meta=False)
                d[key] = resize_center_crop(x, self.size, is_mask=kind == "mask", mode=self.image_mode)
        return d

    def _boxes(self, key: Hashable, boxes, hw: tuple[int, int] | None) -> torch.Tensor:
        """The boxes of ``key`` mapped from the reference image's pixels to the crop, zero-area boxes dropped."""
        if hw is None:
            raise KeyError(f"ResizeCenterCropd: boxes {key!r} are given in the pixels of {self.box_reference!r}, "
                           "which the item lacks; pass box_reference=<the key of their image>")
        b = map_boxes(torch.as_tensor(boxes).reshape(-1, 4), *hw, self.size)
        return b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])]
