"""Disease localisation on MS-CXR (paper Sec. 4, Fig. 9; supplement Sec. 8): multi-token attention heat maps
scored with pixel-wise AUC-ROC against the findings' boxes, averaged per disease.

For every MS-CXR image and finding the prompt (the MS-CXR phrase, or the report's impression) is searched
for the words that express the finding (:func:`foba_med.vocabulary.find_disease_words`); ALL sub-tokens of
those words are captured and their maps summed (multi-token summation, supplement Sec. 8), giving
M̂ = sum_t sum_l sum_k psi_{z_t,l}[:, k] (Eq. 4 over the finding's tokens k). M̂ is min-max normalised per
image and scored against the union mask of the finding's boxes, mapped through exactly the resize and centre
crop that the image goes through (:func:`prepare_item`).

Beyond the paper: the same M̂ binarised by a 2-component GMM (the paper's M_pre) and by a 3-component GMM
keeping the brightest component (background / chest / finding), both scored by IoU against the box mask; the
AUC of each sub-token alone (which sub-token carries the finding); and a word-agnostic control, the AUC of a
centre prior (minus the distance to the image centre): findings sit mostly in the central chest, so an AUC
means localisation only where it beats that control; and, with ``wrong_word_control``, the AUC of the map of
another finding's word put in the finding's place in the same prompt on the same image (the place alone).

``CXREvalStep`` is a MONAI ``Evaluator``'s ``iteration_update`` and ``foba_med.scoring.CXREvalWriter`` (the
scores, the per-disease tables and the report) its handler; the bundle ``bundles/foba_cxr/configs/evaluate.yaml``
wires them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from ignite.engine import Engine

from foba_core.capture import authors_timesteps, heat_maps, span_token_indices, token_weights
from foba_core.diffusion import encode_latents, model_resolution
from foba_core.models import encode_prompts, load_pipeline
from foba_core.seeds import derive_seed
from foba_core.transforms import ResizeCenterCropd
from foba_med.mimic import CXRImageError
from foba_med.ms_cxr import Finding, MSCXRDataset
from foba_med.phantom import STAMP_FILE, write_phantom_mimic
from foba_med.scoring import slug
from foba_med.vocabulary import find_disease_words, wrong_word_prompt

logger = logging.getLogger(__name__)

TRAIN_COMMAND = "python -m monai.bundle run --config_file bundles/foba_cxr/configs/train.yaml"


def load_model(model_dir: str, torch_dtype=torch.float32, device="cpu", text_encoder: str | None = None):
    """Return the report-conditioned LDM of ``model_dir``: a diffusers folder (fine-tuned, or any base model) or a
    MONAI bundle folder (``text_encoder``: its tokenizer/ and text_encoder/ folder, see ``foba_core.monai_ldm``)."""
    if not Path(model_dir).expanduser().exists():
        raise FileNotFoundError(f"fine-tuned model {model_dir} not found; train it first with `{TRAIN_COMMAND}`, or "
                                "pass --model_dir <a diffusers SD folder> (e.g. bundles/foba_toy/models/toy_ldm: the "
                                "toy LDM before CXR fine-tuning) or <a MONAI bundle folder> with --text_encoder DIR")
    return load_pipeline(model_dir, torch_dtype=torch_dtype, device=device, text_encoder=text_encoder)


def ensure_phantom(mimic_dir: str, phantom_dir: str, params: dict | None = None) -> Path:
    """Return ``mimic_dir``; when it is ``phantom_dir``, the phantom world of ``params`` (written if missing).

    As in train.yaml, a phantom of other parameters there (e.g. an earlier default) is refused by
    ``write_phantom_mimic``, naming both; ``--mimic_dir`` takes any phantom as it is.
    """
    mimic_dir = Path(mimic_dir)
    if mimic_dir.resolve() == Path(phantom_dir).resolve():
        if not (mimic_dir / STAMP_FILE).is_file():
            logger.warning("no phantom world in %s: generating it (foba_med.phantom.write_phantom_mimic)", mimic_dir)
        write_phantom_mimic(mimic_dir, **(params or {}))
    return mimic_dir


def left_out(finding: Finding, status: str, err: Exception) -> dict:
    """Return the ``per_image.csv`` row of a finding whose image is ``status`` ("missing" or "unreadable")."""
    return {"id": f"{finding.dicom_id}__{slug(finding.category_name)}", "dicom_id": finding.dicom_id,
            "category_name": finding.category_name, "split": finding.split, "prompt": finding.caption,
            "status": status, "error": str(err)}


class ReadableFindings(torch.utils.data.Dataset):
    """The findings ``indices`` of ``dataset``; a finding whose image cannot be decoded gives its
    :func:`left_out` row (status "unreadable") instead of an item, with a warning naming the file.

    Unreadable images are detected here, when the item is loaded, and not up front in :func:`open_findings`:
    checking there would decode every image twice (once to check, once to score). ``CXREvalStep`` passes the
    row on and ``foba_med.scoring.CXREvalWriter`` counts it, as it counts the missing images (and raises when
    no image could be decoded). A report that cannot be read (``prompt="impression"``) still raises.
    """

    def __init__(self, dataset: MSCXRDataset, indices: list[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        try:
            return self.dataset[self.indices[index]]
        except CXRImageError as err:  # its message names the file
            logger.warning("left out, the image cannot be decoded: %s", err)
            finding = self.dataset.findings[self.indices[index]]
            path = self.dataset.mimic_dir / self.dataset.image_path(finding)
            return {**left_out(finding, "unreadable", err), "path": str(path)}


@dataclass
class FindingSet:
    """The MS-CXR findings whose images are on disk (``dataset``) and those whose images are not (``missing``)."""

    dataset: ReadableFindings
    missing: list[dict]


def open_findings(ms_cxr_csv: str, mimic_dir: str, split: str = "all", prompt: str = "label_text",
                  reports_dir: str | None = None, image_format: str = "auto") -> FindingSet:
    """Return the MS-CXR findings of ``split`` with their images on disk, and the missing ones by name.

    Missing images are logged by name and counted; it is an error only when every image is missing. Images
    that exist but cannot be decoded are found when loaded (:class:`ReadableFindings`).
    """
    ds = MSCXRDataset(ms_cxr_csv, mimic_dir, split=split, prompt=prompt, reports_dir=reports_dir,
                      image_format=image_format)
    if len(ds) == 0:
        raise ValueError(f"{ms_cxr_csv} has no findings in split {split!r}; choose --split train|val|test|all")
    present, missing = [], []
    for index, finding in enumerate(ds.findings):
        try:
            ds.image_path(finding)
            present.append(index)
        except FileNotFoundError as err:
            missing.append(left_out(finding, "missing", err))
    if missing:
        names = sorted({m["dicom_id"] for m in missing})
        logger.warning("%d of %d MS-CXR images (%d findings) are missing under %s and are left out: %s",
                       len(names), len({f.dicom_id for f in ds.findings}), len(missing), mimic_dir, ", ".join(names))
    if not present:
        raise FileNotFoundError(f"none of the {len(ds)} MS-CXR findings has its image under {mimic_dir} "
                                f"(first tried: {missing[0]['error']}); is --mimic_dir the folder holding files/?")
    return FindingSet(ReadableFindings(ds, present), missing)


def finding_tokens(tokenizer, prompt: str, category: str, fallback_all_tokens: bool = False) -> tuple[list[int], str]:
    """Return (token indices, source): ALL sub-tokens of the finding's words in the prompt (multi-token summation).

    ``source`` is "disease_words", "all_tokens" (no disease word and ``fallback_all_tokens``: every prompt
    token), "none" (no disease word) or "truncated" (the words lie beyond the tokenizer's length).
    """
    spans = find_disease_words(prompt, category)
    idx = span_token_indices(tokenizer, prompt, spans)
    if idx:
        return idx, "disease_words"
    if fallback_all_tokens:
        idx = span_token_indices(tokenizer, prompt, [(0, len(prompt))])
        if idx:
            return idx, "all_tokens"
    return [], "truncated" if spans else "none"


def prepare_item(item: dict, size: int, channels: int = 3) -> dict:
    """Return the model input of one MS-CXR item: image (channels, size, size), its box mask and boxes, same crop.

    One geometry for the three (``ResizeCenterCropd``): the radiograph area-averaged (bilinear when enlarged),
    the mask by nearest neighbour, the boxes mapped (those cropped away entirely are dropped).
    """
    geometry = ResizeCenterCropd(keys=("image", "mask", "boxes"), size=size, image_mode="area")
    out = geometry({key: item[key] for key in ("image", "mask", "boxes")})
    image = out["image"].clamp(0, 1).expand(channels, -1, -1)  # grayscale replicated
    return {"image": image, "mask": out["mask"], "boxes": out["boxes"]}


class CXREvalStep:
    """``iteration_update``: a list of MS-CXR items -> the finding's summed heat map M̂ and its per-token maps.

    Each item's output holds ``heat`` (h, w) at latent resolution (None when the prompt names no disease word
    and there is no fallback), ``token_maps`` (k, h, w) one per sub-token, ``tokens`` (their strings) and
    ``token_source`` (see :func:`finding_tokens`), plus the model-resolution image, mask and boxes. With
    ``wrong_word_control``, ``heat_wrong_word`` (h, w) is the map of another finding's word put in the finding's
    place (``control_prompt``; ``foba_med.vocabulary.wrong_word_prompt``), with the same q_sample noise. An item
    whose image could not be decoded (the ``status`` row of :class:`ReadableFindings`) is passed on as it is.
    """

    def __init__(self, pipe, t0: int = 40, timesteps: list[int] | None = None, seed: int = 0,
                 image_size: int | None = None, fallback_all_tokens: bool = False, budget_bytes: float | None = None,
                 wrong_word_control: bool = False):
        self.pipe, self.seed, self.budget = pipe, int(seed), budget_bytes
        self.fallback_all_tokens, self.wrong_word_control = bool(fallback_all_tokens), bool(wrong_word_control)
        n_train = pipe.scheduler.config.num_train_timesteps
        self.timesteps = list(timesteps) if timesteps is not None else authors_timesteps(t0, n_train)
        self.size = int(image_size) if image_size is not None else model_resolution(pipe)

    def __call__(self, engine: Engine | None, items: list[dict]) -> dict:
        pipe = self.pipe
        records = []
        for it in items:
            if "status" in it:  # left out unread
                records.append(it)
                continue
            prep = prepare_item(it, self.size, pipe.vae.config.in_channels)
            idx, source = finding_tokens(pipe.tokenizer, it["caption"], it["category_name"], self.fallback_all_tokens)
            max_length = pipe.tokenizer.model_max_length
            if source != "disease_words":
                logger.warning("%s: no %s word within the first %d tokens of the prompt %r%s", it["id"],
                               it["category_name"], max_length, it["caption"], "; using all prompt tokens" if idx
                               else "; left out (--fallback_all_tokens uses all prompt tokens instead)")
            ids = pipe.tokenizer(it["caption"], truncation=True, max_length=max_length)["input_ids"]
            tokens = pipe.tokenizer.convert_ids_to_tokens([ids[i] for i in idx])
            records.append({**{k: it[k] for k in ("id", "dicom_id", "category_name", "split")}, **prep,
                            "prompt": it["caption"], "token_source": source, "token_index": idx, "tokens": tokens,
                            "heat": None, "token_maps": None, "heat_wrong_word": None})
        todo = [r for r in records if r.get("token_index")]
        if todo:
            z0 = encode_latents(pipe, torch.stack([r["image"] for r in todo]))  # (B, C, h, w)
            hidden, key_mask = encode_prompts(pipe, [r["prompt"] for r in todo], device=z0.device)  # (B, L, D)
            for b, rec in enumerate(todo):
                idx = rec["token_index"]
                # target 0: all sub-tokens summed (supplement Sec. 8); targets 1..k: each sub-token alone
                targets = [idx] + ([[i] for i in idx] if len(idx) > 1 else [])
                maps = self._maps(z0[b:b + 1], hidden[b:b + 1], None if key_mask is None else key_mask[b:b + 1],
                                  targets, rec["id"])  # (n, h, w)
                rec["heat"] = maps[0]
                rec["token_maps"] = maps[1:] if len(idx) > 1 else maps[:1]
                if self.wrong_word_control and rec["token_source"] == "disease_words":
                    self._wrong_word(z0[b:b + 1], rec)
        return {"records": records}

    def _maps(self, z0: torch.Tensor, hidden: torch.Tensor, key_mask, targets: list[list[int]], item_id: str):
        """M̂ of each target's tokens (n, h, w) for one image; q_sample noise seeded by the finding, whatever the prompt."""
        weights = token_weights([targets], hidden.shape[1]).to(z0.device)  # (1, L, n)
        return heat_maps(self.pipe.unet, self.pipe.scheduler, z0, hidden.to(z0.dtype), weights, text_mask=key_mask,
                         timesteps=self.timesteps, seed=derive_seed(self.seed, "q_sample", item_id),
                         budget_bytes=self.budget).total[0].float().cpu()

    def _wrong_word(self, z0: torch.Tensor, rec: dict) -> None:
        """The control map: the finding's words replaced by another finding's (``vocabulary.wrong_word_prompt``)."""
        prompt, other = wrong_word_prompt(rec["prompt"], rec["category_name"])
        idx, source = finding_tokens(self.pipe.tokenizer, prompt, other)
        if source != "disease_words":  # the replacement fell beyond the tokenizer's length
            return
        hidden, key_mask = encode_prompts(self.pipe, [prompt], device=z0.device)
        rec["heat_wrong_word"] = self._maps(z0, hidden, key_mask, [idx], rec["id"])[0]
        rec["control_prompt"] = prompt


def settings_summary(model_dir: str, split: str, prompt: str, t0: int, timesteps, seed: int,
                     fallback_all_tokens: bool) -> dict:
    """Return the run settings shown at the top of the Markdown report."""
    return {"model": model_dir, "split": split, "prompt": prompt,
            "timesteps": f"T0={t0} (authors' grid)" if timesteps is None else list(timesteps), "seed": seed,
            "fallback_all_tokens": bool(fallback_all_tokens)}

