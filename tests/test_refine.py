"""Tests of stage 3: latent-blended background inpainting (Eq. 6) and refined masks M / M_crop (Eq. 5)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from foba_core.diffusion import decode_latents, encode_latents
from foba_core.models import make_scheduler
from foba_core.refine import crop_masks, inpaint_latents, refine_masks

SCHEDULERS = ["DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"]


@pytest.fixture(scope="module")
def pipe():
    from tiny_sd import tiny_pipeline

    return tiny_pipeline(0, text_attention_mask=True)  # 16 x 16 images, 4 x 8 x 8 latents


def _inpaint(pipe, images: torch.Tensor, m_pre: torch.Tensor, **kwargs) -> torch.Tensor:
    """m'(z̃0, y_b) of images (B, 3, H, W): encoded, inpainted in latent space (Eq. 6), decoded."""
    return decode_latents(pipe, inpaint_latents(pipe, encode_latents(pipe, images), m_pre, **kwargs))


def _foreground(b: int = 2, size: int = 8) -> torch.Tensor:
    m = torch.zeros(b, size, size, dtype=torch.bool)
    m[:, 2:6, 3:7] = True
    m[-1, 1:3, 1:3] = True  # the images of a batch have different masks
    return m


class OracleUNet(torch.nn.Module):
    """An ε-predictor that knows the data: every latent equals ``target``. Records the calls it gets."""

    def __init__(self, target: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.target = target
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().double().numpy()  # VE sigma of each timestep
        self.calls: list[dict] = []

    @property
    def device(self):
        return torch.device("cpu")

    @property
    def dtype(self):
        return torch.float32

    def forward(self, x, t, encoder_hidden_states=None, encoder_attention_mask=None):
        sigma = float(np.interp(float(t), np.arange(len(self.sigmas)), self.sigmas))  # as Euler interpolates
        alpha_bar = 1.0 / (1.0 + sigma**2)
        self.calls.append({"t": float(t), "alpha_bar": alpha_bar, "x": x.clone(),
                           "encoder_attention_mask": encoder_attention_mask})
        eps = (x - alpha_bar**0.5 * self.target) / (1 - alpha_bar) ** 0.5  # the exact noise of x_t
        return SimpleNamespace(sample=eps)


def _oracle_pipe(pipe, target):
    oracle = OracleUNet(target, pipe.scheduler.alphas_cumprod)
    fake = SimpleNamespace(unet=oracle, scheduler=pipe.scheduler, tokenizer=pipe.tokenizer,
                           text_encoder=pipe.text_encoder, text_attention_mask=True, vae_scale_factor=2)
    return fake, oracle


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_inpainting_keeps_the_background_and_generates_the_foreground(pipe, scheduler):
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 4, 8, 8, generator=g)
    target = torch.randn(1, 4, 8, 8, generator=g)  # what the (oracle) model believes every image looks like
    fake, oracle = _oracle_pipe(pipe, target)
    m_pre = _foreground()
    out = inpaint_latents(fake, z0, m_pre, scheduler=scheduler, num_inference_steps=20, seed=3)
    fg = m_pre[:, None].expand_as(z0)
    assert torch.equal(out[~fg], z0[~fg])  # blending keeps the known background exactly
    expected = target.expand_as(z0)[fg]
    # an exact model makes any sampler reach the data in the foreground (DDIM stops at alpha_bar_0 < 1)
    assert (out[fg] - expected).abs().mean() < 0.05
    assert (out[fg] - z0[fg]).abs().mean() > 0.5  # the foreground has changed
    assert len(oracle.calls) >= 20 and all(c["encoder_attention_mask"] is not None for c in oracle.calls)
    for call in oracle.calls:  # the model sees the known background at its own noise level: q_sample(z0, t)
        residual = call["x"][~fg] - call["alpha_bar"] ** 0.5 * z0[~fg]
        assert abs(residual.std() / (1 - call["alpha_bar"]) ** 0.5 - 1) < 0.2
    assert oracle.calls[0]["encoder_attention_mask"].shape[0] == 2


