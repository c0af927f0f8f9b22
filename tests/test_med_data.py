"""foba_med data side: MIMIC-CXR readers (JPG and DICOM trees), reports, MS-CXR mapping, vocabulary, phantom."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from foba_core.transforms import ResizeCenterCropd, resize_center_crop
from foba_med.mimic import (
    CXRReadError,
    MimicCXRDataset,
    build_index,
    load_cxr_image,
    read_index,
    read_metadata,
    read_split,
    relative_image_path,
    relative_report_path,
)
from foba_med.ms_cxr import (
    MSCXRDataset,
    box_mask,
    group_findings,
    ms_cxr_holdout,
    read_ms_cxr,
    xywh_to_boxes,
)
from foba_med.phantom import write_phantom_mimic
from foba_med.phantom_drawing import PhantomFinding, render_frontal
from foba_med.reports import choose_prompt, parse_sections, truncate_prompts
from foba_med.train import prepare_index
from foba_med.vocabulary import CATEGORIES, DISEASE_TERMS, category_name, find_disease_words

# ----------------------------------------------------------------------------------------------- reports

REPORT_FULL = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 
 INDICATION:  ___F with cough and fever, evaluate for pneumonia.
 
 COMPARISON:  Chest radiograph from ___.
 
 FINDINGS: 
 
 There is a moderate left pleural effusion with adjacent atelectasis.  The
 right lung is clear.  Compared to the prior study: stable mild cardiomegaly.
 No pneumothorax.
 
 IMPRESSION: 
 
 Moderate left pleural effusion, increased since the prior exam.
"""

REPORT_NUMBERED = """                                 FINAL REPORT
 INDICATION:  Shortness of breath.
 
 FINDINGS:  Bibasilar opacities.
 
 IMPRESSION:
 1. Small right pneumothorax
 2. Bibasilar atelectasis, possibly
    with superimposed infection.
"""

REPORT_CONCLUSION = """ EXAMINATION:  Portable chest.

 FINDINGS:  Heart size is enlarged.

 CONCLUSION:  Cardiomegaly with mild
 pulmonary edema.
"""

REPORT_FINDINGS_ONLY = """                                 FINAL REPORT
 HISTORY:  Fever.

 FINDINGS:

 Patchy opacity in the right lower lobe
 concerning for pneumonia.  No effusion.

 NOTIFICATION:  Discussed with Dr. ___ by telephone
 AT 10:04 PM.
"""

REPORT_NO_HEADINGS = """ PA and lateral views of the chest were obtained.

 The lungs are clear.  There is no effusion.
 No acute cardiopulmonary process.
"""


def test_parse_sections_joins_wrapped_lines_and_keeps_lowercase_text():
    sections = parse_sections(REPORT_FULL)
    assert sections["impression"] == "Moderate left pleural effusion, increased since the prior exam."
    # wrapped lines joined, whitespace normalised; "prior study:" (lower case) is text, not a heading
    assert sections["findings"] == (
        "There is a moderate left pleural effusion with adjacent atelectasis. The right lung is clear. "
        "Compared to the prior study: stable mild cardiomegaly. No pneumothorax."
    )
    assert sections["examination"] == "CHEST (PA AND LAT)"
    assert sections["indication"].startswith("___F with cough")
    assert "FINAL REPORT" not in sections.get("preamble", "")


def test_parse_sections_numbered_impression_and_conclusion():
    sections = parse_sections(REPORT_NUMBERED)
    assert sections["impression"] == (
        "Small right pneumothorax. Bibasilar atelectasis, possibly with superimposed infection."
    )
    assert sections["findings"] == "Bibasilar opacities."
    assert parse_sections(REPORT_CONCLUSION)["impression"] == "Cardiomegaly with mild pulmonary edema."
    assert parse_sections(REPORT_FINDINGS_ONLY)["notification"] == "Discussed with Dr. ___ by telephone AT 10:04 PM."


@pytest.mark.parametrize(
    "text, prompt, source",
    [
        (REPORT_FULL, "Moderate left pleural effusion, increased since the prior exam.", "impression"),
        (REPORT_CONCLUSION, "Cardiomegaly with mild pulmonary edema.", "impression"),
        (REPORT_FINDINGS_ONLY, "Patchy opacity in the right lower lobe concerning for pneumonia. No effusion.",
         "findings"),
        (REPORT_NO_HEADINGS, "The lungs are clear. There is no effusion. No acute cardiopulmonary process.",
         "last_paragraph"),
        (" INDICATION:  Cough.\n\n COMPARISON:  None.\n", "None.", "last_paragraph"),
        ("   \n\n  ", "", "none"),
    ],
)
def test_choose_prompt_prefers_impression_then_findings_then_last_paragraph(text, prompt, source):
    assert choose_prompt(text) == (prompt, source)


