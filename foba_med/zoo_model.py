"""The resources the MONAI model zoo's chest X-ray LDM needs in foba's evaluation, measured on random weights.

``python -m foba_core.bench zoo-cxr [--t0 40] [--device cuda]`` writes a bundle folder in the zoo's layout with the
exact architecture of ``cxr_image_synthesis_latent_diffusion_model`` (its ``configs/inference.json``: ``AutoencoderKL``
64/128/128/128 channels, 3 latent channels; ``DiffusionModelUNet`` 256/512/768 channels, heads of 512 and 768
channels at the two attention levels, cross-attention width 1024; DDIM, v-prediction, scaled-linear betas 0.0015 to
0.0205) and the text side of Stable Diffusion 2.1 base (the CLIP ViT-H/14 text tower: 1024 wide, 23 layers, 16
heads, GELU, 77 tokens), all with random weights, and runs one 512 x 512 MS-CXR finding of the phantom world
through ``foba_med.evaluate.CXREvalStep``: it reports the parameter counts (the text encoder's with the published
49408-token vocabulary; the measured one has the project's small offline tokenizer), seconds per image and peak
memory.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

AUTOENCODER = {"_target_": "monai.networks.nets.AutoencoderKL", "spatial_dims": 2, "in_channels": 1, "out_channels": 1,
               "latent_channels": 3, "channels": [64, 128, 128, 128], "num_res_blocks": 2, "norm_num_groups": 32,
               "norm_eps": 1e-6, "attention_levels": [False, False, False, False],
               "with_encoder_nonlocal_attn": True, "with_decoder_nonlocal_attn": True}
DIFFUSION = {"_target_": "monai.networks.nets.DiffusionModelUNet", "spatial_dims": 2, "in_channels": 3,
             "out_channels": 3, "channels": [256, 512, 768], "num_res_blocks": 2,
             "attention_levels": [False, True, True], "norm_num_groups": 32, "norm_eps": 1e-6,
             "resblock_updown": False, "num_head_channels": [0, 512, 768], "with_conditioning": True,
             "transformer_num_layers": 1, "cross_attention_dim": 1024}
SCHEDULER = {"_target_": "monai.networks.schedulers.DDIMScheduler", "num_train_timesteps": 1000,
             "schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0205,
             "prediction_type": "v_prediction", "clip_sample": False}
# Stable Diffusion 2.1 base's text_encoder/config.json (OpenCLIP ViT-H/14 text tower, penultimate layer).
TEXT_ENCODER = {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 512}


def write_bundle(folder, seed: int = 0) -> Path:
    """Write the zoo CXR LDM's architecture with random weights as a bundle folder with its text side; return it."""
    from monai.bundle import ConfigParser
    from transformers import CLIPTextConfig, CLIPTextModel

    from foba_core.toy.ldm import RADIOLOGY_WORDS, clip_tokenizer

    folder = Path(folder)
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(exist_ok=True)
    config = {"autoencoder_def": AUTOENCODER, "diffusion_def": DIFFUSION, "scheduler": SCHEDULER}
    (folder / "configs" / "inference.json").write_text(json.dumps(config, indent=2) + "\n")
    torch.manual_seed(seed)
    for name, file in (("autoencoder_def", "autoencoder.pth"), ("diffusion_def", "diffusion_model.pth")):
        torch.save(ConfigParser(config).get_parsed_content(name).state_dict(), folder / "models" / file)
    tokenizer = clip_tokenizer(RADIOLOGY_WORDS, max_length=77, folder=str(folder / "tokenizer"))
    text = CLIPTextConfig(**{**TEXT_ENCODER, "vocab_size": len(tokenizer)}, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    CLIPTextModel(text).save_pretrained(folder / "text_encoder")
    return folder


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def published_text_encoder_parameters() -> int:
    """Return the parameters of SD 2.1 base's text encoder with its 49408-token vocabulary (built without memory)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return _count(CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER)))


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


def measure(workdir, t0: int = 40, device: str | None = None, dtype: str = "float32", seed: int = 0) -> dict:
    """Return parameters, seconds per image (model load apart) and peak memory of one 512 x 512 MS-CXR finding."""
    from foba_core.models import load_pipeline
    from foba_med.evaluate import CXREvalStep, open_findings
    from foba_med.ms_cxr import MS_CXR_FILE
    from foba_med.phantom import write_phantom_mimic

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workdir = Path(workdir)
    bundle = write_bundle(workdir / "zoo_cxr_ldm", seed)
    mimic = write_phantom_mimic(workdir / "mimic", n_subjects=8, seed=seed, size=512)
    start = time.perf_counter()
    pipe = load_pipeline(bundle, torch_dtype=getattr(torch, dtype), device=dev)
    load_s = time.perf_counter() - start
    findings = open_findings(str(mimic / MS_CXR_FILE), str(mimic)).dataset
    item = next(findings[i] for i in range(len(findings)) if "status" not in findings[i])
    step = CXREvalStep(pipe, t0=t0, seed=seed)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    record = step(None, [item])["records"][0]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    out = {
        "parameters": {"diffusion_unet": _count(pipe.unet), "autoencoder": _count(pipe.vae),
                       "text_encoder": published_text_encoder_parameters()},
        "image_size": step.size, "latent": list(record["heat"].shape),
        "t0": t0, "tokens": record["tokens"], "seconds_per_image": round(seconds, 2), "load_seconds": round(load_s, 2),
        "peak_rss_bytes": _peak_rss_bytes(), "dtype": dtype,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
    }
    if dev.type == "cuda":
        out["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(dev))
    return out
