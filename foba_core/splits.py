"""The images of a run, decoded once per split: the first stage of the main job caches them at the model's resolution.

``cache_split`` reads one split of a dataset (``foba_core.data.open_images``), puts every image, mask and
box through the one model geometry (shortest side resized to the model's resolution, centre crop;
``foba_core.transforms``) and stores the result in ``OUT/images/<split>/``: pixels in chunks of
``chunk_size`` images (safetensors; float32, or uint8 to save space on large real data sets), ground-truth
masks where the data has them, and ``items.json`` (ids, captions, labels, boxes). Every later stage reads
these files through :class:`SplitImages` instead of decoding the originals again.
"""

from __future__ import annotations

import json
import os

import torch
from tqdm.auto import tqdm

from foba_core.io import write_json
from foba_core.outputs import load_tensors, save_tensors
from foba_core.transforms import ResizeCenterCropd

IMAGE_DTYPES = ("float32", "uint8")


def _chunk_path(folder: str, start: int) -> str:
    return os.path.join(folder, f"images_{start:07d}.safetensors")


def _check_dtype(dtype: str) -> str:
    if dtype not in IMAGE_DTYPES:
        raise ValueError(f"image_dtype {dtype!r} is not one of {', '.join(IMAGE_DTYPES)}")
    return dtype


def model_geometry(item: dict, size: int) -> dict:
    """Return the item's image (3, S, S), mask (S, S) | None and boxes (k, 4) | None at the model's resolution S
    (``transforms.ResizeCenterCropd``: boxes outside the centre square are dropped)."""
    image = item["image"].expand(3, -1, -1) if item["image"].shape[0] == 1 else item["image"]
    geometry = ResizeCenterCropd(("image", "mask", "boxes"), size)
    return geometry({"image": image, "mask": item.get("mask"), "boxes": item.get("boxes")})


def cache_split(data, folder: str, size: int, image_dtype: str = "float32", chunk_size: int = 256,
                split: str = "") -> str:
    """Write the items of ``data`` at the model's resolution into ``folder``; return it. Finished chunks are kept."""
    _check_dtype(image_dtype)
    os.makedirs(folder, exist_ok=True)
    items = []
    for start in tqdm(range(0, len(data), chunk_size), desc=f"images {split}".strip(), unit="chunk"):
        stop = min(start + chunk_size, len(data))
        geometry = [model_geometry(data[i], size) | {"item": data[i]} for i in range(start, stop)]
        if not os.path.exists(_chunk_path(folder, start)):
            images = torch.stack([g["image"] for g in geometry])  # (B, 3, S, S) in [0, 1]
            if image_dtype == "uint8":
                images = (images * 255).round().to(torch.uint8)
            tensors = {"images": images.contiguous()}
            masks = [g["mask"] for g in geometry]
            if all(m is not None for m in masks):
                tensors["masks"] = torch.stack(masks).to(torch.uint8)
            save_tensors(tensors, _chunk_path(folder, start))
        for g in geometry:
            item = g["item"]
            items.append({"id": str(item["id"]), "caption": item.get("caption"), "label": item.get("label"),
                          "has_mask": g["mask"] is not None,
                          "boxes": None if g["boxes"] is None else g["boxes"].tolist()})
    write_json({"size": int(size), "image_dtype": image_dtype, "chunk_size": int(chunk_size), "items": items},
               os.path.join(folder, "items.json"))
    return folder


class SplitImages(torch.utils.data.Dataset):
    """The cached images of one split as dataset items: ``image`` (3, S, S) float in [0, 1], ``mask`` (S, S) bool
    or None, ``boxes`` (k, 4) or None, ``caption``, ``label``, ``id``, ``index`` and ``split``."""

    def __init__(self, folder: str, split: str = ""):
        path = os.path.join(folder, "items.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist: run the images stage first (configs/stages/stage1.yaml)")
        with open(path) as f:
            meta = json.load(f)
        self.folder, self.split = folder, split or os.path.basename(os.path.normpath(folder))
        self.size, self.chunk_size, self.items = meta["size"], meta["chunk_size"], meta["items"]
        self._chunk: tuple[int, dict] | None = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def ids(self) -> list[str]:
        """Return the ids of the split's items, in order."""
        return [it["id"] for it in self.items]

    def _tensors(self, start: int) -> dict:
        if self._chunk is None or self._chunk[0] != start:
            self._chunk = (start, load_tensors(_chunk_path(self.folder, start)))  # a damaged file names itself
        return self._chunk[1]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.items):
            raise IndexError(f"index {index} out of range for a split of {len(self.items)} images")
        start = index - index % self.chunk_size
        tensors = self._tensors(start)
        image = tensors["images"][index - start]
        image = image.float() / 255 if image.dtype == torch.uint8 else image
        meta = self.items[index]
        mask = tensors["masks"][index - start].bool() if "masks" in tensors and meta["has_mask"] else None
        boxes = None if meta["boxes"] is None else torch.tensor(meta["boxes"], dtype=torch.int64).reshape(-1, 4)
        return {"image": image, "mask": mask, "boxes": boxes, "caption": meta["caption"], "label": meta["label"],
                "id": meta["id"], "index": index, "split": self.split}

    def masks(self) -> torch.Tensor | None:
        """Return every ground-truth mask (N, S, S) bool, or None when the split has no masks."""
        if not all(it["has_mask"] for it in self.items):
            return None
        return torch.stack([self[i]["mask"] for i in range(len(self))])

    def boxes(self) -> list:
        """Return each image's ground-truth boxes (k, 4) at the model's resolution (None where it has none)."""
        return [None if it["boxes"] is None else torch.tensor(it["boxes"], dtype=torch.int64).reshape(-1, 4)
                for it in self.items]


def collate_items(items: list[dict]) -> list[dict]:
    """Return a batch of dataset items as the list itself (the steps of the stages take lists of items)."""
    return items


def cache_splits(dataset: str, root, counts: dict, folder: str, size: int, image_dtype: str = "float32",
                 chunk_size: int = 256) -> dict:
    """Cache each split of ``counts`` ({split: number of images or None for all}) into ``folder/<split>``.

    Return {split: SplitImages}. The images are ``foba_core.data.open_images(dataset, root, split, n)``.
    """
    from foba_core.data import open_images

    out = {}
    for split, n in counts.items():
        sub = os.path.join(folder, split)
        cache_split(open_images(dataset, root, split, n), sub, size, image_dtype, chunk_size, split=split)
        out[split] = SplitImages(sub, split)
    return out


def joined(splits: list) -> torch.utils.data.ConcatDataset:
    """Return the items of several ``SplitImages`` one after the other (each item keeps its ``split``)."""
    return torch.utils.data.ConcatDataset(list(splits))