def _wordpiece_tokenizer(max_length: int):
    """A fast tokenizer with BOS/EOS and one word split into two sub-tokens ("effusion" = effu + ##sion)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = "moderate left pleural effu ##sion no acute process small right pneumothorax . ,".split()
    vocab = {t: i for i, t in enumerate(["<bos>", "<eos>", "<unk>", "<pad>", *words])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 0), ("<eos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", pad_token="<pad>", model_max_length=max_length)


def test_truncate_prompts_counts_logs_and_cuts_at_word_boundaries(caplog):
    tokenizer = _wordpiece_tokenizer(max_length=6)  # BOS + 4 tokens + EOS
    prompts = [
        "No acute process.",  # 4 tokens + 2 specials: fits exactly
        "Moderate left pleural effusion.",  # effusion = 2 sub-tokens: would be cut inside the word
        "Small right pneumothorax, moderate left pleural effusion.",
    ]
    with caplog.at_level(logging.INFO, logger="foba_med.reports"):
        out, n_cut = truncate_prompts(prompts, tokenizer)
    assert n_cut == 2
    assert out[0] == prompts[0]
    assert out[1] == "Moderate left pleural"  # not "Moderate left pleural effu"
    assert out[2] == "Small right pneumothorax,"
    for text in out:
        assert len(tokenizer(text)["input_ids"]) <= 6
    assert any("truncated 2 of 3 prompts to 6 tokens" in r.getMessage() for r in caplog.records)


# -------------------------------------------------------------------------------------------- vocabulary


@pytest.mark.parametrize(
    "prompt, category, words",
    [
        ("Moderate left pleural effusion. No pneumothorax.", "Pleural Effusion", ["pleural effusion"]),
        ("Small bilateral Effusions.", "pleural_effusion", ["Effusions"]),
        ("Bibasilar atelectatic changes and left lower lobe atelectasis.", "Atelectasis",
         ["atelectatic", "atelectasis"]),
        ("Atelectases at both bases.", "atelectasis", ["Atelectases"]),
        ("The heart is moderately enlarged.", "Cardiomegaly", ["heart is moderately enlarged"]),
        ("Enlarged heart and cardiomegaly", "Cardiomegaly", ["Enlarged heart", "cardiomegaly"]),
        ("Multifocal consolidations.", "Consolidation", ["consolidations"]),
        ("Interstitial oedema.", "Edema", ["oedema"]),
        ("Patchy opacities and opacification of the left base.", "Lung Opacity", ["opacities", "opacification"]),
        ("Right lower lobe pneumonia.", "Pneumonia", ["pneumonia"]),
        ("Small left hydropneumothorax.", "Pneumothorax", []),
        ("No acute cardiopulmonary process.", "Edema", []),
    ],
)
def test_find_disease_words(prompt, category, words):
    spans = find_disease_words(prompt, category)
    assert [prompt[a:b] for a, b in spans] == words


def test_vocabulary_covers_the_eight_ms_cxr_categories():
    assert set(DISEASE_TERMS) == set(CATEGORIES) and len(CATEGORIES) == 8
    assert category_name("LUNG_OPACITY") == "Lung Opacity"
    with pytest.raises(ValueError, match="effusion"):
        category_name("effusion")


# ------------------------------------------------------------------------------------------ MIMIC trees

SUBJECTS = {  # subject -> split; studies and images below
    "10000032": "train",
    "10000764": "train",
    "11000011": "validate",
    "12000022": "test",
}


def _image_rows():
    """(subject, study, dicom_id, view, height, width) of a tiny release: frontal and lateral views."""
    return [
        ("10000032", "50414267", "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "PA", 30, 40),
        ("10000032", "50414267", "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "LATERAL", 30, 40),
        ("10000032", "53189527", "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "AP", 36, 28),
        ("10000764", "57375967", "096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4", "PA", 32, 32),
        ("11000011", "51029426", "3d3ebc2c-e4d5e8a4-3e1cbd5c-4fe1e2b1-a6e45f2b", "PA", 32, 32),
        ("12000022", "59128402", "6ad03ed1-97ee17ee-9cf8b320-f7011003-cd93b42d", "AP", 32, 32),
    ]


def _write_tables(root: Path, rows, compress_metadata=True, compress_split=False):
    meta = pd.DataFrame([
        {"dicom_id": d, "subject_id": int(s), "study_id": int(t), "PerformedProcedureStepDescription": "CHEST",
         "ViewPosition": v, "Rows": h, "Columns": w, "StudyDate": 21800506, "StudyTime": 213014.531}
        for s, t, d, v, h, w in rows
    ])
    split = pd.DataFrame([{"dicom_id": d, "study_id": int(t), "subject_id": int(s), "split": SUBJECTS[s]}
                          for s, t, d, *_ in rows])
    meta.to_csv(root / ("mimic-cxr-2.0.0-metadata.csv" + (".gz" if compress_metadata else "")), index=False)
    split.to_csv(root / ("mimic-cxr-2.0.0-split.csv" + (".gz" if compress_split else "")), index=False)


def _pattern(height, width, seed):
    """A deterministic uint8 test image with a bright square in the top-left quarter."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(20, 60, size=(height, width)).astype(np.uint8)
    arr[: height // 4, : width // 4] = 250
    return arr


def _write_reports(root: Path, rows):
    texts = [REPORT_FULL, REPORT_NUMBERED, REPORT_CONCLUSION, REPORT_FINDINGS_ONLY, REPORT_NO_HEADINGS]
    studies = list(dict.fromkeys((s, t) for s, t, *_ in rows))
    for k, (s, t) in enumerate(studies):
        path = root / relative_report_path(s, t)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(texts[k % len(texts)])


@pytest.fixture
def jpg_tree(tmp_path):
    root = tmp_path / "mimic-cxr-jpg"
    root.mkdir()
    rows = _image_rows()
    _write_tables(root, rows)
    for k, (s, t, d, v, h, w) in enumerate(rows):
        path = root / relative_image_path(s, t, d, "jpg")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_pattern(h, w, k)).save(path, quality=95)
    reports = tmp_path / "mimic-cxr-reports"  # the reports zip, unpacked beside the images
    _write_reports(reports, rows)
    return root, reports


