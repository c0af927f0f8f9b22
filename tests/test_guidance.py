"""Foreground/background guidance (supplement Eq. 4) and the seeded sampler, on a tiny random pipeline."""

import pytest
import torch
from PIL import Image

from foba_core.guidance import guidance_strip, guided_noise, sample_images
from foba_core.models import make_scheduler
from foba_core.models import encode_prompts
from foba_core.prompts import BACKGROUND_PROMPT

BIRD = "a photo of a bird"


@pytest.fixture(scope="module")
def pipe():
    from tiny_sd import tiny_pipeline

    return tiny_pipeline(seed=0, text_attention_mask=True)


def unet_call(unet, z, t, hidden, mask=None):
    return unet(z, t, encoder_hidden_states=hidden, encoder_attention_mask=mask).sample


@torch.no_grad()
def test_guided_noise_is_eq4_in_one_batched_call(pipe):
    hidden, mask = encode_prompts(pipe, [BIRD, BACKGROUND_PROMPT])
    assert mask is not None
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    hf, hb = hidden[:1].expand(2, -1, -1), hidden[1:].expand(2, -1, -1)
    mf, mb = mask[:1].expand(2, -1), mask[1:].expand(2, -1)
    eps_f, eps_b = unet_call(pipe.unet, z, t, hf, mf), unet_call(pipe.unet, z, t, hb, mb)
    for w in (3.0, 7.5, -1.0, -2.0):
        got = guided_noise(pipe.unet, z, t, hidden[:1], hidden[1:], w, mask[:1], mask[1:])
        torch.testing.assert_close(got, w * eps_f - (w - 1) * eps_b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(guided_noise(pipe.unet, z, t, hidden[:1], hidden[1:], 1.0, mask[:1], mask[1:]), eps_f)
    torch.testing.assert_close(guided_noise(pipe.unet, z, t, hidden[:1], hidden[1:], 0, mask[:1], mask[1:]), eps_b)
    per_sample = guided_noise(pipe.unet, z, t, hidden[:1], hidden[1:], torch.tensor([3.0, -1.0]), mask[:1], mask[1:])
    torch.testing.assert_close(per_sample[0], (3 * eps_f - 2 * eps_b)[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(per_sample[1], (-eps_f + 2 * eps_b)[1], atol=1e-5, rtol=1e-4)
    unmasked = guided_noise(pipe.unet, z, t, hidden[:1], hidden[1:], 3.0)
    assert not torch.allclose(unmasked, 3 * eps_f - 2 * eps_b, atol=1e-4)  # the key masks do reach the U-Net
    with pytest.raises(ValueError, match="both prompts"):
        guided_noise(pipe.unet, z, t, hidden[:1], hidden[1:], 3.0, mask_f=mask[:1])


def test_sampler_is_seeded_per_sample(pipe):
    kwargs = dict(num_inference_steps=3, seed=7)
    a = sample_images(pipe, 3, 3.0, BIRD, batch_size=2, **kwargs)
    assert a.shape == (3, 3, 16, 16) and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(sample_images(pipe, 3, 3.0, BIRD, batch_size=3, **kwargs), a, atol=1e-5, rtol=0)
    torch.testing.assert_close(sample_images(pipe, 2, 3.0, BIRD, batch_size=2, **kwargs), a[:2], atol=1e-5, rtol=0)
    other_seed = sample_images(pipe, 3, 3.0, BIRD, batch_size=2, num_inference_steps=3, seed=8)
    assert (other_seed - a).abs().max() > 1e-3
    background = sample_images(pipe, 3, -1.0, BIRD, batch_size=2, **kwargs)
    assert (background - a).abs().max() > 1e-3  # w changes the image


def test_all_guidance_scales_start_from_the_same_noise(pipe):
    # With y_b = y_f, Eq. 4 gives the same prediction for every w; equal images then mean equal z_T.
    same = [sample_images(pipe, 2, w, BIRD, background_prompt=BIRD, num_inference_steps=2, seed=3) for w in (-1, 1, 5)]
    for images in same[1:]:
        torch.testing.assert_close(images, same[0], atol=1e-4, rtol=0)


def test_sampler_takes_any_compatible_scheduler_and_the_key_mask(pipe):
    ddim = sample_images(pipe, 2, 1.0, BIRD, scheduler="DDIMScheduler", num_inference_steps=3)
    dpm = sample_images(pipe, 2, 1.0, BIRD, scheduler="DPMSolverMultistepScheduler", num_inference_steps=3)
    assert ddim.shape == dpm.shape == (2, 3, 16, 16)
    assert (ddim - dpm).abs().max() > 1e-4
    euler_a = [sample_images(pipe, 2, 1.0, BIRD, scheduler="EulerAncestralDiscreteScheduler", num_inference_steps=3)
               for _ in range(2)]
    torch.testing.assert_close(euler_a[0], euler_a[1])  # a stochastic sampler's step noise is seeded too
    with pytest.raises(ValueError, match="DDIMScheduler"):
        make_scheduler(pipe, "DDIMSchedular")
    pipe.text_attention_mask = False
    try:
        unmasked = sample_images(pipe, 2, 1.0, BIRD, scheduler="DDIMScheduler", num_inference_steps=3)
    finally:
        pipe.text_attention_mask = True
    assert (unmasked - ddim).abs().max() > 1e-4


def test_guidance_strip_draws_one_column_per_scale(pipe, tmp_path):
    path = guidance_strip(pipe, str(tmp_path / "strip.png"), BIRD, ws=(-1, 1, 3), n=2, num_inference_steps=2)
    width, height = Image.open(path).size
    tile = 128  # 16-pixel samples are enlarged to save_grid's minimum tile size
    assert width == 3 * (tile + 2) + 2 and height == 14 + 2 * (tile + 2) + 2

