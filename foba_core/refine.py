"""Stage 3 (paper Sec. 3, Eq. 5-6): background inpainting with the fine-tuned model m' and refined masks M.

Eq. 6 replaces the foreground latents by noise, z̃0 = z0 ⊙ (1 − M_pre) + z ⊙ M_pre, and m' denoises
z̃0 under y_b = "a photo of a background". The reverse process is any diffusers scheduler compatible
with the model's (DDIM by default) with latent blending: after every step the known background is
reset to q_sample(z0, t_prev), and after the last one to z0 itself, so only the foreground is
generated. Eq. 5 then keeps the pixels of M_pre,up where the image changed: M = M_pre,up ⊙ g(|x − x̂|).
``crop_masks`` is the M_crop ablation (supplement Sec. 5), which uses no model.

Two choices go beyond the paper's text, both measured on the toy world (bundles/foba_toy/docs): g is
fitted on the differences inside M_pre,up (``fit="m_pre"``; the paper's whole map: ``fit="image"``),
and |x − x̂| may be averaged over K inpaintings with independent noise (``n_samples``; the paper: 1).
"""

from __future__ import annotations

import inspect
import os

import torch

from foba_core.diffusion import decode_latents, encode_latents
from foba_core.masks import flip_crop_inpaint, refined_mask, upsample_mask
from foba_core.models import encode_prompts, make_scheduler
from foba_core.prompts import BACKGROUND_PROMPT
from foba_core.seeds import derive_seed


def _check_batch(pipe, z0: torch.Tensor, m_pre: torch.Tensor) -> None:
    if z0.ndim != 4 or m_pre.shape != (z0.shape[0], *z0.shape[-2:]):
        raise ValueError(
            f"expected latents (B, C, h, w) and M_pre (B, h, w) at the same latent resolution, got "
            f"{tuple(z0.shape)} and {tuple(m_pre.shape)}; images must be at the model's resolution "
            f"({pipe.unet.config.sample_size * pipe.vae_scale_factor} px: resize with transforms.resize_center_crop)"
        )


@torch.no_grad()
def inpaint_latents(pipe, z0: torch.Tensor, m_pre: torch.Tensor, prompt: str = BACKGROUND_PROMPT,
                    scheduler: str = "DDIMScheduler", num_inference_steps: int = 50, seed: int = 0,
                    strength: float = 1.0, sample: int = 0) -> torch.Tensor:
    """Return the latents of m'(z̃0, y_b) (B, C, h, w): the foreground of M_pre regenerated, the background exactly z0.

    z0 (B, C, h, w) are the encoded images, ``m_pre`` (B, h, w) the preliminary masks. The reverse
    process starts at the first ``strength`` fraction of the ``num_inference_steps`` timesteps from
    q_sample(z̃0, t_start) of Eq. 6. Image b of the batch draws its noise from
    ``derive_seed(seed + b, "inpainting", sample)``, so a batch split in two (seeds s and s + B1) gives
    the same results as one call, and inpaintings with another ``sample`` index are independent.
    """
    _check_batch(pipe, z0, m_pre)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    sampler = make_scheduler(pipe, scheduler)
    device, dtype = pipe.unet.device, pipe.unet.dtype
    b = z0.shape[0]
    z0 = z0.to(device, torch.float32)
    fg = m_pre.to(device).bool()[:, None]  # (B, 1, h, w): True = foreground, to be inpainted
    generators = [torch.Generator().manual_seed(derive_seed(int(seed) + i, "inpainting", sample)) for i in range(b)]
    z = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in generators]).to(device)  # Eq. 6's z
    noise = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in generators]).to(device)

    sampler.set_timesteps(num_inference_steps, device=device)
    n_run = min(int(num_inference_steps * strength), num_inference_steps)
    if n_run < 1:
        raise ValueError(f"strength {strength} leaves no step of {num_inference_steps}; raise either")
    first = (num_inference_steps - n_run) * sampler.order
    timesteps = sampler.timesteps[first:]
    if hasattr(sampler, "set_begin_index"):
        sampler.set_begin_index(first)

    hidden, key_mask = encode_prompts(pipe, [prompt] * b, device=device)  # (B, L, D), (B, L) | None
    unet_kwargs = {"encoder_attention_mask": key_mask} if key_mask is not None else {}
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(sampler.step).parameters else {}

    z_tilde = torch.where(fg, z, z0)  # Eq. 6: z̃0 = z0 ⊙ (1 − M_pre) + z ⊙ M_pre
    latents = sampler.add_noise(z_tilde, noise, timesteps[:1].repeat(b))  # q_sample(z̃0, t_start)
    for i, t in enumerate(timesteps):
        model_input = sampler.scale_model_input(latents, t).to(dtype)
        eps = pipe.unet(model_input, t, encoder_hidden_states=hidden.to(dtype), **unet_kwargs).sample
        latents = sampler.step(eps.float(), t, latents, **step_kwargs).prev_sample
        if i + 1 < len(timesteps):  # latent blending: the known background at the next noise level
            known = sampler.add_noise(z0, noise, timesteps[i + 1:i + 2].repeat(b))
        else:
            known = z0
        latents = torch.where(fg, latents, known)
    return latents


