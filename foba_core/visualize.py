"""Pictures people look at: heat-map and mask overlays, labelled grids, plots (PNG, written atomically)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from foba_core.io import atomic_write


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Return images (N, C, H, W) as uint8 RGB (N, 3, H, W) in [0, 255]: floats in [0, 1] rounded, grey replicated.

    uint8 input is returned as it is (grey replicated); this is what FID networks and PNG files take.
    """
    images = torch.as_tensor(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """Return a (C, H, W) image in [0, 1] as an (H, W, 3) uint8 array for drawing (grey replicated, extra channels cut)."""
    x = image.detach().float().cpu()
    return quantise(x[None, :3] if x.shape[0] != 1 else x[None])[0].permute(1, 2, 0).contiguous().numpy()


def _resize_map(values: torch.Tensor, hw: tuple[int, int]) -> np.ndarray:
    v = values.detach().float().cpu()[None, None]
    return F.interpolate(v, size=hw, mode="bilinear", align_corners=False)[0, 0].numpy()


def heat_overlay(image: torch.Tensor, heat: torch.Tensor, alpha: float = 0.5) -> np.ndarray:
    """Return the image with the min-max normalised heat map (any resolution) blended on top in a jet colour map."""
    from matplotlib import colormaps

    base = to_uint8(image).astype(np.float32)
    h = _resize_map(heat, base.shape[:2])
    h = (h - h.min()) / max(float(h.max() - h.min()), 1e-12)
    colour = colormaps["jet"](h)[..., :3] * 255
    return (base * (1 - alpha) + colour * alpha).round().astype(np.uint8)


def mask_overlay(image: torch.Tensor, mask: torch.Tensor, colour=(255, 40, 40), alpha: float = 0.45) -> np.ndarray:
    """Return the image with a (nearest-neighbour upsampled) binary mask tinted on top."""
    base = to_uint8(image).astype(np.float32)
    m = mask.detach().float().cpu()[None, None]
    m = F.interpolate(m, size=base.shape[:2], mode="nearest")[0, 0].numpy() > 0.5
    out = base.copy()
    out[m] = base[m] * (1 - alpha) + np.asarray(colour, np.float32) * alpha
    return out.round().astype(np.uint8)


def draw_boxes(tile: np.ndarray, boxes, colour=(0, 255, 0)) -> np.ndarray:
    """Return the tile with boxes (x1 y1 x2 y2, exclusive end, in tile pixels) drawn as outlines."""
    img = Image.fromarray(tile)
    draw = ImageDraw.Draw(img)
    for x1, y1, x2, y2 in np.asarray(boxes, dtype=float).reshape(-1, 4):
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=colour, width=max(1, tile.shape[0] // 128))
    return np.asarray(img)


def save_png(array: np.ndarray, path: str) -> str:
    """Write an (H, W[, 3]) uint8 array as PNG atomically; return the path."""
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
    return path


def save_plot(draw, path: str, figsize: tuple[float, float] = (6.4, 4.0)) -> str:
    """Draw onto the axes of a new matplotlib figure with ``draw(ax)`` and write it as a PNG, atomically; return the
    path. The figure is drawn without pyplot, so no global backend is chosen."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    draw(fig.add_subplot())
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return path


def save_grid(rows: list[list[np.ndarray]], path: str, column_titles: list[str] | None = None,
              min_tile: int = 128) -> str:
    """Tile equally sized uint8 images into one labelled PNG (small tiles are enlarged with nearest neighbour)."""
    if not rows or not rows[0]:
        raise ValueError(f"nothing to draw into {path}")
    th, tw = rows[0][0].shape[:2]
    scale = max(1, int(np.ceil(min_tile / max(th, 1))))
    th, tw = th * scale, tw * scale
    pad, head = 2, (14 if column_titles else 0)
    ncol = max(len(r) for r in rows)
    canvas = Image.new("RGB", (ncol * (tw + pad) + pad, head + len(rows) * (th + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(column_titles or []):
        draw.text((pad + j * (tw + pad) + 2, 1), title, fill=(0, 0, 0))
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            tile = tile if tile.ndim == 3 else np.repeat(tile[..., None], 3, axis=2)
            img = Image.fromarray(tile).resize((tw, th), Image.NEAREST)
            canvas.paste(img, (pad + j * (tw + pad), head + pad + i * (th + pad)))
    return save_png(np.asarray(canvas), path)


def thumbnail(image: torch.Tensor, width: int = 256) -> torch.Tensor:
    """Return a square image (3, S, S) at most ``width`` pixels wide, for pictures."""
    from foba_core.transforms import resize_center_crop

    return image if image.shape[-1] <= width else resize_center_crop(image, width)


def save_tiles(images: torch.Tensor, path: str, columns: int = 8) -> str:
    """Write images (N, 3, S, S) as one PNG grid of ``columns`` tiles per row; return its path."""
    tiles = [to_uint8(thumbnail(x)) for x in images]
    return save_grid([tiles[i:i + columns] for i in range(0, len(tiles), columns)], path)
