"""MS-CXR (PhysioNet ms-cxr 1.1.0): findings with boxes, box masks, and the image/mask preprocessing.

``MS_CXR_Local_Alignment_v1.1.0.csv`` has one row per box: dicom_id, category_name (one of the eight
findings), label_text (the report phrase), path (``files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.<ext>`` in the
MIMIC-CXR tree), x, y, w, h (box in original image pixels), image_width, image_height, split. One image and
finding can have several rows (several boxes, sometimes several phrases). The paper scores the heat map of a
finding against its boxes with pixel-wise AUC-ROC, so the boxes become one union mask per (image, finding),
mapped through exactly the resize and crop that the image goes through
(``foba_core.transforms.ResizeCenterCropd`` with ``image_mode="area"``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.utils import look_up_option

from foba_med.mimic import IMAGE_FORMATS, find_image, load_cxr_image, read_report
from foba_med.reports import choose_prompt
from foba_med.vocabulary import category_name

MS_CXR_FILE = "MS_CXR_Local_Alignment_v1.1.0.csv"
MS_CXR_COLUMNS = ("dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width",
                  "image_height", "split")
_SUBJECT_STUDY = re.compile(r"p(\d+)/s(\d+)/")
_SPLIT_ALIASES = {"val": "val", "valid": "val", "validate": "val", "validation": "val", "train": "train",
                  "test": "test", "all": "all"}


def read_ms_cxr(csv_path: str | os.PathLike) -> pd.DataFrame:
    """Return the MS-CXR table (one row per box) from the CSV or the folder holding it, checking its columns."""
    csv_path = Path(csv_path)
    if csv_path.is_dir():
        csv_path = csv_path / MS_CXR_FILE
    if not csv_path.is_file():
        raise FileNotFoundError(f"MS-CXR annotations not found: {csv_path} (expected {MS_CXR_FILE}, PhysioNet ms-cxr)")
    df = pd.read_csv(csv_path, dtype={"dicom_id": str, "path": str, "split": str})
    missing = [c for c in MS_CXR_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{csv_path} lacks columns {missing}; found {list(df.columns)}")
    df["category_name"] = [category_name(c) for c in df["category_name"]]
    return df


def ms_cxr_holdout(csv_path: str | os.PathLike) -> tuple[frozenset[str], frozenset[str]]:
    """Return (dicom_ids, subject_ids) of the MS-CXR images, to keep them out of LDM fine-tuning."""
    df = read_ms_cxr(csv_path)
    subjects = {m.group(1) for m in map(_SUBJECT_STUDY.search, df["path"]) if m}
    return frozenset(df["dicom_id"]), frozenset(subjects)


def xywh_to_boxes(x, y, w, h, image_height: int, image_width: int) -> np.ndarray:
    """Return (N, 4) int64 boxes x1 y1 x2 y2 (exclusive end) covering MS-CXR x, y, w, h, clipped to the image."""
    x, y, w, h = (np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in (x, y, w, h))
    boxes = np.stack([np.floor(x), np.floor(y), np.ceil(x + w), np.ceil(y + h)], axis=1)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, image_width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, image_height)
    return boxes.astype(np.int64)


def box_mask(boxes, image_height: int, image_width: int) -> torch.Tensor:
    """Return the bool (H, W) union mask of boxes x1 y1 x2 y2 (exclusive end) in original pixels."""
    mask = torch.zeros(int(image_height), int(image_width), dtype=torch.bool)
    for x1, y1, x2, y2 in np.asarray(boxes, dtype=np.int64).reshape(-1, 4):
        mask[max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)] = True
    return mask


@dataclass(frozen=True)
class Finding:
    """One MS-CXR finding on one image: all its boxes (x1 y1 x2 y2, original pixels) and phrases."""

    dicom_id: str
    category_name: str
    label_texts: tuple[str, ...]
    path: str
    boxes: np.ndarray
    image_height: int
    image_width: int
    split: str

    @property
    def subject_id(self) -> str:
        """The MIMIC subject_id, read from the path."""
        return _SUBJECT_STUDY.search(self.path).group(1)

    @property
    def study_id(self) -> str:
        """The MIMIC study_id, read from the path."""
        return _SUBJECT_STUDY.search(self.path).group(2)

    @property
    def caption(self) -> str:
        """The finding's phrase(s) as one prompt; several distinct phrases are joined as sentences."""
        if len(self.label_texts) == 1:
            return self.label_texts[0]
        return ". ".join(t.strip().rstrip(".") for t in self.label_texts) + "."

    def mask(self) -> torch.Tensor:
        """Return the union of the finding's boxes as a bool (H, W) mask in original pixels."""
        return box_mask(self.boxes, self.image_height, self.image_width)


