"""Latent-diffusion training glue for MONAI's SupervisedTrainer: text encoding, noisy batches, masked noise loss.

The trainer is MONAI's own ``SupervisedTrainer`` with ``network=unet``: ``DiffusionBatch`` is its
``prepare_batch`` (it draws latent-shaped noise and timesteps, so MONAI's image-shaped
``DiffusionPrepareBatch`` is not used) and ``noise_loss`` its ``loss_function``. The same pieces
serve toy pretraining, the foreground/background fine-tuning and the MIMIC-CXR fine-tuning.
``to_diffusion_latents`` / ``to_vae_latents`` are the one place where VAE latents are normalised, and
``encode_latents`` / ``decode_latents`` (with ``vae_posterior``, ``reconstruct`` and ``model_resolution``)
the one VAE codec between images in [0, 1] and the latents z the U-Net diffuses.
"""

from __future__ import annotations

import torch

from foba_core.seeds import derive_seed


def _channel_statistics(vae, like: torch.Tensor):
    """The VAE config's per-channel latents_mean and latents_std as (1, C, 1, 1) tensors like ``like``; None if unset."""
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    return tuple(torch.tensor(v, dtype=like.dtype, device=like.device).view(1, -1, 1, 1) for v in (mean, std))


def to_diffusion_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """Return the latents the U-Net diffuses (B, C, h, w) from raw VAE latents: the VAE config's normalisation.

    Stable Diffusion 1.x/2.x scale by ``scaling_factor`` only; a VAE config with per-channel
    ``latents_mean`` / ``latents_std`` (diffusers' SDXL convention, used by the toy LDM) is also
    centred and whitened per channel: z = (z_raw - mean) * scaling_factor / std.
    """
    stats = _channel_statistics(vae, z)
    if stats is None:
        return z * vae.config.scaling_factor
    return (z - stats[0]) * vae.config.scaling_factor / stats[1]


def to_vae_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """Return raw VAE latents (B, C, h, w) for the decoder: the inverse of ``to_diffusion_latents``."""
    stats = _channel_statistics(vae, z)
    if stats is None:
        return z / vae.config.scaling_factor
    return z * stats[1] / vae.config.scaling_factor + stats[0]


def model_resolution(pipe) -> int:
    """Return the image side length the pipeline's U-Net was built for (sample_size x VAE factor)."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def vae_posterior(vae, images: torch.Tensor):
    """Return q(z | x), the VAE encoder's diagonal Gaussian over raw latents, of images (B, 3, H, W) in [0, 1]."""
    return vae.encode(images.to(vae.device, vae.dtype) * 2 - 1).latent_dist


