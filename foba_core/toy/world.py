"""The toy world: deterministic labelled scenes (one shape on a textured background).

Every item is generated from ``(seed, split, index)`` alone, so a split is reproducible
without storing files and items can be generated in any order or in parallel.

Two domains, as LAION and CUB differ for Stable Diffusion: the **foundation** world the toy LDM is pretrained on
(``BACKGROUNDS``: noise, stripes, gradients, blotches, checkers, in colours drawn uniformly) and the **target**
dataset the main job distils the object concept from (``TARGET_BACKGROUNDS``: dots, rings, waves and plaid, never
seen in pretraining, in a muted palette, with thin clutter lines crossing the background). The shapes and their
captions are the foundation world's, so the object words keep their meaning; what the pretrained model lacks
is the target's backgrounds, which fine-tuning (paper Sec. 3, stage 2) has to teach it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from foba_core import prompts

OBJECT_CLASSES = ("circle", "square", "triangle", "star", "cross", "diamond")
BACKGROUNDS = ("noise", "stripes", "gradient", "blotches", "checker")
TARGET_BACKGROUNDS = ("dots", "rings", "waves", "plaid")
SPLITS = {"train": 0, "val": 1, "test": 2}


def _shape_polygon(name: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape of radius ``r`` centred at (cx, cy), rotated by ``angle``."""
    if name == "circle":
        pts = [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
    elif name == "square":
        pts = [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]
    elif name == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif name == "diamond":
        pts = [(0.0, -1.0), (0.6, 0.0), (0.0, 1.0), (-0.6, 0.0)]
    elif name == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rad = 1.0 if k % 2 == 0 else 0.42
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif name == "cross":
        w = 0.33
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
    else:
        raise ValueError(f"unknown toy object class {name!r}; expected one of {OBJECT_CLASSES}")
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 1.0, size=3).astype(np.float32)


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A textured background of shape (size, size, 3) in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c1, c2 = _random_colour(rng), _random_colour(rng)
    if kind == "noise":
        coarse = rng.uniform(0, 1, size=(size // 4, size // 4, 3)).astype(np.float32)
        img = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC), np.float32) / 255
        img = 0.5 * img + 0.5 * c1
    elif kind == "stripes":
        angle, freq = rng.uniform(0, math.pi), rng.uniform(2.0, 6.0)
        t = (xx * math.cos(angle) + yy * math.sin(angle)) * freq
        w = (np.sin(2 * math.pi * t) > 0).astype(np.float32)[..., None]
        img = w * c1 + (1 - w) * c2
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        t = (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle) + 0.5
        t = np.clip(t, 0, 1)[..., None]
        img = t * c1 + (1 - t) * c2
    elif kind == "blotches":
        img = np.broadcast_to(c1, (size, size, 3)).copy()
        for _ in range(int(rng.integers(3, 7))):
            bx, by, br = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.08, 0.3)
            w = np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * br**2))[..., None]
            img = img * (1 - w) + _random_colour(rng) * w
    elif kind == "checker":
        cells = int(rng.integers(2, 6))
        w = (((xx * cells).astype(int) + (yy * cells).astype(int)) % 2).astype(np.float32)[..., None]
        img = w * c1 + (1 - w) * c2
    else:
        raise ValueError(f"unknown toy background {kind!r}; expected one of {BACKGROUNDS}")
    return np.clip(img, 0, 1).astype(np.float32)


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A colour of the target palette: half way to mid grey."""
    return (0.5 * _random_colour(rng) + 0.25).astype(np.float32)


def _target_background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A target-domain background (size, size, 3) in [0, 1]: a texture unseen in pretraining, plus clutter lines."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c1, c2 = _muted_colour(rng), _muted_colour(rng)
    if kind == "dots":
        pitch = rng.uniform(4.0, 7.0)
        ox, oy, radius = rng.uniform(0, pitch), rng.uniform(0, pitch), rng.uniform(0.22, 0.38) * pitch
        dx, dy = (xx + ox) % pitch - pitch / 2, (yy + oy) % pitch - pitch / 2
        w = (dx**2 + dy**2 < radius**2).astype(np.float32)
    elif kind == "rings":
        cx, cy, period = rng.uniform(-0.5, 1.5) * size, rng.uniform(-0.5, 1.5) * size, rng.uniform(4.0, 8.0)
        w = (np.sin(2 * math.pi * np.hypot(xx - cx, yy - cy) / period) > 0).astype(np.float32)
    elif kind == "waves":
        angle, period = rng.uniform(0, math.pi), rng.uniform(5.0, 9.0)
        amplitude, wavelength, phase = rng.uniform(1.5, 3.5), rng.uniform(8.0, 16.0), rng.uniform(0, 2 * math.pi)
        u, v = xx * math.cos(angle) + yy * math.sin(angle), -xx * math.sin(angle) + yy * math.cos(angle)
        w = (np.sin(2 * math.pi * (u + amplitude * np.sin(2 * math.pi * v / wavelength + phase)) / period) > 0)
        w = w.astype(np.float32)
    elif kind == "plaid":
        period = rng.uniform(5.0, 9.0)
        w = 0.5 * ((np.sin(2 * math.pi * xx / period) > 0.3).astype(np.float32)
                   + (np.sin(2 * math.pi * yy / period) > 0.3).astype(np.float32))
    else:
        raise ValueError(f"unknown target background {kind!r}; expected one of {TARGET_BACKGROUNDS}")
    img = w[..., None] * c1 + (1 - w[..., None]) * c2
    canvas = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    draw, clutter = ImageDraw.Draw(canvas), tuple(int(v * 255) for v in _muted_colour(rng))
    for _ in range(int(rng.integers(2, 5))):  # distractors: thin lines across the background
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        draw.line([(x0, y0), (x1, y1)], fill=clutter, width=1)
    return np.asarray(canvas, np.float32) / 255


# domain -> (its background kinds, the function that paints one)
DOMAINS = {"foundation": (BACKGROUNDS, _background), "target": (TARGET_BACKGROUNDS, _target_background)}


def _domain(domain: str):
    """Return the (kinds, painter) of a toy domain, or raise naming the domains."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown toy domain {domain!r}; expected one of {tuple(DOMAINS)}")
    return DOMAINS[domain]