def test_strength_runs_the_last_steps_only(pipe):
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    fake, oracle = _oracle_pipe(pipe, torch.zeros(1, 4, 8, 8))
    inpaint_latents(fake, z0, _foreground(1), num_inference_steps=10, strength=0.5)
    assert len(oracle.calls) == 5 and oracle.calls[0]["t"] < 600
    with pytest.raises(ValueError, match="strength"):
        inpaint_latents(fake, z0, _foreground(1), num_inference_steps=10, strength=0.01)


def test_inpainting_is_seeded_and_batch_independent(pipe):
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    m_pre = _foreground()
    a = _inpaint(pipe, images, m_pre, num_inference_steps=3, seed=7)
    b = _inpaint(pipe, images, m_pre, num_inference_steps=3, seed=7)
    assert a.shape == (2, 3, 16, 16) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b)
    c = _inpaint(pipe, images, m_pre, num_inference_steps=3, seed=8)
    assert not torch.allclose(a, c)
    second = _inpaint(pipe, images[1:], m_pre[1:], num_inference_steps=3, seed=8)  # image 1 of seed 7
    assert torch.allclose(a[1:], second, atol=1e-5)
    other = _inpaint(pipe, images, m_pre, num_inference_steps=3, seed=7, sample=1)  # another inpainting k
    assert not torch.allclose(a, other)
    assert torch.allclose(other[1:], _inpaint(pipe, images[1:], m_pre[1:], num_inference_steps=3, seed=8, sample=1),
                          atol=1e-5)


def test_real_unet_inpainting_keeps_background_latents_and_gets_the_key_mask(pipe):
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    z0 = encode_latents(pipe, images)
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        out = inpaint_latents(pipe, z0, _foreground(), scheduler="EulerDiscreteScheduler", num_inference_steps=3)
    finally:
        handle.remove()
    fg = _foreground()[:, None].expand_as(z0)
    assert torch.equal(out[~fg], z0[~fg]) and not torch.allclose(out[fg], z0[fg])
    assert seen and all(k.get("encoder_attention_mask") is not None for k in seen)


def test_scheduler_lookup_and_input_checks(pipe):
    from diffusers import DPMSolverMultistepScheduler

    sampler = make_scheduler(pipe, "DPMSolverMultistepScheduler")
    assert isinstance(sampler, DPMSolverMultistepScheduler)
    assert sampler.config.num_train_timesteps == pipe.scheduler.config.num_train_timesteps
    with pytest.raises(ValueError, match="DDIMScheduler"):
        make_scheduler(pipe, "DDIMSchedular")
    with pytest.raises(ValueError, match="latent resolution"):
        inpaint_latents(pipe, torch.zeros(1, 4, 8, 8), torch.zeros(1, 16, 16, dtype=torch.bool))


def test_refine_masks_stay_inside_the_upsampled_preliminary_mask(pipe):
    from foba_core.masks import binarize_gmm, upsample_mask

    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    m_pre = _foreground()
    masks, inpainted = refine_masks(pipe, images, m_pre, num_inference_steps=3, fit="image")
    up = upsample_mask(m_pre, (16, 16))
    assert masks.shape == (2, 16, 16) and masks.dtype == torch.bool and inpainted.shape == (1, *images.shape)
    assert not (masks & ~up).any()  # M = M_pre,up ⊙ g(...)
    for i in range(2):  # Eq. 5 on the returned inpainting, g fitted on the whole map
        diff = (images[i] - inpainted[0, i]).abs().mean(0)
        assert torch.equal(masks[i], up[i] & binarize_gmm(diff))
    from foba_core.diffusion import encode_latents

    again = refine_masks(pipe, images, m_pre, num_inference_steps=3, fit="image", z0=encode_latents(pipe, images))
    assert torch.equal(again[0], masks) and torch.equal(again[1], inpainted)  # stage 1's latents, same result
    other = refine_masks(pipe, images, m_pre, num_inference_steps=3, fit="image",
                         z0=encode_latents(pipe, images.flip(0)))
    assert not torch.equal(other[1], inpainted)  # the latents given are the ones inpainted


