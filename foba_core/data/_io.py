"""Shared pieces of the dataset readers: the record-backed dataset, image/mask loading, atomic writes.

A reader parses its dataset's index files into *records* (one dict per image) and hands them to
:class:`RecordDataset`, which loads pixels lazily and builds the item dictionaries of the project:
``image`` (3, H, W) float in [0, 1] at original resolution, ``mask`` (H, W) bool where the dataset
has masks, ``boxes`` (N, 4) int64 ``x1 y1 x2 y2`` with exclusive end, ``caption``, ``id``, ``label``,
``path``, plus the record's extra keys.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SPLITS = ("train", "test", "all")


def check_option(value: str, options: tuple[str, ...], what: str) -> str:
    """Return ``value`` if it is one of ``options``; raise a ValueError listing them (with a did-you-mean)."""
    if value in options:
        return value
    close = difflib.get_close_matches(str(value), options, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{what} {value!r} is not one of {', '.join(options)}.{hint}")


def check_split(split: str) -> str:
    """Return ``split`` if it is one of train, test, all; raise a did-you-mean error otherwise."""
    return check_option(split, SPLITS, "split")


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a file; otherwise raise FileNotFoundError naming it and what it should hold."""
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}: expected {what}")
    return path


def load_rgb(path: Path, dataset: str) -> torch.Tensor:
    """Return the image at ``path`` as a (3, H, W) float tensor in [0, 1]; grayscale/CMYK/palette become RGB."""
    require_file(path, f"a {dataset} image")
    with Image.open(path) as im:
        arr = np.array(im.convert("RGB"), dtype=np.uint8)  # (H, W, 3), a writable copy
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def load_mask(path: Path, dataset: str, threshold: int) -> torch.Tensor:
    """Return the 8-bit mask at ``path`` binarised as ``value > threshold``: a (H, W) bool tensor."""
    require_file(path, f"a {dataset} mask")
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L"), dtype=np.uint8)  # 'LA', 'P', 'RGB' masks drop to luminance
    return torch.from_numpy(arr > threshold)


def boxes_to_pixels(boxes: np.ndarray, height: int, width: int) -> torch.Tensor:
    """Return float boxes (N, 4) as int64 pixel boxes: x1, y1 floored, x2, y2 ceiled, clipped to the image."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = np.empty(boxes.shape, dtype=np.int64)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        out[i] = (min(max(math.floor(x1), 0), width), min(max(math.floor(y1), 0), height),
                  min(max(math.ceil(x2), 0), width), min(max(math.ceil(y2), 0), height))
    return torch.from_numpy(out)


class RecordDataset(torch.utils.data.Dataset):
    """A sized sequence of dataset items built lazily from parsed index records.

    Each record is a dict with ``path`` (image file), ``id``, ``label``, optional ``boxes`` (float
    (N, 4), 0-based, exclusive end), optional ``mask_path``, and any extra keys, which are copied
    into the item. Subclasses may override :meth:`record_boxes` to parse boxes lazily.
    """

    dataset_name = "dataset"

    def __init__(self, records: list[dict], caption: str, mask_threshold: int = 127):
        self.records = records
        self.caption = caption
        self.mask_threshold = int(mask_threshold)

    def __len__(self) -> int:
        return len(self.records)

    def record_boxes(self, record: dict) -> np.ndarray | None:
        """Return the record's boxes as float (N, 4) ``x1 y1 x2 y2`` (0-based, exclusive end), or None."""
        return record.get("boxes")

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a {self.dataset_name} split of {len(self)} items")
        record = self.records[index]
        image = load_rgb(record["path"], self.dataset_name)
        _, height, width = image.shape
        item = {key: value for key, value in record.items() if key not in ("path", "boxes", "mask_path")}
        item.update(image=image, caption=self.caption, path=str(record["path"]))
        boxes = self.record_boxes(record)
        if boxes is not None:
            item["boxes"] = boxes_to_pixels(boxes, height, width)
        if record.get("mask_path") is not None:
            mask = load_mask(record["mask_path"], self.dataset_name, self.mask_threshold)
            if tuple(mask.shape) != (height, width):
                raise ValueError(f"mask {record['mask_path']} is {tuple(mask.shape)} but image {record['path']} "
                                 f"is {(height, width)}: the mask must match its image pixel for pixel")
            item["mask"] = mask
        return item

