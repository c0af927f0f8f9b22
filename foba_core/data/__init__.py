"""Dataset readers: ``open_dataset(name, root, split)`` for CUB, Stanford Dogs, Stanford Cars, Human3.6M and the toy world.

Every reader is a sized torch ``Dataset`` of dictionaries: ``image`` (3, H, W) float in [0, 1] at the
original resolution, ``boxes`` (N, 4) int64 ``x1 y1 x2 y2`` (exclusive end), ``mask`` (H, W) bool
where the dataset has masks, ``caption`` ("a photo of a bird|dog|car|human"), ``id``, ``label`` and
``path``. docs/datasets.md describes the expected layouts.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from torch.utils.data import Dataset

from foba_core.data._io import check_option

# name -> (module, class); imported on use, so that `python -m foba_core.data.h36m` runs its module only once
READERS = {
    "cub": ("foba_core.data.cub", "CUB200"),
    "dogs": ("foba_core.data.dogs", "StanfordDogs"),
    "cars": ("foba_core.data.cars", "StanfordCars"),
    "h36m": ("foba_core.data.h36m", "Human36M"),
    "toy": ("foba_core.toy.world", "ToyWorld"),
}
DATASETS = tuple(READERS)

__all__ = ["DATASETS", "READERS", "open_dataset"]


def open_dataset(name: str, root: str | Path | None, split: str = "test", **kwargs) -> Dataset:
    """Return the ``split`` (train, test or all) of dataset ``name`` (cub, dogs, cars, h36m, toy) stored at ``root``.

    ``toy`` ignores ``root`` and builds ``foba_core.toy.world.ToyWorld(split=split, **kwargs)``, whose splits
    are train, val and test. Extra keyword arguments go to the reader (e.g. ``masks=False`` for CUB).
    """
    name = check_option(name, DATASETS, "dataset")
    module, cls = READERS[name]
    reader = getattr(importlib.import_module(module), cls)
    if name == "toy":
        return reader(split=split, **kwargs)
    if root is None:
        raise ValueError(f"open_dataset({name!r}): root is None; pass the folder that holds the {name} files")
    return reader(root, split=split, **kwargs)
