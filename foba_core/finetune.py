"""Stage 2 (paper Sec. 3, supplement Sec. 2): fine-tuning the LDM 50/50 on background inpainting and synthesis.

Background inpainting: a random rectangle lying in the background of M_pre is the only supervised
region (the noise loss is masked to the rectangle minus M_pre) under y_b = "a photo of a background".
Full-image synthesis: the whole latent is supervised under y_f = "a photo of a {object}". The U-Net
stays a plain text-to-image U-Net (no extra mask channels), as in the authors' code.

The trainer is ``foba_core.engines.ResumableTrainer`` (MONAI's ``SupervisedTrainer``) with
``foba_core.diffusion.DiffusionBatch`` as its ``prepare_batch`` (it reads each item's ``loss_mask``), wired once
in ``configs/fragments/diffusion_trainer.yaml``; ``configs/stages/finetune.yaml`` feeds it
``FineTuneDataset`` + ``StreamSampler``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from foba_core.models import read_foba_json, save_pipeline
from foba_core.prompts import BACKGROUND_PROMPT
from foba_core.seeds import derive_seed
from foba_core.transforms import resize_center_crop

REFERENCE_LATENT_SIZE = 64  # the authors' rectangle rules are stated for Stable Diffusion's 64x64 latents


def sample_background_rectangle(
    m_pre: torch.Tensor, generator: torch.Generator, min_side: float = 10, min_area: float = 16**2,
    max_area: float = 32**2, min_background: float = 2 / 3, retries: int = 100,
    reference_size: int = REFERENCE_LATENT_SIZE,
) -> torch.Tensor:
    """Return a random background rectangle (bool (h, w), True inside) for the inpainting task of fine-tuning.

    The authors' rules (their ``get_rectangular_inpainting_mask``): two random background pixels of
    M_pre are opposite corners; the rectangle is kept when both sides are longer than ``min_side``
    latent pixels, its area lies in [``min_area``, ``max_area``] and at least ``min_background`` of
    its pixels are background; after ``retries`` rejected draws the whole latent is returned, so that
    the supervised region (rectangle minus M_pre) falls back to the whole background.

    The numbers are for 64x64 latents and scale with the latent size: with s = sqrt(h w) / 64
    (= h / 64 for square latents) a side must exceed ``min_side * s`` and the area lie in
    [``min_area * s^2``, ``max_area * s^2``] (toy 16x16 latents: sides >= 3, area 16..64). Sides
    count the pixels the rectangle covers, corners included (the authors' code measures the corner
    distance, one pixel less, and its area check mixes the two).

    Without any background pixel the mask is all False: the caller must train that image on full
    synthesis instead (``FineTuneDataset`` does). A background too small for any valid rectangle
    ends in the fallback, i.e. the whole (tiny) background is supervised.
    """
    if m_pre.ndim != 2 or m_pre.dtype != torch.bool:
        raise ValueError(f"sample_background_rectangle: expected M_pre as a bool (h, w) mask, got "
                         f"{m_pre.dtype} of shape {tuple(m_pre.shape)}")
    if retries < 1:
        raise ValueError(f"sample_background_rectangle: retries must be >= 1, got {retries}")
    h, w = m_pre.shape
    background = ~m_pre.cpu()
    ys, xs = torch.nonzero(background, as_tuple=True)
    if ys.numel() == 0:
        return torch.zeros(h, w, dtype=torch.bool)
    s = math.sqrt(h * w) / reference_size
    pick = torch.randint(ys.numel(), (retries, 2), generator=generator)  # (R, 2) corner indices, all draws at once
    y1, y2 = ys[pick].min(1).values, ys[pick].max(1).values + 1  # (R,) exclusive ends
    x1, x2 = xs[pick].min(1).values, xs[pick].max(1).values + 1
    height, width = y2 - y1, x2 - x1
    area = height * width
    counts = torch.nn.functional.pad(background.long().cumsum(0).cumsum(1), (1, 0, 1, 0))  # (h+1, w+1) integral image
    n_background = counts[y2, x2] - counts[y1, x2] - counts[y2, x1] + counts[y1, x1]
    valid = ((height > min_side * s) & (width > min_side * s) & (area >= min_area * s**2)
             & (area <= max_area * s**2) & (n_background >= min_background * area))
    rect = torch.zeros(h, w, dtype=torch.bool)
    if not valid.any():
        rect[:] = True  # fallback: supervise the whole background
        return rect
    k = int(valid.int().argmax())  # the first accepted draw, as in the authors' retry loop
    rect[y1[k]:y2[k], x1[k]:x2[k]] = True
    return rect


def load_stage1(path: str | os.PathLike) -> dict:
    """Return {"ids": list[str], "m_pre": (N, h, w) bool} read from a stage-1 output file (OUT/stage1/<split>/stage1.pt)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"stage-1 file {path} does not exist; write it with stage 1: `python -m monai.bundle run run_stage1 "
            "--config_file <the main job's list of config files> --output_dir <folder>` (configs/stages/stage1.yaml)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "m_pre" not in state or "ids" not in state:
        raise ValueError(f"{path} is not a stage-1 output: expected a dict with 'ids' and 'm_pre'")
    m_pre = state["m_pre"]
    if m_pre.ndim != 3 or len(state["ids"]) != m_pre.shape[0]:
        raise ValueError(f"{path}: expected m_pre (N, h, w) with one id per mask, got {tuple(m_pre.shape)} "
                         f"and {len(state['ids'])} ids")
    return {"ids": [str(i) for i in state["ids"]], "m_pre": m_pre.bool()}


