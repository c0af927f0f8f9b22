"""Tiny random MONAI latent diffusion models in the model zoo's bundle layout, for tests (nothing is downloaded).

``save_tiny_bundle`` writes ``configs/inference.json`` as the zoo's CXR bundle writes it (its download and load lines
included, which foba must not run) with MONAI's class names, or, with ``generative=True``, with MONAI Generative's
(``generative.networks.*``, ``num_channels``, ``beta_schedule``) and its checkpoints' older key layout;
``models/autoencoder.pth`` and ``models/diffusion_model.pth`` hold the weights. ``save_text_side`` writes the folder
with ``tokenizer/`` and ``text_encoder/`` that ``--text_encoder`` names (the tiny SD tokenizer, a 32-d CLIP encoder).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

CROSS_DIM = 32

AUTOENCODER = {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "latent_channels": 3, "channels": [8, 16],
               "num_res_blocks": 1, "norm_num_groups": 4, "norm_eps": 1e-6, "attention_levels": [False, False],
               "with_encoder_nonlocal_attn": True, "with_decoder_nonlocal_attn": True}
# Cross-attention at both levels (two resolutions), two heads of 8 channels at the first, two of 16 at the second.
DIFFUSION = {"spatial_dims": 2, "in_channels": 3, "out_channels": 3, "channels": [16, 32], "num_res_blocks": 1,
             "attention_levels": [True, True], "norm_num_groups": 8, "norm_eps": 1e-6, "resblock_updown": False,
             "num_head_channels": [8, 16], "with_conditioning": True, "transformer_num_layers": 1,
             "cross_attention_dim": CROSS_DIM}
SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.0015, "beta_end": 0.0205, "prediction_type": "v_prediction",
             "clip_sample": False}


def tiny_networks(seed: int = 0, **diffusion):
    """Return seeded random MONAI (AutoencoderKL, DiffusionModelUNet, DDIMScheduler) of the tiny configuration."""
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
    from monai.networks.schedulers import DDIMScheduler

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        autoencoder = AutoencoderKL(**AUTOENCODER)
        torch.manual_seed(seed)
        unet = DiffusionModelUNet(**{**DIFFUSION, **diffusion})
    return autoencoder.eval(), unet.eval(), DDIMScheduler(schedule="scaled_linear_beta", **SCHEDULER)


def _old_key(key: str, unet: bool) -> str:
    """Return MONAI Generative's name of a MONAI parameter (the inverse of MONAI's ``load_old_state_dict``)."""
    if unet and "transformer_blocks" in key:
        key = re.sub(r"\.(attn[12])\.out_proj\.", r".\1.to_out.0.", key)
    key = re.sub(r"\.attn\.(to_[qkv])\.", r".\1.", key)
    key = re.sub(r"\.attn\.out_proj\.", ".proj_attn.", key)
    return key.replace("postconv", "conv")


def old_state_dict(module, unet: bool) -> dict:
    """Return the module's weights with MONAI Generative's key names."""
    return {_old_key(k, unet): v for k, v in module.state_dict().items()}


def zoo_config(generative: bool = False, latent_side: int | None = None) -> dict:
    """Return an inference.json in the zoo CXR bundle's form for the tiny networks."""
    autoencoder, diffusion = dict(AUTOENCODER), dict(DIFFUSION)
    scheduler = {**SCHEDULER, "schedule": "scaled_linear_beta"}
    prefix = "monai.networks"
    if generative:
        prefix = "generative.networks"
        autoencoder["num_channels"] = autoencoder.pop("channels")
        diffusion["num_channels"] = diffusion.pop("channels")
        scheduler["beta_schedule"] = scheduler.pop("schedule").removesuffix("_beta")
    config = {
        "imports": ["$import torch", "$from transformers import CLIPTextModel", "$from transformers import CLIPTokenizer"],
        "bundle_root": "/a/path/of/the/authors",
        "model_dir": "$@bundle_root + '/models'",
        "tokenizer": "$CLIPTokenizer.from_pretrained(\"stabilityai/stable-diffusion-2-1-base\", subfolder=\"tokenizer\")",
        "text_encoder": "$CLIPTextModel.from_pretrained(\"stabilityai/stable-diffusion-2-1-base\", "
                        "subfolder=\"text_encoder\")",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "autoencoder_def": {"_target_": f"{prefix}.nets.AutoencoderKL", **autoencoder},
        "load_autoencoder": "$@autoencoder_def.load_state_dict(torch.load(@model_dir + '/autoencoder.pth'))",
        "diffusion_def": {"_target_": f"{prefix}.nets.DiffusionModelUNet", **diffusion},
        "load_diffusion": "$@diffusion_def.load_state_dict(torch.load(@model_dir + '/diffusion_model.pth'))",
        "scheduler": {"_target_": f"{prefix}.schedulers.DDIMScheduler",
                      "_requires_": ["@load_diffusion", "@load_autoencoder"], **scheduler},
        "noise": "$torch.randn((1, 3, 64, 64)).to(@device)",
    }
    if latent_side is not None:
        config["latent_shape"] = [3, latent_side, latent_side]
    return config


def save_tiny_bundle(folder, seed: int = 0, generative: bool = False, latent_side: int | None = 8):
    """Write a tiny MONAI LDM bundle folder; return (autoencoder, unet, scheduler) as written."""
    folder = Path(folder)
    autoencoder, unet, scheduler = tiny_networks(seed)
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(exist_ok=True)
    (folder / "configs" / "inference.json").write_text(json.dumps(zoo_config(generative, latent_side), indent=4))
    if generative:
        torch.save(old_state_dict(autoencoder, unet=False), folder / "models" / "autoencoder.pth")
        torch.save(old_state_dict(unet, unet=True), folder / "models" / "diffusion_model.pth")
    else:
        torch.save(autoencoder.state_dict(), folder / "models" / "autoencoder.pth")
        torch.save(unet.state_dict(), folder / "models" / "diffusion_model.pth")
    return autoencoder, unet, scheduler


def save_text_side(folder, seed: int = 0) -> Path:
    """Write ``tokenizer/`` and ``text_encoder/`` (hidden size 32, the tiny U-Net's cross-attention width)."""
    from tiny_sd import tiny_components

    folder = Path(folder)
    parts = tiny_components(seed=seed, cross_attention_dim=CROSS_DIM)
    parts["tokenizer"].save_pretrained(folder / "tokenizer")
    parts["text_encoder"].save_pretrained(folder / "text_encoder")
    return folder
