"""MONAI latent diffusion models (foba_core.monai_ldm): the model zoo's bundle layout read (MONAI's and MONAI
Generative's names and key layouts), attention captured on MONAI's CrossAttentionBlock equal to MONAI's own stored
attention, MONAI schedulers with v-prediction in every stage, and a saved bundle read back."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tiny_monai import old_state_dict, save_text_side, save_tiny_bundle, tiny_networks


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return save_text_side(tmp_path_factory.mktemp("text") / "sd21_text")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo") / "cxr_ldm"
    save_tiny_bundle(folder, seed=0)
    return folder


def _stored_attention_maps(unet, scheduler, z0, context, weights, timesteps, seed):
    """M̂ read from MONAI's own stored attention (save_attn): one timestep per forward, every attn2 layer."""
    blocks = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    for block in blocks:
        block.save_attn = True
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(timesteps), *z0.shape), generator=gen)  # the draws heat_maps makes
    total = torch.zeros(z0.shape[0], weights.shape[-1], *z0.shape[-2:])
    try:
        with torch.no_grad():
            for k, t in enumerate(timesteps):
                tt = torch.full((z0.shape[0],), t, dtype=torch.long)
                unet(scheduler.add_noise(z0, noise[k], tt), tt, context=context)
                for block in blocks:
                    att = block.att_mat.mean(1)  # (B, Q, L): heads averaged
                    side = int(att.shape[1] ** 0.5)
                    maps = torch.einsum("bql,bln->bnq", att, weights).reshape(z0.shape[0], -1, side, side)
                    total += F.interpolate(maps, size=z0.shape[-2:], mode="bilinear", align_corners=False)
    finally:
        for block in blocks:
            block.save_attn = False
    return total, len(blocks)


def test_heat_maps_on_monai_unet_equal_monais_stored_attention_for_several_sub_token_targets():
    from foba_core.capture import AttentionCapture, heat_maps

    _, unet, scheduler = tiny_networks(seed=1)
    gen = torch.Generator().manual_seed(2)
    z0 = torch.randn(2, 3, 8, 8, generator=gen)
    context = torch.randn(2, 7, 32, generator=gen)
    weights = torch.zeros(2, 7, 2)
    weights[0, [1, 2], 0] = 1  # image 0: a word of two sub-tokens, and one of one
    weights[0, 4, 1] = 1
    weights[1, [2, 3, 5], 0] = 1  # image 1: a word of three sub-tokens, and BOS
    weights[1, 0, 1] = 1
    timesteps = [981, 501, 21]
    ours = heat_maps(unet, scheduler, z0, context, weights, timesteps=timesteps, seed=3, per_layer=True)
    reference, n_layers = _stored_attention_maps(unet, scheduler, z0, context, weights, timesteps, seed=3)
    assert n_layers >= 4 and len(ours.layer_names) == n_layers  # down 2, middle 1, up 3 for this U-Net
    rel = (ours.total - reference).abs().max() / reference.abs().max()
    assert rel <= 1e-4, rel
    assert set(ours.per_layer) == set(ours.layer_names)

    # the original forwards return on exit: the U-Net's output is unchanged, no instance forward is left
    blocks = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    t = torch.tensor([500, 500])
    with torch.no_grad():
        before = unet(z0, t, context=context)
        with AttentionCapture(unet, (8, 8)) as cap:
            cap.select(weights)
            inside = unet(z0, t, context=context)
        after = unet(z0, t, context=context)
    assert all("forward" not in vars(b) for b in blocks)
    assert torch.allclose(inside, before, atol=1e-5) and torch.equal(after, before)


def test_capture_of_a_flash_attention_unet_is_the_same_and_leaves_flash_attention_on():
    from foba_core.capture import heat_maps

    _, plain, scheduler = tiny_networks(seed=1)
    _, flash, _ = tiny_networks(seed=1, use_flash_attention=True)
    flash.load_state_dict(plain.state_dict())
    z0 = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
    weights = torch.zeros(1, 5, 1)
    weights[0, 2, 0] = 1
    a = heat_maps(plain, scheduler, z0, context, weights, timesteps=[401, 21]).total
    b = heat_maps(flash, scheduler, z0, context, weights, timesteps=[401, 21]).total
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert all(m.use_flash_attention for n, m in flash.named_modules() if n.endswith("attn2"))


