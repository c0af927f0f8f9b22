"""MIMIC-CXR readers: metadata and split tables, image and report paths, CXR images, the dataset, the index.

Layout (PhysioNet MIMIC-CXR-JPG 2.0.0/2.1.0; MIMIC-CXR 2.0.0 has the same tree with ``.dcm`` files)::

    <mimic_dir>/mimic-cxr-2.0.0-metadata.csv(.gz)   dicom_id, subject_id, study_id, ViewPosition, Rows, ...
    <mimic_dir>/mimic-cxr-2.0.0-split.csv(.gz)      dicom_id, study_id, subject_id, split (train/validate/test)
    <mimic_dir>/files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg
    <reports_dir>/files/p10/p10000032/s50414267.txt (mimic-cxr-reports.zip; reports_dir defaults to mimic_dir)

The paper fine-tunes the LDM on MIMIC-CXR images conditioned on the report's impression and keeps the
MS-CXR images out of training (supplement); pass their dicom_ids (or subjects) as exclusions.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.utils import look_up_option
from PIL import Image

from foba_core.io import atomic_write
from foba_med.reports import choose_prompt

logger = logging.getLogger(__name__)

METADATA_FILE = "mimic-cxr-2.0.0-metadata.csv"
SPLIT_FILE = "mimic-cxr-2.0.0-split.csv"
METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition")
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
INDEX_COLUMNS = ("dicom_id", "subject_id", "study_id", "path", "view", "split", "prompt", "prompt_source")
SPLITS = {"train": "train", "val": "validate", "validate": "validate", "test": "test", "all": "all"}
IMAGE_FORMATS = ("auto", "jpg", "dcm")


class CXRReadError(ValueError):
    """A chest X-ray image or report that exists but cannot be read."""


class CXRImageError(CXRReadError):
    """A chest X-ray image that exists but cannot be decoded."""



def _read_table(mimic_dir: str | os.PathLike, name: str, columns: Sequence[str]) -> pd.DataFrame:
    """Read ``name`` (.csv.gz or .csv) from ``mimic_dir`` with ids as strings, checking ``columns``."""
    candidates = [Path(mimic_dir) / f"{name}.gz", Path(mimic_dir) / name]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"MIMIC-CXR table not found: looked for {candidates[0]} and {candidates[1]}; download it from "
            "PhysioNet MIMIC-CXR-JPG (it is also needed with the DICOM release) and put it in mimic_dir"
        )
    df = pd.read_csv(path, dtype={"dicom_id": str, "subject_id": str, "study_id": str})
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{path} lacks columns {missing}; found {list(df.columns)}")
    return df


def read_metadata(mimic_dir: str | os.PathLike) -> pd.DataFrame:
    """Return the per-image metadata table (dicom_id, subject_id, study_id, ViewPosition, Rows, Columns, ...)."""
    df = _read_table(mimic_dir, METADATA_FILE, METADATA_COLUMNS)
    df["ViewPosition"] = df["ViewPosition"].fillna("").astype(str)
    return df


def read_split(mimic_dir: str | os.PathLike) -> pd.DataFrame:
    """Return the official split table (dicom_id, study_id, subject_id, split in train/validate/test)."""
    return _read_table(mimic_dir, SPLIT_FILE, SPLIT_COLUMNS)


def relative_image_path(subject_id: str | int, study_id: str | int, dicom_id: str, ext: str = "jpg") -> str:
    """Return ``files/p{subject[:2]}/p{subject}/s{study}/{dicom_id}.{ext}``, the image's path in the release."""
    subject = str(subject_id)
    return f"files/p{subject[:2]}/p{subject}/s{study_id}/{dicom_id}.{ext}"


def relative_report_path(subject_id: str | int, study_id: str | int) -> str:
    """Return ``files/p{subject[:2]}/p{subject}/s{study}.txt``, the study's report in mimic-cxr-reports."""
    subject = str(subject_id)
    return f"files/p{subject[:2]}/p{subject}/s{study_id}.txt"


