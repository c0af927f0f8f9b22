"""A phantom chest X-ray world: synthetic radiographs, MIMIC-style reports and MS-CXR-style boxes.

Each frontal radiograph (drawn by ``foba_med.phantom_drawing``: anatomy, findings, boxes) shows 0-2 of the
eight MS-CXR findings (:func:`sample_findings`), which a MIMIC-style report names (:func:`make_report`).
:func:`write_phantom_mimic` writes the REAL MIMIC-CXR-JPG layout (files/ tree, metadata and split tables,
report .txt files) plus ``MS_CXR_Local_Alignment_v1.1.0.csv``, so the phantom goes through the same readers as
the real data. Everything is a function of the seed.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from foba_core.io import temp_folder
from foba_med.mimic import METADATA_FILE, SPLIT_FILE, relative_image_path, relative_report_path
from foba_med.ms_cxr import MS_CXR_FILE
from foba_med.phantom_drawing import PhantomFinding, render_frontal, render_lateral
from foba_med.vocabulary import CATEGORIES

STAMP_FILE = "phantom.json"
PHANTOM_VERSION = 4  # 4: the chest magnified in the frame; 3: patient shifted, hearts varied; 2: "Left upper lung opacity"
_SEVERITY = {
    "Pleural Effusion": ("small", "moderate", "large"),
    "Pneumothorax": ("small", "moderate", "large"),
    "Cardiomegaly": ("mild", "moderate", "severe"),
    "Edema": ("mild", "moderate"),
}
_LATERAL = ("Atelectasis", "Consolidation", "Lung Opacity", "Pleural Effusion", "Pneumonia", "Pneumothorax")
# edema (both perihilar regions) is only combined with findings it does not overlap
_EDEMA_PARTNERS = ("Cardiomegaly", "Pleural Effusion")


def sample_findings(rng: np.random.Generator, p_normal: float = 0.3) -> list[PhantomFinding]:
    """Return 0 (with probability p_normal), 1 or 2 findings (no boxes yet): categories, sides, severities, zones."""
    if rng.random() < p_normal:
        return []
    n = int(rng.integers(1, 3))
    categories: list[str] = []
    while len(categories) < n:
        cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        pool = categories + [cat]
        clash = cat in categories or ("Edema" in pool and not set(pool) <= {"Edema", *_EDEMA_PARTNERS})
        if not clash:
            categories.append(cat)
    sides = ["left", "right"]
    rng.shuffle(sides)  # two lateralised findings go to opposite lungs
    findings = []
    for cat in categories:
        side = sides.pop() if cat in _LATERAL else ""
        severity = str(rng.choice(_SEVERITY[cat])) if cat in _SEVERITY else ""
        zone = str(rng.choice(("upper", "lower"))) if cat in ("Consolidation", "Lung Opacity", "Pneumonia") else ""
        findings.append(PhantomFinding(cat, side, severity, zone))
    return findings


_FINDINGS_SENTENCE = {
    "Atelectasis": "Plate-like atelectasis is seen at the {side} lung base.",
    "Cardiomegaly": "The heart is {sev}ly enlarged.",
    "Consolidation": "There is consolidation in the {side} {zone} lobe.",
    "Edema": "There is {sev} perihilar haziness with vascular indistinctness, consistent with pulmonary edema.",
    "Lung Opacity": "A hazy opacity is seen in the {side} {zone} lung.",
    "Pleural Effusion": "There is a {sev} {side} pleural effusion with blunting of the costophrenic angle.",
    "Pneumonia": "Patchy airspace opacities in the {side} {zone} lobe are concerning for pneumonia.",
    "Pneumothorax": "A {sev} {side} apical pneumothorax is present; the pleural line is visible.",
}
_EXAMS = {"PA": "CHEST (PA AND LAT)", "AP": "CHEST (PORTABLE AP)"}
_NORMAL_IMPRESSIONS = ("No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.")
_INDICATIONS = ("shortness of breath", "cough and fever", "chest pain", "hypoxia", "evaluate for pneumonia")


def _wrap(text: str) -> str:
    return "\n".join(" " + line for line in textwrap.wrap(text, 76))


def make_report(findings: list[PhantomFinding], view: str, rng: np.random.Generator,
                p_findings_only: float = 0.05) -> str:
    """Return a MIMIC-style free-text report naming ``findings`` (FINDINGS + IMPRESSION), wrapped at 78 columns."""
    exam = _EXAMS[view]
    sentences = [_FINDINGS_SENTENCE[f.category].format(sev=f.severity, side=f.side, zone=f.zone) for f in findings]
    named = {f.category for f in findings}
    if not named & {"Cardiomegaly"}:
        sentences.append("The cardiomediastinal silhouette is within normal limits.")
    if not named & {"Pleural Effusion", "Pneumothorax"}:
        sentences.append("No pleural effusion or pneumothorax is seen.")
    if not findings:
        sentences.insert(0, "The lungs are clear without focal consolidation.")
    if findings:
        items = [f.label_text + "." for f in findings]
        numbered = len(items) > 1 and rng.random() < 0.5
        impression = "\n".join(f"{i}. {t}" for i, t in enumerate(items, 1)) if numbered else " ".join(items)
    else:
        impression = str(rng.choice(_NORMAL_IMPRESSIONS))
    lines = [
        " " * 33 + "FINAL REPORT",
        f" EXAMINATION:  {exam}",
        " ",
        f" INDICATION:  ___-year-old with {rng.choice(_INDICATIONS)}.",
        " ",
        " COMPARISON:  None.",
        " ",
        " FINDINGS:",
        " ",
        _wrap(" ".join(sentences)),
    ]
    if rng.random() >= p_findings_only:
        impression_text = "\n".join(_wrap(line) for line in impression.split("\n"))
        lines += [" ", " IMPRESSION:", " ", impression_text]
    return "\n".join(lines) + "\n"


def _ids(rng: np.random.Generator, n: int, low: int) -> list[str]:
    return [str(low + int(i)) for i in rng.choice(9_000_000, size=n, replace=False)]


def _dicom_id(rng: np.random.Generator) -> str:
    return "-".join(f"{int(v):08x}" for v in rng.integers(0, 2**32, size=5))


def _write_tree(root: Path, params: dict) -> dict:
    """Write the phantom release under ``root``; return counts for the stamp."""
    seed, size, n_subjects = params["seed"], params["size"], params["n_subjects"]
    rng = np.random.default_rng((seed, 7))
    subjects = _ids(rng, n_subjects, 10_000_000)
    studies = _ids(rng, 2 * n_subjects, 50_000_000)
    splits = rng.choice(["train", "validate", "test"], size=n_subjects, p=[0.8, 0.1, 0.1])
    splits[: min(3, n_subjects)] = ["train", "validate", "test"][: min(3, n_subjects)]
    in_ms_cxr = rng.random(n_subjects) < params["ms_cxr_fraction"]
    meta, split_rows, ms_rows = [], [], []
    for si, subject in enumerate(subjects):
        srng = np.random.default_rng((seed, 11, si))
        ms_split = str(srng.choice(["train", "val", "test"], p=[0.6, 0.2, 0.2]))
        for ti in range(1 + int(srng.random() < 0.5)):
            study = studies[2 * si + ti]
            view = "PA" if srng.random() < 0.6 else "AP"
            aspect = 1.0 + srng.uniform(-params["aspect_jitter"], params["aspect_jitter"])
            height, width = size, int(round(size * aspect / 2) * 2)
            image, findings = render_frontal(sample_findings(srng, params["p_normal"]), height, width,
                                             (seed, si, ti))
            images = [(_dicom_id(srng), view, image)]
            if view == "PA" and srng.random() < params["p_lateral"]:
                images.append((_dicom_id(srng), "LATERAL", render_lateral(height, width, (seed, si, ti))))
            date = f"21{int(srng.integers(10, 90)):02d}{int(srng.integers(1, 13)):02d}{int(srng.integers(1, 29)):02d}"
            for dicom_id, image_view, pixels in images:
                path = root / relative_image_path(subject, study, dicom_id, "jpg")
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.round(pixels * 255).astype(np.uint8)).save(path, quality=95)
                meta.append({
                    "dicom_id": dicom_id, "subject_id": subject, "study_id": study,
                    "PerformedProcedureStepDescription": _EXAMS[view],
                    "ViewPosition": image_view, "Rows": height, "Columns": width, "StudyDate": date,
                    "StudyTime": f"{int(srng.integers(0, 24)):02d}{int(srng.integers(0, 60)):02d}00.000",
                    "ProcedureCodeSequence_CodeMeaning": _EXAMS[view],
                    "ViewCodeSequence_CodeMeaning": {"PA": "postero-anterior", "AP": "antero-posterior",
                                                     "LATERAL": "lateral"}[image_view],
                    "PatientOrientationCodeSequence_CodeMeaning": "Erect" if view == "PA" else "Recumbent",
                })
                split_rows.append({"dicom_id": dicom_id, "study_id": study, "subject_id": subject,
                                   "split": splits[si]})
            report = make_report(findings, view, srng, params["p_findings_only"])
            (root / relative_report_path(subject, study)).write_text(report, encoding="utf-8")
            if in_ms_cxr[si]:
                dicom_id = images[0][0]
                for f in findings:
                    for x, y, w, h in f.boxes:
                        ms_rows.append({
                            "dicom_id": dicom_id, "category_name": f.category, "label_text": f.label_text,
                            "path": relative_image_path(subject, study, dicom_id, "jpg"), "x": x, "y": y, "w": w,
                            "h": h, "image_width": width, "image_height": height, "split": ms_split,
                        })
    gz = {"method": "gzip", "mtime": 0}  # no timestamp in the archive: byte-identical trees per seed
    pd.DataFrame(meta).to_csv(root / f"{METADATA_FILE}.gz", index=False, compression=gz)
    pd.DataFrame(split_rows).to_csv(root / f"{SPLIT_FILE}.gz", index=False, compression=gz)
    ms = pd.DataFrame(ms_rows, columns=["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h",
                                        "image_width", "image_height", "split"])
    ms.to_csv(root / MS_CXR_FILE, index=False)
    return {"images": len(meta), "studies": len({m["study_id"] for m in meta}), "subjects": n_subjects,
            "ms_cxr_rows": len(ms), "ms_cxr_per_category": ms.groupby("category_name")["dicom_id"].nunique().to_dict()}


def write_phantom_mimic(
    out_dir: str | os.PathLike,
    n_subjects: int = 1000,
    seed: int = 0,
    size: int = 128,
    p_normal: float = 0.3,
    ms_cxr_fraction: float = 0.25,
    p_lateral: float = 0.15,
    p_findings_only: float = 0.05,
    aspect_jitter: float = 0.1,
) -> Path:
    """Write (or reuse) a phantom MIMIC-CXR-JPG release with MS-CXR boxes under ``out_dir``; return out_dir.

    Each subject has 1-2 studies with one frontal image (PA or AP, ``size`` pixels high, width jittered by
    ``aspect_jitter``), sometimes a lateral, and a report. A ``ms_cxr_fraction`` of the subjects forms the MS-CXR
    subset: every box of their frontal images' findings is a row of MS_CXR_Local_Alignment_v1.1.0.csv, as in the
    real data spread over all MIMIC splits (exclude them from training). The tree is built in a temporary sibling
    folder and moved into place; ``phantom.json`` records the parameters, and a second call with the same
    parameters reuses the tree. A folder holding anything else is an error.
    """
    out_dir = Path(out_dir)
    params = {"generator": "foba_med.phantom", "version": PHANTOM_VERSION, "n_subjects": int(n_subjects),
              "seed": int(seed), "size": int(size), "p_normal": float(p_normal),
              "ms_cxr_fraction": float(ms_cxr_fraction), "p_lateral": float(p_lateral),
              "p_findings_only": float(p_findings_only), "aspect_jitter": float(aspect_jitter)}
    if n_subjects < 1 or size < 32:
        raise ValueError(f"write_phantom_mimic needs n_subjects >= 1 and size >= 32, got {n_subjects}, {size}")
    stamp = out_dir / STAMP_FILE
    if stamp.is_file():
        found = json.loads(stamp.read_text())["params"]
        if found == params:
            return out_dir
        changed = ", ".join(f"{k}={found.get(k)!r} (asked for {params.get(k)!r})"
                            for k in sorted(found.keys() | params.keys()) if found.get(k) != params.get(k))
        raise FileExistsError(f"{out_dir} holds a phantom with other parameters: {changed}; write the phantom into "
                              "another folder (the bundles' --phantom_dir), or read this one as it is (--mimic_dir)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty and is not a phantom tree; choose an empty or new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder(out_dir.parent, f".{out_dir.name}.tmp-")
    try:
        counts = _write_tree(tmp, params)
        (tmp / STAMP_FILE).write_text(json.dumps({"params": params, "counts": counts}, indent=1, sort_keys=True))
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
