"""Stanford Cars (Cars196) as distributed: ``cars_train.tgz``, ``cars_test.tgz``, ``car_devkit.tgz`` and
``cars_test_annos_withlabels.mat``.

Layout (from the devkit's README.txt)::

    cars_train/<00001>.jpg, cars_test/<00001>.jpg
    devkit/cars_meta.mat                 class_names: cell array, one name per class
    devkit/cars_train_annos.mat          annotations: struct array with bbox_x1, bbox_y1, bbox_x2,
                                         bbox_y2 (pixels), class (1-based id), fname
    cars_test_annos_withlabels.mat       the same for cars_test/ (in the root or in devkit/)

The bbox fields are MATLAB pixel indices, 1-based and inclusive, so ``[x1 - 1, y1 - 1, x2, y2]`` is
the 0-based box with exclusive end (the authors' loader used ``[x1, y1, x2 + 1, y2 + 1]``: one pixel
apart). Image file names repeat across the two folders, so ids carry the split: ``train_00001``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from foba_core.data._io import RecordDataset, check_split, require_file
from foba_core.toy.world import object_prompt

_ANNOTATION_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


def read_annotations(path: Path) -> list[dict]:
    """Return the rows of a Cars ``annotations`` struct array: 0-based exclusive box, 1-based class, fname."""
    require_file(path, "a Stanford Cars annotation file (MATLAB struct array 'annotations')")
    mat = scipy.io.loadmat(path, squeeze_me=True)
    if "annotations" not in mat:
        raise ValueError(f"{path} has no variable 'annotations'; expected the devkit's struct array")
    annotations = np.atleast_1d(mat["annotations"])
    names = annotations.dtype.names or ()
    missing = [field for field in _ANNOTATION_FIELDS if field not in names]
    if missing:
        hint = " (cars_test_annos.mat has no classes: use cars_test_annos_withlabels.mat)" if missing == ["class"] else ""
        raise ValueError(f"{path}: 'annotations' lacks the fields {missing}{hint}")
    rows = []
    for a in annotations:
        x1, y1, x2, y2 = (float(a[k]) for k in _ANNOTATION_FIELDS[:4])
        rows.append({"box": [x1 - 1.0, y1 - 1.0, x2, y2], "class": int(a["class"]), "fname": str(a["fname"])})
    return rows


def _test_annotations(root: Path) -> Path:
    """Return ``cars_test_annos_withlabels.mat`` from the root or from devkit/."""
    for path in (root / "cars_test_annos_withlabels.mat", root / "devkit" / "cars_test_annos_withlabels.mat"):
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"missing {root / 'cars_test_annos_withlabels.mat'} (also looked in {root / 'devkit'}): it is distributed "
        "apart from car_devkit.tgz and holds the test boxes with their classes")


class StanfordCars(RecordDataset):
    """Stanford Cars split as dataset items with the car's one ``box`` (original resolution)."""

    dataset_name = "Stanford Cars"

    def __init__(self, root: str | Path, split: str = "test"):
        split = check_split(split)
        root = Path(root)
        meta = root / "devkit" / "cars_meta.mat"
        mat = scipy.io.loadmat(require_file(meta, "the devkit's class names (cell array class_names)"), squeeze_me=True)
        if "class_names" not in mat:
            raise ValueError(f"{meta} has no variable 'class_names'; expected the devkit's cell array of class names")
        class_names = [str(name) for name in np.atleast_1d(mat["class_names"])]
        records = []
        for part in ("train", "test") if split == "all" else (split,):
            annotation_file = root / "devkit" / "cars_train_annos.mat" if part == "train" else _test_annotations(root)
            for row in read_annotations(annotation_file):
                if not 1 <= row["class"] <= len(class_names):
                    raise ValueError(f"{annotation_file}: class {row['class']} of {row['fname']} is outside the "
                                     f"{len(class_names)} classes of {meta}")
                records.append({
                    "path": root / f"cars_{part}" / row["fname"],
                    "id": f"{part}_{Path(row['fname']).stem}",
                    "label": class_names[row["class"] - 1],
                    "boxes": np.array([row["box"]]),
                })
        super().__init__(records, caption=object_prompt("car"))
