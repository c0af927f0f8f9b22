"""Attention capture and heat maps M̂ (Eq. 4) against a reference that stores every map."""

import pytest
import torch

from foba_core.capture import AttentionCapture, authors_timesteps, heat_maps, token_indices, token_weights


def _tiny_unet(sd2: bool = False):
    """A tiny U-Net with SD 1.x's attention settings, or SD 2.x's (linear projections, per-block head dims, upcast)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    sd2_settings = {"use_linear_projection": True, "attention_head_dim": (2, 4), "upcast_attention": True}
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        norm_num_groups=16, **(sd2_settings if sd2 else {"attention_head_dim": 8}),
    ).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return unet, scheduler


@pytest.fixture(scope="module")
def tiny_unet():
    return _tiny_unet()


def _inputs(n=3, seq=9, hw=(8, 6)):
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(n, 4, *hw, generator=g)
    hidden = torch.randn(n, seq, 16, generator=g)
    # per-image targets: image 0 one token, image 1 a two-token word, image 2 another token
    weights = token_weights([[[2]], [[3, 4]], [[5]]], seq)
    return z0, hidden, weights


def test_authors_timesteps():
    ts = authors_timesteps(40)
    assert ts[0] == 781 and ts[-1] == 1 and len(ts) == 40 and ts[0] - ts[1] == 20
    with pytest.raises(ValueError):
        authors_timesteps(60)


@pytest.mark.parametrize("budget,sd2", [(1e12, False), (1.0, False), (1e12, True)])  # one chunk / one row per chunk
def test_heat_maps_equal_reference(tiny_unet, budget, sd2):
    from foba_core.bench import reference_heat_maps

    unet, scheduler = _tiny_unet(sd2=True) if sd2 else tiny_unet
    z0, hidden, weights = _inputs()  # non-square latents: 8 x 6 (odd grid below: 4 x 3)
    ts = [901, 501, 101, 1]
    ours = heat_maps(unet, scheduler, z0, hidden, weights, timesteps=ts, seed=7, per_layer=True,
                     per_timestep=True, budget_bytes=budget)
    ref, ref_layers, stored = reference_heat_maps(unet, scheduler, z0, hidden, weights, timesteps=ts, seed=7)
    rel = (ours.total - ref).abs().max() / ref.abs().max()
    assert rel <= 1e-4
    assert ours.total.shape == (3, 1, 8, 6)
    # the per-layer and per-timestep views sum to the total
    assert torch.allclose(sum(ours.per_layer.values()), ours.total, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours.per_timestep.sum(1), ours.total, rtol=1e-5, atol=1e-6)
    assert set(ours.per_layer) == set(ref_layers) and len(ours.per_layer) == len(ours.layer_names)
    for name, m in ours.per_layer.items():
        assert torch.allclose(m, ref_layers[name], rtol=1e-4, atol=1e-6)
    assert ours.capture_bytes * 5 < stored  # even with the per-layer and per-timestep views kept


def test_processors_restored_and_masked_attention(tiny_unet):
    from foba_core.bench import reference_heat_maps

    unet, scheduler = tiny_unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    z0, hidden, weights = _inputs()
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[:, 7:] = 0  # hide the last tokens from cross-attention (toy models are trained with this)
    ours = heat_maps(unet, scheduler, z0, hidden, weights, text_mask=mask, timesteps=[501, 1])
    ref = reference_heat_maps(unet, scheduler, z0, hidden, weights, text_mask=mask, timesteps=[501, 1])[0]
    unmasked = heat_maps(unet, scheduler, z0, hidden, weights, timesteps=[501, 1]).total
    assert torch.allclose(ours.total, ref, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(ours.total, unmasked, rtol=1e-3)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


def test_conditional_half_only(tiny_unet):
    unet, scheduler = tiny_unet
    z0, hidden, weights = _inputs()
    t = torch.tensor([501] * 3)

    def capture(uncond):
        with torch.inference_mode(), AttentionCapture(unet, (8, 6), conditional_half=True) as cap:
            cap.select(weights)
            unet(torch.cat([z0, z0]), torch.cat([t, t]), torch.cat([uncond, hidden]))
            return cap.pop()[0]

    a = capture(torch.zeros_like(hidden))
    b = capture(torch.randn(hidden.shape, generator=torch.Generator().manual_seed(9)))
    assert torch.allclose(a, b, atol=1e-6)  # the unconditional half does not leak in
    with torch.inference_mode(), AttentionCapture(unet, (8, 6)) as cap:
        cap.select(weights)
        unet(z0, t, hidden)
        alone = cap.pop()[0]
    assert torch.allclose(a, alone, rtol=1e-4, atol=1e-6)


def test_capture_requires_selection(tiny_unet):
    unet, _ = tiny_unet
    z0, hidden, _ = _inputs()
    with pytest.raises(RuntimeError, match="select"), torch.inference_mode(), AttentionCapture(unet, (8, 6)):
        unet(z0, torch.tensor([1, 1, 1]), hidden)


def test_token_indices_multi_token_words():
    from foba_core.toy.ldm import build_tokenizer

    import tempfile

    tok = build_tokenizer(tempfile.mkdtemp(), max_length=32)
    prompt = "Small left pleural effusion and a pneumomediastinum"
    idx = token_indices(tok, prompt, ["pleural effusion", "pneumomediastinum", "left"])
    tokens = tok.convert_ids_to_tokens(tok(prompt).input_ids)
    assert [tokens[i] for i in idx[0]] == ["pleural</w>", "effusion</w>"]
    assert len(idx[1]) >= 2 and "".join(tokens[i] for i in idx[1]).replace("</w>", "") == "pneumomediastinum"
    assert [tokens[i] for i in idx[2]] == ["left</w>"]
    with pytest.raises(ValueError, match="not in the prompt") as err:
        token_indices(tok, prompt, "bird")
    assert "pleural</w>" in str(err.value)  # the error shows the prompt's tokens


def test_maps_only_forward_stops_after_the_last_layer_and_shares_keys(tiny_unet):
    """stop_after_last skips what follows the last cross-attention; shared contexts project K/V once, same maps."""
    unet, _ = tiny_unet
    z0, hidden, weights = _inputs()
    rows = torch.tensor([0, 0, 1, 2, 2, 2])  # (image, timestep) rows: images repeat, as in heat_maps
    t = torch.tensor([901, 1, 501, 901, 501, 1])
    calls = {"conv_out": 0, "to_k": 0}
    hooks = [unet.conv_out.register_forward_hook(lambda *a: calls.__setitem__("conv_out", calls["conv_out"] + 1))]
    first_attn2 = next(m for n, m in unet.named_modules() if n.endswith("attn2"))
    hooks.append(first_attn2.to_k.register_forward_hook(
        lambda m, inp, out: calls.__setitem__("to_k", out.shape[0])))
    try:
        with torch.inference_mode(), AttentionCapture(unet, (8, 6), stop_after_last=True) as cap:
            cap.select(weights[rows], context_rows=rows)
            cap.forward(z0[rows], t, hidden[rows])
            shared = cap.pop()[0]
        assert calls == {"conv_out": 0, "to_k": 3}  # stopped before conv_out; K of 3 distinct prompts
        with torch.inference_mode(), AttentionCapture(unet, (8, 6)) as cap:
            cap.select(weights[rows])
            unet(z0[rows], t, hidden[rows])
            full = cap.pop()[0]
        assert calls == {"conv_out": 1, "to_k": 6}
    finally:
        for h in hooks:
            h.remove()
    assert torch.allclose(shared, full, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sd2", [False, True])
@pytest.mark.parametrize("inputs_dtype", [torch.float32, torch.bfloat16])
def test_bfloat16_unet_gives_the_float32_maps(sd2, inputs_dtype):
    """Mixed precision: a bfloat16 U-Net gives float32 maps within 0.5 % of the float32 U-Net's (max |diff| / max),
    per timestep and per layer within 3 %.

    Measured on these tiny U-Nets (torch 2.13 CPU): total 3.3e-4 (SD 1.x layout) / 8.6e-4 (SD 2.x) with float32
    latents and text, 9.1e-4 / 1.3e-3 with both rounded to bfloat16; per timestep and per layer at most 8.2e-3.
    The tolerances leave about 4x margin; deeper U-Nets drift further from float32.
    """
    import copy

    unet, scheduler = _tiny_unet(sd2=sd2)
    half = copy.deepcopy(unet).to(torch.bfloat16)
    z0, hidden, weights = _inputs()
    ts = [901, 501, 101, 1]
    ref = heat_maps(unet, scheduler, z0, hidden, weights, timesteps=ts, seed=7, per_layer=True, per_timestep=True)
    ours = heat_maps(half, scheduler, z0.to(inputs_dtype), hidden.to(inputs_dtype), weights, timesteps=ts, seed=7,
                     per_layer=True, per_timestep=True)
    assert ours.total.dtype == ours.per_timestep.dtype == torch.float32
    assert {m.dtype for m in ours.per_layer.values()} == {torch.float32}

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    assert rel(ours.total, ref.total) <= 5e-3
    assert rel(ours.per_timestep, ref.per_timestep) <= 3e-2
    assert max(rel(ours.per_layer[k], ref.per_layer[k]) for k in ref.per_layer) <= 3e-2
    assert next(half.parameters()).dtype == torch.bfloat16  # the U-Net itself ran in bfloat16
