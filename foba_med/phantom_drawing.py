"""The phantom radiographs: chest anatomy, the eight MS-CXR findings drawn on it, and their boxes.

Frontal images show a chest outline, two dark lung fields with vascular markings and rib hints, the
mediastinum and spine, clavicles, the heart shadow and the diaphragm domes; the findings are drawn on top,
each with its boxes (x, y, w, h in original pixels). Radiological convention: the patient's right is on the
image's left. Everything is a function of the seed; ``foba_med.phantom`` turns the images into a release.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

ZOOM = (1.2, 1.55)  # the range of the chest's magnification in the frame, as collimation and build vary
SHIFT = (0.15, 0.22)  # the largest shift of the patient, as fractions of the height and the width


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


_SEVERITY_LEVEL = {"small": 0, "mild": 0, "moderate": 1, "large": 2, "severe": 2}


def _draw_finding(chest: _Chest, img: np.ndarray, finding: PhantomFinding, rng: np.random.Generator) -> None:
    """Draw ``finding`` on ``img`` in place and fill its boxes (x, y, w, h); no box when it came out too small."""
    sev = _SEVERITY_LEVEL.get(finding.severity, 1)
    if finding.category == "Cardiomegaly":
        regions = [chest.heart]
    elif finding.category == "Edema":
        regions = _draw_edema(chest, img, sev, rng)
    else:
        regions = [_draw_lung_finding(chest, img, finding, sev, rng)]
    finding.boxes = [box for box in map(_bbox, regions) if box is not None]


def _draw_edema(chest: _Chest, img: np.ndarray, sev: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Draw a bilateral perihilar haze ("bat wings") on ``img`` in place; return its region in each lung."""
    h, w, xx, yy = chest.h, chest.w, chest.xx, chest.yy
    regions = []
    for lung in chest.lungs.values():
        hx, hy = lung["hilum"]
        haze = _fade(np.exp(-(((xx - hx) / (0.11 * w)) ** 2 + ((yy - hy) / (0.14 * h)) ** 2) / 2))
        haze *= 1 + 0.25 * _blur(rng.normal(size=(h, w)), 0.01 * w)
        img += np.where(lung["visible"], (0.24 + 0.08 * sev) * haze, 0.0).astype(np.float32)
        regions.append(lung["visible"] & (haze > 0))
    return regions


def _draw_lung_finding(chest: _Chest, img: np.ndarray, finding: PhantomFinding, sev: int,
                       rng: np.random.Generator) -> np.ndarray:
    """Draw a finding of one lung (``finding.side``) on ``img`` in place; return its region (H, W) bool."""
    h, w, xx, yy = chest.h, chest.w, chest.xx, chest.yy
    lung = chest.lungs[finding.side]
    t, v = lung["t"], lung["v"]
    lung_h = lung["base"] - chest.top
    if finding.category == "Pleural Effusion":  # fluid in the base, meniscus rising laterally
        depth = (0.25, 0.36, 0.50)[sev] * lung_h
        lateral = np.clip((t + 1) / 2, 0, 1)  # 0 at the mediastinum, 1 at the chest wall
        level = lung["base"] - 0.05 * h - depth * (0.35 + 0.65 * lateral**1.5)
        fluid = lung["mask"] & (yy > level)
        img[:] = np.where(fluid, 0.47, img)  # water density: the hemidiaphragm silhouette is lost
        return fluid
    if finding.category == "Pneumothorax":  # air without markings at the apex/lateral side, pleural line inside
        rim = (0.08, 0.11, 0.15)[sev] * w
        dist = ndimage.distance_transform_edt(lung["mask"])
        where = lung["mask"] & ((t > -0.1) | (v < 0.2)) & (v < 0.65)
        air = where & (dist < rim)
        line = where & (dist >= rim) & (dist < rim + max(1.0, 0.012 * w))
        img[air] = 0.04
        img[line] = 0.42
        return air | line
    if finding.category == "Atelectasis":  # plate-like band above the diaphragm
        angle = np.deg2rad(rng.uniform(-12, 12))
        cy = chest.top + rng.uniform(0.72, 0.8) * lung_h
        along = (xx - lung["centre"]) * np.cos(angle) + (yy - cy) * np.sin(angle)
        across = -(xx - lung["centre"]) * np.sin(angle) + (yy - cy) * np.cos(angle)
        band = (np.abs(across) < 0.035 * h) & (np.abs(along) < 0.75 * lung["half_width"]) & lung["visible"]
        img[band] += 0.33
        return band
    return _draw_lobar(chest, img, lung, finding, rng)