def test_read_tables_gz_or_plain_and_missing_file_named(tmp_path):
    rows = _image_rows()
    _write_tables(tmp_path, rows, compress_metadata=True, compress_split=False)
    meta, split = read_metadata(tmp_path), read_split(tmp_path)
    assert len(meta) == len(split) == len(rows)
    assert meta["subject_id"].iloc[0] == "10000032" and set(split["split"]) == {"train", "validate", "test"}
    (tmp_path / "mimic-cxr-2.0.0-split.csv").unlink()
    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-split.csv"):
        read_split(tmp_path)


def test_mimic_dataset_splits_views_and_exclusions(jpg_tree):
    root, reports = jpg_tree
    assert len(MimicCXRDataset(root, "all", reports_dir=reports)) == 5  # the lateral view is left out
    assert len(MimicCXRDataset(root, "all", views=None, reports_dir=reports)) == 6
    train = MimicCXRDataset(root, "train", reports_dir=reports)
    assert len(train) == 3
    assert len(MimicCXRDataset(root, "val", reports_dir=reports)) == 1
    assert len(MimicCXRDataset(root, "validate", reports_dir=reports)) == 1
    assert len(MimicCXRDataset(root, "test", views=("PA",), reports_dir=reports)) == 0
    ms_ids = ["02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"]
    assert len(MimicCXRDataset(root, "train", exclude_dicom_ids=ms_ids, reports_dir=reports)) == 2
    assert len(MimicCXRDataset(root, "train", exclude_subjects=["p10000032"], reports_dir=reports)) == 1
    with pytest.raises(ValueError, match="validate"):
        MimicCXRDataset(root, "valid-ation", reports_dir=reports)

    item = next(it for it in train if it["view"] == "AP")  # a 36 x 28 image: original resolution, 1 channel
    assert item["image"].shape == (1, 36, 28) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["image"][0, :9, :7].mean() > 0.9 > item["image"][0, 20:, 20:].mean()
    assert item["id"] == "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab" and item["subject_id"] == "10000032"
    first = next(it for it in train if it["study_id"] == "50414267")
    assert first["caption"] == "Moderate left pleural effusion, increased since the prior exam."
    assert first["prompt_source"] == "impression"