def load_cxr_image(path: str | os.PathLike) -> np.ndarray:
    """Return the radiograph at ``path`` as float32 (H, W) in [0, 1], bright = dense (MONOCHROME2 convention).

    JPG/PNG are read with PIL (8 or 16 bit). DICOM is read with pydicom: Modality LUT / rescale slope and
    intercept, then the VOI LUT or window centre/width, scaled by the output range of that LUT/window (the
    image's own range when it has neither); MONOCHROME1 is inverted. Unreadable files raise CXRImageError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"chest X-ray image not found: {path}")
    try:
        if path.suffix.lower() in (".dcm", ".dicom"):
            return _load_dicom(path)
        return _load_pil(path)
    except (CXRImageError, FileNotFoundError):
        raise
    except Exception as err:  # PIL, pydicom and numpy raise many types for broken files
        raise CXRImageError(f"cannot read chest X-ray image {path}: {type(err).__name__}: {err}") from err


def _load_pil(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        img.load()  # decode now, so that a truncated file fails here
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float32) / 65535.0
        elif img.mode == "F":
            arr = np.asarray(img, dtype=np.float32)
        else:
            arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    return np.clip(arr, 0.0, 1.0)


def _load_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    try:
        ds = pydicom.dcmread(path)
        raw = ds.pixel_array
    except Exception as err:
        hint = ""
        if "decoder" in str(err).lower() or "plugin" in str(err).lower():
            hint = "; compressed DICOM needs a decoder: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"
        raise CXRImageError(f"cannot read DICOM {path}: {type(err).__name__}: {err}{hint}") from err
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or raw.ndim != 2:
        raise CXRImageError(f"{path}: expected a single-frame MONOCHROME1/2 radiograph, got {photometric} {raw.shape}")
    arr = apply_modality_lut(raw, ds)
    if ds.get("VOILUTSequence"):
        if arr.dtype.kind == "f" and np.array_equal(arr, np.round(arr)):
            arr = arr.astype(np.int64)  # a VOI LUT is indexed by integers
        n_entries, first = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor[:2])
        n_entries = n_entries or 2**16  # PS3.3 C.11.2.1.1: 0 means 65536 entries
        out = apply_voi(arr, ds).astype(np.float64)
        table = apply_voi(np.arange(first, first + n_entries), ds).astype(np.float64)  # the whole LUT
        lo, hi = table.min(), table.max()
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        out = apply_windowing(arr, ds)
        with np.errstate(over="ignore"):  # the window's output range: its values far below / above the window
            lo, hi = apply_windowing(np.array([-1e300, 1e300]), ds)
    else:
        out = np.asarray(arr, dtype=np.float64)
        lo, hi = out.min(), out.max()
    img = np.zeros(out.shape, np.float64) if hi == lo else np.clip((out - lo) / (hi - lo), 0.0, 1.0)
    if photometric == "MONOCHROME1":
        img = 1.0 - img  # MONOCHROME1: low values are bright
    return img.astype(np.float32)


def _resolve_split(split: str) -> str:
    return SPLITS[look_up_option(split, tuple(SPLITS))]


def find_image(mimic_dir: str | os.PathLike, subject_id: str | int, study_id: str | int, dicom_id: str,
               image_format: str = "auto") -> str:
    """Return the image's path relative to ``mimic_dir``: the ``image_format`` file, or for ``"auto"`` the .jpg, else
    the .dcm, whichever exists, decided per image (a tree may hold some images as .jpg, others as .dcm).

    Raises FileNotFoundError naming every path tried.
    """
    image_format = look_up_option(image_format, IMAGE_FORMATS)
    paths = [relative_image_path(subject_id, study_id, dicom_id, ext)
             for ext in (("jpg", "dcm") if image_format == "auto" else (image_format,))]
    for path in paths:
        if (Path(mimic_dir) / path).is_file():
            return path
    tried = [str(Path(mimic_dir) / path) for path in paths]
    raise FileNotFoundError(f"chest X-ray image {dicom_id} not found: tried {tried}")


def _listed_path(mimic_dir: Path, row) -> str:
    """The image's path for :func:`image_table` with ``"auto"``: found per image; the .jpg when neither file exists
    (then reported missing where it is read)."""
    try:
        return find_image(mimic_dir, row.subject_id, row.study_id, row.dicom_id)
    except FileNotFoundError:
        return relative_image_path(row.subject_id, row.study_id, row.dicom_id, "jpg")


def select_views(rows: pd.DataFrame, views: Sequence[str] | None, source: str) -> pd.DataFrame:
    """Return the rows whose ``view`` (ViewPosition) is one of ``views``; None keeps every row.

    An empty ``views``, or one that matches none of the rows, raises a ValueError naming the option and the
    views that ``source`` holds.
    """
    if views is None:
        return rows
    kept = rows[rows["view"].isin(list(views))]
    if not len(views) or (kept.empty and len(rows)):
        present = ", ".join(sorted(set(rows["view"]) - {""})) or "none"
        raise ValueError(f"--views {list(views)} selects no image: the views (ViewPosition) in {source} are {present}; "
                         "pass a list of them, e.g. --views \"[PA, AP]\" (the frontal views), or --views None for all")
    return kept


def image_table(
    mimic_dir: str | os.PathLike,
    split: str = "all",
    views: Sequence[str] | None = ("PA", "AP"),
    exclude_dicom_ids: Iterable[str] = (),
    exclude_subjects: Iterable[str | int] = (),
    image_format: str = "auto",
) -> pd.DataFrame:
    """Return one row per selected image: dicom_id, subject_id, study_id, view, split, path (relative).

    Joins the metadata and split tables on dicom_id; ``views`` filters ViewPosition (:func:`select_views`),
    ``split`` is train | val | validate | test | all; excluded images and subjects are dropped. With
    ``image_format="auto"`` each image is looked for as .jpg, then .dcm (:func:`find_image`).
    """
    mimic_dir = Path(mimic_dir)
    meta = read_metadata(mimic_dir)
    splits = read_split(mimic_dir)[["dicom_id", "split"]]
    df = meta.merge(splits, on="dicom_id", how="left", validate="one_to_one")
    if df["split"].isna().any():
        n_missing = int(df["split"].isna().sum())
        logger.warning("%d images of %s have no split row and are left out", n_missing, METADATA_FILE)
        df = df[df["split"].notna()]
    df = select_views(df.rename(columns={"ViewPosition": "view"}), views, METADATA_FILE)
    split_name = _resolve_split(split)
    if split_name != "all":
        df = df[df["split"] == split_name]
    df = df[~df["dicom_id"].isin({str(d) for d in exclude_dicom_ids})]
    df = df[~df["subject_id"].isin({str(s).lstrip("p") for s in exclude_subjects})]
    df = df[["dicom_id", "subject_id", "study_id", "view", "split"]].reset_index(drop=True)
    if look_up_option(image_format, IMAGE_FORMATS) != "auto":
        df["path"] = [relative_image_path(r.subject_id, r.study_id, r.dicom_id, image_format) for r in df.itertuples()]
        return df
    df["path"] = [_listed_path(mimic_dir, r) for r in df.itertuples()]
    if len(df) and not any((mimic_dir / path).is_file() for path in df["path"]):
        raise FileNotFoundError(f"none of the {len(df)} listed images is under {mimic_dir / 'files'} as .jpg or .dcm "
                                f"(first tried: {mimic_dir / df['path'][0]}); is mimic_dir the folder holding files/?")
    return df


def read_report(reports_dir: str | os.PathLike, subject_id: str | int, study_id: str | int) -> str:
    """Return the free-text report of a study (``reports_dir/files/pXX/pXXXXXXXX/sXXXXXXXX.txt``)."""
    path = Path(reports_dir) / relative_report_path(subject_id, study_id)
    if not path.is_file():
        raise FileNotFoundError(f"report not found: {path} (reports_dir must hold the files/ tree of the reports)")
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as err:
        raise CXRReadError(f"cannot read report {path}: {type(err).__name__}: {err}") from err


class MimicCXRDataset(torch.utils.data.Dataset):
    """MIMIC-CXR radiographs with their report prompts, at original resolution.

    Items: ``image`` float tensor (1, H, W) in [0, 1]; ``caption`` the prompt (impression > findings > last
    paragraph); ``id`` the dicom_id; ``subject_id``, ``study_id``, ``view``, ``split``, ``prompt_source``,
    ``path``. With ``index_csv`` (from :func:`build_index`) the rows and prompts come from the index and no
    report is parsed; otherwise they come from the metadata/split tables and each report is read on access.
    ``transform`` (optional) is applied to the item dict.
    """

    def __init__(
        self,
        mimic_dir: str | os.PathLike,
        split: str = "train",
        views: Sequence[str] | None = ("PA", "AP"),
        exclude_dicom_ids: Iterable[str] = (),
        exclude_subjects: Iterable[str | int] = (),
        index_csv: str | os.PathLike | None = None,
        reports_dir: str | os.PathLike | None = None,
        image_format: str = "auto",
        transform: Callable[[dict], dict] | None = None,
    ):
        self.mimic_dir = Path(mimic_dir)
        self.reports_dir = Path(reports_dir) if reports_dir is not None else self.mimic_dir
        self.transform = transform
        exclude_dicom_ids = {str(d) for d in exclude_dicom_ids}
        exclude_subjects = {str(s).lstrip("p") for s in exclude_subjects}
        if index_csv is None:
            self.rows = image_table(mimic_dir, split, views, exclude_dicom_ids, exclude_subjects, image_format)
        else:
            rows = select_views(read_index(index_csv), views, str(index_csv))
            split_name = _resolve_split(split)
            keep = ~rows["dicom_id"].isin(exclude_dicom_ids) & ~rows["subject_id"].isin(exclude_subjects)
            if split_name != "all":
                keep &= rows["split"] == split_name
            self.rows = rows[keep].reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows.iloc[index]
        if "prompt" in self.rows.columns:
            prompt, source = row["prompt"], row["prompt_source"]
        else:
            prompt, source = choose_prompt(read_report(self.reports_dir, row["subject_id"], row["study_id"]))
        path = self.mimic_dir / row["path"]
        item = {
            "image": torch.from_numpy(load_cxr_image(path))[None],  # (1, H, W)
            "caption": prompt,
            "id": row["dicom_id"],
            "subject_id": row["subject_id"],
            "study_id": row["study_id"],
            "view": row["view"],
            "split": row["split"],
            "prompt_source": source,
            "path": str(path),
        }
        return self.transform(item) if self.transform is not None else item


def read_index(index_csv: str | os.PathLike) -> pd.DataFrame:
    """Return an index written by :func:`build_index`, checking its columns."""
    index_csv = Path(index_csv)
    if not index_csv.is_file():
        raise FileNotFoundError(f"index not found: {index_csv}; create it with foba_med.mimic.build_index")
    df = pd.read_csv(index_csv, dtype=str, keep_default_na=False)
    missing = [c for c in INDEX_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{index_csv} lacks index columns {missing}; rebuild it with foba_med.mimic.build_index")
    return df


def build_index(
    mimic_dir: str | os.PathLike,
    output_csv: str | os.PathLike,
    views: Sequence[str] | None = ("PA", "AP"),
    exclude_dicom_ids: Iterable[str] = (),
    exclude_subjects: Iterable[str | int] = (),
    reports_dir: str | os.PathLike | None = None,
    image_format: str = "auto",
    check_images: bool = True,
    num_workers: int = 4,
) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Scan the release once and return (index, problems); the index is also written atomically to output_csv.

    Index columns: dicom_id, subject_id, study_id, path, view, split, prompt, prompt_source (all splits).
    Each study's report is parsed once; with ``check_images`` every image is decoded (in ``num_workers``
    threads). Missing or unreadable images and reports, and empty reports, leave their images out and are
    returned as (file, reason) problems; their counts are logged. Nothing here is fatal except missing tables.
    """
    mimic_dir = Path(mimic_dir)
    reports_dir = Path(reports_dir) if reports_dir is not None else mimic_dir
    rows = image_table(mimic_dir, "all", views, exclude_dicom_ids, exclude_subjects, image_format)
    problems: list[tuple[str, str]] = []
    kinds: Counter[str] = Counter()

    def problem(name: str, kind: str, err: Exception | None = None) -> None:
        problems.append((name, kind if err is None else f"{kind}: {type(err).__name__}: {err}"))
        kinds[kind] += 1

    prompts = _study_prompts(rows, reports_dir, problem)
    bad_images = _unusable_images(rows, mimic_dir, check_images, num_workers, problem)
    keys = list(zip(rows["subject_id"], rows["study_id"]))
    keep = np.array([key in prompts and path not in bad_images for key, path in zip(keys, rows["path"])], dtype=bool)
    index = rows[keep].reset_index(drop=True)
    index["prompt"] = [prompts[key][0] for key, ok in zip(keys, keep) if ok]
    index["prompt_source"] = [prompts[key][1] for key, ok in zip(keys, keep) if ok]
    index = index[list(INDEX_COLUMNS)]
    atomic_write(output_csv, lambda tmp: index.to_csv(tmp, index=False))
    logger.log(
        logging.WARNING if problems else logging.INFO,
        "build_index: %d of %d images indexed in %s; problems: %s",
        len(index), len(rows), output_csv, dict(kinds) or "none",
    )
    return index, problems


