"""The chest X-ray evaluation at the paper's scale: ``python -m foba_core.bench cxr-paper-scale`` (see ``foba_core.bench``).

One MS-CXR-like item (a random 512×512 radiograph, one "Pleural Effusion" box, the phrase "Small left pleural
effusion") goes through ``foba_med.evaluate.CXREvalStep`` - the evaluation's own heat-map step: the finding's
words found in the phrase, ALL their sub-tokens captured, the summed map and one map per sub-token - on a
random-weight model of SD 2.x base's published architecture (``foba_core/model_configs/sd2_base``). The
word -> token mapping needs a real tokenizer: a CLIP-format BPE learned offline on the toy and radiology corpus
(``foba_core.toy.ldm.clip_tokenizer``), 77 positions like SD 2.x's.
"""

from __future__ import annotations

import torch

from foba_core.bench import (
    MODEL_CONFIGS,
    _device,
    _device_name,
    _rel_diff,
    _summary,
    floor_forwards,
    measure_runs,
    reference_fits,
    reference_heat_maps,
    reference_memory,
    sd_components,
)
from foba_core.capture import default_budget_bytes, rows_per_chunk, token_weights
from foba_core.diffusion import encode_latents, model_resolution
from foba_core.models import encode_prompts
from foba_core.seeds import derive_seed
from foba_med.evaluate import CXREvalStep, finding_tokens, prepare_item
from foba_med.ms_cxr import box_mask

CXR_CAPTION = "Small left pleural effusion"  # an MS-CXR label_text
CXR_CATEGORY = "Pleural Effusion"


def cxr_tokenizer(max_length: int = 77):
    """Return a CLIP-format BPE tokenizer learned offline on the toy and radiology words, ``max_length`` positions."""
    from foba_core.toy.ldm import clip_tokenizer, tokenizer_corpus

    return clip_tokenizer(" ".join(tokenizer_corpus()), max_length)


def cxr_item(size: int, seed: int = 0) -> dict:
    """Return an MS-CXR-like item: a random radiograph (1, size, size) in [0, 1], one finding box, its mask and phrase."""
    image = torch.rand(1, size, size, generator=torch.Generator().manual_seed(seed + 1))
    # x1 y1 x2 y2 in pixels: the lower chest on the image's right, where a left effusion lies
    boxes = torch.tensor([[size * 9 // 16, size * 9 // 16, size * 7 // 8, size * 7 // 8]])
    return {"image": image, "mask": box_mask(boxes, size, size), "boxes": boxes, "caption": CXR_CAPTION,
            "category_name": CXR_CATEGORY, "id": "bench__pleural_effusion", "dicom_id": "bench", "split": "test"}


def bench_cxr_paper_scale(t0: int = 40, dtype: str = "float32", device: str | None = None, seed: int = 0,
                          quick: bool = False, configs=None, memory_limit: float | None = None) -> dict:
    """Time (a), (b), (c) of the MS-CXR heat maps of one image and finding on SD 2.x base's architecture; return
    seconds and peak memory per image (see ``foba_core.bench``). ``configs``, ``memory_limit``: as
    ``foba_core.bench.bench_paper_scale``."""
    from pathlib import Path

    dev = _device(device)
    config_dir = Path(configs) if configs is not None else MODEL_CONFIGS / "sd2_base"
    pipe = sd_components(config_dir, cxr_tokenizer(), seed, dev, getattr(torch, dtype))
    size = model_resolution(pipe)
    item = cxr_item(size, seed)
    step = CXREvalStep(pipe, t0=t0, seed=seed)
    idx, source = finding_tokens(pipe.tokenizer, item["caption"], item["category_name"])
    if source != "disease_words":
        raise RuntimeError(f"the bench's tokenizer finds no {CXR_CATEGORY!r} words in {CXR_CAPTION!r} ({source})")
    targets = [idx] + ([[i] for i in idx] if len(idx) > 1 else [])  # as CXREvalStep: the sum, then each sub-token
    seq_len = pipe.tokenizer.model_max_length
    latent_hw = (size // pipe.vae_scale_factor,) * 2
    need = reference_memory(pipe.unet, latent_hw, seq_len, len(step.timesteps), 1)
    fits, skipped = reference_fits(need, dev, memory_limit)
    chunk = rows_per_chunk(pipe.unet, latent_hw, seq_len, default_budget_bytes(dev))
    q_seed = derive_seed(seed, "q_sample", item["id"])  # CXREvalStep's q_sample seed of this finding

    def ours(laps):
        rec = step(None, [item])["records"][0]
        laps.lap("heat_maps")
        maps = torch.cat([rec["heat"][None], rec["token_maps"]]) if len(idx) > 1 else rec["heat"][None]
        return {"maps": maps, "tokens": rec["tokens"]}

    def inputs():
        prep = prepare_item(item, size, pipe.vae.config.in_channels)
        z0 = encode_latents(pipe, prep["image"][None])  # (1, 4, h, w)
        hidden, key_mask = encode_prompts(pipe, [item["caption"]], device=dev)  # (1, L, D)
        return z0, hidden, key_mask

    def reference(laps):
        z0, hidden, key_mask = inputs()
        weights = token_weights([targets], hidden.shape[1]).to(dev)  # (1, L, n)
        total, _, stored = reference_heat_maps(pipe.unet, pipe.scheduler, z0, hidden, weights, key_mask,
                                               step.timesteps, q_seed)
        laps.lap("heat_maps")
        return {"maps": total[0].cpu(), "captured": stored}

    def floor(laps):
        z0, hidden, _ = inputs()
        floor_forwards(pipe.unet, pipe.scheduler, z0, hidden, step.timesteps, chunk, q_seed)
        laps.lap("heat_maps")
        return {}

    with torch.inference_mode():  # warm-up: the VAE encoder and one U-Net forward
        z0, hidden, _ = inputs()
        pipe.unet(z0.to(pipe.unet.dtype), torch.tensor([1], device=dev), hidden.to(pipe.unet.dtype))
    runs = {"floor": floor, "ours": ours, "reference": reference}
    results, meters, parts = measure_runs(dev, runs, skip=() if fits else ("reference",))
    res = {"bench": "cxr-paper-scale", "model": "Stable Diffusion 2.x base architecture, random weights",
           "configs": str(config_dir), "device": _device_name(dev), "dtype": dtype, "threads": torch.get_num_threads(),
           "images": 1, "resolution": size, "latent": list(latent_hw), "t0": t0, "quick": quick,
           "prompt": CXR_CAPTION, "finding": CXR_CATEGORY, "token_index": idx, "tokens": results["ours"]["tokens"]}
    res.update(_summary(dev, ("reference", "floor", "ours"), meters, parts, ("heat_maps",)))
    # CXREvalStep keeps only the maps; (c)'s captured bytes are those of capture.heat_maps, not reported by the step
    res["captured_bytes"] = {"reference": results.get("reference", {}).get("captured"), "ours": None}
    res["reference_need_bytes"] = need
    res["reference_skipped"] = skipped
    res["maps_rel_diff"] = (_rel_diff(results["reference"]["maps"], results["ours"]["maps"])
                            if "reference" in results else None)
    res["rows_per_chunk"] = chunk
    res["seed"] = seed
    return res