def test_build_index_collects_problems_and_matches_dataset(jpg_tree, tmp_path):
    root, reports = jpg_tree
    rows = _image_rows()
    # a truncated JPG, a missing image, a missing report, an empty report
    truncated = root / relative_image_path(*rows[3][:3], "jpg")
    truncated.write_bytes(truncated.read_bytes()[:200])
    missing_image = root / relative_image_path(*rows[4][:3], "jpg")
    missing_image.unlink()
    missing_report = reports / relative_report_path(*rows[5][:2])
    missing_report.unlink()
    empty_report = reports / relative_report_path(*rows[2][:2])
    empty_report.write_text("\n   \n")

    out = tmp_path / "index" / "index.csv"
    index, problems = build_index(root, out, reports_dir=reports, num_workers=2)
    named = {Path(name).name: reason for name, reason in problems}
    assert set(named) == {truncated.name, missing_image.name, missing_report.name, empty_report.name}
    assert named[truncated.name].startswith("unreadable image") and truncated.name in named[truncated.name]
    assert named[missing_image.name].startswith("missing image")
    assert named[missing_report.name].startswith("missing report")
    assert named[empty_report.name] == "empty report"
    assert list(index["dicom_id"]) == [rows[0][2]]  # only the first frontal image is intact
    _, quick = build_index(root, tmp_path / "quick.csv", reports_dir=reports, check_images=False)
    assert {Path(name).name for name, _ in quick} == set(named) - {truncated.name}  # only decoding finds it
    assert [p.name for p in out.parent.iterdir()] == ["index.csv"]  # atomic write, no temp left
    on_disk = read_index(out)
    assert list(on_disk.columns) == ["dicom_id", "subject_id", "study_id", "path", "view", "split", "prompt",
                                     "prompt_source"]
    from_index = MimicCXRDataset(root, "all", index_csv=out)
    assert len(from_index) == 1
    assert from_index[0]["caption"] == MimicCXRDataset(root, "all", reports_dir=reports)[0]["caption"]


def test_an_empty_or_unmatched_view_selection_names_the_option_and_the_views(jpg_tree, tmp_path):
    root, reports = jpg_tree
    for views in ([], ["pa"]):  # the index preparation (prepare.yaml): a ValueError, not pandas' KeyError
        with pytest.raises(ValueError, match=r"--views .* in mimic-cxr-2\.0\.0-metadata\.csv are AP, LATERAL, PA"):
            prepare_index(root, tmp_path / "index.csv", views=views, reports_dir=reports)
    prepare_index(root, tmp_path / "index.csv", reports_dir=reports)
    with pytest.raises(ValueError, match=r"--views \[\] .*index\.csv are AP, PA"):  # the training dataset
        MimicCXRDataset(root, "train", views=[], index_csv=tmp_path / "index.csv")
    index, _ = build_index(root, tmp_path / "empty.csv", exclude_subjects=SUBJECTS, reports_dir=reports)
    assert index.empty and list(index.columns) == list(read_index(tmp_path / "empty.csv").columns)  # all held out


def test_corrupt_images_raise_errors_naming_the_file(tmp_path):
    bad_jpg = tmp_path / "broken.jpg"
    bad_jpg.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    bad_dcm = tmp_path / "broken.dcm"
    bad_dcm.write_bytes(b"DICM" * 10)
    for path in (bad_jpg, bad_dcm):
        with pytest.raises(CXRReadError, match=path.name):
            load_cxr_image(path)
    with pytest.raises(FileNotFoundError, match="absent.jpg"):
        load_cxr_image(tmp_path / "absent.jpg")


def test_load_png_16_bit(tmp_path):
    arr = (np.arange(12 * 10).reshape(12, 10) * 500).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "x.png")
    img = load_cxr_image(tmp_path / "x.png")
    np.testing.assert_allclose(img, arr / 65535.0, atol=1e-6)


# ------------------------------------------------------------------------------------------------- DICOM


