"""The toy world and the toy LDM: determinism, exact labels, tokenizer, pretraining lowers the loss and resumes."""

import json
import os

import numpy as np
import pytest
import torch

from foba_core.toy.world import OBJECT_CLASSES, ToyWorld

PRETRAIN = os.path.join(os.path.dirname(__file__), "..", "bundles", "foba_toy", "configs", "pretrain.yaml")


def test_toy_world_is_deterministic_and_splits_differ():
    a, b = ToyWorld("test", size=8, seed=3), ToyWorld("test", size=8, seed=3)
    for i in range(8):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"]) and x["id"] == y["id"]
    other_seed, train = ToyWorld("test", size=8, seed=4), ToyWorld("train", size=8, seed=3)
    assert not torch.equal(a[0]["image"], other_seed[0]["image"])
    assert not torch.equal(a[0]["image"], train[0]["image"])
    assert len({a[i]["id"] for i in range(8)} | {train[i]["id"] for i in range(8)}) == 16


def test_toy_items_follow_the_dataset_convention_and_labels_are_exact():
    world = ToyWorld("train", size=40, seed=0)
    seen = set()
    for i in range(len(world)):
        item = world[i]
        image, mask, box = item["image"], item["mask"], item["boxes"][0]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
        assert mask.dtype == torch.bool and mask.shape == (32, 32) and 10 < mask.sum() < 32 * 32 * 0.6
        assert item["caption"] == f"a photo of a {item['label']}"
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        # the object is drawn in one shaded colour: its pixels vary little along a row
        obj = image[:, mask]
        assert obj.std(dim=1).max() < 0.2
        seen.add(item["label"])
    assert seen == set(OBJECT_CLASSES)
    with pytest.raises(IndexError):
        world[40]
    with pytest.raises(ValueError, match="split"):
        ToyWorld("holdout")


def test_background_fraction_adds_object_free_scenes_and_keeps_the_others():
    from foba_core.prompts import BACKGROUND_PROMPT

    plain, mixed = ToyWorld("train", size=200, seed=0), ToyWorld("train", size=200, seed=0, background_fraction=0.3)
    backgrounds = [i for i in range(200) if mixed[i]["label"] == "background"]
    assert 40 <= len(backgrounds) <= 80  # ~30 % of 200
    for i in range(200):
        item = mixed[i]
        if i in backgrounds:
            assert item["caption"] == BACKGROUND_PROMPT and not item["mask"].any()
            assert item["boxes"].shape == (0, 4) and item["image"].shape == (3, 32, 32)
            assert item["image"].std() > 0.01 and item["id"] == plain[i]["id"]  # a texture, same id scheme
        else:  # the object scenes are exactly those of background_fraction=0
            assert torch.equal(item["image"], plain[i]["image"]) and item["caption"] == plain[i]["caption"]
    again = ToyWorld("train", size=200, seed=0, background_fraction=0.3)
    assert torch.equal(again[backgrounds[0]]["image"], mixed[backgrounds[0]]["image"])
    with pytest.raises(ValueError, match="background_fraction"):
        ToyWorld("train", background_fraction=1.0)


def test_the_target_domain_keeps_shapes_and_masks_on_backgrounds_unseen_in_pretraining():
    from foba_core.data import open_dataset
    from foba_core.toy.world import BACKGROUNDS, TARGET_BACKGROUNDS, toy_backgrounds

    foundation, target = ToyWorld("test", size=40, seed=0), open_dataset("toy_target", None, split="test", size=40)
    assert target.domain == "target" and foundation.domain == "foundation"
    kinds = {target[i]["background"] for i in range(40)}
    assert kinds == set(TARGET_BACKGROUNDS) and not kinds & set(BACKGROUNDS)
    for i in range(40):
        a, b = foundation[i], target[i]
        assert a["label"] == b["label"] and a["caption"] == b["caption"]  # the same concept words
        assert not torch.equal(a["image"], b["image"])
        mask, image = b["mask"], b["image"]
        assert mask.any() and image[:, mask].std(dim=1).max() < 0.2  # the object: one shaded colour, exact mask
        assert torch.equal(b["image"], target[i]["image"])  # deterministic
    # the muted palette: target backgrounds stay within [0.25, 0.75] per channel (clutter included)
    texture = toy_backgrounds(16, seed=0, domain="target")
    assert texture.min() >= 0.24 and texture.max() <= 0.76
    assert toy_backgrounds(16, seed=0).max() > 0.9  # the foundation textures span [0, 1]
    with pytest.raises(ValueError, match="unknown toy domain 'beach'"):
        ToyWorld("test", domain="beach")


