"""Settings are checked before any work: errors name the option as typed on the command line; the main job, run
whole or one stage alone, and the toy pretraining fail in ``initialize``, before any output exists."""

from __future__ import annotations

import os

import pytest

from foba_core import validate

ROOT = os.path.join(os.path.dirname(__file__), "..")
STAGES = [f"configs/stages/{s}.yaml" for s in ("stage1", "finetune", "refine", "segment", "guidance", "report")]
TOY_JOB = STAGES + ["configs/datasets/toy.yaml", "bundles/foba_toy/configs/pipeline.yaml"]
PRETRAIN = os.path.join(ROOT, "bundles", "foba_toy", "configs", "pretrain.yaml")


@pytest.mark.parametrize("check, args, message", [
    (validate.integer, (0, "finetune_steps"), "--finetune_steps must be an integer >= 1, got 0"),
    (validate.integer, (2.0, "segment_steps"), "--segment_steps must be an integer >= 1, got 2.0"),
    (validate.integer, (True, "refine_samples"), "--refine_samples must be an integer >= 1, got True"),
    (validate.integer, (0, "n_test", 1, None, True), "--n_test must be an integer >= 1 or null, got 0"),
    (validate.integer, (-1, "n_overlays", 0), "--n_overlays must be an integer >= 0, got -1"),
    (validate.probability, (1.5, "p_inpaint"), "--p_inpaint must be a number in [0, 1], got 1.5"),
    (validate.positive, (0, "lr"), "--lr must be a number > 0, got 0"),
    (validate.positive, ("1e-4", "lr"), "--lr must be a number > 0, got '1e-4'"),
    (validate.choice, ("m-pre", "refine_gmm_fit", ("image", "m_pre")),
     "--refine_gmm_fit must be one of image, m_pre, got 'm-pre'; did you mean m_pre?"),
    (validate.choices, (["train", "tset"], "splits", ("train", "test")),
     "--splits must be one of train, test, got 'tset'; did you mean test?"),
    (validate.choices, ([], "views"), "--views must be a non-empty list of distinct names, got []"),
    (validate.choices, (["test", "test"], "splits", ("train", "test")),
     "--splits must be a non-empty list of distinct names of train, test, got ['test', 'test']"),
    (validate.path, (None, "pretrained", "a model"), "--pretrained is required: a model"),
    (validate.path, ("no/such/model", "pretrained", "a model"), "--pretrained no/such/model does not exist: "
                                                                "expected a model"),
    (validate.fits, (64, 12, "batch_size", "training images"), "--batch_size 64 is larger than the 12 training "
                                                               "images"),
])
def test_each_check_names_the_option_and_the_value_it_got(check, args, message):
    with pytest.raises(ValueError) as err:
        check(*args)
    assert str(err.value).startswith(message)


def test_checks_return_valid_values_and_allow_null_where_optional(tmp_path):
    assert validate.integer(3, "n") == 3 and validate.integer(None, "n", optional=True) is None
    assert validate.probability(0, "p") == 0 and validate.number(1.0, "f", 0, 1, open_low=True) == 1.0
    assert validate.path(tmp_path, "dir", "a folder") == tmp_path and validate.path(None, "d", "", optional=True) is None
    validate.check_timesteps(40, None)
    validate.check_timesteps(0, [501, 1])  # an explicit list: T0 is not used
    with pytest.raises(ValueError, match=r"--t0 must be an integer in \[1, 50\], got 51"):
        validate.check_timesteps(51, None)
    with pytest.raises(ValueError, match="--timesteps must be null or a non-empty list of integers >= 0"):
        validate.check_timesteps(40, [501, -1])


def test_a_scheduler_is_any_diffusers_scheduler_class_and_a_typo_gets_the_closest_names():
    assert validate.scheduler_class("DDIMScheduler") == "DDIMScheduler"
    assert validate.scheduler_class("EulerDiscreteScheduler") == "EulerDiscreteScheduler"
    for name in ("SchedulerMixin", "StableDiffusionPipeline", None):
        with pytest.raises(ValueError, match="--scheduler must name a diffusers scheduler class"):
            validate.scheduler_class(name)
    with pytest.raises(ValueError, match=r"got 'DDIMSchedulr'; did you mean DDIMScheduler \(or "):
        validate.scheduler_class("DDIMSchedulr")


