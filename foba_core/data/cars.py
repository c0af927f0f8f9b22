"""Stanford Cars (Cars196) in either of its two distributions.

1. The split archives ``cars_train.tgz``, ``cars_test.tgz``, ``car_devkit.tgz`` and, apart from them,
   ``cars_test_annos_withlabels.mat`` (layout from the devkit's README.txt)::

    cars_train/<00001>.jpg, cars_test/<00001>.jpg
    devkit/cars_meta.mat                 class_names: 1×196 cell array, one name per class
    devkit/cars_train_annos.mat          annotations: 1×N struct array with bbox_x1, bbox_y1, bbox_x2,
                                         bbox_y2 (pixels), class (1-based id), fname
    cars_test_annos_withlabels.mat       the same for cars_test/ (in the root or in devkit/); the devkit's
                                         own cars_test_annos.mat has no class and is not enough

   A copy whose image folders are nested one level (``cars_train/cars_train/``) is read too.

2. The single archive ``car_ims.tgz`` with ``cars_annos.mat``::

    car_ims/<000001>.jpg
    cars_annos.mat                       annotations: struct array with relative_im_path
                                         ('car_ims/000001.jpg'), bbox_x1, bbox_y1, bbox_x2, bbox_y2, class,
                                         test (1 test, 0 train); class_names: cell array

The bbox fields are MATLAB pixel indices, 1-based and inclusive, so ``[x1 - 1, y1 - 1, x2, y2]`` is
the 0-based box with exclusive end (the authors' loader used ``[x1, y1, x2 + 1, y2 + 1]``: one pixel
apart); boxes are clipped to the image. Image file names repeat across ``cars_train/`` and
``cars_test/``, so ids there carry the split (``train_00001``); in the ``car_ims`` distribution the id
is the file stem (``000001``). A few images are grayscale; all are returned as RGB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from foba_core.data._io import (
    RecordDataset, check_split, finite_boxes, load_mat, mat_number, mat_string, mat_strings, mat_struct_rows,
)
from foba_core.prompts import object_prompt

_BOX_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
_ANNOTATION_FIELDS = (*_BOX_FIELDS, "class", "fname")
_ANNOS_FIELDS = ("relative_im_path", *_BOX_FIELDS, "class", "test")
_WHAT = "a Stanford Cars annotation file (MATLAB struct array 'annotations')"


def _box(row: dict, name: str) -> list[float]:
    """The 0-based, exclusive-end box of the annotation row of image ``name`` (MATLAB 1-based inclusive pixel
    indices); a coordinate that is not finite raises, naming the image."""
    x1, y1, x2, y2 = finite_boxes([[mat_number(row[k]) for k in _BOX_FIELDS]], name)[0]
    return [x1 - 1.0, y1 - 1.0, x2, y2]


def read_annotations(path: Path) -> list[dict]:
    """Return the rows of a devkit ``annotations`` struct array: 0-based exclusive box, 1-based class, fname."""
    mat = load_mat(path, _WHAT, ("annotations",))
    names = np.asarray(mat["annotations"]).dtype.names or ()
    if "fname" in names and "class" not in names:
        raise ValueError(f"{path}: 'annotations' has no field 'class' - cars_test_annos.mat has no classes: "
                         "use cars_test_annos_withlabels.mat")
    rows = []
    try:
        for a in mat_struct_rows(mat["annotations"], _ANNOTATION_FIELDS, path, "annotations"):
            fname = mat_string(a["fname"])
            rows.append({"box": _box(a, fname), "class": int(mat_number(a["class"])), "fname": fname})
    except ValueError as err:
        raise ValueError(f"{path}: {err}; expected {_WHAT} with fields {list(_ANNOTATION_FIELDS)}") from err
    return rows


def read_class_names(path: Path) -> list[str]:
    """Return the class names of ``class_names`` (cell array or char matrix) in a Cars .mat file."""
    mat = load_mat(path, "the Stanford Cars class names (cell array class_names)", ("class_names",))
    try:
        return mat_strings(mat["class_names"])
    except ValueError as err:
        raise ValueError(f"{path}: 'class_names' {err}") from err


def _test_annotations(root: Path) -> Path:
    """Return ``cars_test_annos_withlabels.mat`` from the root or from devkit/ (or, failing that, a
    ``devkit/cars_test_annos.mat`` that does have the field ``class``)."""
    for path in (root / "cars_test_annos_withlabels.mat", root / "devkit" / "cars_test_annos_withlabels.mat"):
        if path.is_file():
            return path
    unlabelled = root / "devkit" / "cars_test_annos.mat"
    if unlabelled.is_file():
        names = np.asarray(load_mat(unlabelled, _WHAT, ("annotations",))["annotations"]).dtype.names or ()
        if "class" in names:
            return unlabelled
    raise FileNotFoundError(
        f"missing {root / 'cars_test_annos_withlabels.mat'} (also looked in {root / 'devkit'}): it is distributed "
        "apart from car_devkit.tgz and holds the test boxes with their classes")


def _image_folder(root: Path, part: str) -> Path:
    """``root/cars_<part>``, or ``root/cars_<part>/cars_<part>`` when the archive was extracted one level deeper."""
    folder = root / f"cars_{part}"
    nested = folder / f"cars_{part}"
    return nested if nested.is_dir() and not any(folder.glob("*.jpg")) else folder


def _check_class(cls: int, n: int, annotation_file: Path, name: str, classes_file: Path) -> None:
    if not 1 <= cls <= n:
        raise ValueError(f"{annotation_file}: class {cls} of {name} is outside the {n} classes of {classes_file}")


class StanfordCars(RecordDataset):
    """Stanford Cars split as dataset items with the car's one ``box`` (original resolution)."""

    dataset_name = "Stanford Cars"
    class_word = "car"  # the object word of y_f = "a photo of a car" (paper Sec. 3)

    def __init__(self, root: str | Path, split: str = "test"):
        split = check_split(split)
        root = Path(root)
        devkit = root / "devkit"
        if (devkit / "cars_train_annos.mat").is_file() or (devkit / "cars_meta.mat").is_file():
            records = self._devkit_records(root, split)
        elif (root / "cars_annos.mat").is_file():
            records = self._cars_annos_records(root, split)
        else:
            raise FileNotFoundError(
                f"missing {devkit / 'cars_meta.mat'} and {devkit / 'cars_train_annos.mat'} (car_devkit.tgz, with "
                f"cars_train/, cars_test/ and cars_test_annos_withlabels.mat) and {root / 'cars_annos.mat'} "
                "(with car_ims/): point root at a folder holding one of the two Stanford Cars distributions")
        super().__init__(records, caption=object_prompt(self.class_word))

    @staticmethod
    def _devkit_records(root: Path, split: str) -> list[dict]:
        meta = root / "devkit" / "cars_meta.mat"
        class_names = read_class_names(meta)
        records = []
        for part in ("train", "test") if split == "all" else (split,):
            annotation_file = root / "devkit" / "cars_train_annos.mat" if part == "train" else _test_annotations(root)
            folder = _image_folder(root, part)
            for row in read_annotations(annotation_file):
                _check_class(row["class"], len(class_names), annotation_file, row["fname"], meta)
                records.append({
                    "path": folder / row["fname"],
                    "id": f"{part}_{Path(row['fname']).stem}",
                    "label": class_names[row["class"] - 1],
                    "class_id": row["class"],  # 1-based, as in the devkit
                    "boxes": np.array([row["box"]]),
                })
        return records

    @staticmethod
    def _cars_annos_records(root: Path, split: str) -> list[dict]:
        path = root / "cars_annos.mat"
        mat = load_mat(path, f"{_WHAT} with relative_im_path and test", ("annotations",))
        classes_file = path if "class_names" in mat else root / "devkit" / "cars_meta.mat"
        class_names = read_class_names(classes_file)
        records = []
        try:
            rows = mat_struct_rows(mat["annotations"], _ANNOS_FIELDS, path, "annotations")
            for a in rows:
                relative = mat_string(a["relative_im_path"]).replace("\\", "/")
                is_test = int(mat_number(a["test"]))
                if is_test not in (0, 1):
                    raise ValueError(f"'test' of {relative} is {is_test}; expected 1 (test) or 0 (train)")
                if split != "all" and is_test != (split == "test"):
                    continue
                cls = int(mat_number(a["class"]))
                _check_class(cls, len(class_names), path, relative, classes_file)
                records.append({
                    "path": root / relative,
                    "id": Path(relative).stem,
                    "label": class_names[cls - 1],
                    "class_id": cls,
                    "boxes": np.array([_box(a, relative)]),
                })
        except ValueError as err:
            if str(path) in str(err):
                raise
            raise ValueError(f"{path}: {err}; expected {_WHAT} with fields {list(_ANNOS_FIELDS)}") from err
        return records
