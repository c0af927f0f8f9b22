"""Stanford Dogs as distributed: ``images.tar``, ``annotation.tar`` and ``lists.tar`` extracted in one folder.

Layout::

    Images/<wnid>-<breed>/<wnid>_<n>.jpg
    Annotation/<wnid>-<breed>/<wnid>_<n>      PASCAL-VOC-style XML without extension, one <object>
                                              per dog, each with <bndbox> xmin ymin xmax ymax
    train_list.mat, test_list.mat             MATLAB v5: file_list, annotation_list (cells of paths
                                              relative to Images/ and Annotation/), labels (1-based)

Every dog of an image becomes one row of ``boxes``. The XML coordinates are read as PASCAL VOC
defines them, 1-based and inclusive, so ``[xmin - 1, ymin - 1, xmax, ymax]`` is the 0-based box with
exclusive end (the authors' loader used ``[xmin, ymin, xmax + 1, ymax + 1]``: one pixel apart).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import scipy.io

from foba_core.data._io import RecordDataset, check_split, require_file
from foba_core.toy.world import object_prompt

_LIST_FIELDS = ("file_list", "annotation_list", "labels")


def read_voc_boxes(path: Path) -> np.ndarray:
    """Return every <object>'s box of a VOC-style XML file as float (N, 4), 0-based with exclusive end."""
    require_file(path, "a Stanford Dogs annotation (VOC-style XML, no file extension)")
    try:
        root = ET.parse(path).getroot()
        boxes = [[float(obj.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")]
                 for obj in root.iter("object")]
    except (ET.ParseError, AttributeError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: expected VOC XML with <object><bndbox><xmin>… per dog ({err})") from err
    boxes = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    boxes[:, :2] -= 1.0  # 1-based inclusive -> 0-based; inclusive max == exclusive end after the shift
    return boxes


def read_split_list(path: Path) -> list[tuple[str, str, int]]:
    """Return (image path, annotation path, 1-based label) triples from a train_list/test_list .mat file."""
    require_file(path, "a Stanford Dogs split list (MATLAB file with file_list, annotation_list, labels)")
    mat = scipy.io.loadmat(path, squeeze_me=True)
    missing = [field for field in _LIST_FIELDS if field not in mat]
    if missing:
        raise ValueError(f"{path} lacks the fields {missing}; expected {list(_LIST_FIELDS)} as in lists.tar")
    files, annotations, labels = (np.atleast_1d(mat[field]) for field in _LIST_FIELDS)
    if not len(files) == len(annotations) == len(labels):
        raise ValueError(f"{path}: file_list ({len(files)}), annotation_list ({len(annotations)}) and labels "
                         f"({len(labels)}) must have one entry per image")
    return [(str(f), str(a), int(label)) for f, a, label in zip(files, annotations, labels, strict=True)]


class StanfordDogs(RecordDataset):
    """Stanford Dogs split as dataset items with all dogs' ``boxes`` (original resolution)."""

    dataset_name = "Stanford Dogs"

    def __init__(self, root: str | Path, split: str = "test"):
        split = check_split(split)
        root = Path(root)
        lists = ["train_list.mat", "test_list.mat"] if split == "all" else [f"{split}_list.mat"]
        records = []
        for list_file in lists:
            for image, annotation, _ in read_split_list(root / list_file):
                folder = Path(image).parent.name  # <wnid>-<breed>
                records.append({
                    "path": root / "Images" / image,
                    "annotation_path": str(root / "Annotation" / annotation),
                    "id": Path(image).stem,  # ImageNet id, e.g. n02085620_10074
                    "label": folder.split("-", 1)[-1].replace("_", " "),
                })
        super().__init__(records, caption=object_prompt("dog"))

    def record_boxes(self, record: dict) -> np.ndarray:
        """Return all dogs' boxes of the record, parsed from its XML annotation."""
        return read_voc_boxes(Path(record["annotation_path"]))
