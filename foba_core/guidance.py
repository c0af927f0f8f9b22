"""Foreground/background guidance: sampling the fine-tuned LDM between its two concepts (Sec. 4, Fig. 8).

Classifier-free guidance with the background prompt y_b in place of the empty prompt
(supplement Eq. 4):  ε̃(z_t) = w·ε(z_t, y_f) − (w − 1)·ε(z_t, y_b).
w = 1 is plain synthesis under y_f, w > 1 pushes further towards the object, w = 0 is plain
synthesis under y_b and w = −1 guides towards the background (the same as swapping the prompts
with w = 2). Every sample's starting noise depends only on ``(seed, sample index)``, so images
drawn with the same seed at different w start from the same z_T and can be laid side by side.
"""

from __future__ import annotations

import inspect
import numbers

import torch

from foba_core.diffusion import decode_latents
from foba_core.models import encode_prompts, make_scheduler
from foba_core.prompts import BACKGROUND_PROMPT
from foba_core.seeds import derive_seed
from foba_core.visualize import save_grid, to_uint8


def _noise_prediction(unet, z_t, t, hidden, key_mask):
    kwargs = {"encoder_attention_mask": key_mask} if key_mask is not None else {}
    return unet(z_t, t, encoder_hidden_states=hidden, **kwargs).sample


def guided_noise(unet, z_t: torch.Tensor, t, hidden_f: torch.Tensor, hidden_b: torch.Tensor, w,
                 mask_f: torch.Tensor | None = None, mask_b: torch.Tensor | None = None) -> torch.Tensor:
    """Return the guided prediction w·ε(z_t, y_f) − (w − 1)·ε(z_t, y_b) (supplement Eq. 4), shape of z_t.

    ``hidden_f`` / ``hidden_b`` are the text states of y_f and y_b, (B, L, D) or (1, L, D);
    ``mask_f`` / ``mask_b`` the U-Net key masks from ``encode_prompts`` (both or neither). ``w`` is a
    number or a (B,) tensor. Both prompts go through ONE U-Net call on the doubled batch; for the
    numbers w = 1 and w = 0 only the one prediction that the formula keeps is computed.
    """
    if (mask_f is None) != (mask_b is None):
        raise ValueError("pass the key masks of both prompts (mask_f and mask_b) or neither; the model was trained "
                         "either with or without them")
    b = z_t.shape[0]
    hidden_f, hidden_b = hidden_f.expand(b, -1, -1), hidden_b.expand(b, -1, -1)  # (B, L, D)
    if mask_f is not None:
        mask_f, mask_b = mask_f.expand(b, -1), mask_b.expand(b, -1)  # (B, L)
    if isinstance(w, numbers.Number) and w in (0, 1):
        return (_noise_prediction(unet, z_t, t, hidden_f, mask_f) if w == 1
                else _noise_prediction(unet, z_t, t, hidden_b, mask_b))
    t2 = torch.cat([t, t]) if torch.is_tensor(t) and t.ndim == 1 else t
    mask = torch.cat([mask_f, mask_b]) if mask_f is not None else None
    eps = _noise_prediction(unet, torch.cat([z_t, z_t]), t2, torch.cat([hidden_f, hidden_b]), mask)  # (2B, C, h, w)
    eps_f, eps_b = eps.chunk(2)
    if torch.is_tensor(w):
        if w.shape != (b,):
            raise ValueError(f"w must be a number or a tensor of shape ({b},), got shape {tuple(w.shape)}")
        w = w.to(eps).view(b, *([1] * (eps.ndim - 1)))
    return w * eps_f - (w - 1) * eps_b  # supplement Eq. 4


@torch.inference_mode()
def sample_images(pipe, n: int, w: float, object_prompt: str, background_prompt: str = BACKGROUND_PROMPT,
                  scheduler="DDIMScheduler", num_inference_steps: int = 50, seed: int = 0,
                  batch_size: int = 16) -> torch.Tensor:
    """Return ``n`` images (n, 3, H, W) in [0, 1] synthesised with foreground/background guidance scale ``w``.

    ``object_prompt`` is y_f (e.g. "a photo of a bird"), ``background_prompt`` y_b. w >= 1 gives
    object images, w = -1 backgrounds. ``scheduler`` is a diffusers scheduler class name compatible
    with the pipeline's (or an instance), configured from the pipeline's schedule. Sample i starts
    from noise seeded by ``derive_seed(seed, "z_T", i)``, whatever the batch size and w; a stochastic
    scheduler's step noise comes from one generator per batch (``derive_seed(seed, "step noise", first
    index)``), so such samples also depend on ``batch_size``.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    hidden, key_mask = encode_prompts(pipe, [object_prompt, background_prompt], device=device)
    hidden = hidden.to(dtype)  # (2, L, D): y_f, y_b
    mask_f, mask_b = (key_mask[:1], key_mask[1:]) if key_mask is not None else (None, None)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    images = []
    for start in range(0, n, batch_size):
        indices = range(start, min(start + batch_size, n))
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(seed, "z_T", i)))
                             for i in indices])  # (B, C, h, w), drawn on the CPU: the same on every device
        sched = make_scheduler(pipe, scheduler)
        sched.set_timesteps(num_inference_steps, device=device)
        step_kwargs = {}
        if "generator" in inspect.signature(sched.step).parameters:
            step_kwargs["generator"] = torch.Generator().manual_seed(derive_seed(seed, "step noise", start))
        z = noise.to(device, dtype) * sched.init_noise_sigma
        for t in sched.timesteps:
            eps = guided_noise(unet, sched.scale_model_input(z, t), t, hidden[:1], hidden[1:], w, mask_f, mask_b)
            z = sched.step(eps, t, z, **step_kwargs).prev_sample
        images.append(decode_latents(pipe, z).cpu())  # (B, 3, H, W) in [0, 1]
    return torch.cat(images)


def guidance_strip(pipe, path: str, object_prompt: str, ws=(-2, -1, 0, 1, 3, 7.5), n: int = 4, seed: int = 0,
                   **sample_kwargs) -> str:
    """Write a PNG like Fig. 8: one row per starting noise, one column per guidance scale w; return its path.

    ``sample_kwargs`` go to ``sample_images`` (background_prompt, scheduler, num_inference_steps, batch_size).
    """
    columns = [sample_images(pipe, n, w, object_prompt, seed=seed, **sample_kwargs) for w in ws]
    rows = [[to_uint8(col[i]) for col in columns] for i in range(n)]
    return save_grid(rows, path, column_titles=[f"w={w:g}" for w in ws])