def random_background(rng: np.random.Generator, size: int = 32, domain: str = "foundation") -> tuple[str, np.ndarray]:
    """Draw a background kind of ``domain`` and return it with its texture (size, size, 3) in [0, 1]."""
    kinds, paint = _domain(domain)
    kind = kinds[int(rng.integers(len(kinds)))]
    return kind, paint(kind, size, rng)


def toy_backgrounds(n: int, seed: int = 0, size: int = 32, domain: str = "foundation") -> torch.Tensor:
    """Return ``n`` object-free textures of ``domain`` (n, 3, size, size) in [0, 1], deterministic in ``seed``."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7]))
    return torch.stack([torch.from_numpy(random_background(rng, size, domain)[1]).permute(2, 0, 1)
                        for _ in range(int(n))])


def make_scene(rng: np.random.Generator, size: int = 32, name: str | None = None, background: str | None = None,
               domain: str = "foundation") -> dict:
    """Return one scene: image (H, W, 3) float, mask (H, W) bool, box, object class and background kind."""
    name = name if name is not None else OBJECT_CLASSES[int(rng.integers(len(OBJECT_CLASSES)))]
    if background is None:
        background, bg = random_background(rng, size, domain)
    else:
        bg = _domain(domain)[1](background, size, rng)
    r = rng.uniform(0.2, 0.36) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    poly = _shape_polygon(name, cx, cy, r, rng.uniform(0, 2 * math.pi))
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(poly, fill=255)
    mask = np.asarray(canvas) > 127
    # An object colour far enough from the local background that the object is visible.
    bg_mean = bg[mask].mean(0) if mask.any() else bg.reshape(-1, 3).mean(0)
    colour = _random_colour(rng)
    for _ in range(20):
        if np.abs(colour - bg_mean).sum() > 0.6:
            break
        colour = _random_colour(rng)
    shade = 1.0 - 0.25 * (np.mgrid[0:size, 0:size][0].astype(np.float32) - cy) / size
    obj = np.clip(colour[None, None, :] * shade[..., None], 0, 1)
    image = np.where(mask[..., None], obj, bg).astype(np.float32)
    ys, xs = np.nonzero(mask)
    box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]  # x1 y1 x2 y2, exclusive end
    return {"image": image, "mask": mask, "box": box, "label": name, "background": background}


class ToyWorld(torch.utils.data.Dataset):
    """A sized, deterministic split of the toy world; items follow the dataset dictionary convention.

    Item ``i`` of split ``s`` is generated from ``SeedSequence([seed, s, i])``: the same ``seed``
    gives the same scenes, and the train, val and test splits never share a generator stream.

    With ``background_fraction`` > 0, that fraction of the items (chosen from a stream of their own,
    so the other items stay the scenes of ``background_fraction=0``) is a background without an
    object: label "background", caption y_b, an empty mask and no boxes. The toy LDM's pretraining
    uses them so that y_b means what it means to a foundation model (paper Sec. 3).

    ``domain`` is "foundation" (the pretraining world, the default) or "target" (its backgrounds, see the module).
    ``class_word`` is None: unlike a real dataset's readers, the object word of y_f is each item's ``label``.
    """

    class_word = None

    generated = True  # items are made from (seed, split, index), not read from a folder

    def __init__(self, split: str = "train", size: int | None = None, image_size: int = 32, seed: int = 0,
                 classes: tuple[str, ...] | None = None, background_fraction: float = 0.0, domain: str = "foundation"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        _domain(domain)
        self.domain = domain
        self.split, self.image_size, self.seed = split, int(image_size), int(seed)
        self.size = int(size) if size is not None else {"train": 30000, "val": 512, "test": 256}[split]
        self.classes = tuple(classes) if classes is not None else OBJECT_CLASSES
        if not 0.0 <= float(background_fraction) < 1.0:
            raise ValueError(f"background_fraction must be in [0, 1), got {background_fraction!r}")
        self.background_fraction = float(background_fraction)
        for c in self.classes:
            if c not in OBJECT_CLASSES:
                raise ValueError(f"unknown toy object class {c!r}; expected some of {OBJECT_CLASSES}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a toy split of {self.size} items")
        key = [self.seed, SPLITS[self.split], int(index)]
        if self.background_fraction and np.random.default_rng(key + [1]).uniform() < self.background_fraction:
            return self._background_item(index, np.random.default_rng(key + [2]))
        rng = np.random.default_rng(np.random.SeedSequence(key))
        name = self.classes[int(rng.integers(len(self.classes)))]
        scene = make_scene(rng, self.image_size, name=name, domain=self.domain)
        return {
            "image": torch.from_numpy(scene["image"]).permute(2, 0, 1).contiguous(),  # (3, H, W) in [0, 1]
            "mask": torch.from_numpy(scene["mask"]),  # (H, W) bool
            "boxes": torch.tensor([scene["box"]], dtype=torch.int64),  # (1, 4)
            "caption": prompts.object_prompt(name),  # y_f of the item's own label
            "label": name,
            "background": scene["background"],
            "id": self._item_id(index),
        }

    def _item_id(self, index: int) -> str:
        return f"toy-{self.split}-{self.seed}-{index:06d}"

    def _background_item(self, index: int, rng: np.random.Generator) -> dict:
        kind, image = random_background(rng, self.image_size, self.domain)
        return {
            "image": torch.from_numpy(image).permute(2, 0, 1).contiguous(),
            "mask": torch.zeros(self.image_size, self.image_size, dtype=torch.bool),
            "boxes": torch.zeros(0, 4, dtype=torch.int64),
            "caption": prompts.BACKGROUND_PROMPT,  # y_b
            "label": "background",
            "background": kind,
            "id": self._item_id(index),
        }


class ToyTarget(ToyWorld):
    """The toy world's target domain as a dataset (``open_dataset("toy_target", ...)``, preset
    ``configs/datasets/toy_target.yaml``): scenes whose backgrounds the toy LDM never saw in pretraining."""

    def __init__(self, split: str = "train", size: int | None = None, image_size: int = 32, seed: int = 0,
                 classes: tuple[str, ...] | None = None, background_fraction: float = 0.0):
        super().__init__(split, size, image_size, seed, classes, background_fraction, domain="target")
