"""Benchmarks at the paper's scale (``python -m foba_core.bench paper-scale`` / ``cxr-paper-scale``): the published
architectures, the entry points on tiny configs through the same code, and (a)'s memory estimate and skip."""

import json

import pytest
import torch

from foba_core import bench
from foba_core.bench import COMPONENT_FILES, MODEL_CONFIGS, FixedTokenizer, read_config, reference_memory

# Tiny sizes over the published files: the same layouts (4 levels, SD 1.x / 2.x attention settings), toy widths.
TINY = {
    "unet.json": {"block_out_channels": [32, 64, 64, 64], "sample_size": 8, "norm_num_groups": 8,
                  "cross_attention_dim": 32},
    "vae.json": {"block_out_channels": [8, 16, 16, 16], "norm_num_groups": 8, "layers_per_block": 1, "sample_size": 64},
    "text_encoder.json": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "projection_dim": 32},
}
HEADS = {"sd14": 2, "sd2_base": [2, 4, 4, 4]}
KEYS = {"seconds", "speedup", "overhead", "captured_bytes", "peak_rss_bytes", "peak_gpu_bytes", "device", "dtype",
        "threads", "reference_need_bytes", "reference_skipped", "maps_rel_diff"}


def _tiny_configs(folder, published: str):
    folder.mkdir()
    for name in COMPONENT_FILES:
        config = json.loads((MODEL_CONFIGS / published / name).read_text())
        config.update(TINY.get(name, {}))
        if name == "unet.json":
            config["attention_head_dim"] = HEADS[published]
        (folder / name).write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def tiny_sd14(tmp_path_factory):
    return _tiny_configs(tmp_path_factory.mktemp("configs") / "sd14", "sd14")


@pytest.fixture(scope="module")
def tiny_sd2(tmp_path_factory):
    return _tiny_configs(tmp_path_factory.mktemp("configs") / "sd2_base", "sd2_base")


def _last_json(capsys) -> dict:
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) > 3  # a table before the JSON
    return json.loads(lines[-1])


@pytest.mark.parametrize("published, parameters", [
    ("sd14", (859_520_964, 83_653_863, 123_060_480)),  # SD v1.4: U-Net, VAE, CLIP ViT-L/14 text tower
    ("sd2_base", (865_910_724, 83_653_863, 340_387_840)),  # SD 2 base: U-Net, VAE, OpenCLIP ViT-H/14 text tower
])
def test_published_configs_build_the_published_architectures(published, parameters):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = MODEL_CONFIGS / published
    with torch.device("meta"):  # shapes only: no memory, no weights
        unet = UNet2DConditionModel.from_config(read_config(folder / "unet.json"))
        vae = AutoencoderKL.from_config(read_config(folder / "vae.json"))
        text = CLIPTextModel(CLIPTextConfig.from_dict(read_config(folder / "text_encoder.json")))
    assert tuple(sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)) == parameters
    assert unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1) == 512
    assert vae.config.scaling_factor == 0.18215 and text.config.max_position_embeddings == 77
    assert unet.config.cross_attention_dim == text.config.hidden_size  # 768 (SD 1.4) / 1024 (SD 2)


def test_fixed_tokenizer_gives_clip_ids_padded_to_77():
    tok = FixedTokenizer()
    enc = tok(["a photo of a bird", "a photo of a background"], padding="max_length", max_length=77,
              truncation=True, return_tensors="pt")
    assert enc.input_ids.shape == (2, 77) and enc.attention_mask.sum(1).tolist() == [7, 7]
    assert enc.input_ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 3329, 49407]
    assert enc.input_ids[0, bench.BENCH_TARGET] == 3329 and (enc.input_ids[:, 7:] == 49407).all()
    with pytest.raises(KeyError, match="a photo of a dog"):
        tok(["a photo of a dog"])


@pytest.mark.parametrize("sd2, latent_hw, dtype", [(False, (8, 6), torch.float32), (True, (8, 6), torch.float32),
                                                   (False, (7, 5), torch.bfloat16)])