def _write_dicom(path: Path, raw: np.ndarray, photometric="MONOCHROME2", bits_stored=16, signed=False,
                 slope=None, intercept=None, center=None, width=None, voi_lut=None):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - Presentation
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = raw.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    if voi_lut is not None:
        item = Dataset()
        item.add_new(0x00283002, "US", [len(voi_lut), 0, 16])  # LUT Descriptor: entries, first value, bits
        item.add_new(0x00283006, "US", [int(v) for v in voi_lut])  # LUT Data
        ds.VOILUTSequence = [item]
    ds.PixelData = raw.astype(np.int16 if signed else np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _linear_window(x, center, width):
    """DICOM PS3.3 C.11.2.1.2.1 linear VOI function, scaled to [0, 1]."""
    return np.clip(((x - (center - 0.5)) / (width - 1) + 0.5), 0.0, 1.0)


RAMP12 = (np.arange(16 * 20).reshape(16, 20) * 12).astype(np.int64)  # 0 .. 3828, fits 12 bits


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(bits_stored=16), lambda x: (x - x.min()) / (x.max() - x.min())),
        (dict(bits_stored=12, center=2000, width=1000), lambda x: _linear_window(x, 2000, 1000)),
        (dict(bits_stored=12, slope=2.0, intercept=-1024.0, center=1000, width=4001),
         lambda x: _linear_window(2.0 * x - 1024.0, 1000, 4001)),
        (dict(bits_stored=12, photometric="MONOCHROME1", center=2000, width=3000),
         lambda x: 1.0 - _linear_window(x, 2000, 3000)),
        (dict(bits_stored=16, photometric="MONOCHROME1"), lambda x: 1.0 - (x - x.min()) / (x.max() - x.min())),
        (dict(bits_stored=12, voi_lut=np.sqrt(np.arange(4096) / 4095.0) * 4000 + 50),
         lambda x: np.sqrt(x / 4095.0)),
    ],
    ids=["16bit-minmax", "12bit-window", "rescale-window", "mono1-window", "mono1-minmax", "voi-lut"],
)
def test_load_dicom_luts_windows_and_photometric(tmp_path, kwargs, expected):
    path = _write_dicom(tmp_path / "x.dcm", RAMP12, **kwargs)
    img = load_cxr_image(path)
    assert img.shape == RAMP12.shape and img.dtype == np.float32
    np.testing.assert_allclose(img, expected(RAMP12.astype(np.float64)), atol=2e-3)