def group_findings(df: pd.DataFrame) -> list[Finding]:
    """Return one :class:`Finding` per (dicom_id, category_name), in the table's order, with all its boxes."""
    findings = []
    for (dicom_id, category), rows in df.groupby(["dicom_id", "category_name"], sort=False):
        first = rows.iloc[0]
        height, width = int(first["image_height"]), int(first["image_width"])
        findings.append(Finding(
            dicom_id=str(dicom_id),
            category_name=str(category),
            label_texts=tuple(dict.fromkeys(str(t) for t in rows["label_text"])),
            path=str(first["path"]),
            boxes=xywh_to_boxes(rows["x"], rows["y"], rows["w"], rows["h"], height, width),
            image_height=height,
            image_width=width,
            split=str(first["split"]),
        ))
    return findings


class MSCXRDataset(torch.utils.data.Dataset):
    """MS-CXR findings with their images and union box masks, at original resolution.

    Items: ``image`` (1, H, W) float in [0, 1]; ``mask`` bool (H, W) union of the finding's boxes; ``boxes``
    int64 (N, 4) x1 y1 x2 y2; ``caption`` the MS-CXR phrase (``prompt="label_text"``) or the study report's
    impression (``prompt="impression"``, needs the reports); ``category_name``; ``id``
    ("<dicom_id>__<category>"); ``dicom_id``, ``split``, ``path``. ``split`` filters MS-CXR's own split
    column (train | val | test | all). When the local image's size differs from MS-CXR's image_width/height
    (a resized copy), the boxes are scaled to the local image.
    """

    def __init__(
        self,
        csv_path: str | os.PathLike,
        mimic_dir: str | os.PathLike,
        split: str = "all",
        prompt: str = "label_text",
        reports_dir: str | os.PathLike | None = None,
        categories: tuple[str, ...] | None = None,
        image_format: str = "auto",
        transform: Callable[[dict], dict] | None = None,
    ):
        self.mimic_dir = Path(mimic_dir)
        self.reports_dir = Path(reports_dir) if reports_dir is not None else self.mimic_dir
        self.prompt = look_up_option(prompt, ("label_text", "impression"))
        self.image_format = look_up_option(image_format, IMAGE_FORMATS)
        self.transform = transform
        df = read_ms_cxr(csv_path)
        split = _SPLIT_ALIASES[look_up_option(split, tuple(_SPLIT_ALIASES))]
        if split != "all":
            df = df[[_SPLIT_ALIASES.get(str(s).lower(), str(s)) == split for s in df["split"]]]
        if categories is not None:
            df = df[df["category_name"].isin([category_name(c) for c in categories])]
        self.findings = group_findings(df)

    def __len__(self) -> int:
        return len(self.findings)

    def image_path(self, finding: Finding) -> str:
        """Return the finding's image path relative to ``mimic_dir`` (:func:`foba_med.mimic.find_image`: MS-CXR's
        path extension may differ from the local release); FileNotFoundError naming the paths tried."""
        return find_image(self.mimic_dir, finding.subject_id, finding.study_id, finding.dicom_id, self.image_format)

    def __getitem__(self, index: int) -> dict:
        finding = self.findings[index]
        path = self.mimic_dir / self.image_path(finding)
        image = torch.from_numpy(load_cxr_image(path))[None]  # (1, H, W)
        height, width = image.shape[-2:]
        boxes = finding.boxes
        if (height, width) != (finding.image_height, finding.image_width):  # a resized copy of the image
            scale = np.array([width / finding.image_width, height / finding.image_height] * 2)
            boxes = np.round(boxes * scale).astype(np.int64)
        mask = box_mask(boxes, height, width)
        if self.prompt == "impression":
            caption = choose_prompt(read_report(self.reports_dir, finding.subject_id, finding.study_id))[0]
        else:
            caption = finding.caption
        item = {
            "image": image,
            "mask": mask,
            "boxes": torch.from_numpy(boxes),
            "caption": caption,
            "category_name": finding.category_name,
            "id": f"{finding.dicom_id}__{finding.category_name.lower().replace(' ', '_')}",
            "dicom_id": finding.dicom_id,
            "split": finding.split,
            "path": str(path),
        }
        return self.transform(item) if self.transform is not None else item