def test_reference_memory_is_what_the_reference_stores(sd2, latent_hw, dtype):
    """(a)'s estimate, T0 × N × Σ_l heads_l × Q_l × L × element size, equals the bytes reference_heat_maps holds."""
    from test_capture import _tiny_unet

    unet, scheduler = _tiny_unet(sd2=sd2)
    unet = unet.to(dtype)
    g = torch.Generator().manual_seed(0)
    z0, hidden = torch.randn(2, 4, *latent_hw, generator=g), torch.randn(2, 9, 16, generator=g)
    weights = torch.zeros(2, 9, 1)
    weights[:, 3] = 1.0
    stored = bench.reference_heat_maps(unet, scheduler, z0, hidden, weights, timesteps=[501, 101, 1])[2]
    need = reference_memory(unet, latent_hw, seq_len=9, n_timesteps=3, n_images=2)
    assert need["stored"] == stored
    largest = max(heads * q * q for _, heads, q in bench.attention_geometry(unet, latent_hw, "attn1"))
    assert need["self_attention"] == 2 * 2 * largest * unet.dtype.itemsize  # scores and softmax of 2 images


def test_paper_scale_entry_point_on_tiny_configs(tiny_sd14, capsys):
    res = bench.main(["paper-scale", "--quick", "--device", "cpu"], configs=tiny_sd14)
    out = _last_json(capsys)
    assert out == json.loads(json.dumps(res)) and KEYS <= set(out)
    assert out["images"] == 3 and out["t0"] == 2 and out["ddim_steps"] == 2 and out["resolution"] == 64
    assert out["target_token"] == 5 and out["dtype"] == "float32" and out["threads"] >= 1
    for run in ("reference", "floor", "ours"):
        assert out["seconds"][run] > 0 and out["peak_rss_bytes"][run] > 0
        assert out["seconds"][run] == pytest.approx(out["seconds_stage1"][run] + out["seconds_refine"][run])
    assert out["speedup"] == pytest.approx(out["seconds"]["reference"] / out["seconds"]["ours"])
    assert out["overhead"] == pytest.approx(out["seconds"]["ours"] / out["seconds"]["floor"])
    assert out["captured_bytes"]["reference"] == out["reference_need_bytes"]["stored"]  # the estimate is exact
    assert 0 < out["captured_bytes"]["ours"] < out["captured_bytes"]["reference"]
    assert out["reference_skipped"] is None and out["maps_rel_diff"] < 1e-4  # same noise: (a) and (c) agree
    assert out["peak_gpu_bytes"] is None


def test_paper_scale_reports_what_the_reference_would_need_when_it_does_not_fit(tiny_sd14, capsys):
    res = bench.main(["paper-scale", "--quick", "--images", "1", "--device", "cpu", "--dtype", "bfloat16"],
                     configs=tiny_sd14, memory_limit=1000)
    out = _last_json(capsys)
    need = out["reference_need_bytes"]
    assert out == json.loads(json.dumps(res))
    assert out["seconds"]["reference"] is None and out["speedup"] is None and out["captured_bytes"]["reference"] is None
    assert f"would need {need['stored'] + need['self_attention']} bytes" in out["reference_skipped"]
    assert out["seconds"]["ours"] > 0 and out["overhead"] > 0 and out["dtype"] == "bfloat16"
    # bfloat16 maps hold 2 bytes per element: the estimate follows the U-Net's dtype
    assert need == reference_memory(*_tiny_unet_of(tiny_sd14, torch.bfloat16), seq_len=77, n_timesteps=2, n_images=1)


def _tiny_unet_of(folder, dtype):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(read_config(folder / "unet.json")).to(dtype)
    return unet, (8, 8)


def test_cxr_paper_scale_entry_point_on_tiny_configs(tiny_sd2, capsys):
    res = bench.main(["cxr-paper-scale", "--quick", "--device", "cpu"], configs=tiny_sd2)
    out = _last_json(capsys)
    assert out == json.loads(json.dumps(res)) and KEYS <= set(out)
    assert out["images"] == 1 and out["t0"] == 2 and out["finding"] == "Pleural Effusion"
    assert out["tokens"] == ["pleural</w>", "effusion</w>"]  # all sub-tokens of the finding's words
    for run in ("reference", "floor", "ours"):
        assert out["seconds"][run] > 0 and out["peak_rss_bytes"][run] > 0
    assert out["captured_bytes"]["reference"] == out["reference_need_bytes"]["stored"]
    assert out["maps_rel_diff"] < 1e-4  # CXREvalStep's maps (sum + each sub-token) equal the reference's


def test_bench_options_that_do_not_apply_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(["attention", "--quick"])
    with pytest.raises(SystemExit):
        bench.main(["cxr-paper-scale", "--images", "3"])
    assert "apply" in capsys.readouterr().err