@torch.no_grad()
def encode_latents(pipe, images: torch.Tensor) -> torch.Tensor:
    """Return z0: E[q(z | x)] for images (B, 3, H, W) in [0, 1], normalised as the U-Net diffuses it (deterministic)."""
    return to_diffusion_latents(pipe.vae, vae_posterior(pipe.vae, images).mean)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Return the decoded images (B, 3, H, W) in [0, 1] of diffusion latents (the VAE's normalisation undone)."""
    vae = pipe.vae
    x = vae.decode(to_vae_latents(vae, latents.to(vae.device, vae.dtype))).sample
    return ((x.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def reconstruct(pipe, images: torch.Tensor) -> torch.Tensor:
    """Return D(E(x)): images (B, 3, H, W) in [0, 1] encoded and decoded by the VAE alone (no diffusion)."""
    return decode_latents(pipe, encode_latents(pipe, images))


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: list[str], use_attention_mask: bool, device=None):
    """Return the frozen text encoder's hidden states (B, L, D) and, if the model uses one, the U-Net's key mask (B, L).

    The key mask hides EOS and padding from cross-attention: a causal text encoder copies the object's
    identity into every later token, so a model trained with the mask must be run with it too.
    """
    device = device if device is not None else text_encoder.device
    tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    ids = tokens.input_ids.to(device)
    mask = tokens.attention_mask.to(device)
    hidden = text_encoder(ids, attention_mask=mask if use_attention_mask else None)[0]  # (B, L, D)
    return hidden, (text_token_mask(mask) if use_attention_mask else None)


def text_token_mask(tokens_mask: torch.Tensor) -> torch.Tensor:
    """Return the cross-attention key mask that hides EOS and padding (keeps BOS and the words)."""
    lengths = tokens_mask.sum(1)  # BOS + words + EOS
    positions = torch.arange(tokens_mask.shape[1], device=tokens_mask.device)[None]
    return (positions < (lengths[:, None] - 1)).to(tokens_mask.dtype)


class DiffusionBatch:
    """``prepare_batch`` for MONAI trainers: turns {image | latent, caption[, loss_mask]} into a noise-prediction step.

    Returns ``(z_t, (target, loss_mask), (t, text_hidden), {"encoder_attention_mask": ...})`` so that MONAI
    calls ``unet(z_t, t, text_hidden, encoder_attention_mask=...)`` and ``noise_loss(pred, (target, mask))``.
    Noise, timesteps, latent sampling and caption dropout come from a generator seeded by
    ``derive_seed(seed, "batch", call count)``; the count is part of ``state_dict`` so a resumed run draws
    what the uninterrupted run would have drawn.
    """

    def __init__(self, vae, text_encoder, tokenizer, scheduler, text_attention_mask: bool = False,
                 caption_dropout: float = 0.0, seed: int = 0):
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        self.vae, self.text_encoder, self.tokenizer, self.scheduler = vae, text_encoder, tokenizer, scheduler
        self.text_attention_mask, self.caption_dropout, self.seed = bool(text_attention_mask), caption_dropout, int(seed)
        self.calls = 0

    def state_dict(self) -> dict:
        return {"calls": self.calls, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])

    def encode_images(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Return z0: a sample of q(z | x) for images in [0, 1], normalised as the U-Net diffuses it."""
        with torch.no_grad():
            dist = vae_posterior(self.vae, images)
            noise = torch.randn(dist.mean.shape, generator=generator).to(dist.mean)
            return to_diffusion_latents(self.vae, dist.mean + dist.std * noise)

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "batch", self.calls))
        self.calls += 1
        if "latent" in batchdata:
            z0 = batchdata["latent"].to(device, non_blocking=non_blocking)
        else:
            z0 = self.encode_images(batchdata["image"].to(device, non_blocking=non_blocking), gen)
        b = z0.shape[0]
        captions = list(batchdata["caption"])
        if self.caption_dropout > 0:  # empty prompts for classifier-free guidance
            drop = torch.rand(b, generator=gen) < self.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        hidden, mask = encode_text(self.tokenizer, self.text_encoder, captions, self.text_attention_mask, device)
        noise = torch.randn(z0.shape, generator=gen).to(z0)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=gen).to(z0.device)
        z_t = self.scheduler.add_noise(z0, noise, t)  # q_sample(z0, t)
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(z0, noise, t)
        else:
            target = noise
        loss_mask = batchdata.get("loss_mask")
        loss_mask = torch.ones_like(z0[:, :1]) if loss_mask is None else loss_mask.to(z0).reshape(b, 1, *z0.shape[2:])
        kwargs = {"encoder_attention_mask": mask} if mask is not None else {}
        return z_t, (target, loss_mask), (t, hidden), kwargs


def noise_loss(pred, target_and_mask) -> torch.Tensor:
    """Return the per-sample MSE between predicted and true noise, averaged over the loss mask (B,)."""
    target, mask = target_and_mask
    pred = pred.sample if hasattr(pred, "sample") else pred
    se = (pred.float() - target.float()).pow(2) * mask  # (B, C, h, w)
    return se.flatten(1).sum(1) / (mask.flatten(1).sum(1) * pred.shape[1]).clamp_min(1.0)