def test_the_zoo_bundle_layout_loads_with_monai_classes_and_a_local_text_encoder(bundle, text_dir):
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
    from monai.networks.schedulers import DDIMScheduler

    from foba_core.diffusion import decode_latents, encode_latents, model_resolution
    from foba_core.models import load_pipeline
    from foba_core.monai_ldm import MonaiLDM

    autoencoder, unet, _ = tiny_networks(seed=0)
    pipe = load_pipeline(bundle, text_encoder=text_dir)
    assert isinstance(pipe, MonaiLDM) and pipe.foba_source == str(bundle.resolve())
    assert isinstance(pipe.unet.model, DiffusionModelUNet) and isinstance(pipe.vae.model, AutoencoderKL)
    assert isinstance(pipe.scheduler.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in pipe.unet.model.state_dict().items())
    assert pipe.vae_scale_factor == 2 and model_resolution(pipe) == 16 and pipe.vae.config.scaling_factor == 0.3
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    z0 = encode_latents(pipe, images)
    gray = images.mean(1, keepdim=True)  # the bundle's 1-channel [0, 1] images
    assert torch.allclose(z0, autoencoder.encode(gray)[0] * 0.3, atol=1e-6)
    decoded = decode_latents(pipe, z0)
    assert decoded.shape == (2, 3, 16, 16) and torch.equal(decoded[:, 0], decoded[:, 2])
    t = torch.tensor([10, 900])
    hidden = torch.randn(2, 16, 32)
    with torch.no_grad():
        assert torch.equal(pipe.unet(z0, t, hidden).sample, unet(z0, t, context=hidden))
        assert torch.equal(pipe.unet(z0, t[0], encoder_hidden_states=hidden).sample,
                           unet(z0, torch.tensor([10, 10]), context=hidden))
    with pytest.raises(ValueError, match="no cross-attention key mask"):
        pipe.unet(z0, t, hidden, encoder_attention_mask=torch.tensor([[1, 1, 0]]))


def test_monai_generative_names_and_key_layout_are_converted(tmp_path, text_dir):
    from foba_core.models import load_pipeline

    autoencoder, unet, _ = tiny_networks(seed=4)
    save_tiny_bundle(tmp_path / "old", seed=4, generative=True)
    stored = torch.load(tmp_path / "old" / "models" / "diffusion_model.pth", weights_only=True)
    assert any(".to_out.0." in k for k in stored) and not any("attn2.out_proj" in k for k in stored)
    pipe = load_pipeline(tmp_path / "old", text_encoder=text_dir)
    for ours, theirs in ((pipe.unet.model, unet), (pipe.vae.model, autoencoder)):
        mine = ours.state_dict()
        assert mine.keys() == theirs.state_dict().keys()
        assert all(torch.equal(mine[k], v) for k, v in theirs.state_dict().items())
    assert old_state_dict(unet, unet=True).keys() == stored.keys()