def test_several_inpaintings_draw_independent_noise_and_eq5_averages_them(pipe):
    from foba_core.masks import refined_mask, upsample_mask

    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    m_pre = _foreground()
    masks, inpainted = refine_masks(pipe, images, m_pre, num_inference_steps=3, seed=5, n_samples=3)
    assert inpainted.shape == (3, 2, 3, 16, 16)
    assert torch.allclose(inpainted[0], _inpaint(pipe, images, m_pre, num_inference_steps=3, seed=5))
    assert torch.allclose(inpainted[2], _inpaint(pipe, images, m_pre, num_inference_steps=3, seed=5, sample=2))
    assert not torch.allclose(inpainted[0], inpainted[1])
    up = upsample_mask(m_pre, (16, 16))
    for i in range(2):
        assert torch.equal(masks[i], refined_mask(images[i], inpainted[:, i], up[i], fit="m_pre"))
    with pytest.raises(ValueError, match="n_samples"):
        refine_masks(pipe, images, m_pre, num_inference_steps=3, n_samples=0)


def test_crop_masks_recover_an_object_on_a_plain_background():
    images = torch.zeros(1, 3, 16, 16)
    images[:, 0] = 0.2  # a plain red-ish background
    obj = torch.zeros(16, 16, dtype=torch.bool)
    obj[5:10, 6:11] = True
    images[0, :, obj] = torch.tensor([0.9, 0.8, 0.1])[:, None]
    m_pre = torch.zeros(1, 8, 8, dtype=torch.bool)
    m_pre[0, 2:6, 2:6] = True  # a coarse mask that overestimates the object, as M_pre does
    masks, filled = crop_masks(images, m_pre)
    assert torch.equal(masks[0], obj)
    assert torch.allclose(filled[0], torch.zeros(3, 16, 16).index_fill_(0, torch.tensor([0]), 0.2))


@torch.no_grad()
def test_latent_normalisation_follows_the_vae_config_and_round_trips():
    from tiny_sd import tiny_pipeline

    from foba_core.diffusion import reconstruct, to_diffusion_latents, to_vae_latents

    pipe = tiny_pipeline(0)
    vae = pipe.vae
    raw = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 + 1
    assert torch.allclose(to_diffusion_latents(vae, raw), raw * vae.config.scaling_factor)  # SD 1.x/2.x: scaling only
    mean, std = [0.5, -1.0, 2.0, 0.0], [2.0, 0.5, 1.0, 4.0]
    vae.register_to_config(latents_mean=mean, latents_std=std, scaling_factor=1.0)
    z = to_diffusion_latents(vae, raw)
    expected = (raw - torch.tensor(mean).view(1, 4, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1)
    assert torch.allclose(z, expected)
    assert torch.allclose(to_vae_latents(vae, z), raw, atol=1e-6)
    # every stage goes through them: encoding, decoding (refinement and sampling) and the VAE round trip
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    posterior = vae.encode(images * 2 - 1).latent_dist.mean
    assert torch.allclose(encode_latents(pipe, images), to_diffusion_latents(vae, posterior), atol=1e-6)
    zeros = torch.zeros(1, 4, 8, 8)
    decoded = ((vae.decode(torch.tensor(mean).view(1, 4, 1, 1).expand(1, 4, 8, 8)).sample + 1) / 2).clamp(0, 1)
    assert torch.allclose(decode_latents(pipe, zeros), decoded, atol=1e-6)  # z = 0 is the mean latent
    assert torch.allclose(reconstruct(pipe, images), decode_latents(pipe, encode_latents(pipe, images)))
    # the toy pretraining encodes its data set through the same codec (raw means, normalised afterwards)
    from foba_core.toy.pretrain import encode_dataset

    raw_means = encode_dataset(vae, [{"image": x, "caption": ""} for x in images], batch_size=1)
    assert torch.allclose(to_diffusion_latents(vae, raw_means), encode_latents(pipe, images), atol=1e-6)