def _encode_images(pipe, images: torch.Tensor) -> torch.Tensor:
    """z0 of the images to inpaint (B, C, h, w), after checking that they are (B, 3, H, W)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"inpainting expects images (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
    return encode_latents(pipe, images)


def _masks_from(images: torch.Tensor, filled: torch.Tensor, m_pre: torch.Tensor, random_state: int | None,
                fit: str) -> torch.Tensor:
    """Eq. 5 for a batch: M = M_pre,up ⊙ g(|x − x̂|), one GMM per image; ``filled`` (K, B, 3, H, W) or (B, 3, H, W)."""
    m_pre_up = upsample_mask(m_pre.cpu(), tuple(images.shape[-2:]))  # (B, H, W)
    images, filled = images.detach().float().cpu(), filled.detach().float().cpu()
    filled = filled if filled.ndim == 5 else filled[None]  # (K, B, 3, H, W)
    return torch.stack([refined_mask(x, filled[:, b], m, random_state, fit)
                        for b, (x, m) in enumerate(zip(images, m_pre_up))])


def refine_masks(pipe, images: torch.Tensor, m_pre: torch.Tensor, prompt: str = BACKGROUND_PROMPT,
                 scheduler: str = "DDIMScheduler", num_inference_steps: int = 50, seed: int = 0,
                 strength: float = 1.0, random_state: int | None = 0, n_samples: int = 1,
                 fit: str = "m_pre", z0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the refined masks M (B, H, W) bool of Eq. 5 and the inpaintings m'(z̃0, y_b) (K, B, 3, H, W).

    ``n_samples`` = K inpaintings of each image with independent noise (image i, inpainting k: seed
    ``derive_seed(seed + i, "inpainting", k)``; K = 1 is the paper's single inpainting); Eq. 5 takes their
    mean difference. ``fit`` is where g is fitted (``masks.refined_mask``). ``z0`` are the images' latents
    (``diffusion.encode_latents``) when the caller has them, e.g. from stage 1 in the same process, with the
    same model's VAE; otherwise the images are encoded here.
    """
    if int(n_samples) < 1:
        raise ValueError(f"n_samples must be >= 1 (inpaintings per image), got {n_samples}")
    if z0 is None:
        z0 = _encode_images(pipe, images)  # (B, C, h, w), encoded once for the K inpaintings
    inpainted = torch.stack([decode_latents(pipe, inpaint_latents(
        pipe, z0, m_pre, prompt, scheduler, num_inference_steps, seed, strength, sample=k))
        for k in range(int(n_samples))])  # (K, B, 3, H, W)
    return _masks_from(images, inpainted, m_pre, random_state, fit), inpainted


