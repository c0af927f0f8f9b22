"""The training configs copy one trainer wiring (configs/fragments/diffusion_trainer.yaml) and one DDP override
(configs/fragments/multi_gpu.yaml) with MONAI's ``%file#id`` macros; each builds a ResumableTrainer."""

import os

import pytest
import torch
from monai.bundle import ConfigParser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAGMENTS = os.path.join(ROOT, "configs", "fragments")
TOY, CXR = (os.path.join(ROOT, "bundles", name, "configs") for name in ("foba_toy", "foba_cxr"))
PRETRAIN, CXR_TRAIN = os.path.join(TOY, "pretrain.yaml"), os.path.join(CXR, "train.yaml")
FINETUNE = [f"configs/stages/{s}.yaml" for s in ("stage1", "finetune", "refine", "segment", "guidance", "report")] + [
    "configs/datasets/toy.yaml", "bundles/foba_toy/configs/pipeline.yaml"]  # the main job, whose training it is
WIRING = ("prepare_batch", "optimizer", "lr_schedule", "trainer")
OWN_HANDLERS = ["LrScheduleHandler", "ClipGradNorm", "LossLog", "ResumableCheckpointSaver", "StatsHandler",
                "ProgressBar"]

def _parser(*files, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([f for x in files for f in (x if isinstance(x, list) else [x])])
    parser.update(overrides)
    return parser


def _top_level_refs(config) -> set:
    """The top-level ids that ``config`` (a fragment entry) refers to with ``@id`` (``@train#x``: train#x)."""
    from monai.bundle.reference_resolver import ReferenceResolver

    if isinstance(config, dict):
        return set().union(set(), *(_top_level_refs(v) for v in config.values()))
    if isinstance(config, list):
        return set().union(set(), *(_top_level_refs(v) for v in config))
    if not isinstance(config, str):
        return set()
    refs = {ReferenceResolver.normalize_id(r).replace("::", "#") for r in ReferenceResolver.match_refs_pattern(config)}
    return {r if r.startswith("train#") else r.split("#")[0] for r in refs}


@pytest.mark.parametrize("config", [PRETRAIN, FINETUNE, CXR_TRAIN])
def test_each_training_config_copies_the_fragment_and_gives_every_key_it_needs(config, monkeypatch):
    monkeypatch.chdir(ROOT)  # macro paths are relative to the repository root, where the bundles are run
    fragment = ConfigParser.load_config_file(os.path.join(FRAGMENTS, "diffusion_trainer.yaml"))
    parser = _parser(config)
    assert parser["train#handlers"] == []  # a literal list, so that --tracking mlflow can append to it
    parser.resolve_macro_and_relative_ids()
    for key in WIRING:
        assert parser[f"train#{key}"] == fragment[key], key
    needed = set().union(*(_top_level_refs(fragment[key]) for key in WIRING))
    assert needed >= {"unet", "max_steps", "accumulation_steps", "checkpoint_dir", "tracking_params"}
    given = set(parser.get()) | {f"train#{key}" for key in parser["train"]}
    assert needed <= given, sorted(needed - given)


@pytest.mark.parametrize("base, override, kept", [
    (FINETUNE, os.path.join(FRAGMENTS, "multi_gpu_finetune.yaml"), slice(0, None)),  # the main job's checks
    (CXR_TRAIN, os.path.join(CXR, "multi_gpu_train.yaml"), slice(1, None)),  # all but its set_determinism
])
def test_the_multi_gpu_overrides_share_one_ddp_fragment(base, override, kept, monkeypatch):
    monkeypatch.chdir(ROOT)
    fragment = ConfigParser.load_config_file(os.path.join(FRAGMENTS, "multi_gpu.yaml"))
    single, multi = _parser(base), _parser(base, override)
    for parser in (single, multi):
        parser.resolve_macro_and_relative_ids()
    assert multi["device"] == fragment["device"]
    assert multi["initialize"][0] == fragment["initialize"][0]  # joins the group, seeds with the rank seed
    assert multi["initialize"][1:] == single["initialize"][kept]  # then the base config's own steps
    assert multi["train#trainer"] == single["train#trainer"]  # DDP, rank-0 handlers, resume: the trainer's


def _trainer(config, **overrides):
    """Build ``train#trainer`` of ``config`` with an extra handler where --tracking would put MLflow's."""
    parser = _parser(config, **overrides)
    parser["train#handlers"].append({"_target_": "monai.handlers.GarbageCollector"})
    return parser, parser.get_parsed_content("train#trainer")


def _check(parser, trainer, accumulation_steps=1):
    from monai.handlers import GarbageCollector

    from foba_core.diffusion import DiffusionBatch
    from foba_core.engines import ResumableTrainer

    assert type(trainer) is ResumableTrainer
    assert [type(h).__name__ for h in trainer.handlers] == OWN_HANDLERS + ["GarbageCollector"]
    assert isinstance(trainer.handlers[-1], GarbageCollector)
    assert trainer.network is parser.get_parsed_content("unet")
    assert isinstance(trainer.prepare_batch, DiffusionBatch) and isinstance(trainer.optimizer, torch.optim.AdamW)
    assert trainer.state.epoch_length == parser.get_parsed_content("max_steps") * accumulation_steps
    assert trainer.accumulation_steps == accumulation_steps
    assert sorted(trainer.state_objects) == (["gradients"] if accumulation_steps > 1 else []) + [
        "loss_log", "lr_schedule", "optimizer", "prepare_batch", "unet"]


@pytest.mark.slow
def test_the_three_configs_build_the_resumable_trainer(tmp_path, monkeypatch):
    from tiny_sd import save_tiny_sd

    from foba_core.splits import cache_split
    from foba_core.toy.world import ToyWorld
    from foba_core.transforms import resize_center_crop
    from foba_med.phantom import write_phantom_mimic

    monkeypatch.chdir(ROOT)
    parser, trainer = _trainer(PRETRAIN, n_train=16, vae_steps=1, vae_batch_size=8, batch_size=8, max_steps=2,
                               output_dir=str(tmp_path / "pretrain"), model_dir=str(tmp_path / "pretrain" / "model"))
    _check(parser, trainer)

    save_tiny_sd(tmp_path / "sd", text_attention_mask=True)
    world = ToyWorld("train", size=4, seed=0)
    items = [world[i] for i in range(4)]
    m_pre = torch.stack([resize_center_crop(it["mask"], 8, is_mask=True) for it in items])
    out = tmp_path / "finetune"  # what the images and stage-1 stages leave for the fine-tuning stage
    cache_split(items, str(out / "images" / "train"), size=16)
    (out / "stage1" / "train").mkdir(parents=True)
    torch.save({"ids": [it["id"] for it in items], "heatmaps": m_pre.float(), "m_pre": m_pre},
               out / "stage1" / "train" / "stage1.pt")
    parser, trainer = _trainer(FINETUNE, pretrained=str(tmp_path / "sd"), finetune_steps=2, finetune_batch_size=2,
                               output_dir=str(out))
    _check(parser, trainer)

    mimic = write_phantom_mimic(tmp_path / "mimic", n_subjects=16, seed=5, size=32)
    parser, trainer = _trainer(CXR_TRAIN, mimic_dir=str(mimic), pretrained=str(tmp_path / "sd"), max_steps=2,
                               batch_size=2, accumulation_steps=3, output_dir=str(tmp_path / "cxr"))
    _check(parser, trainer, accumulation_steps=3)
