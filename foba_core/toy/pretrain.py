"""Pretraining of the toy LDM on the toy world: the VAE first (then frozen), then the text-conditioned U-Net."""

from __future__ import annotations

import json
import os

import torch
from tqdm.auto import tqdm

from foba_core.diffusion import to_diffusion_latents, vae_posterior
from foba_core.io import write_torch
from foba_core.models import save_pipeline
from foba_core.toy.ldm import ToyLDMConfig, config_dict


def _stack(dataset, indices) -> tuple[torch.Tensor, list[str]]:
    items = [dataset[int(i)] for i in indices]
    return torch.stack([it["image"] for it in items]), [it["caption"] for it in items]


def train_vae(vae, dataset, steps: int = 400, batch_size: int = 64, lr: float = 1e-3, kl_weight: float = 1e-6,
              seed: int = 0, device="cpu") -> list[float]:
    """Train the AutoencoderKL on reconstruction + a small KL term (lr cosine-annealed to 0); return the loss per step."""
    gen = torch.Generator().manual_seed(seed)
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    for _ in tqdm(range(steps), desc="toy VAE", mininterval=5):
        idx = torch.randint(len(dataset), (batch_size,), generator=gen)
        x = _stack(dataset, idx)[0].to(device) * 2 - 1  # (B, 3, H, W) in [-1, 1]
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(x)
        recon = vae.decode(z).sample
        loss = torch.nn.functional.mse_loss(recon, x) + kl_weight * dist.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.detach().item())
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def encode_dataset(vae, dataset, batch_size: int = 500, device="cpu") -> torch.Tensor:
    """Return the raw (not yet normalised) posterior means E[q(z | x)] of every image of ``dataset`` (N, C, h, w).

    They are raw because the toy VAE's per-channel latents_mean / latents_std are measured on them
    (:func:`vae_stage`); ``diffusion.to_diffusion_latents`` then normalises them like every other latent.
    """
    out = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="encode latents", mininterval=5):
        x = _stack(dataset, range(start, min(start + batch_size, len(dataset))))[0].to(device)
        out.append(vae_posterior(vae, x).mean.cpu())
    return torch.cat(out)


class LatentCaptions(torch.utils.data.Dataset):
    """Items {latent, caption} from precomputed scaled latents and the captions of the toy scenes."""

    def __init__(self, latents: torch.Tensor, captions: list[str]):
        if len(latents) != len(captions):
            raise ValueError(f"{len(latents)} latents but {len(captions)} captions")
        self.latents, self.captions = latents, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        return {"latent": self.latents[i], "caption": self.captions[i]}


def vae_stage(components: dict, dataset, work_dir: str, steps: int = 400, batch_size: int = 64, lr: float = 1e-3,
              seed: int = 0, device="cpu") -> LatentCaptions:
    """Train (or reload from ``work_dir``) the VAE, set its per-channel latent mean and std, return the latent dataset."""
    vae = components["vae"]
    cache = os.path.join(work_dir, "vae_stage.pt")
    if os.path.exists(cache):
        state = torch.load(cache, map_location="cpu", weights_only=True)  # tensors, captions and losses: no code
        vae.load_state_dict(state["vae"])
        vae.eval().requires_grad_(False)
        latents, captions = state["latents"], state["captions"]
    else:
        losses = train_vae(vae, dataset, steps, batch_size, lr, seed=seed, device=device)
        latents = encode_dataset(vae, dataset, device=device)
        captions = [dataset[i]["caption"] for i in range(len(dataset))]
        os.makedirs(work_dir, exist_ok=True)
        write_torch({"vae": vae.state_dict(), "latents": latents, "captions": captions, "losses": losses}, cache)
    # Latents are diffused centred and at unit variance per channel (diffusers' latents_mean / latents_std).
    # The toy VAE's channel means lie up to 1.3 standard deviations from 0; with scaling only, sampling from
    # N(0, I), which lacks that offset, gave every sample the same colour cast.
    vae.register_to_config(latents_mean=latents.mean(dim=(0, 2, 3)).tolist(),
                           latents_std=latents.std(dim=(0, 2, 3)).tolist(), scaling_factor=1.0)
    return LatentCaptions(to_diffusion_latents(vae, latents), captions)


def save_toy_model(components: dict, folder: str, cfg: ToyLDMConfig, training_log: str | None = None) -> str:
    """Save the toy LDM in the Stable Diffusion folder layout (+ foba.json), atomically; return the folder."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=components["vae"], text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
        unet=components["unet"], scheduler=components["scheduler"], safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    meta = {"image_size": cfg.image_size, "toy_ldm_config": config_dict(cfg)}
    if training_log and os.path.exists(training_log):
        with open(training_log) as f:
            meta["training"] = {k: v for k, v in json.load(f).items() if k != "losses"}
    pipe.text_attention_mask = True  # trained with the text key mask (foba.json)
    return str(save_pipeline(pipe, folder, extra=meta))