class FineTuneDataset(torch.utils.data.Dataset):
    """The fine-tuning mixture: each draw of an image is background inpainting or full synthesis, 50/50.

    Index k is draw ``k // N`` of image ``perm_draw[k % N]``, where ``perm_draw`` is a seeded permutation
    of the N images per draw: read sequentially (``StreamSampler``), the stream visits every image
    once per draw in a new random order. The task and the rectangle of one (draw, image) come from a
    generator seeded by (``seed``, draw, image), so an item never depends on the order it is read in,
    on workers, or on a resume. Items (``loss_mask`` at latent resolution, float):

    - inpainting (probability ``p_inpaint``): ``caption`` = y_b, ``loss_mask`` = rectangle minus M_pre;
    - synthesis: ``caption`` = y_f (``object_prompt``, or the item's own caption when None),
      ``loss_mask`` = ones.

    An image whose M_pre has no background cannot be inpainted and is always trained on synthesis.
    ``items`` is a dataset of dictionaries (``image``, ``caption``, ``id``) or an (N, 3, H, W) tensor in
    [0, 1]; images are resized and centre-cropped to ``image_size`` (default: as they are). ``ids``,
    when given (the ids of stage1.pt), is checked against each item's id so that masks cannot be
    applied to the wrong images.
    """

    def __init__(self, items, m_pre: torch.Tensor, object_prompt: str | None = None,
                 background_prompt: str = BACKGROUND_PROMPT, seed: int = 0, image_size: int | None = None,
                 draws: int = 1, p_inpaint: float = 0.5, ids: list[str] | None = None):
        if m_pre.ndim != 3:
            raise ValueError(f"FineTuneDataset: expected M_pre of shape (N, h, w), got {tuple(m_pre.shape)}")
        if len(items) != m_pre.shape[0]:
            raise ValueError(f"FineTuneDataset: {len(items)} images but {m_pre.shape[0]} preliminary masks; "
                             "compute M_pre on exactly these images (stage 1 with the same split and size)")
        if ids is not None and len(ids) != len(items):
            raise ValueError(f"FineTuneDataset: {len(ids)} ids for {len(items)} images")
        if isinstance(items, torch.Tensor) and object_prompt is None:
            raise ValueError("FineTuneDataset: images given as a tensor have no captions; pass object_prompt (y_f)")
        if not 0.0 <= p_inpaint <= 1.0:
            raise ValueError(f"FineTuneDataset: p_inpaint must be in [0, 1], got {p_inpaint}")
        if int(draws) < 1:
            raise ValueError(f"FineTuneDataset: draws must be >= 1, got {draws}")
        h, w = m_pre.shape[-2:]
        if image_size is not None and (image_size % h or image_size % w or image_size // h != image_size // w):
            raise ValueError(f"FineTuneDataset: image_size {image_size} is not a multiple of the latent size "
                             f"{h}x{w} of M_pre; pass the model's resolution (diffusion.model_resolution(pipe))")
        self.items, self.m_pre = items, m_pre.bool().cpu()
        self.object_prompt, self.background_prompt = object_prompt, background_prompt
        self.seed, self.image_size, self.draws, self.p_inpaint = int(seed), image_size, int(draws), float(p_inpaint)
        self.ids = None if ids is None else [str(i) for i in ids]
        self._perm: tuple[int, torch.Tensor | None] = (-1, None)

    def __len__(self) -> int:
        return self.draws * self.m_pre.shape[0]

    def locate(self, k: int) -> tuple[int, int]:
        """Return (draw, image index) of stream position ``k``."""
        if not 0 <= k < len(self):
            raise IndexError(f"index {k} out of range for a fine-tuning stream of {len(self)} items")
        n = self.m_pre.shape[0]
        draw = k // n
        if self._perm[0] != draw:  # the image order of this draw, cached while a stream reads it
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "image order", draw))
            self._perm = (draw, torch.randperm(n, generator=gen))
        return draw, int(self._perm[1][k % n])

    def _image(self, i: int) -> tuple[torch.Tensor, str, str]:
        if isinstance(self.items, torch.Tensor):
            return self.items[i], self.object_prompt, str(i)
        item = self.items[i]
        image_id = str(item.get("id", i))
        if self.ids is not None and image_id != self.ids[i]:
            raise ValueError(f"FineTuneDataset: image {i} has id {image_id!r} but its M_pre belongs to "
                             f"{self.ids[i]!r}; the stage-1 file was computed on other images")
        caption = self.object_prompt if self.object_prompt is not None else item["caption"]
        return item["image"], caption, image_id

    def __getitem__(self, k: int) -> dict:
        draw, i = self.locate(int(k))
        image, object_caption, image_id = self._image(i)
        image = image.expand(3, -1, -1) if image.shape[0] == 1 else image  # grey -> RGB
        if self.image_size is not None:
            image = resize_center_crop(image, self.image_size)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "task", draw, i))
        m_pre = self.m_pre[i]
        task, caption, loss_mask = "synthesis", object_caption, torch.ones(m_pre.shape)
        if float(torch.rand((), generator=gen)) < self.p_inpaint:
            supervised = sample_background_rectangle(m_pre, gen) & ~m_pre  # rectangle minus M_pre
            if supervised.any():  # without background pixels the draw stays synthesis
                task, caption, loss_mask = "inpaint", self.background_prompt, supervised.float()
        return {"image": image.float(), "caption": caption, "loss_mask": loss_mask, "task": task, "id": image_id,
                "draw": draw}