def _study_prompts(rows: pd.DataFrame, reports_dir: Path, problem) -> dict[tuple[str, str], tuple[str, str]]:
    """Return {(subject, study): (prompt, source)} of the studies of ``rows``, each report parsed once.

    Missing, unreadable and empty reports are reported to ``problem(name, kind, err)`` and left out.
    """
    prompts = {}
    for subject, study in rows[["subject_id", "study_id"]].drop_duplicates().itertuples(index=False):
        name = relative_report_path(subject, study)
        try:
            prompt, source = choose_prompt(read_report(reports_dir, subject, study))
        except FileNotFoundError as err:
            problem(name, "missing report", err)
            continue
        except CXRReadError as err:
            problem(name, "unreadable report", err)
            continue
        if not prompt:
            problem(name, "empty report")
            continue
        prompts[(subject, study)] = (prompt, source)
    return prompts


def _unusable_images(rows: pd.DataFrame, mimic_dir: Path, check_images: bool, num_workers: int, problem) -> set[str]:
    """Return the paths of ``rows`` whose image is missing (or, with ``check_images``, does not decode).

    Images are checked in ``num_workers`` threads; each failure is reported to ``problem(name, kind, err)``.
    """
    def check(rel_path: str) -> tuple[str, Exception] | None:
        try:
            if check_images:
                load_cxr_image(mimic_dir / rel_path)
            elif not (mimic_dir / rel_path).is_file():
                raise FileNotFoundError(f"chest X-ray image not found: {mimic_dir / rel_path}")
        except (FileNotFoundError, CXRReadError) as err:
            return rel_path, err
        return None

    bad_images: set[str] = set()
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        for failed in pool.map(check, rows["path"]):
            if failed is not None:
                name, err = failed
                problem(name, "missing image" if isinstance(err, FileNotFoundError) else "unreadable image", err)
                bad_images.add(name)
    return bad_images
