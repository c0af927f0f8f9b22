"""A phantom chest X-ray world: synthetic radiographs, MIMIC-style reports and MS-CXR-style boxes.

Frontal images show a chest outline, two dark lung fields with vascular markings and rib hints, the
mediastinum and spine, clavicles, the heart shadow and the diaphragm domes; 0-2 of the eight MS-CXR findings
are drawn on top, each with its boxes (x, y, w, h in original pixels). Radiological convention: the patient's
right is on the image's left. :func:`write_phantom_mimic` writes the REAL MIMIC-CXR-JPG layout (files/ tree,
metadata and split tables, report .txt files) plus ``MS_CXR_Local_Alignment_v1.1.0.csv``, so the phantom goes
through the same readers as the real data. Everything is a function of the seed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from foba_med.mimic import METADATA_FILE, SPLIT_FILE, relative_image_path, relative_report_path
from foba_med.ms_cxr import MS_CXR_FILE
from foba_med.vocabulary import CATEGORIES

STAMP_FILE = "phantom.json"
PHANTOM_VERSION = 2  # 2: "Left upper lung opacity" (was "Opacity in the left upper lung")
_SEVERITY = {
    "Pleural Effusion": ("small", "moderate", "large"),
    "Pneumothorax": ("small", "moderate", "large"),
    "Cardiomegaly": ("mild", "moderate", "severe"),
    "Edema": ("mild", "moderate"),
}
_LATERAL = ("Atelectasis", "Consolidation", "Lung Opacity", "Pleural Effusion", "Pneumonia", "Pneumothorax")
# edema (both perihilar regions) is only combined with findings it does not overlap
_EDEMA_PARTNERS = ("Cardiomegaly", "Pleural Effusion")


@dataclass
class PhantomFinding:
    """One drawn finding: MS-CXR category, patient side, severity, lung zone and boxes (x, y, w, h)."""

    category: str
    side: str = ""  # "left" | "right" (the patient's) | "" (cardiomegaly, edema: both sides)
    severity: str = ""
    zone: str = ""  # "upper" | "lower" for lobar findings
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)

    @property
    def label_text(self) -> str:
        """The MS-CXR-style phrase naming the finding, e.g. "Moderate left pleural effusion"."""
        sev, side, zone = self.severity, self.side, self.zone
        phrase = {
            "Atelectasis": f"{side} basilar atelectasis",
            "Cardiomegaly": f"{sev} cardiomegaly",
            "Consolidation": f"{side} {zone} lobe consolidation",
            "Edema": f"{sev} pulmonary edema",
            "Lung Opacity": f"{side} {zone} lung opacity",
            "Pleural Effusion": f"{sev} {side} pleural effusion",
            "Pneumonia": f"{side} {zone} lobe pneumonia",
            "Pneumothorax": f"{sev} {side} apical pneumothorax",
        }[self.category]
        return phrase[0].upper() + phrase[1:]


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


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x, y, w, h) of the True pixels, None when there are too few to see."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 6:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def _fade(haze: np.ndarray, floor: float = 0.2) -> np.ndarray:
    """A haze profile that reaches 0 where ``haze`` falls to ``floor``: the finding has an edge for its box."""
    return np.clip((haze - floor) / (1.0 - floor), 0.0, 1.0)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(img, sigma) if sigma > 0 else img


class _Chest:
    """The anatomy of one frontal radiograph: masks and coordinates, drawn from ``rng``."""

    def __init__(self, rng: np.random.Generator, height: int, width: int, heart_scale: float):
        self.h, self.w = height, width
        self.yy, self.xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5  # pixel centres
        self.cx = width * (0.5 + rng.uniform(-0.02, 0.02))
        self.top = height * rng.uniform(0.12, 0.16)
        bottom = height * rng.uniform(0.70, 0.75)
        self.lungs = {}
        for side, sign in (("right", -1.0), ("left", 1.0)):  # patient's right lung = image left
            half_width = width * (0.155 if side == "right" else 0.145) * rng.uniform(0.95, 1.05)
            centre = self.cx + sign * width * 0.205
            base = bottom - (0.025 * height if side == "right" else 0.0)  # right hemidiaphragm is higher
            u = (self.xx - centre) / half_width  # -1..1 across the lung
            v = (self.yy - self.top) / (base - self.top)  # 0 at the apex, 1 at the dome's foot
            dome = 0.08 * height * (1.0 - u**2)  # diaphragm dome, costophrenic angle laterally
            mask = (v > 0) & (np.abs(u) < np.clip(1.6 * np.sqrt(np.clip(v, 0, None)), 0, 1)) & (self.yy < base - dome)
            hilum = (centre - sign * 0.55 * half_width, self.top + 0.5 * (base - self.top))
            self.lungs[side] = {"mask": mask, "t": sign * u, "v": v, "base": base, "hilum": hilum,
                                "centre": centre, "half_width": half_width}
        # heart: an ellipse low in the mediastinum, shifted to the patient's left (image right)
        self.heart_c = (self.cx + 0.045 * width, bottom - 0.12 * height)
        self.heart_r = (0.16 * width * heart_scale, 0.115 * height * (1 + 0.5 * (heart_scale - 1)))
        hx = (self.xx - self.heart_c[0]) / self.heart_r[0]
        hy = (self.yy - self.heart_c[1]) / self.heart_r[1]
        diaphragm = np.minimum(*(self._diaphragm(s) for s in ("right", "left")))
        self.heart = (hx**2 + hy**2 < 1) & (self.yy < diaphragm + 0.02 * height)
        for lung in self.lungs.values():
            lung["visible"] = lung["mask"] & ~self.heart

    def _diaphragm(self, side: str) -> np.ndarray:
        lung = self.lungs[side]
        u = (self.xx - lung["centre"]) / lung["half_width"]
        return lung["base"] - 0.08 * self.h * (1.0 - np.clip(u, -1, 1) ** 2)

    def render(self, rng: np.random.Generator) -> np.ndarray:
        """The normal radiograph (H, W) in [0, 1]: bright = dense."""
        h, w, xx, yy, cx = self.h, self.w, self.xx, self.yy, self.cx
        torso = ((xx - cx) / (0.47 * w)) ** 4 + ((yy - 0.66 * h) / (0.64 * h)) ** 4 < 1
        img = np.where(torso, 0.44, 0.03).astype(np.float32)
        img[torso & (np.abs(xx - cx) < 0.07 * w)] = 0.58  # mediastinum
        texture = _blur(rng.normal(size=(h, w)).astype(np.float32), 0.012 * w)
        texture /= texture.std() + 1e-6
        ribs = np.zeros((h, w), np.float32)
        for lung in self.lungs.values():
            hx, hy = lung["hilum"]
            vessels = 0.09 * np.exp(-np.hypot(xx - hx, yy - hy) / (0.22 * w))  # markings fan out from the hilum
            img[lung["visible"]] = (0.12 + vessels + 0.025 * texture)[lung["visible"]]
            # posterior ribs: arcs that rise laterally, every ~9% of the height
            arc = (yy + 0.10 * h * lung["t"] ** 2) / (0.09 * h)
            ribs += np.where(lung["visible"] & ((arc % 1.0) < 0.28), 0.05, 0.0).astype(np.float32)
        img[self.heart] = 0.60
        img += ribs
        img += np.where(torso & (np.abs(xx - cx) < 0.03 * w), 0.06, 0.0)  # spine
        for sign in (-1.0, 1.0):  # clavicles
            x0, x1 = cx + sign * 0.05 * w, cx + sign * 0.33 * w
            y_line = 0.15 * h + (xx - x0) / (x1 - x0) * (-0.05 * h)
            bone = (np.abs(yy - y_line) < 0.018 * h) & ((xx - x0) * sign > 0) & ((x1 - xx) * sign > 0)
            img += np.where(bone, 0.12, 0.0)
        return _blur(img, 0.006 * w)


def _draw_finding(chest: _Chest, img: np.ndarray, finding: PhantomFinding, rng: np.random.Generator) -> None:
    """Draw ``finding`` on ``img`` in place and fill its boxes (x, y, w, h); no box when it came out too small."""
    h, w, xx, yy = chest.h, chest.w, chest.xx, chest.yy
    sev = {"small": 0, "mild": 0, "moderate": 1, "large": 2, "severe": 2}.get(finding.severity, 1)
    regions: list[np.ndarray] = []
    cat = finding.category
    if cat == "Cardiomegaly":
        regions.append(chest.heart)
    elif cat == "Edema":  # bilateral perihilar haze ("bat wings")
        for lung in chest.lungs.values():
            hx, hy = lung["hilum"]
            haze = _fade(np.exp(-(((xx - hx) / (0.11 * w)) ** 2 + ((yy - hy) / (0.14 * h)) ** 2) / 2))
            haze *= 1 + 0.25 * _blur(rng.normal(size=(h, w)), 0.01 * w)
            img += np.where(lung["visible"], (0.24 + 0.08 * sev) * haze, 0.0).astype(np.float32)
            regions.append(lung["visible"] & (haze > 0))
    else:
        lung = chest.lungs[finding.side]
        visible, t, v = lung["visible"], lung["t"], lung["v"]
        lung_h = lung["base"] - chest.top
        if cat == "Pleural Effusion":  # fluid in the base, meniscus rising laterally
            depth = (0.25, 0.36, 0.50)[sev] * lung_h
            lateral = np.clip((t + 1) / 2, 0, 1)  # 0 at the mediastinum, 1 at the chest wall
            level = lung["base"] - 0.05 * h - depth * (0.35 + 0.65 * lateral**1.5)
            fluid = lung["mask"] & (yy > level)
            img[:] = np.where(fluid, 0.47, img)  # water density: the hemidiaphragm silhouette is lost
            regions.append(fluid)
        elif cat == "Pneumothorax":  # air without markings at the apex/lateral side, pleural line inside
            rim = (0.08, 0.11, 0.15)[sev] * w
            dist = ndimage.distance_transform_edt(lung["mask"])
            where = lung["mask"] & ((t > -0.1) | (v < 0.2)) & (v < 0.65)
            air = where & (dist < rim)
            line = where & (dist >= rim) & (dist < rim + max(1.0, 0.012 * w))
            img[air] = 0.04
            img[line] = 0.42
            regions.append(air | line)
        elif cat == "Atelectasis":  # plate-like band above the diaphragm
            angle = np.deg2rad(rng.uniform(-12, 12))
            cy = chest.top + rng.uniform(0.72, 0.8) * lung_h
            along = (xx - lung["centre"]) * np.cos(angle) + (yy - cy) * np.sin(angle)
            across = -(xx - lung["centre"]) * np.sin(angle) + (yy - cy) * np.cos(angle)
            band = (np.abs(across) < 0.035 * h) & (np.abs(along) < 0.75 * lung["half_width"]) & visible
            img[band] += 0.33
            regions.append(band)
        else:  # consolidation, lung opacity, pneumonia: a lobar (upper or lower zone) process
            cy = chest.top + (0.35 if finding.zone == "upper" else 0.68) * lung_h + rng.uniform(-0.04, 0.04) * h
            cx = lung["centre"] + rng.uniform(-0.2, 0.2) * lung["half_width"]
            noise = _blur(rng.normal(size=(h, w)), 0.02 * w)
            noise /= noise.std() + 1e-6
            if cat == "Pneumonia":  # several patchy blobs around the centre
                patches = np.zeros((h, w), bool)
                for _ in range(int(rng.integers(4, 7))):
                    px, py = cx + rng.normal(0, 0.06 * w), cy + rng.normal(0, 0.05 * h)
                    patches |= np.hypot((xx - px) / w, (yy - py) / h) < rng.uniform(0.035, 0.05)
                region = patches & visible
                img[region] += 0.32
            else:
                r = np.hypot((xx - cx) / w, (yy - cy) / h)
                if cat == "Consolidation":  # dense, irregular edge, air bronchograms
                    region = (r + 0.02 * noise < rng.uniform(0.10, 0.13)) & visible
                    img[region] = 0.62
                    bronchi = region & (np.abs(np.sin((yy - cy) / (0.05 * h) + 0.6 * (xx - cx) / w * 10)) < 0.12)
                    img[bronchi] -= 0.2
                else:  # lung opacity: hazy, soft edged
                    haze = _fade(np.exp(-(r / rng.uniform(0.08, 0.095)) ** 2 / 2))
                    img += np.where(visible, 0.32 * haze, 0.0).astype(np.float32)
                    region = visible & (haze > 0)
            regions.append(region)
    finding.boxes = [box for box in map(_bbox, regions) if box is not None]


def render_frontal(
    findings: list[PhantomFinding], height: int, width: int, seed: int | tuple[int, ...]
) -> tuple[np.ndarray, list[PhantomFinding]]:
    """Return (image float32 (H, W) in [0, 1], the findings that were drawn, with their boxes).

    The anatomy and the noise depend on ``seed`` only, so the same seed without findings gives the same
    chest without them (cardiomegaly changes the heart). Findings that come out too small are dropped.
    """
    seed = tuple(np.atleast_1d(seed).tolist())
    anatomy, lesions = np.random.default_rng(seed + (0,)), np.random.default_rng(seed + (1,))
    cardio = next((f for f in findings if f.category == "Cardiomegaly"), None)
    heart_scale = {"mild": 1.45, "moderate": 1.6, "severe": 1.75}[cardio.severity] if cardio else 1.0
    chest = _Chest(anatomy, height, width, heart_scale)
    img = chest.render(anatomy)
    noise = anatomy.normal(0, 0.012, size=(height, width)).astype(np.float32)
    drawn = []
    for finding in findings:
        finding = PhantomFinding(finding.category, finding.side, finding.severity, finding.zone)
        _draw_finding(chest, img, finding, lesions)
        if finding.boxes:
            drawn.append(finding)
    img = _blur(img, 0.004 * width) + noise
    return np.clip(img, 0.0, 1.0).astype(np.float32), drawn


def render_lateral(height: int, width: int, seed: int | tuple[int, ...]) -> np.ndarray:
    """Return a plain lateral view (H, W) in [0, 1]: chest profile, one lung field, heart anterior, spine."""
    rng = np.random.default_rng(tuple(np.atleast_1d(seed).tolist()) + (2,))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    cx = width * rng.uniform(0.48, 0.52)
    body = ((xx - cx) / (0.4 * width)) ** 4 + ((yy - 0.6 * height) / (0.62 * height)) ** 4 < 1
    lung = ((xx - cx) / (0.27 * width)) ** 2 + ((yy - 0.45 * height) / (0.3 * height)) ** 2 < 1
    heart = ((xx - cx + 0.14 * width) / (0.14 * width)) ** 2 + ((yy - 0.62 * height) / (0.13 * height)) ** 2 < 1
    img = np.where(body, 0.45, 0.03)
    img[lung] = 0.2
    img[heart] = 0.58
    img[body & (np.abs(xx - cx - 0.3 * width) < 0.04 * width)] = 0.65  # spine posteriorly
    img = _blur(img.astype(np.float32), 0.006 * width) + rng.normal(0, 0.012, size=(height, width))
    return np.clip(img, 0.0, 1.0).astype(np.float32)


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
    n_subjects: int = 200,
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
        raise FileExistsError(f"{out_dir} holds a phantom with other parameters ({found}); use another out_dir")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty and is not a phantom tree; choose an empty or new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
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
