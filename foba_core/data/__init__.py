"""Dataset readers: ``open_dataset(name, root, split)`` for CUB, Stanford Dogs, Stanford Cars, Human3.6M and the toy world.

Every reader is a sized torch ``Dataset`` of dictionaries: ``image`` (3, H, W) float in [0, 1] at the
original resolution, ``boxes`` (N, 4) int64 ``x1 y1 x2 y2`` (exclusive end), ``mask`` (H, W) bool
where the dataset has masks, ``caption`` ("a photo of a bird|dog|car|human"), ``id``, ``label`` and
``path``. docs/datasets.md describes the expected layouts, the coordinate and orientation conventions and the
box evaluation. ``open_images`` is the bundles' entry point: a split, or a fixed random subset of it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch.utils.data import Dataset

from foba_core.data._io import check_option

# name -> (module, class); imported on use, so that `python -m foba_core.data.h36m` runs its module only once
READERS = {
    "cub": ("foba_core.data.cub", "CUB200"),
    "dogs": ("foba_core.data.dogs", "StanfordDogs"),
    "cars": ("foba_core.data.cars", "StanfordCars"),
    "h36m": ("foba_core.data.h36m", "Human36M"),
    "toy": ("foba_core.toy.world", "ToyWorld"),
    "toy_target": ("foba_core.toy.world", "ToyTarget"),
}
DATASETS = tuple(READERS)

SUBSET_SEED = 0  # the random subset of --max_images depends on the split and N only, never on the run's seed

__all__ = ["DATASETS", "READERS", "SUBSET_SEED", "is_generated", "open_dataset", "open_images"]


def _reader(name: str):
    module, cls = READERS[check_option(name, DATASETS, "dataset")]
    return getattr(importlib.import_module(module), cls)


def is_generated(name: str) -> bool:
    """Return whether dataset ``name`` is generated (the toy world) rather than read from a folder."""
    return bool(getattr(_reader(name), "generated", False))


def open_dataset(name: str, root: str | Path | None, split: str = "test", **kwargs) -> Dataset:
    """Return the ``split`` (train, test or all) of dataset ``name`` (cub, dogs, cars, h36m, toy) stored at ``root``.

    A generated dataset (its reader's ``generated`` is true: the toy world, whose splits are train, val and
    test) ignores ``root``. Extra keyword arguments go to the reader (e.g. ``masks=False`` for CUB,
    ``prepared_dir=`` for a raw Human3.6M copy, ``size=`` for the toy world). docs/datasets.md describes
    each dataset's layout.
    """
    reader = _reader(name)
    if is_generated(name):
        return reader(split=split, **kwargs)
    if root is None:
        raise ValueError(f"open_dataset({name!r}): root is None; pass the folder that holds the {name} files "
                         "(--dataset_dir)")
    return reader(root, split=split, **kwargs)


def open_images(dataset: str, root, split: str, n_images: int | None = None) -> Dataset:
    """Return the images D of one split: ``n_images`` generated items, or a fixed random subset of ``n_images``.

    The subset of a stored dataset is the first ``n_images`` of one permutation seeded by ``SUBSET_SEED``,
    kept in the dataset's order, so every stage that opens the split with the same N sees the same images
    (None: all of them).
    """
    if is_generated(dataset):
        if n_images is None:
            raise ValueError(f"the {dataset} world is generated: pass the number of images (n_images / n_train / "
                             "n_test)")
        return open_dataset(dataset, None, split=split, size=int(n_images))
    data = open_dataset(dataset, root, split=split)
    if len(data) == 0:
        raise ValueError(f"the {split} split of {dataset} at {root} holds no images; check the folder "
                         "(docs/datasets.md; Human3.6M: prepare it with --n_test_frames > 0 for a test split)")
    if n_images is None or int(n_images) >= len(data):
        return data
    if int(n_images) < 1:
        raise ValueError(f"n_images must be >= 1 or None (all images), got {n_images}")
    keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(SUBSET_SEED))[: int(n_images)]
    return torch.utils.data.Subset(data, sorted(keep.tolist()))
