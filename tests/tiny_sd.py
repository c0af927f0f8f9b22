"""Tiny random Stable-Diffusion-layout pipelines for tests (no weights are downloaded).

``tiny_components`` builds the five SD components at toy size (the tokenizer is a CLIP-format BPE
learned offline), ``tiny_pipeline`` wraps them in a ``StableDiffusionPipeline``, ``save_tiny_sd``
writes one as a diffusers folder, and ``save_original_checkpoint`` / ``save_original_config`` write
the same weights as ONE file in the original CompVis/Stability layout (and its LDM yaml), so that
the single-file loader is exercised on files in the other tool's key layout.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import torch

from foba_core.prompts import BACKGROUND_PROMPT, object_prompt
from foba_core.toy.ldm import RADIOLOGY_WORDS, clip_tokenizer
from foba_core.toy.world import OBJECT_CLASSES

# Words the tiny tokenizer knows whole; anything else splits into sub-tokens as with real CLIP.
TINY_WORDS = " ".join(
    [object_prompt(c) for c in ("bird", "dog", "car", "person", *OBJECT_CLASSES)] + [BACKGROUND_PROMPT, RADIOLOGY_WORDS]
)


@lru_cache(maxsize=4)
def tiny_tokenizer(max_length: int = 16, vocab_size: int = 1000):
    """Return a CLIPTokenizer learned on the tiny corpus with the project's deterministic BPE learner."""
    return clip_tokenizer(TINY_WORDS, max_length, vocab_size)


def tiny_components(seed: int = 0, cross_attention_dim: int = 32, sample_size: int = 8, max_length: int = 16,
                    layers_per_block: int = 1, attention_head_dim: int = 2) -> dict:
    """Return seeded random SD components: unet, vae (factor 2), text_encoder, tokenizer, scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer(max_length)
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's global RNG
        torch.manual_seed(seed)
        # SD layout: cross-attention at the higher resolution and in the middle block, none at the lowest.
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            layers_per_block=layers_per_block, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
            attention_head_dim=attention_head_dim,
        )
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            sample_size=2 * sample_size,
        )
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=cross_attention_dim, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=max_length, projection_dim=cross_attention_dim,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, steps_offset=1)  # SD's schedule
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def tiny_pipeline(seed: int = 0, text_attention_mask: bool = False, **kwargs):
    """Return a tiny random StableDiffusionPipeline with the attributes that ``load_pipeline`` sets."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_components(seed, **kwargs), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.text_attention_mask = text_attention_mask
    pipe.foba_source = f"tiny_sd(seed={seed})"
    return pipe


def save_tiny_sd(folder, seed: int = 0, text_attention_mask: bool = False, **kwargs):
    """Write a tiny random pipeline as a diffusers folder (with foba.json) and return the pipeline."""
    from foba_core.models import save_pipeline

    pipe = tiny_pipeline(seed, text_attention_mask, **kwargs)
    save_pipeline(pipe, folder)
    return pipe


# Inverse of diffusers.loaders.single_file_utils.convert_ldm_{unet,vae,clip}_checkpoint, for SD 1.x
# layouts (conv proj_in/proj_out, CLIP text encoder): diffusers names -> original CompVis names.
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_key(key: str, unet) -> str:
    """Return the original ``model.diffusion_model.*`` name of one diffusers U-Net parameter."""
    per_block = unet.config.layers_per_block + 1  # resnets + one down/upsampler slot per level
    head, _, leaf = key.rpartition(".")  # leaf: weight | bias
    if head in _UNET_TOP:
        return f"{_UNET_TOP[head]}.{leaf}"
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        kind, block, part, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if kind == "down":
            index = 1 + block * per_block + (per_block - 1 if part == "downsamplers" else j)
            outer = "input_blocks"
        else:
            index = block * per_block + (per_block - 1 if part == "upsamplers" else j)
            outer = "output_blocks"
        if part == "resnets":
            return f"{outer}.{index}.0.{_resnet_rest(rest)}"
        if part == "attentions":
            return f"{outer}.{index}.1.{rest}"
        if part == "downsamplers":
            return f"{outer}.{index}.0.op.{rest.removeprefix('conv.')}"
        has_attention = hasattr(unet.up_blocks[block], "attentions")
        return f"{outer}.{index}.{2 if has_attention else 1}.{rest}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        slot = 1 if m[1] == "attentions" else 2 * int(m[2])  # resnet, transformer, resnet
        return f"middle_block.{slot}.{_resnet_rest(m[3]) if m[1] == 'resnets' else m[3]}"
    raise KeyError(f"no original-layout name for U-Net parameter {key!r}")


