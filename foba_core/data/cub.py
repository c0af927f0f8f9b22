"""Caltech-UCSD Birds-200-2011 (CUB) as distributed: ``CUB_200_2011.tgz`` plus ``segmentations.tgz``.

Layout (from the dataset's README)::

    CUB_200_2011/images.txt               <image_id> <image_name>            (ids 1-based)
    CUB_200_2011/train_test_split.txt     <image_id> <is_training_image>   (1 train, 0 test)
    CUB_200_2011/image_class_labels.txt   <image_id> <class_id>
    CUB_200_2011/classes.txt              <class_id> <class_name>
    CUB_200_2011/bounding_boxes.txt       <image_id> <x> <y> <width> <height>   (floats, pixels)
    CUB_200_2011/images/<class_name>/<name>.jpg
    segmentations/<class_name>/<name>.png   (separate archive; beside or inside CUB_200_2011/)

Rows are joined on ``image_id`` (never on line order). The box is ``[x, y, x + width, y + height]``:
``(x, y)`` is the 0-based top-left corner, so ``x + width`` is the exclusive end; the reader floors
x1/y1, ceils x2/y2 and clips to the image.

The segmentations are soft: each pixel averages several annotators' binary masks (8-bit, mostly
mode 'L', some 'LA' or palette). A pixel is foreground when ``value / 255 > 0.5`` (``value > 127``),
i.e. a strict majority of annotators; the authors' loader rounds ``value / 255`` the same way.
A mask must have its image's size.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from foba_core.data._io import RecordDataset, check_split, require_file
from foba_core.prompts import object_prompt

MASK_THRESHOLD = 127  # foreground: value / 255 > 0.5, a strict majority of the annotators

_TABLES = {  # file -> (columns after image_id, what a line holds)
    "train_test_split.txt": (["is_training_image"], "lines '<image_id> <is_training_image>' (1 train, 0 test)"),
    "image_class_labels.txt": (["class_id"], "lines '<image_id> <class_id>'"),
    "bounding_boxes.txt": (["x", "y", "width", "height"], "lines '<image_id> <x> <y> <width> <height>' (pixels)"),
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
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not made of {what}: {err}") from err
    if table.empty:
        raise ValueError(f"{path} is empty; expected {what}")
    if table.isna().any().any():
        row = int(np.flatnonzero(table.isna().any(axis=1).to_numpy())[0]) + 1
        raise ValueError(f"{path}, line {row}: expected {what}")
    if table.iloc[:, 0].duplicated().any():
        dup = table.iloc[:, 0][table.iloc[:, 0].duplicated()].iloc[0]
        raise ValueError(f"{path}: id {dup} appears on several lines; expected {what}, one line per id")
    return table


def _numbers(table: pd.DataFrame, columns: list[str], path: Path, what: str) -> pd.DataFrame:
    """Return ``table`` with ``columns`` as floats; a cell that is not a finite number raises, naming file and line."""
    for column in columns:
        values = pd.to_numeric(table[column], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(dtype=np.float64))  # nan (not a number) or inf
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{path}, line {row + 1}: {table[column].iloc[row]!r} is not a finite number; "
                             f"expected {what}")
        table[column] = values.astype(np.float64)
    return table


def _find_segmentations(base: Path, required: bool) -> Path | None:
    """Return the ``segmentations`` folder inside ``base`` or beside it (None if absent and not ``required``)."""
    for folder in (base / "segmentations", base.parent / "segmentations"):
        if folder.is_dir():
            return folder
    if not required:
        warnings.warn(f"CUB-200-2011: no segmentations/ in {base} or {base.parent}; reading boxes only "
                      "(extract segmentations.tgz there for the masks)", stacklevel=3)
        return None
    raise FileNotFoundError(
        f"missing {base / 'segmentations'} and {base.parent / 'segmentations'}: extract segmentations.tgz "
        "(distributed separately from CUB_200_2011.tgz) there, or pass masks=False to read boxes only")


class CUB200(RecordDataset):
    """CUB-200-2011 split as dataset items with the bird's ``mask`` and its one ``box`` (original resolution).

    ``masks``: True (default) requires ``segmentations/`` (a missing folder raises FileNotFoundError naming where
    it was looked for), False never reads it, None reads it when present and warns when it is absent. A missing
    mask file of a present folder is always an error naming the file.
    """

    dataset_name = "CUB-200-2011"
    class_word = "bird"  # the object word of y_f = "a photo of a bird" (paper Sec. 3)

    def __init__(self, root: str | Path, split: str = "test", masks: bool | None = True,
                 mask_threshold: int = MASK_THRESHOLD):
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
            if file == "bounding_boxes.txt":
                table = _numbers(table, columns, base / file, what)
            merged = merged.join(table.set_index("image_id"))
        bad = ~merged["is_training_image"].isin(["0", "1"])
        if bad.any():
            raise ValueError(f"{base / 'train_test_split.txt'}: image {bad.idxmax()} has "
                             f"{merged.loc[bad.idxmax(), 'is_training_image']!r}; expected 1 (train) or 0 (test)")
        small = (merged["width"] < 0) | (merged["height"] < 0)
        if small.any():
            raise ValueError(f"{base / 'bounding_boxes.txt'}: image {small.idxmax()} has a negative width or height; "
                             "expected '<x> <y> <width> <height>' with the top-left corner and the sizes")
        not_ids = [c for c in list(classes["class_id"]) + list(merged["class_id"]) if not str(c).isdigit()]
        if not_ids:
            raise ValueError(f"class id {not_ids[0]!r} in {base / 'classes.txt'} or {base / 'image_class_labels.txt'} "
                             "is not a positive integer; expected 1-based class ids")
        class_names = dict(zip(classes["class_id"], classes["class_name"], strict=True))
        unknown = sorted(set(merged["class_id"]) - set(class_names))
        if unknown:
            raise ValueError(f"{base / 'image_class_labels.txt'} uses class ids {unknown[:5]} that "
                             f"{base / 'classes.txt'} does not define")
        if split != "all":
            merged = merged[merged["is_training_image"] == ("1" if split == "train" else "0")]
        segmentations = _find_segmentations(base, required=masks is True) if masks is not False else None
        records = []
        for _, row in merged.iterrows():
            x, y, w, h = (float(row[k]) for k in ("x", "y", "width", "height"))
            name = Path(row["name"])
            records.append({
                "path": base / "images" / name,
                "id": name.stem,  # e.g. Black_Footed_Albatross_0046_18, unique in CUB
                "label": class_names[row["class_id"]].split(".", 1)[-1].replace("_", " "),
                "class_id": int(row["class_id"]),  # 1-based, as in classes.txt
                "boxes": np.array([[x, y, x + w, y + h]]),  # (x, y): top-left corner, 0-based; sizes in pixels
                "mask_path": segmentations / name.with_suffix(".png") if segmentations is not None else None,
            })
        super().__init__(records, caption=object_prompt(self.class_word), mask_threshold=mask_threshold)