def _draw_lobar(chest: _Chest, img: np.ndarray, lung: dict, finding: PhantomFinding,
                rng: np.random.Generator) -> np.ndarray:
    """Draw consolidation, lung opacity or pneumonia, a lobar (upper or lower zone) process; return its region."""
    h, w, xx, yy = chest.h, chest.w, chest.xx, chest.yy
    visible, lung_h = lung["visible"], lung["base"] - chest.top
    cy = chest.top + (0.35 if finding.zone == "upper" else 0.68) * lung_h + rng.uniform(-0.04, 0.04) * h
    cx = lung["centre"] + rng.uniform(-0.2, 0.2) * lung["half_width"]
    noise = _blur(rng.normal(size=(h, w)), 0.02 * w)
    noise /= noise.std() + 1e-6
    if finding.category == "Pneumonia":  # several patchy blobs around the centre
        patches = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(4, 7))):
            px, py = cx + rng.normal(0, 0.06 * w), cy + rng.normal(0, 0.05 * h)
            patches |= np.hypot((xx - px) / w, (yy - py) / h) < rng.uniform(0.035, 0.05)
        region = patches & visible
        img[region] += 0.32
        return region
    r = np.hypot((xx - cx) / w, (yy - cy) / h)
    if finding.category == "Consolidation":  # dense, irregular edge, air bronchograms
        region = (r + 0.02 * noise < rng.uniform(0.10, 0.13)) & visible
        img[region] = 0.62
        bronchi = region & (np.abs(np.sin((yy - cy) / (0.05 * h) + 0.6 * (xx - cx) / w * 10)) < 0.12)
        img[bronchi] -= 0.2
        return region
    haze = _fade(np.exp(-(r / rng.uniform(0.08, 0.095)) ** 2 / 2))  # lung opacity: hazy, soft edged
    img += np.where(visible, 0.32 * haze, 0.0).astype(np.float32)
    return visible & (haze > 0)


def render_frontal(
    findings: list[PhantomFinding], height: int, width: int, seed: int | tuple[int, ...]
) -> tuple[np.ndarray, list[PhantomFinding]]:
    """Return (image float32 (H, W) in [0, 1], the findings that were drawn, with their boxes).

    The anatomy, the noise and the framing (the chest magnified 1.2 to 1.55 times about the frame's centre, so that
    it fills the frame and may leave it laterally, and shifted by up to 15 % of the height and 22 % of the width,
    boxes moved with the image; a normal heart 0.85 to 1.2 times the mean size) depend on ``seed`` only,
    so the same seed without findings gives the same chest without them (cardiomegaly enlarges the heart).
    Findings that come out too small or leave the frame are dropped.
    """
    seed = tuple(np.atleast_1d(seed).tolist())
    anatomy, lesions = np.random.default_rng(seed + (0,)), np.random.default_rng(seed + (1,))
    framing = np.random.default_rng(seed + (3,))  # patient position and heart size: a stream of their own
    cardio = next((f for f in findings if f.category == "Cardiomegaly"), None)
    normal_heart = framing.uniform(0.85, 1.2)  # normal hearts vary in size too (drawn always: the same shift)
    shift = (framing.uniform(-SHIFT[0], SHIFT[0]) * height, framing.uniform(-SHIFT[1], SHIFT[1]) * width)  # (dy, dx)
    heart_scale = {"mild": 1.45, "moderate": 1.6, "severe": 1.75}[cardio.severity] if cardio else normal_heart
    chest = _Chest(anatomy, height, width, heart_scale)
    img = chest.render(anatomy)
    noise = anatomy.normal(0, 0.012, size=(height, width)).astype(np.float32)
    drawn = []
    for finding in findings:
        finding = PhantomFinding(finding.category, finding.side, finding.severity, finding.zone)
        _draw_finding(chest, img, finding, lesions)
        if finding.boxes:
            drawn.append(finding)
    zoom = framing.uniform(*ZOOM)  # collimation: the chest fills the frame to a varying degree
    # the patient is neither centred nor of one size in the frame: the image is magnified by ``zoom`` about the
    # frame's centre and moved by ``shift``; its boxes go with it, the frame outside the patient stays dark
    centre = np.array([height / 2, width / 2])
    offset = centre - 0.5 - (centre + np.asarray(shift)) / zoom + 0.5 / zoom  # pixel centres at index + 0.5
    img = ndimage.affine_transform(_blur(img, 0.004 * width), np.full(2, 1 / zoom), offset, order=1,
                                   mode="constant", cval=0.03) + noise
    for finding in drawn:
        finding.boxes = [box for box in (_framed(b, zoom, shift, height, width) for b in finding.boxes)
                         if box is not None]
    drawn = [f for f in drawn if f.boxes]
    return np.clip(img, 0.0, 1.0).astype(np.float32), drawn


def _framed(box: tuple[int, int, int, int], zoom: float, shift: tuple[float, float], height: int, width: int):
    """The box (x, y, w, h) magnified by ``zoom`` about the frame's centre, moved by ``shift`` (dy, dx) and clipped
    to the image; None when too little is left."""
    x, y, w, h = box
    (dy, dx), cy, cx = shift, height / 2, width / 2
    x0, x1 = (np.array([x, x + w]) - cx) * zoom + cx + dx
    y0, y1 = (np.array([y, y + h]) - cy) * zoom + cy + dy
    x0, y0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
    x1, y1 = min(width, int(np.ceil(x1))), min(height, int(np.ceil(y1)))
    return (x0, y0, x1 - x0, y1 - y0) if x1 - x0 >= 2 and y1 - y0 >= 2 else None


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
