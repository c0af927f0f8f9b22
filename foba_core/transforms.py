"""The one geometric transform images go through before a model sees them, applied identically to masks and boxes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def square_geometry(height: int, width: int, size: int) -> tuple[float, int, int]:
    """Return (scale, top, left): resize the shortest side to ``size``, then centre-crop ``size`` x ``size``."""
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    return scale, (new_h - size) // 2, (new_w - size) // 2


def resize_center_crop(x: torch.Tensor, size: int, is_mask: bool = False) -> torch.Tensor:
    """Return ``x`` (C, H, W) or a mask (H, W) resized (shortest side = size) and centre-cropped to size x size.

    Images use antialiased bilinear interpolation; masks use nearest neighbour so that they do not
    grow (a bilinear-resized mask thresholded afterwards does).
    """
    squeeze = x.ndim == 2
    t = x[None, None] if squeeze else x[None]
    h, w = t.shape[-2:]
    scale, top, left = square_geometry(h, w, size)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        if is_mask:
            t = F.interpolate(t.float(), size=(new_h, new_w), mode="nearest-exact") > 0.5
        else:
            t = F.interpolate(t.float(), size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
            t = t.clamp(0, 1)
    t = t[..., top:top + size, left:left + size]
    t = t.bool() if is_mask else t
    return t[0, 0] if squeeze else t[0]


def map_boxes(boxes: torch.Tensor, height: int, width: int, size: int) -> torch.Tensor:
    """Return boxes (N, 4; x1 y1 x2 y2, exclusive end) mapped through ``resize_center_crop`` and clipped to the crop."""
    scale, top, left = square_geometry(height, width, size)
    b = boxes.float() * scale - torch.tensor([left, top, left, top], dtype=torch.float32)
    b = b.clamp(0, size)
    return torch.stack([b[:, 0].floor(), b[:, 1].floor(), b[:, 2].ceil(), b[:, 3].ceil()], 1).long()

