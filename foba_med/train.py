"""Glue for fine-tuning an LDM on MIMIC-CXR images and report prompts (paper Sec. 4 "Medical", supplement Sec. 8).

The paper fine-tunes Stable Diffusion's U-Net on ~160k MIMIC-CXR images conditioned on the report's
impression, with the text encoder frozen and the MS-CXR images held out for evaluation. The bundles
``bundles/foba_cxr/configs/{prepare,train}.yaml`` wire these functions to ``foba_med.mimic`` (index,
dataset), ``foba_core.diffusion`` (the noise-prediction step) and ``foba_core.engines.ResumableTrainer`` (MONAI's
``SupervisedTrainer`` with resume, gradient clipping, loss log, MLflow), wired in
``configs/fragments/diffusion_trainer.yaml``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NoReturn

import pandas as pd

from foba_core.transforms import ResizeCenterCropd
from foba_med.mimic import MimicCXRDataset, build_index, read_index
from foba_med.ms_cxr import ms_cxr_holdout
from foba_med.phantom import write_phantom_mimic
from foba_med.reports import truncate_prompts

logger = logging.getLogger(__name__)

# Keys of a training item that reach the trainer (the rest of a MimicCXRDataset item is bookkeeping).
TRAIN_KEYS = ("image", "caption", "id")


def phantom_tree(folder: str | os.PathLike) -> str:
    """Return the phantom MIMIC-CXR-JPG tree at ``folder``, writing it first if missing (the default runs' data)."""
    return str(write_phantom_mimic(folder))


def required(key: str, what: str) -> NoReturn:
    """Raise: a setting that a config (e.g. paper.yaml) cannot default must be given on the command line."""
    raise ValueError(f"this configuration needs --{key}: {what}")


def holdout(ms_cxr_csv: str | os.PathLike | None,
            exclude_subjects: Iterable[str | int] = ()) -> tuple[frozenset, frozenset]:
    """Return (dicom_ids, subject_ids) kept out of fine-tuning: MS-CXR images and patients plus ``exclude_subjects``.

    ``ms_cxr_csv=None`` holds out the listed subjects only.
    """
    subjects = {str(s).lstrip("p") for s in exclude_subjects}
    if ms_cxr_csv is None:
        return frozenset(), frozenset(subjects)
    if not Path(ms_cxr_csv).exists():
        raise FileNotFoundError(
            f"MS-CXR table {ms_cxr_csv} not found; pass --ms_cxr_csv <MS_CXR_Local_Alignment_v1.1.0.csv>, "
            "or --ms_cxr_csv None to keep the MS-CXR images in (they are the evaluation set)"
        )
    dicom_ids, ms_subjects = ms_cxr_holdout(ms_cxr_csv)
    return dicom_ids, frozenset(subjects | ms_subjects)


def prepare_index(
    mimic_dir: str | os.PathLike,
    output_csv: str | os.PathLike,
    ms_cxr_csv: str | os.PathLike | None = None,
    exclude_subjects: Iterable[str | int] = (),
    views: Sequence[str] | None = ("PA", "AP"),
    reports_dir: str | os.PathLike | None = None,
    num_workers: int = 4,
) -> pd.DataFrame:
    """Return the index of ``mimic_dir`` (one scan, written to ``output_csv``), printing each broken file and counts.

    MS-CXR images and patients (``ms_cxr_csv``) and ``exclude_subjects`` are left out of the index.
    """
    dicom_ids, subjects = holdout(ms_cxr_csv, exclude_subjects)
    index, problems = build_index(mimic_dir, output_csv, views=views, exclude_dicom_ids=dicom_ids,
                                  exclude_subjects=subjects, reports_dir=reports_dir, num_workers=num_workers)
    for name, reason in problems:
        print(f"  skipped {name}: {reason}", flush=True)
    kinds = Counter(reason.split(":")[0] for _, reason in problems)
    counts = ", ".join(f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in sorted(kinds.items())) or "none"
    splits = {k: int(v) for k, v in index["split"].value_counts().items()}
    print(f"index: {len(index)} images {splits} written to {output_csv}; problems: {counts}", flush=True)
    return index


def load_or_prepare_index(index_csv: str | os.PathLike, mimic_dir: str | os.PathLike, **kwargs) -> str:
    """Return ``index_csv``, building it with :func:`prepare_index` (one scan of ``mimic_dir``) if it does not exist."""
    if Path(index_csv).is_file():
        read_index(index_csv)  # fails early on a foreign file
        print(f"using the index {index_csv}", flush=True)
    else:
        prepare_index(mimic_dir, index_csv, **kwargs)
    return str(index_csv)


def training_transform(image_size: int):
    """Return the MONAI dictionary transforms of a training image: shortest side -> ``image_size``, centre crop, RGB.

    The geometry is ``foba_core.transforms.ResizeCenterCropd`` with area averaging (the one the evaluation
    maps MS-CXR boxes through, ``foba_med.evaluate.prepare_item``); the grayscale radiograph is replicated to
    the three channels the LDM's VAE expects.
    """
    from monai.transforms import Compose, RepeatChanneld, SelectItemsd, ToTensord

    return Compose([
        ResizeCenterCropd(keys="image", size=image_size, image_mode="area"),  # (1, S, S)
        RepeatChanneld(keys="image", repeats=3),  # (3, S, S), grayscale replicated to RGB
        ToTensord(keys="image", track_meta=False),
        SelectItemsd(keys=TRAIN_KEYS),
    ])


def training_dataset(
    mimic_dir: str | os.PathLike,
    index_csv: str | os.PathLike,
    tokenizer,
    image_size: int,
    ms_cxr_csv: str | os.PathLike | None = None,
    exclude_subjects: Iterable[str | int] = (),
    views: Sequence[str] | None = ("PA", "AP"),
    split: str = "train",
    cache_rate: float = 1.0,
):
    """Return the fine-tuning set: items {image (3, S, S) in [0, 1], caption, id} of the official ``split``.

    Rows come from the index (prompt = impression > findings > last paragraph); MS-CXR images and patients
    and ``exclude_subjects`` are held out; prompts longer than the text encoder's limit are cut after their
    last whole word that fits, and the count is printed. ``cache_rate`` of the preprocessed images is kept
    in memory (MONAI ``CacheDataset``; 0 for the full MIMIC-CXR).
    """
    from monai.data import CacheDataset

    dicom_ids, subjects = holdout(ms_cxr_csv, exclude_subjects)
    if ms_cxr_csv is None:
        logger.warning("no MS-CXR table given: the MS-CXR images (the evaluation set) are NOT held out of training")
    images = MimicCXRDataset(mimic_dir, split=split, views=views, exclude_dicom_ids=dicom_ids,
                             exclude_subjects=subjects, index_csv=index_csv)
    if len(images) == 0:
        raise ValueError(f"no {split} images left in {index_csv} after the view filter {views} and the holdout; "
                         "check --mimic_dir / --index_csv and the split file")
    prompts, n_cut = truncate_prompts(list(images.rows["prompt"]), tokenizer)
    images.rows["prompt"] = prompts
    sources = {k: int(v) for k, v in images.rows["prompt_source"].value_counts().items()}
    print(f"training set: {len(images)} {split} images ({len(dicom_ids)} MS-CXR images and {len(subjects)} subjects "
          f"held out); prompt sources {sources}; {n_cut} prompts truncated to {tokenizer.model_max_length} tokens",
          flush=True)
    return CacheDataset(images, transform=training_transform(image_size), cache_rate=cache_rate, progress=False)


def save_finetuned(pipe, folder: str | os.PathLike, image_size: int, train_log: str | os.PathLike | None = None,
                   **settings) -> Path:
    """Save the fine-tuned pipeline as a diffusers folder (``models.save_pipeline``) and return the folder.

    ``foba.json`` keeps the source model's ``text_attention_mask`` and records the source, the training
    image size, ``settings`` and the loss summary of ``train_log`` (``LossLog``'s JSON, without the losses).
    """
    from foba_core.models import save_pipeline

    extra = {"finetuned_from": getattr(pipe, "foba_source", None), "image_size": int(image_size), **settings}
    if train_log is not None and Path(train_log).is_file():
        extra["training"] = {k: v for k, v in json.loads(Path(train_log).read_text()).items() if k != "losses"}
    folder = save_pipeline(pipe, folder, extra)
    print(f"saved the fine-tuned model to {folder}", flush=True)
    return folder