def test_dicom_tree_dataset_auto_detects_dcm(tmp_path):
    rows = _image_rows()
    _write_tables(tmp_path, rows, compress_metadata=False, compress_split=True)
    for k, (s, t, d, v, h, w) in enumerate(rows):
        raw = _pattern(h, w, k).astype(np.int64) * 16  # 12-bit data, bright square = high values
        mono1 = k % 2 == 1  # MONOCHROME1 stores the same picture with low values bright
        _write_dicom(tmp_path / relative_image_path(s, t, d, "dcm"), 4095 - raw if mono1 else raw,
                     bits_stored=12, photometric="MONOCHROME1" if mono1 else "MONOCHROME2")
    _write_reports(tmp_path, rows)  # reports unpacked into the same files/ tree
    ds = MimicCXRDataset(tmp_path, "train")
    assert len(ds) == 3
    for item in ds:
        assert item["path"].endswith(".dcm") and item["image"].ndim == 3
        h, w = item["image"].shape[1:]
        # MONOCHROME1 is inverted on load: the square is bright in both photometric interpretations
        assert item["image"][0, : h // 4, : w // 4].mean() > 0.9 > item["image"][0, h // 2:, w // 2:].mean()


def test_auto_format_is_decided_per_image_in_a_tree_of_jpg_and_dcm_files(tmp_path):
    rows = _image_rows()
    _write_tables(tmp_path, rows)
    _write_reports(tmp_path, rows)
    for k, (s, t, d, v, h, w) in enumerate(rows):  # the first image a .jpg, the second a .dcm, ...
        if k % 2:
            _write_dicom(tmp_path / relative_image_path(s, t, d, "dcm"), _pattern(h, w, k).astype(np.int64) * 16,
                         bits_stored=12)
        else:
            path = tmp_path / relative_image_path(s, t, d, "jpg")
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_pattern(h, w, k)).save(path, quality=95)
    index, problems = build_index(tmp_path, tmp_path / "index.csv", views=None)
    assert problems == [] and [Path(p).suffix for p in index["path"]] == [".jpg", ".dcm"] * 3
    items = list(MimicCXRDataset(tmp_path, "all", views=None))
    assert [Path(item["path"]).suffix for item in items] == [".jpg", ".dcm"] * 3
    for item in items:  # both formats decoded: the bright square of _pattern
        h, w = item["image"].shape[1:]
        assert item["image"][0, : h // 4, : w // 4].mean() > 0.9 > item["image"][0, h // 2:, w // 2:].mean()
    for path in [*tmp_path.glob("files/**/*.jpg"), *tmp_path.glob("files/**/*.dcm")]:
        path.unlink()
    with pytest.raises(FileNotFoundError, match="as .jpg or .dcm.*folder holding files/"):
        MimicCXRDataset(tmp_path, "all")


# ------------------------------------------------------------------------------------------------ MS-CXR

MS_ROWS = [  # dicom_id, category, label_text, x, y, w, h, W, H, split
    ("aaaa", "Pleural Effusion", "Small left pleural effusion", 60, 40, 30, 15, 100, 60, "train"),
    ("aaaa", "Pleural Effusion", "Small left pleural effusion", 65, 50, 20, 8, 100, 60, "train"),
    ("aaaa", "Cardiomegaly", "Cardiomegaly", 30, 20, 40, 30, 100, 60, "train"),
    ("bbbb", "Edema", "Mild pulmonary edema", 10, 10, 20, 30, 60, 100, "val"),
    ("bbbb", "Edema", "Interstitial edema", 35.4, 10.2, 15.3, 30.9, 60, 100, "val"),
]


def _write_ms_cxr(root: Path, subject="15724729", study="55825419"):
    df = pd.DataFrame([
        {"dicom_id": d, "category_name": c, "label_text": t,
         "path": relative_image_path(subject, study, d, "dcm"),  # MS-CXR points into the DICOM release
         "x": x, "y": y, "w": w, "h": h, "image_width": W, "image_height": H, "split": s}
        for d, c, t, x, y, w, h, W, H, s in MS_ROWS
    ])
    path = root / "MS_CXR_Local_Alignment_v1.1.0.csv"
    df.to_csv(path, index=False)
    return path


def test_ms_cxr_groups_rows_into_findings_with_union_masks(tmp_path):
    findings = group_findings(read_ms_cxr(_write_ms_cxr(tmp_path)))
    assert [(f.dicom_id, f.category_name, len(f.boxes)) for f in findings] == [
        ("aaaa", "Pleural Effusion", 2), ("aaaa", "Cardiomegaly", 1), ("bbbb", "Edema", 2)]
    effusion, _, edema = findings
    mask = effusion.mask()
    assert mask.shape == (60, 100) and mask.dtype == torch.bool
    assert mask.sum() == 30 * 15 + 20 * 3  # the second box sticks out 3 rows below the first
    assert mask[40, 60] and mask[54, 90 - 1] and not mask[54, 90] and mask[57, 70] and not mask[58, 70]
    np.testing.assert_array_equal(edema.boxes[1], [35, 10, 51, 42])  # float x y w h: floor / ceil
    assert edema.caption == "Mild pulmonary edema. Interstitial edema."
    assert (edema.subject_id, edema.study_id) == ("15724729", "55825419")
    ids, subjects = ms_cxr_holdout(tmp_path)
    assert ids == {"aaaa", "bbbb"} and subjects == {"15724729"}
    np.testing.assert_array_equal(xywh_to_boxes([90], [50], [30], [30], 60, 100), [[90, 50, 100, 60]])


@pytest.mark.parametrize("height, width, box, size, expected", [
    (60, 100, (40, 10, 60, 30), 30, (10, 5, 20, 15)),  # landscape: x shifts by the crop of 10
    (100, 60, (10, 40, 30, 60), 30, (5, 10, 15, 20)),  # portrait: y shifts
    (50, 90, (30, 12, 55, 37), 32, None),  # non-integer scale: check against the pixels
])
def test_box_mask_maps_where_the_pixels_go(height, width, box, size, expected):
    image = torch.zeros(1, height, width)
    mask = box_mask([box], height, width)
    image[0][mask] = 1.0
    out = ResizeCenterCropd(keys=("image", "mask"), size=size, image_mode="area")({"image": image, "mask": mask})
    image_out, mask_out = out["image"], out["mask"]
    assert image_out.shape == (1, size, size) and mask_out.shape == (size, size) and mask_out.dtype == torch.bool
    if expected is not None:
        assert torch.equal(mask_out, box_mask([expected], size, size))
    assert image_out[0][mask_out].mean() > 0.9  # the mapped box sits on the box's pixels
    assert image_out[0][~mask_out].mean() < 0.05


@pytest.mark.parametrize("height, width, size", [(61, 100, 32), (100, 57, 31), (40, 40, 33), (70, 45, 20)])
def test_cxr_preprocess_matches_the_core_pipeline_geometry(height, width, size):
    mask = box_mask([(7, 9, 30, 35), (20, 2, 26, 60)], height, width)
    cxr = ResizeCenterCropd(keys=("image", "mask"), size=size, image_mode="area")  # the radiographs' resampling
    out = cxr({"image": torch.rand(1, height, width), "mask": mask})
    assert torch.equal(out["mask"], resize_center_crop(mask, size, is_mask=True))  # masks: the natural images' way


def test_ms_cxr_dataset_reads_images_and_scales_boxes_of_resized_copies(tmp_path):
    csv = _write_ms_cxr(tmp_path)
    for dicom_id, (h, w) in {"aaaa": (30, 50), "bbbb": (100, 60)}.items():  # "aaaa" is a half-size copy
        path = tmp_path / relative_image_path("15724729", "55825419", dicom_id, "jpg")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((h, w), 128, np.uint8)).save(path)
    (tmp_path / relative_report_path("15724729", "55825419")).write_text(REPORT_FULL)
    ds = MSCXRDataset(csv, tmp_path)
    assert len(ds) == 3 and len(MSCXRDataset(csv, tmp_path, split="validate")) == 1
    effusion = ds[0]
    assert effusion["image"].shape == (1, 30, 50) and effusion["mask"].shape == (30, 50)
    assert effusion["boxes"].tolist()[0] == [30, 20, 45, 28]  # 60, 40, 90, 55 halved
    assert effusion["id"] == "aaaa__pleural_effusion" and effusion["caption"] == "Small left pleural effusion"
    impression = MSCXRDataset(csv, tmp_path, prompt="impression", categories=("edema",))
    assert len(impression) == 1 and impression[0]["caption"].startswith("Moderate left pleural effusion")