def draws_for(max_steps: int, batch_size: int, n_images: int) -> int:
    """Return the number of draws per image that one stream of ``max_steps`` batches needs."""
    return max(1, -(-int(max_steps) * int(batch_size) // int(n_images)))


class StreamSampler(torch.utils.data.Sampler):
    """Sequential indices start, start + 1, ... of a dataset; ``start`` is set after a resume for an exact replay.

    After the trainer resumes at iteration n (``engines.ResumableTrainer``), ``set_start(n * batch_size)`` makes
    the next pass continue the stream where the interrupted run stopped (ignite restarts the data
    iterator from the beginning).
    """

    def __init__(self, data_source, start: int = 0):
        self.data_source, self.start = data_source, int(start)

    def set_start(self, start: int) -> int:
        """Return the new start index (clamped to the stream length)."""
        self.start = min(max(0, int(start)), len(self.data_source))
        return self.start

    def __iter__(self):
        return iter(range(self.start, len(self.data_source)))

    def __len__(self) -> int:
        return len(self.data_source) - self.start


def save_finetuned(pipe, folder, stage1: str | None = None, training_log: str | None = None) -> Path:
    """Write the fine-tuned model m' as a diffusers folder; foba.json keeps the base model's settings plus a summary."""
    base = {}
    source = getattr(pipe, "foba_source", None)
    if source and Path(source).is_dir():
        base = {k: v for k, v in read_foba_json(Path(source)).items() if k not in ("text_attention_mask", "finetune")}
    summary = {"base_model": source, "stage1": None if stage1 is None else str(Path(stage1).resolve())}
    if training_log and os.path.exists(training_log):
        with open(training_log) as f:
            summary["training"] = {k: v for k, v in json.load(f).items() if k != "losses"}
    return save_pipeline(pipe, folder, extra={**base, "finetune": summary})