def test_bundle_errors_name_the_file_and_the_option(tmp_path, bundle, text_dir):
    import shutil

    from foba_core.models import load_pipeline

    with pytest.raises(FileNotFoundError, match=r"has no tokenizer/ or text_encoder/; pass --text_encoder DIR"):
        load_pipeline(bundle)
    with pytest.raises(FileNotFoundError, match=r"--text_encoder .*nowhere has no tokenizer/ or text_encoder/"):
        load_pipeline(bundle, text_encoder=tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "models" / "diffusion_model.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"models/diffusion_model.pth not found"):
        load_pipeline(broken, text_encoder=text_dir)
    (broken / "models" / "diffusion_model.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"diffusion_model.pth cannot be read as a PyTorch state dict"):
        load_pipeline(broken, text_encoder=text_dir)
    torch.save(tiny_networks(seed=0)[0].state_dict(), broken / "models" / "diffusion_model.pth")  # the VAE's
    with pytest.raises(ValueError, match=r"diffusion_model.pth does not fit the DiffusionModelUNet"):
        load_pipeline(broken, text_encoder=text_dir)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    del config["diffusion_def"]
    (broken / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"defines no diffusion network as diffusion_def or network_def"):
        load_pipeline(broken, text_encoder=text_dir)
    with pytest.raises(ValueError, match="applies to MONAI bundle folders only"):
        from tiny_sd import save_tiny_sd

        save_tiny_sd(tmp_path / "sd")
        load_pipeline(tmp_path / "sd", text_encoder=text_dir)


def test_a_saved_bundle_reads_back_in_foba_and_in_monais_config_parser(tmp_path, bundle, text_dir):
    from monai.bundle import ConfigParser

    from foba_core.models import load_pipeline, save_pipeline

    pipe = load_pipeline(bundle, text_encoder=text_dir)
    with torch.no_grad():
        pipe.unet.model.out[2].conv.bias.add_(0.5)  # a "fine-tuned" change
    out = save_pipeline(pipe, tmp_path / "model", {"finetuned_from": str(bundle)})
    assert json.loads((out / "foba.json").read_text())["finetuned_from"] == str(bundle)
    again = load_pipeline(out)  # the text side travels in the bundle
    for a, b in ((pipe.unet.model, again.unet.model), (pipe.vae.model, again.vae.model),
                 (pipe.text_encoder, again.text_encoder)):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert again.scheduler.config.prediction_type == "v_prediction" and again.vae.config.scaling_factor == 0.3
    parser = ConfigParser(ConfigParser.load_config_file(str(out / "configs" / "inference.json")))
    parser["bundle_root"] = str(out)
    parser.get_parsed_content("load_diffusion")  # MONAI's own reading of the saved file, weights_only
    unet = parser.get_parsed_content("diffusion_def")
    assert torch.equal(unet.out[2].conv.bias, pipe.unet.model.out[2].conv.bias)
    save_pipeline(again, out)  # a saved bundle may be replaced


def test_monai_schedulers_with_v_prediction_serve_fine_tuning_inpainting_and_guidance(bundle, text_dir):
    from foba_core.diffusion import DiffusionBatch, encode_latents
    from foba_core.guidance import sample_images
    from foba_core.models import load_pipeline, make_scheduler
    from foba_core.refine import inpaint_latents

    pipe = load_pipeline(bundle, text_encoder=text_dir)
    ddpm = make_scheduler(pipe, "DDPMScheduler")
    assert type(ddpm.scheduler).__name__ == "DDPMScheduler" and ddpm.config.prediction_type == "v_prediction"
    assert torch.equal(ddpm.alphas_cumprod, pipe.scheduler.alphas_cumprod)

    # fine-tuning's target is MONAI's velocity v = sqrt(a) eps - sqrt(1 - a) z0 of its own q_sample
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    batch = {"latent": encode_latents(pipe, images), "caption": ["a photo of a bird", "a photo"]}
    z_t, (target, _), (t, _), kwargs = DiffusionBatch(pipe.vae, pipe.text_encoder, pipe.tokenizer, ddpm)(batch)
    z0 = batch["latent"]
    a = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    eps = (z_t - a.sqrt() * z0) / (1 - a).sqrt()
    assert not kwargs and torch.allclose(target, a.sqrt() * eps - (1 - a).sqrt() * z0, atol=1e-4)
    assert torch.allclose(target, ddpm.scheduler.get_velocity(z0, eps, t), atol=1e-5)

    # DDIM inpainting (Eq. 6) with MONAI's DDIM: the background stays z0 exactly, the foreground changes
    m_pre = torch.zeros(2, 8, 8, dtype=torch.bool)
    m_pre[:, 2:6, 2:6] = True
    out = inpaint_latents(pipe, z0, m_pre, num_inference_steps=4, seed=0)
    assert torch.equal(out[:, :, ~m_pre[0]], z0[:, :, ~m_pre[0]])
    assert not torch.allclose(out[:, :, m_pre[0]], z0[:, :, m_pre[0]])
    assert torch.equal(out, inpaint_latents(pipe, z0, m_pre, num_inference_steps=4, seed=0))

    # guidance sampling with MONAI's DDIM and, stochastic, its DDPM (one generator per batch: reproducible)
    for name in ("DDIMScheduler", "DDPMScheduler"):
        first = sample_images(pipe, 2, 3.0, "a photo of a bird", scheduler=name, num_inference_steps=3, seed=0)
        again = sample_images(pipe, 2, 3.0, "a photo of a bird", scheduler=name, num_inference_steps=3, seed=0)
        assert first.shape == (2, 3, 16, 16) and torch.isfinite(first).all() and torch.equal(first, again)


ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def _train(out, phantom, bundle, text_dir, kill: str | None = None):
    """The CXR training bundle on a MONAI bundle, in a new process: 6 steps of batch 4, a checkpoint every 2."""
    import os
    import subprocess
    import sys

    runner = [str(ROOT / "tests" / "kill_run.py"), kill] if kill else ["-m", "monai.bundle"]
    args = ["run", "--config_file", "bundles/foba_cxr/configs/train.yaml", "--mimic_dir", str(phantom),
            "--pretrained", str(bundle), "--text_encoder", str(text_dir), "--output_dir", str(out), "--max_steps", "6",
            "--batch_size", "4", "--warmup_steps", "1", "--lr", "0.002", "--checkpoint_interval", "2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.run([sys.executable, *runner, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_cxr_bundles_fine_tune_a_monai_ldm_resume_after_a_kill_and_evaluate_it(tmp_path, phantom, bundle, text_dir):
    import pandas as pd
    from monai.bundle import ConfigWorkflow

    whole = _train(tmp_path / "whole", phantom, bundle, text_dir)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = tmp_path / "killed"
    first = _train(killed, phantom, bundle, text_dir, kill="iteration:3")
    assert first.returncode == -9 and sorted(p.name for p in (killed / "checkpoints").iterdir()) == [
        "checkpoint_iteration=2.pt"]
    second = _train(killed, phantom, bundle, text_dir)
    assert second.returncode == 0 and "at iteration 2" in second.stdout, second.stderr[-3000:]
    weights = [torch.load(folder / "model" / "models" / "diffusion_model.pth", weights_only=True)
               for folder in (tmp_path / "whole", killed)]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    source = torch.load(bundle / "models" / "diffusion_model.pth", weights_only=True)
    assert not torch.equal(source["conv_in.conv.weight"], weights[0]["conv_in.conv.weight"])  # it was fine-tuned
    autoencoder = torch.load(tmp_path / "whole" / "model" / "models" / "autoencoder.pth", weights_only=True)
    original = torch.load(bundle / "models" / "autoencoder.pth", weights_only=True)
    assert all(torch.equal(autoencoder[k], original[k]) for k in original)  # the VAE is frozen

    out = tmp_path / "evaluate"
    wf = ConfigWorkflow(config_file="bundles/foba_cxr/configs/evaluate.yaml", workflow_type="infer",
                        mimic_dir=str(phantom), model_dir=str(tmp_path / "whole" / "model"), output_dir=str(out),
                        timesteps=[501, 101], n_overlays=1)
    wf.initialize()
    wf.run()
    per_disease = pd.read_csv(out / "auc_per_disease.csv")
    scored = per_disease[per_disease["n_images"] > 0]
    assert len(scored) >= 4 and scored["auc_roc"].between(0, 1).all()
    assert json.loads((out / "settings.json").read_text())["model_dir"] == str(tmp_path / "whole" / "model")


def test_the_evaluate_bundle_runs_on_a_zoo_layout_bundle_with_a_separate_text_encoder(tmp_path, phantom, bundle,
                                                                                      text_dir):
    import pandas as pd
    from monai.bundle import ConfigWorkflow

    out = tmp_path / "evaluate"
    wf = ConfigWorkflow(config_file="bundles/foba_cxr/configs/evaluate.yaml", workflow_type="infer",
                        mimic_dir=str(phantom), model_dir=str(bundle), text_encoder=str(text_dir),
                        output_dir=str(out), timesteps=[501], n_overlays=0)
    wf.initialize()
    wf.run()
    per_image = pd.read_csv(out / "per_image.csv")
    assert (per_image["status"] == "scored").sum() >= 4
    assert per_image.loc[per_image["status"] == "scored", "auc_roc"].between(0, 1).all()


def test_the_zoo_model_measurement_runs_one_finding_through_the_evaluation(tmp_path, monkeypatch):
    from foba_med import zoo_model
    from tiny_monai import AUTOENCODER, DIFFUSION

    assert zoo_model.published_text_encoder_parameters() > 3e8  # OpenCLIP ViT-H/14's text tower: about 340 M
    monkeypatch.setattr(zoo_model, "AUTOENCODER", {"_target_": "monai.networks.nets.AutoencoderKL", **AUTOENCODER})
    monkeypatch.setattr(zoo_model, "DIFFUSION", {"_target_": "monai.networks.nets.DiffusionModelUNet", **DIFFUSION})
    monkeypatch.setattr(zoo_model, "TEXT_ENCODER", {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 37,
                                                    "num_hidden_layers": 2, "num_attention_heads": 4,
                                                    "max_position_embeddings": 77, "hidden_act": "gelu"})
    out = zoo_model.measure(tmp_path, t0=2)
    assert out["image_size"] == 128 and out["latent"] == [64, 64]  # no latent_shape: the zoo model's 64 x 64
    assert out["tokens"] and out["seconds_per_image"] > 0 and out["peak_rss_bytes"] > 0
    unet = torch.load(tmp_path / "zoo_cxr_ldm" / "models" / "diffusion_model.pth", weights_only=True)
    assert out["parameters"]["diffusion_unet"] == sum(v.numel() for v in unet.values())


@pytest.mark.slow
def test_the_main_job_runs_on_a_monai_bundle_given_as_pretrained(tmp_path, bundle, text_dir):
    import pandas as pd

    from foba_core.models import load_pipeline
    from foba_core.monai_ldm import MonaiLDM
    from test_toy_pipeline import _run

    _run(tmp_path, pretrained=str(bundle), text_encoder=str(text_dir), segment_crop=12)  # 16-pixel model images
    out = tmp_path / "toy"
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 9 and results[["acc", "iou", "miou"]].apply(lambda c: c.between(0, 100)).all().all()
    finetuned = load_pipeline(out / "finetune" / "model")  # saved as a bundle folder, the text side inside
    assert isinstance(finetuned, MonaiLDM)
    source = torch.load(bundle / "models" / "diffusion_model.pth", weights_only=True)
    assert not torch.equal(finetuned.unet.model.state_dict()["conv_in.conv.weight"], source["conv_in.conv.weight"])
    assert json.loads((out / "stage1" / "stage.json").read_text())["settings"]["text_encoder"] == str(text_dir)


def test_a_bundle_in_the_brats_bundles_naming_with_references_and_yaml_loads(tmp_path, text_dir):
    """network_def / noise_scheduler, values given by reference (@spatial_dims, @latent_shape), a YAML config."""
    import yaml

    from foba_core.models import load_pipeline
    from tiny_monai import AUTOENCODER, DIFFUSION, SCHEDULER

    autoencoder, unet, _ = tiny_networks(seed=2)
    config = {
        "spatial_dims": 2, "latent_channels": 3, "scale_factor": 0.5,
        "latent_shape": ["@latent_channels", 8, 8],
        "autoencoder_def": {"_target_": "monai.networks.nets.autoencoderkl.AutoencoderKL",
                            **{**AUTOENCODER, "spatial_dims": "@spatial_dims", "latent_channels": "@latent_channels"}},
        "network_def": {"_target_": "monai.networks.nets.diffusion_model_unet.DiffusionModelUNet",
                        **{**DIFFUSION, "spatial_dims": "@spatial_dims", "in_channels": "@latent_channels"}},
        "noise_scheduler": {"_target_": "monai.networks.schedulers.ddim.DDIMScheduler",
                            **{**SCHEDULER, "prediction_type": "epsilon"}, "schedule": "scaled_linear_beta"},
        "load_diffusion": "$@network_def.load_old_state_dict(torch.load(@bundle_root + '/models/model.pt'))",
    }
    (tmp_path / "brats" / "configs").mkdir(parents=True)
    (tmp_path / "brats" / "models").mkdir()
    (tmp_path / "brats" / "configs" / "inference.yaml").write_text(yaml.safe_dump(config))
    torch.save(autoencoder.state_dict(), tmp_path / "brats" / "models" / "autoencoder.pth")
    torch.save(unet.state_dict(), tmp_path / "brats" / "models" / "diffusion_model.pth")
    pipe = load_pipeline(tmp_path / "brats", text_encoder=text_dir)
    assert pipe.vae.config.scaling_factor == 0.5 and pipe.unet.config.sample_size == 8
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in pipe.unet.model.state_dict().items())
    config["latent_shape"] = [3, 8, 16]
    (tmp_path / "brats" / "configs" / "inference.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"latent_shape must be \[channels, side, side\]"):
        load_pipeline(tmp_path / "brats", text_encoder=text_dir)