# ----------------------------------------------------------------------------------------------- phantom


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_phantom_is_deterministic_and_reused(tmp_path):
    a = write_phantom_mimic(tmp_path / "a", n_subjects=8, seed=3, size=64)
    b = write_phantom_mimic(tmp_path / "b", n_subjects=8, seed=3, size=64)
    c = write_phantom_mimic(tmp_path / "c", n_subjects=8, seed=4, size=64)
    digest = _tree_digest(a)
    assert digest == _tree_digest(b) and digest != _tree_digest(c)
    stamp_time = (a / "phantom.json").stat().st_mtime_ns
    assert write_phantom_mimic(a, n_subjects=8, seed=3, size=64) == a  # same parameters: reused
    assert (a / "phantom.json").stat().st_mtime_ns == stamp_time
    with pytest.raises(FileExistsError, match=r"other parameters: n_subjects=8 \(asked for 9\); .*--mimic_dir"):
        write_phantom_mimic(a, n_subjects=9, seed=3, size=64)
    stamp = json.loads((c / "phantom.json").read_text())
    stamp["params"]["retired_option"] = 0.5  # a parameter this version no longer has
    (c / "phantom.json").write_text(json.dumps(stamp))
    with pytest.raises(FileExistsError, match=r"other parameters: retired_option=0.5 \(asked for None\);"):
        write_phantom_mimic(c, n_subjects=8, seed=4, size=64)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "data.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        write_phantom_mimic(tmp_path / "foreign", n_subjects=8)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_phantom_tree_reads_back_through_the_real_readers(tmp_path):
    root = write_phantom_mimic(tmp_path / "phantom", n_subjects=40, seed=0, size=64, ms_cxr_fraction=0.6)
    ms_ids, ms_subjects = ms_cxr_holdout(root)
    index, problems = build_index(root, root / "index.csv")
    assert problems == [] and len(index) > 40
    assert set(index["view"]) <= {"PA", "AP"} and set(index["split"]) == {"train", "validate", "test"}
    normal = index["prompt"].str.startswith("No acute cardiopulmonary")
    assert 0 < normal.sum() < len(index)
    train = MimicCXRDataset(root, "train", index_csv=root / "index.csv", exclude_subjects=ms_subjects)
    assert len(train) > 0 and not set(train.rows["dicom_id"]) & ms_ids
    item = train[0]
    assert item["image"].shape[1] == 64 and 0 <= item["image"].min() and item["image"].max() <= 1

    prompts = dict(zip(index["dicom_id"], index["prompt"]))
    ms = MSCXRDataset(root, root)
    categories = set()
    for finding in ms.findings:  # the report's prompt and the MS-CXR phrase both name the finding
        categories.add(finding.category_name)
        assert find_disease_words(prompts[finding.dicom_id], finding.category_name), prompts[finding.dicom_id]
        assert find_disease_words(finding.caption, finding.category_name), finding.caption
    assert len(categories) >= 6
    sample = ms[0]
    assert sample["mask"].any() and sample["mask"].shape == sample["image"].shape[1:]