def _resnet_rest(rest: str) -> str:
    head, _, leaf = rest.rpartition(".")
    return f"{_UNET_RESNET[head]}.{leaf}"


def _vae_key(key: str, n_blocks: int) -> str:
    """Return the original ``first_stage_model.*`` name of one diffusers AutoencoderKL parameter."""
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    # The original decoder counts its levels from the lowest resolution up.
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                 lambda m: f"decoder.up.{n_blocks - 1 - int(m[1])}.block.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                 lambda m: f"decoder.up.{n_blocks - 1 - int(m[1])}.upsample.", key)
    key = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", key)
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key)
    if m:
        key = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    return key.replace("conv_shortcut", "nin_shortcut")


def original_state_dict(pipe) -> dict[str, torch.Tensor]:
    """Return the pipeline's U-Net, VAE and CLIP weights under their original single-file SD names."""
    state = {}
    for key, value in pipe.unet.state_dict().items():
        state["model.diffusion_model." + _unet_key(key, pipe.unet)] = value
    n_blocks = len(pipe.vae.config.block_out_channels)
    for key, value in pipe.vae.state_dict().items():
        name = _vae_key(key, n_blocks)
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", name):
            value = value[:, :, None, None]  # the original attention projections are 1x1 convolutions
        state["first_stage_model." + name] = value
    for key, value in pipe.text_encoder.state_dict().items():
        # Original SD checkpoints hold transformers' CLIPTextModel with its ``text_model.`` wrapper.
        name = key if key.startswith("text_model.") else "text_model." + key
        state["cond_stage_model.transformer." + name] = value
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def save_original_checkpoint(pipe, path) -> Path:
    """Write the pipeline's weights as one original-layout .ckpt ({"state_dict": ...}) or .safetensors file."""
    path = Path(path)
    state = original_state_dict(pipe)
    if path.suffix == ".ckpt":
        torch.save({"state_dict": state}, path)
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        raise ValueError(f"{path}: unsupported suffix {path.suffix!r}; use .ckpt or .safetensors")
    return path


def save_original_config(pipe, path) -> Path:
    """Write the original LDM yaml (v1-inference.yaml style) that describes the pipeline's U-Net and VAE."""
    import yaml

    unet, vae, scheduler = pipe.unet.config, pipe.vae.config, pipe.scheduler.config
    base = unet.block_out_channels[0]
    # attention_resolutions lists the downsampling factors (1, 2, 4, ...) whose level has cross-attention.
    attention = [2**i for i, kind in enumerate(unet.down_block_types) if kind.startswith("CrossAttn")]
    original = {"model": {"params": {
        "linear_start": scheduler.beta_start, "linear_end": scheduler.beta_end,
        "timesteps": scheduler.num_train_timesteps, "scale_factor": vae.scaling_factor,
        "unet_config": {"params": {
            "in_channels": unet.in_channels, "out_channels": unet.out_channels, "model_channels": base,
            "channel_mult": [c // base for c in unet.block_out_channels], "attention_resolutions": attention,
            "num_res_blocks": unet.layers_per_block, "num_heads": unet.attention_head_dim,
            "transformer_depth": 1, "context_dim": unet.cross_attention_dim, "use_linear_in_transformer": False,
        }},
        "first_stage_config": {"params": {"ddconfig": {
            "ch": vae.block_out_channels[0],
            "ch_mult": [c // vae.block_out_channels[0] for c in vae.block_out_channels],
            "in_channels": vae.in_channels, "out_ch": vae.out_channels, "z_channels": vae.latent_channels,
            "num_res_blocks": vae.layers_per_block,
        }}},
    }}}
    path = Path(path)
    path.write_text(yaml.safe_dump(original))
    return path
