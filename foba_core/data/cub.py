"""Caltech-UCSD Birds-200-2011 (CUB) as distributed: ``CUB_200_2011.tgz`` plus ``segmentations.tgz``.

Layout (from the dataset's README)::

    CUB_200_2011/images.txt               <image_id> <image_name>
    CUB_200_2011/train_test_split.txt     <image_id> <is_training_image>   (1 train, 0 test)
    CUB_200_2011/image_class_labels.txt   <image_id> <class_id>
    CUB_200_2011/classes.txt              <class_id> <class_name>
    CUB_200_2011/bounding_boxes.txt       <image_id> <x> <y> <width> <height>   (floats, pixels)
    CUB_200_2011/images/<class_name>/<name>.jpg
    segmentations/<class_name>/<name>.png   (separate archive; beside or inside CUB_200_2011/)

The segmentations are soft: each pixel averages several annotators' binary masks (8-bit, mostly
mode 'L', some 'LA'). A pixel is foreground when ``value / 255 > 0.5`` (``value > 127``), i.e. a
strict majority of annotators; the authors' loader rounds ``value / 255`` the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from foba_core.data._io import RecordDataset, check_split, require_file
from foba_core.toy.world import object_prompt

MASK_THRESHOLD = 127  # foreground: value / 255 > 0.5, a strict majority of the annotators

_TABLES = {  # file -> (columns after image_id, what a line holds)
    "train_test_split.txt": (["is_training_image"], "lines '<image_id> <is_training_image>'"),
    "image_class_labels.txt": (["class_id"], "lines '<image_id> <class_id>'"),
    "bounding_boxes.txt": (["x", "y", "width", "height"], "lines '<image_id> <x> <y> <width> <height>'"),
}


def find_cub_base(root: str | Path) -> Path:
    """Return the folder holding ``images.txt``: ``root`` itself or ``root/CUB_200_2011``."""
    root = Path(root)
    for base in (root, root / "CUB_200_2011"):
        if (base / "images.txt").is_file():
            return base
    raise FileNotFoundError(
        f"missing {root / 'images.txt'} and {root / 'CUB_200_2011' / 'images.txt'}: point root at the "
        "CUB_200_2011 folder extracted from CUB_200_2011.tgz, or at the folder that holds it")


def _read_table(path: Path, columns: list[str], what: str) -> pd.DataFrame:
    """Read a whitespace-separated CUB index file with the given columns; every cell must be present."""
    require_file(path, what)
    try:
        table = pd.read_csv(path, sep=r"\s+", header=None, names=columns, dtype=str)
    except pd.errors.ParserError as err:
        raise ValueError(f"{path} is not made of {what}: {err}") from err
    if table.isna().any().any():
        row = int(np.flatnonzero(table.isna().any(axis=1).to_numpy())[0]) + 1
        raise ValueError(f"{path}, line {row}: expected {what}")
    return table


def _find_segmentations(base: Path) -> Path:
    """Return the ``segmentations`` folder inside ``base`` or beside it."""
    for folder in (base / "segmentations", base.parent / "segmentations"):
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f"missing {base / 'segmentations'} and {base.parent / 'segmentations'}: extract segmentations.tgz "
        "(distributed separately from CUB_200_2011.tgz) there, or pass masks=False to read boxes only")


class CUB200(RecordDataset):
    """CUB-200-2011 split as dataset items with the bird's ``mask`` and its one ``box`` (original resolution)."""

    dataset_name = "CUB-200-2011"

    def __init__(self, root: str | Path, split: str = "test", masks: bool = True, mask_threshold: int = MASK_THRESHOLD):
        split = check_split(split)
        base = find_cub_base(root)
        images = _read_table(base / "images.txt", ["image_id", "name"], "lines '<image_id> <image_name>'")
        classes = _read_table(base / "classes.txt", ["class_id", "class_name"], "lines '<class_id> <class_name>'")
        merged = images.set_index("image_id")
        for file, (columns, what) in _TABLES.items():
            table = _read_table(base / file, ["image_id", *columns], what)
            if len(table) != len(images) or set(table["image_id"]) != set(images["image_id"]):
                raise ValueError(f"{base / 'images.txt'} lists {len(images)} images but {base / file} has "
                                 f"{len(table)} rows for other image ids: both must hold one line per image")
            merged = merged.join(table.set_index("image_id"))
        class_names = dict(zip(classes["class_id"], classes["class_name"], strict=True))
        unknown = sorted(set(merged["class_id"]) - set(class_names))
        if unknown:
            raise ValueError(f"{base / 'image_class_labels.txt'} uses class ids {unknown[:5]} that "
                             f"{base / 'classes.txt'} does not define")
        if split != "all":
            merged = merged[merged["is_training_image"] == ("1" if split == "train" else "0")]
        segmentations = _find_segmentations(base) if masks else None
        records = []
        for _, row in merged.iterrows():
            x, y, w, h = (float(row[k]) for k in ("x", "y", "width", "height"))
            name = Path(row["name"])
            records.append({
                "path": base / "images" / name,
                "id": name.stem,  # e.g. Black_Footed_Albatross_0046_18, unique in CUB
                "label": class_names[row["class_id"]].split(".", 1)[-1].replace("_", " "),
                "boxes": np.array([[x, y, x + w, y + h]]),  # (x, y) top-left, sizes in pixels
                "mask_path": segmentations / name.with_suffix(".png") if segmentations is not None else None,
            })
        super().__init__(records, caption=object_prompt("bird"), mask_threshold=mask_threshold)