def _cause(err: BaseException) -> ValueError:
    """The ValueError of a check under the RuntimeErrors that MONAI wraps it in."""
    while not isinstance(err, ValueError):
        err = err.__cause__
    return err


def _main_job(tmp_path, files, run_id="run", **overrides) -> ValueError:
    """Run a main job that must fail in ``initialize``; return the ValueError that MONAI's RuntimeError wraps."""
    from monai.bundle import run

    cwd = os.getcwd()
    os.chdir(ROOT)  # the stage configs name configs/ relative to the repository root
    try:
        with pytest.raises(RuntimeError) as err:
            run(run_id, config_file=files, output_dir=str(tmp_path / "out"), device="cpu", **overrides)
    finally:
        os.chdir(cwd)
    return _cause(err.value)


@pytest.mark.parametrize("run_id, overrides, message", [
    ("run", {"scheduler": "DDIMSchedulr"}, "--scheduler must name a diffusers scheduler class such as DDIMScheduler, "
                                           "got 'DDIMSchedulr'; did you mean DDIMScheduler"),
    ("run", {"finetune_steps": 0}, "--finetune_steps must be an integer >= 1, got 0"),
    ("run", {"n_test": 0}, "--n_test must be an integer >= 1, got 0"),  # the toy world needs a number of images
    ("run", {"refine_gmm_fit": "mpre"}, "--refine_gmm_fit must be one of image, m_pre, got 'mpre'; did you mean m_pre?"),
    ("run_refine", {"scheduler": "DDIMSchedulr"}, "--scheduler must name a diffusers scheduler class"),
    ("run_stage1", {"splits": ["train", "val"]}, "--splits must be one of train, test, got 'val'"),
])
def test_the_toy_main_job_checks_its_settings_before_any_stage_runs(tmp_path, run_id, overrides, message):
    err = _main_job(tmp_path, TOY_JOB, run_id, **overrides)
    assert str(err).startswith(message), str(err)
    assert not (tmp_path / "out" / "stage1").exists() and not (tmp_path / "out" / "images").exists()


def test_the_natural_main_job_asks_for_its_model_and_checks_max_images(tmp_path):
    files = STAGES + ["configs/datasets/cub.yaml", "bundles/foba_natural/configs/pipeline.yaml"]
    err = _main_job(tmp_path, files, dataset_dir=str(tmp_path))
    assert str(err).startswith("--pretrained is required: a local Stable Diffusion folder")
    err = _main_job(tmp_path, files, dataset_dir=str(tmp_path), pretrained=str(tmp_path), max_images=0)
    assert str(err) == "--max_images must be an integer >= 1 or null, got 0"
    err = _main_job(tmp_path, STAGES + ["configs/datasets/dogs.yaml", "bundles/foba_natural/configs/pipeline.yaml"])
    assert str(err) == "--dataset_dir is required: the folder of the dogs files (docs/datasets.md)"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"max_steps": 0}, "--max_steps must be an integer >= 1, got 0"),
    ({"batch_size": 64, "n_train": 32}, "--batch_size 64 is larger than the 32 training scenes (--n_train)"),
    ({"caption_dropout": 2}, "--caption_dropout must be a number in [0, 1], got 2"),
])
def test_toy_pretraining_checks_its_settings_before_anything_is_built(tmp_path, overrides, message):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=PRETRAIN, workflow_type="train", output_dir=str(tmp_path / "out"),
                        model_dir=str(tmp_path / "model"), **overrides)
    with pytest.raises(RuntimeError) as err:
        wf.initialize()
    assert str(_cause(err.value)).startswith(message)
    assert not (tmp_path / "out").exists() and not (tmp_path / "model").exists()