def crop_masks(images: torch.Tensor, m_pre: torch.Tensor, random_state: int | None = 0, fit: str = "m_pre"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the M_crop masks (B, H, W) bool (Eq. 5 with the flipped background crop) and the filled images."""
    if images.ndim != 4 or m_pre.ndim != 3 or m_pre.shape[0] != images.shape[0]:
        raise ValueError(f"crop_masks: expected images (B, C, H, W) and M_pre (B, h, w), got {tuple(images.shape)} "
                         f"and {tuple(m_pre.shape)}")
    m_pre_up = upsample_mask(m_pre.cpu(), tuple(images.shape[-2:]))
    images = images.detach().float().cpu()
    filled = torch.stack([flip_crop_inpaint(x, m) for x, m in zip(images, m_pre_up)])
    return _masks_from(images, filled, m_pre, random_state, fit), filled


def split_runs(items: list[dict]) -> list[tuple[str, int, int]]:
    """Return (split, first index, stop index) of each contiguous run of one split's items in a batch."""
    runs: list[tuple[str, int, int]] = []
    for item in items:
        split, index = item["split"], int(item["index"])
        if runs and runs[-1][0] == split and runs[-1][2] == index:
            runs[-1] = (split, runs[-1][1], index + 1)
        else:
            runs.append((split, index, index + 1))
    return runs


class MaskStep:
    """``iteration_update`` of a mask-making stage: a batch of split items -> {"items", "masks" (B, S, S)}.

    ``m_pre`` maps each split to its stage-1 output ({"ids", "m_pre"}); the items' ids are checked against
    it. Each contiguous run of one split's items (indices s .. e - 1) is computed by ``masks_of(images,
    m_pre, start=s, split)`` and stored in ``cache_dir``, so an interrupted stage resumes batch by batch.
    """

    def __init__(self, m_pre: dict, cache_dir: str):
        self.m_pre, self.cache_dir = m_pre, cache_dir

    def masks_of(self, images: torch.Tensor, m_pre: torch.Tensor, start: int, split: str) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, engine, items: list[dict]) -> dict:
        from foba_core.outputs import cached

        out = []
        for split, start, stop in split_runs(items):
            stage1 = self.m_pre[split]
            for item in items:
                if item["split"] == split and stage1["ids"][item["index"]] != item["id"]:
                    raise RuntimeError(f"image {item['id']!r} of the {split} split has no M_pre of its own (stage 1 "
                                       "ran on other images); rerun stage 1")
            images = torch.stack([it["image"] for it in items if it["split"] == split])  # (B, 3, S, S)
            path = os.path.join(self.cache_dir, f"{split}_{start:07d}-{stop:07d}.safetensors")
            out.append(cached(path, lambda: {"masks": self.masks_of(images, stage1["m_pre"][start:stop], start, split)})
                       ["masks"].bool())
        return {"items": items, "masks": torch.cat(out)}


class RefineStep(MaskStep):
    """Refined masks M (Eq. 5-6) with the fine-tuned model; image i of split s draws its noise from
    ``derive_seed(seed, "refine", s) + i``, so no two splits (nor D'_s) share inpainting noise.

    ``batch_size`` is the batch that callers outside an engine (the synthetic D'_s) refine at.
    """

    def __init__(self, pipe, m_pre: dict, cache_dir: str, scheduler: str = "DDIMScheduler",
                 num_inference_steps: int = 50, n_samples: int = 1, fit: str = "image", seed: int = 0,
                 batch_size: int = 8):
        super().__init__(m_pre, cache_dir)
        self.batch_size = int(batch_size)
        self.pipe, self.scheduler, self.steps = pipe, scheduler, int(num_inference_steps)
        self.n_samples, self.fit, self.seed = int(n_samples), fit, int(seed)

    def masks_of(self, images: torch.Tensor, m_pre: torch.Tensor, start: int, split: str) -> torch.Tensor:
        seed = derive_seed(self.seed, "refine", split) + start  # image i of the batch: + i (batch-independent)
        return refine_masks(self.pipe, images, m_pre, scheduler=self.scheduler, num_inference_steps=self.steps,
                            seed=seed, n_samples=self.n_samples, fit=self.fit)[0]


class CropStep(MaskStep):
    """The M_crop ablation (supplement Sec. 5): Eq. 5 with the flipped background crop, no model."""

    def __init__(self, m_pre: dict, cache_dir: str, fit: str = "image"):
        super().__init__(m_pre, cache_dir)
        self.fit = fit

    def masks_of(self, images: torch.Tensor, m_pre: torch.Tensor, start: int, split: str) -> torch.Tensor:
        return crop_masks(images, m_pre, fit=self.fit)[0]