@pytest.mark.parametrize("category, side, severity, zone", [
    ("Atelectasis", "right", "", ""), ("Cardiomegaly", "", "mild", ""), ("Consolidation", "left", "", "upper"),
    ("Edema", "", "mild", ""), ("Lung Opacity", "right", "", "lower"), ("Pleural Effusion", "left", "small", ""),
    ("Pneumonia", "right", "", "upper"), ("Pneumothorax", "left", "small", ""),
])
def test_phantom_findings_are_visible_at_32_pixels(category, side, severity, zone):
    finding = PhantomFinding(category, side, severity, zone)
    with_finding, drawn = render_frontal([finding], 128, 128, seed=(5, 1))
    without, _ = render_frontal([], 128, 128, seed=(5, 1))
    assert [f.category for f in drawn] == [category] and drawn[0].boxes

    def small(img):
        return np.asarray(Image.fromarray(img).resize((32, 32), Image.BOX))

    diff = np.abs(small(with_finding) - small(without))
    inside = np.zeros((32, 32), bool)
    for x, y, w, h in drawn[0].boxes:
        inside[y // 4:(y + h + 3) // 4, x // 4:(x + w + 3) // 4] = True
    if category == "Pleural Effusion":  # the side is the patient's: left lung on the image's right
        right = render_frontal([PhantomFinding(category, "right", severity, zone)], 128, 128, seed=(5, 1))[1]
        assert drawn[0].boxes[0][0] > right[0].boxes[0][0] + right[0].boxes[0][2]  # the same framing, other side
    strongest = np.sort(diff[inside])[-max(4, inside.sum() // 4):]  # crescents and bands fill part of a box
    assert strongest.mean() > 0.08 and diff[~inside].max() < 0.02


def test_the_wrong_word_prompt_puts_the_next_findings_word_in_the_findings_place():
    from foba_med.vocabulary import CATEGORIES, control_category, find_disease_words, wrong_word_prompt

    assert wrong_word_prompt("Small left pleural effusion", "Pleural Effusion") == ("Small left pneumonia", "Pneumonia")
    assert wrong_word_prompt("Heart is mildly enlarged. Cardiomegaly.", "cardiomegaly") == (
        "consolidation. consolidation.", "Consolidation")
    assert wrong_word_prompt("Right apical pneumothorax", "Pneumothorax") == ("Right apical atelectasis", "Atelectasis")
    assert wrong_word_prompt("No acute process", "Edema") == ("No acute process", "Lung Opacity")  # no word: unchanged
    assert sorted(control_category(c) for c in CATEGORIES) == sorted(CATEGORIES)  # every finding controls another
    for category in CATEGORIES:
        prompt, other = wrong_word_prompt(f"Left {category.lower()}", category)
        assert other != category and find_disease_words(prompt, other) and not find_disease_words(prompt, category)


def test_the_phantoms_framing_leaves_little_to_the_centre_prior():
    """Findings as a radiograph places them (either side, both zones, a magnified and shifted chest): a map that
    is only the distance to the image centre scores little (measured on these 120 images: 63.0; phantom v3,
    without the magnification, 73.8)."""
    from foba_core.metrics import auc_roc
    from foba_med.phantom import sample_findings
    from foba_med.scoring import centre_prior

    aucs: dict[str, list[float]] = {}
    for i in range(120):
        rng = np.random.default_rng((0, i))
        _, findings = render_frontal(sample_findings(rng, p_normal=0.0), 64, 64, seed=(0, i))
        for finding in findings:
            mask = torch.zeros(64, 64, dtype=torch.bool)
            for x, y, w, h in finding.boxes:
                mask[y:y + h, x:x + w] = True
            if not mask.all():
                aucs.setdefault(finding.category, []).append(auc_roc(centre_prior(64, 64), mask))
    assert len(aucs) == 8
    assert np.mean([np.mean(a) for a in aucs.values()]) < 0.68
