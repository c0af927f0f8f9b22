"""Stanford Dogs as distributed: ``images.tar``, ``annotation.tar`` and ``lists.tar`` extracted in one folder.

Layout::

    Images/<wnid>-<breed>/<wnid>_<n>.jpg
    Annotation/<wnid>-<breed>/<wnid>_<n>      PASCAL-VOC-style XML without extension: <size> (width,
                                              height of the annotated image) and one <object> per dog,
                                              each with <bndbox> xmin ymin xmax ymax
    train_list.mat, test_list.mat             MATLAB v5: file_list, annotation_list (N×1 cells of paths
                                              relative to Images/ and Annotation/), labels (1-based)

Every dog of an image becomes one row of ``boxes`` (N, 4), in the file's order; how several dogs are
scored is the metric's business (``foba_core.metrics.BoxIoUAccumulator``: the box enclosing all of
them). The XML coordinates are read as PASCAL VOC defines them, 1-based and inclusive, so
``[xmin - 1, ymin - 1, xmax, ymax]`` is the 0-based box with exclusive end (the authors' loader used
``[xmin, ymin, xmax + 1, ymax + 1]``: one pixel apart); boxes are clipped to the image.

Images come from ImageNet: a few are grayscale, CMYK or a PNG behind a ``.jpg`` name; all are
returned as RGB. The XML ``<size>`` tells in which orientation a box was drawn: when it matches the
EXIF-rotated image only, the image is rotated (see ``foba_core.data._io``).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from foba_core.data._io import (
    RecordDataset, check_split, finite_boxes, load_mat, mat_numbers, mat_strings, require_file,
)
from foba_core.prompts import object_prompt

_LIST_FIELDS = ("file_list", "annotation_list", "labels")
_XML = "a Stanford Dogs annotation (VOC-style XML without file extension, one <object><bndbox> per dog)"


def read_voc_annotation(path: Path) -> tuple[np.ndarray, tuple[int, int] | None]:
    """Return every <object>'s box of a VOC-style XML file as float (N, 4), 0-based with exclusive end, and the
    annotated image size (width, height) from <size> (None when absent or zero)."""
    require_file(path, _XML)
    try:
        root = ET.parse(path).getroot()
        boxes = []
        for obj in root.iter("object"):
            box = obj.find("bndbox")
            if box is None:
                raise ValueError("an <object> has no <bndbox>")
            boxes.append([float(box.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")])
        size = root.find("size")
        width, height = ((int(float(size.find(k).text)) for k in ("width", "height"))
                         if size is not None and size.find("width") is not None and size.find("height") is not None
                         else (0, 0))
    except (ET.ParseError, AttributeError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: expected {_XML} ({err})") from err
    if not boxes:
        raise ValueError(f"{path} has no <object> with a <bndbox>; expected {_XML}")
    boxes = finite_boxes(boxes, str(path))
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise ValueError(f"{path}: a <bndbox> has xmax < xmin or ymax < ymin")
    boxes[:, :2] -= 1.0  # 1-based inclusive -> 0-based; inclusive max == exclusive end after the shift
    return boxes, ((width, height) if width > 0 and height > 0 else None)


def read_split_list(path: Path) -> list[tuple[str, str, int]]:
    """Return (image path, annotation path, 1-based label) triples from a train_list/test_list .mat file."""
    what = "a Stanford Dogs split list (MATLAB file with file_list, annotation_list, labels, as in lists.tar)"
    mat = load_mat(path, what, _LIST_FIELDS)
    try:
        files, annotations = mat_strings(mat["file_list"]), mat_strings(mat["annotation_list"])
        labels = mat_numbers(mat["labels"])
    except ValueError as err:
        raise ValueError(f"{path}: {err}; expected {what}") from err
    if not len(files) == len(annotations) == len(labels):
        raise ValueError(f"{path}: file_list ({len(files)}), annotation_list ({len(annotations)}) and labels "
                         f"({len(labels)}) must have one entry per image")
    return [(f.replace("\\", "/"), a.replace("\\", "/"), int(label))
            for f, a, label in zip(files, annotations, labels, strict=True)]


class StanfordDogs(RecordDataset):
    """Stanford Dogs split as dataset items with all dogs' ``boxes`` (original resolution)."""

    dataset_name = "Stanford Dogs"
    class_word = "dog"  # the object word of y_f = "a photo of a dog" (paper Sec. 3)

    def __init__(self, root: str | Path, split: str = "test"):
        split = check_split(split)
        root = Path(root)
        lists = ["train_list.mat", "test_list.mat"] if split == "all" else [f"{split}_list.mat"]
        records = []
        for list_file in lists:
            for image, annotation, label in read_split_list(root / list_file):
                folder = Path(image).parent.name  # <wnid>-<breed>
                records.append({
                    "path": root / "Images" / image,
                    "annotation_path": str(root / "Annotation" / annotation),
                    "id": Path(image).stem,  # ImageNet id, e.g. n02085620_10074
                    "label": folder.split("-", 1)[-1].replace("_", " "),
                    "class_id": label,  # 1-based, as in the lists
                })
        super().__init__(records, caption=object_prompt(self.class_word))

    def record_annotation(self, record: dict) -> tuple[np.ndarray, tuple[int, int] | None]:
        """Return all dogs' boxes of the record and the annotated size, parsed from its XML annotation."""
        return read_voc_annotation(Path(record["annotation_path"]))
