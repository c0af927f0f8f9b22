"""The tiny text-conditioned LDM of the toy world, built from diffusers/transformers classes.

The components are the ones of Stable Diffusion (AutoencoderKL, CLIPTextModel + CLIPTokenizer,
UNet2DConditionModel, DDPMScheduler), only small, so the same loading, capture and fine-tuning
code serves the toy and real checkpoints.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field

import torch

from foba_core.prompts import BACKGROUND_PROMPT, object_prompt
from foba_core.toy.world import OBJECT_CLASSES

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
    # Which U-Net levels (16x16, 8x8 latents) have transformer blocks. The 8x8 level alone localises the
    # object word (measured per layer: AUC 0.82-0.96 there, 0.44-0.68 at 16x16) at less than half the cost per step.
    cross_attention_levels: tuple[bool, ...] = (False, True)
    attention_head_dim: int = 8  # diffusers passes it on as the number of heads (head widths 4 and 8 here)
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    max_length: int = 32
    vocab_size: int = 1000
    extra_corpus: tuple[str, ...] = field(default_factory=tuple)

    @property
    def latent_size(self) -> int:
        """Latent side length (the VAE downsamples by 2 per extra block)."""
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


def tokenizer_corpus(extra: tuple[str, ...] = ()) -> list[str]:
    """Return the sentences the toy BPE tokenizer is trained on."""
    lines = [object_prompt(c) for c in OBJECT_CLASSES] + [BACKGROUND_PROMPT, RADIOLOGY_WORDS]
    return lines * 20 + list(extra)


BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def learn_bpe(corpus: str, vocab_size: int = 1000) -> tuple[dict[str, int], tuple[str, ...]]:
    """Return a CLIP-format BPE vocabulary and merge list learned from ``corpus``, deterministically.

    Like CLIP's: 256 byte-level symbols, the same with the end-of-word suffix ``</w>``, the merges,
    then BOS and EOS. (With the ``tokenizers`` BpeTrainer the token ids and the order of equally
    frequent merges change from process to process; here ties go to the alphabetically first pair,
    so the same corpus always gives the same tokenizer.)
    """
    from collections import Counter

    from tokenizers import pre_tokenizers

    to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = alphabet + [c + "</w>" for c in alphabet]
    words = Counter(to_bytes.pre_tokenize_str(w)[0][0] for w in corpus.lower().split())
    split = {w: (*w[:-1], w[-1] + "</w>") for w in words}
    merges = []
    while len(symbols) + len(merges) + 2 < vocab_size:
        pairs = Counter()
        for w, n in words.items():
            for pair in zip(split[w], split[w][1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent, ties alphabetical
        merges.append(best)
        for w, parts in split.items():
            out, i = [], 0
            while i < len(parts):
                if parts[i:i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            split[w] = tuple(out)
    tokens = symbols + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return vocab, tuple(f"{a} {b}" for a, b in merges)


def clip_tokenizer(corpus: str, max_length: int, vocab_size: int = 1000, folder: str | None = None):
    """Return the fast CLIP tokenizer of the BPE learned on ``corpus``, saved to ``folder`` if given."""
    from transformers import CLIPTokenizerFast  # word -> token offsets need it; in transformers 5 it is CLIPTokenizer

    vocab, merges = learn_bpe(corpus, vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(tmp, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        tokenizer = CLIPTokenizerFast.from_pretrained(tmp, model_max_length=max_length, pad_token=EOS)
    if folder is not None:
        os.makedirs(folder, exist_ok=True)
        tokenizer.save_pretrained(folder)
    return tokenizer


def build_tokenizer(folder: str, max_length: int = 32, vocab_size: int = 1000, extra_corpus: tuple[str, ...] = ()):
    """Learn the toy CLIP-style BPE tokenizer offline, save it to ``folder`` and return it."""
    return clip_tokenizer(" ".join(tokenizer_corpus(extra_corpus)), max_length, vocab_size, folder)


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
    levels = tuple(bool(a) for a in cfg.cross_attention_levels)
    if len(levels) != len(cfg.unet_channels) or not any(levels):
        raise ValueError(f"cross_attention_levels needs one flag per U-Net level ({len(cfg.unet_channels)}) and at "
                         f"least one True, got {cfg.cross_attention_levels}")
    unet = UNet2DConditionModel(
        sample_size=cfg.latent_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        block_out_channels=cfg.unet_channels, layers_per_block=cfg.unet_layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)),
        cross_attention_dim=cfg.text_hidden, attention_head_dim=cfg.attention_head_dim, norm_num_groups=16,
    )
    # Stable Diffusion's noise schedule: 1000 steps, scaled-linear betas, epsilon prediction.
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type="epsilon", clip_sample=False,
                              steps_offset=1)
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet, "scheduler": scheduler}


def config_dict(cfg: ToyLDMConfig) -> dict:
    """Return the config as JSON-serialisable values (stored in the model folder's foba.json)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