def test_toy_tokenizer_is_deterministic_and_keeps_the_object_words_whole(tmp_path):
    from foba_core.toy.ldm import build_tokenizer, learn_bpe, tokenizer_corpus

    corpus = " ".join(tokenizer_corpus())
    assert learn_bpe(corpus) == learn_bpe(corpus)
    tok = build_tokenizer(str(tmp_path / "tok"))
    for name in (*OBJECT_CLASSES, "background"):
        assert tok.tokenize(f"a photo of a {name}") == ["a</w>", "photo</w>", "of</w>", "a</w>", f"{name}</w>"]
    assert sorted(os.listdir(tmp_path / "tok")) >= ["merges.txt", "vocab.json"]


def _workflow(output_dir, **overrides):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=PRETRAIN, workflow_type="train", output_dir=str(output_dir),
                        model_dir=str(output_dir / "model"), **overrides)
    wf.initialize()
    return wf


@pytest.mark.slow
def test_pretraining_lowers_the_loss_resumes_and_saves_an_sd_folder(tmp_path):
    from ignite.engine import Events

    small = dict(n_train=256, vae_steps=40, max_steps=60, batch_size=16, warmup_steps=5, checkpoint_interval=20,
                 lr_drop_step=50, lr_drop_factor=0.3)
    wf = _workflow(tmp_path, **small)
    trainer = wf.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=40), lambda e: e.terminate())  # an interruption
    wf.run()
    assert trainer.state.iteration == 40
    first = json.loads((tmp_path / "train_log.json").read_text())

    wf = _workflow(tmp_path, **small)  # a new process would do exactly this
    wf.run()
    wf.finalize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 60  # continued from 40, did not start over
    lr = wf.parser.get_parsed_content("train#optimizer").param_groups[0]["lr"]
    assert lr == pytest.approx(0.3 * wf.parser.get_parsed_content("lr"))  # the resumed run dropped at step 50
    second = json.loads((tmp_path / "train_log.json").read_text())
    assert second["iterations_this_run"] == 20 and second["losses"][:40] == first["losses"]  # the whole run's curve
    losses = second["losses"]
    assert np.mean(losses[-20:]) < 0.8 * np.mean(losses[:10])

    from foba_core.models import load_pipeline

    pipe = load_pipeline(str(tmp_path / "model"))
    assert pipe.text_attention_mask is True
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    # the VAE config centres and whitens the latents per channel: the training images' latents are N(0, 1)-like
    assert len(pipe.vae.config.latents_mean) == len(pipe.vae.config.latents_std) == pipe.vae.config.latent_channels
    from foba_core.diffusion import encode_latents

    world = ToyWorld("train", size=256, seed=0, background_fraction=0.15)
    z = encode_latents(pipe, torch.stack([world[i]["image"] for i in range(256)]))  # (256, C, h, w)
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    assert (z.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3
    foba = json.loads((tmp_path / "model" / "foba.json").read_text())
    assert foba["training"]["iterations"] == 60
    # cross-attention where ToyLDMConfig.cross_attention_levels says (the 8x8 level), as the saved config records
    assert pipe.unet.config.down_block_types == ["DownBlock2D", "CrossAttnDownBlock2D"]
    assert pipe.unet.config.up_block_types == ["CrossAttnUpBlock2D", "UpBlock2D"]
    assert foba["toy_ldm_config"]["cross_attention_levels"] == [False, True]


def test_toy_ldm_config_needs_one_attention_flag_per_level(tmp_path):
    from foba_core.toy.ldm import ToyLDMConfig, build_components

    for levels in ((False, False), (True,)):
        with pytest.raises(ValueError, match="cross_attention_levels"):
            build_components(ToyLDMConfig(cross_attention_levels=levels), str(tmp_path / "tok"))
