"""The tiny text-conditioned LDM of the toy world, built from diffusers/transformers classes.

The components are the ones of Stable Diffusion (AutoencoderKL, CLIPTextModel + CLIPTokenizer,
UNet2DConditionModel, DDPMScheduler), only small, so the same loading, capture and fine-tuning
code serves the toy and real checkpoints.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field

import torch

from foba_core.toy.world import BACKGROUND_PROMPT, OBJECT_CLASSES, object_prompt

# Words of the phantom chest X-ray reports, so that the toy tokenizer has them as whole words or
# (for the rarer ones) as a few sub-tokens, as a real CLIP tokenizer would.
RADIOLOGY_WORDS = (
    "no acute cardiopulmonary process findings impression chest radiograph frontal lateral view "
    "the heart size is normal enlarged mildly moderately severely cardiomegaly cardiac silhouette "
    "left right bilateral small moderate large pleural effusion effusions pneumothorax apical "
    "consolidation opacity opacities lung base bases lower upper lobe atelectasis atelectatic "
    "edema pulmonary vascular congestion pneumonia infection focal there are and with without "
    "new unchanged compared to prior stable mediastinal contours lungs clear"
)


@dataclass
class ToyLDMConfig:
    """Sizes of the toy LDM (defaults: 32x32 RGB images, 4x16x16 latents)."""

    image_size: int = 32
    vae_channels: tuple[int, ...] = (32, 64)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64)
    unet_layers_per_block: int = 1
    attention_head_dim: int = 8
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    max_length: int = 32
    vocab_size: int = 600
    extra_corpus: tuple[str, ...] = field(default_factory=tuple)

    @property
    def latent_size(self) -> int:
        """Latent side length (the VAE downsamples by 2 per extra block)."""
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


def tokenizer_corpus(extra: tuple[str, ...] = ()) -> list[str]:
    """Return the sentences the toy BPE tokenizer is trained on."""
    lines = [object_prompt(c) for c in OBJECT_CLASSES] + [BACKGROUND_PROMPT, RADIOLOGY_WORDS]
    lines += [" ".join("abcdefghijklmnopqrstuvwxyz0123456789"), " ".join(".,:;!?-'()/%&+=\"")]
    return lines * 20 + list(extra)


def build_tokenizer(folder: str, max_length: int = 32, vocab_size: int = 600, extra_corpus: tuple[str, ...] = ()):
    """Train a CLIP-style BPE tokenizer offline with `tokenizers`, save it to ``folder`` and load it as CLIPTokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(unk_token=None, end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  end_of_word_suffix="</w>", show_progress=False)
    bpe.train_from_iterator(tokenizer_corpus(extra_corpus), trainer)
    with tempfile.TemporaryDirectory() as tmp:
        bpe.model.save(tmp)  # vocab.json + merges.txt, the files CLIPTokenizer reads
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length, pad_token="<|endoftext|>")
    os.makedirs(folder, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_components(cfg: ToyLDMConfig, tokenizer_dir: str, seed: int = 0) -> dict:
    """Return freshly initialised (untrained) toy LDM components, seeded."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(tokenizer_dir, cfg.max_length, cfg.vocab_size, cfg.extra_corpus)
    torch.manual_seed(seed)
    n_vae = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n_vae, up_block_types=("UpDecoderBlock2D",) * n_vae,
        block_out_channels=cfg.vae_channels, layers_per_block=1, norm_num_groups=16, sample_size=cfg.image_size,
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=2 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=cfg.text_hidden,
    ))
    torch.manual_seed(seed + 2)
    n_unet = len(cfg.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=cfg.latent_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        block_out_channels=cfg.unet_channels, layers_per_block=cfg.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * n_unet, up_block_types=("CrossAttnUpBlock2D",) * n_unet,
        cross_attention_dim=cfg.text_hidden, attention_head_dim=cfg.attention_head_dim, norm_num_groups=16,
    )
    # Stable Diffusion's noise schedule: 1000 steps, scaled-linear betas, epsilon prediction.
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type="epsilon", clip_sample=False)
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet, "scheduler": scheduler}


def config_dict(cfg: ToyLDMConfig) -> dict:
    """Return the config as JSON-serialisable values (stored in the model folder's foba.json)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
