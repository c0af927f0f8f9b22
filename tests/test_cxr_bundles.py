"""foba_cxr bundles: prepare (broken files named), training set, fine-tuning (loss, MLflow, resume), paper.yaml; settings
checked before anything is built, and reruns into one output folder with other settings refused."""

from __future__ import annotations

import json
import os
import re
import types

import numpy as np
import pytest
import torch

from foba_med.mimic import read_index, read_metadata, relative_image_path, relative_report_path
from foba_med.ms_cxr import MS_CXR_FILE, ms_cxr_holdout

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "bundles", "foba_cxr", "configs")
PREPARE, TRAIN, PAPER = (os.path.join(CONFIGS, f"{name}.yaml") for name in ("prepare", "train", "paper"))


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A tiny random SD folder trained with the text key mask, as the toy LDM is."""
    from tiny_sd import save_tiny_sd

    folder = tmp_path_factory.mktemp("sd") / "tiny"
    save_tiny_sd(folder, seed=0, text_attention_mask=True)
    return folder


def _workflow(config, workflow_type="train", **overrides):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=config, workflow_type=workflow_type,
                        **{k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in overrides.items()})
    wf.initialize()
    return wf


def _root_cause(err: BaseException) -> BaseException:
    """The error of a check or guard under the RuntimeErrors that MONAI wraps it in."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


@pytest.mark.parametrize("overrides, message", [
    ({"max_steps": 0}, r"--max_steps must be an integer >= 1, got 0$"),
    ({"max_steps": -3}, r"--max_steps must be an integer >= 1, got -3$"),
    ({"caption_dropout": 1.5}, r"--caption_dropout must be a number in \[0, 1\], got 1.5$"),
    ({"views": []}, r"--views must be a non-empty list"),
    ({"batch_size": 1000}, r"--batch_size 1000 is larger than the \d+ training images: every batch would hold some "
                           r"images twice; pass --batch_size \d+ or less, or point to the full data set$"),
])
def test_training_settings_are_checked_before_the_trainer_is_built(phantom, tiny_sd, tmp_path, overrides, message):
    out = tmp_path / "train"
    with pytest.raises(RuntimeError) as err:
        _workflow(TRAIN, **{"mimic_dir": phantom, "pretrained": tiny_sd, "output_dir": out, "max_steps": 1,
                            "batch_size": 2, **overrides})
    assert re.match(message, str(_root_cause(err.value))), str(_root_cause(err.value))
    assert not (out / "model").exists() and not (out / "checkpoints").exists() and not (out / "settings.json").exists()


def test_prepare_indexes_every_readable_image_and_names_the_broken_files(phantom, tmp_path, capsys):
    import shutil

    mimic = tmp_path / "mimic"
    shutil.copytree(phantom, mimic)
    meta = read_metadata(mimic)
    frontal = meta[meta["ViewPosition"].isin(["PA", "AP"])]
    bad_image = frontal.iloc[0]
    bad_image_path = relative_image_path(bad_image.subject_id, bad_image.study_id, bad_image.dicom_id)
    (mimic / bad_image_path).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    other = frontal[frontal["study_id"] != bad_image.study_id].iloc[0]
    bad_report = relative_report_path(other.subject_id, other.study_id)
    (mimic / bad_report).write_bytes(b"\xff\xfe\xfa impression \xc3\x28")  # not UTF-8

    wf = _workflow(PREPARE, "infer", mimic_dir=mimic, output_dir=tmp_path / "out", num_workers=1)
    wf.run()
    out = capsys.readouterr().out
    assert bad_image_path in out and "unreadable image" in out
    assert bad_report in out and "unreadable report" in out
    assert "1 unreadable image," in out and "1 unreadable report" in out

    index = read_index(tmp_path / "out" / "index.csv")
    lost = {bad_image.dicom_id} | set(frontal.loc[frontal["study_id"] == other.study_id, "dicom_id"])
    assert set(index["dicom_id"]) == set(frontal["dicom_id"]) - lost
    assert (index["prompt"].str.len() > 0).all() and set(index["view"]) <= {"PA", "AP"}


def test_prepare_holds_out_ms_cxr_images_and_patients(phantom, tmp_path):
    wf = _workflow(PREPARE, "infer", mimic_dir=phantom, output_dir=tmp_path, ms_cxr_csv=phantom / MS_CXR_FILE,
                   num_workers=1)
    wf.run()
    index = read_index(tmp_path / "index.csv")
    dicom_ids, subjects = ms_cxr_holdout(phantom / MS_CXR_FILE)
    assert dicom_ids and subjects and len(index) > 0
    assert not set(index["dicom_id"]) & dicom_ids and not set(index["subject_id"]) & subjects


def test_training_dataset_is_rgb_train_split_held_out_and_truncates_long_prompts(phantom, tmp_path, capsys):
    from tiny_sd import tiny_tokenizer

    from foba_med.train import prepare_index, training_dataset

    index_csv = tmp_path / "index.csv"
    prepare_index(phantom, index_csv, num_workers=1)  # everything; the training set applies the holdout itself
    rows = read_index(index_csv)
    keep_out = rows[rows["split"] == "train"]["subject_id"].iloc[-1]
    dicom_ids, subjects = ms_cxr_holdout(phantom / MS_CXR_FILE)
    trained = rows.index[(rows["split"] == "train") & ~rows["subject_id"].isin(subjects | {keep_out})]
    rows.loc[trained[0], "prompt"] = ("There is a moderate right pleural effusion with blunting of the costophrenic "
                                      "angle. The heart is mildly enlarged. No pneumothorax is seen.")  # > 16 tokens
    rows.to_csv(index_csv, index=False)
    tokenizer = tiny_tokenizer(16)
    data = training_dataset(phantom, index_csv, tokenizer, image_size=16, ms_cxr_csv=phantom / MS_CXR_FILE,
                            exclude_subjects=[f"p{keep_out}"])
    expected = rows[(rows["split"] == "train") & ~rows["dicom_id"].isin(dicom_ids)
                    & ~rows["subject_id"].isin(subjects | {keep_out})]
    assert len(data) == len(expected) > 0
    items = [data[i] for i in range(len(data))]
    assert {it["id"] for it in items} == set(expected["dicom_id"])
    for it in items:
        assert set(it) == {"image", "caption", "id"}
        image = it["image"]
        assert type(image) is torch.Tensor and image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1 and image.std() > 0.01
        assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])  # grayscale replicated
        assert len(tokenizer(it["caption"])["input_ids"]) <= 16
    too_long = [p for p in expected["prompt"] if len(tokenizer(p)["input_ids"]) > 16]
    assert too_long
    assert f"{len(too_long)} prompts truncated to 16 tokens" in capsys.readouterr().out
    by_id = {it["id"]: it["caption"] for it in items}
    for dicom_id, prompt in zip(expected["dicom_id"], expected["prompt"]):
        assert prompt.startswith(by_id[dicom_id])  # a cut keeps the leading words


def test_missing_ms_cxr_table_says_how_to_go_on(tmp_path):
    from foba_med.train import holdout

    with pytest.raises(FileNotFoundError, match="--ms_cxr_csv None"):
        holdout(tmp_path / "nowhere.csv")
    assert holdout(None, ["p10000032", 10000033]) == (frozenset(), frozenset({"10000032", "10000033"}))


def test_gradient_clipping_waits_for_the_accumulated_gradient():
    from foba_core.distributed import effective_batch
    from foba_core.engines import ClipGradNorm, optimizer_steps_now

    param = torch.nn.Parameter(torch.zeros(3))
    clip = ClipGradNorm([param], max_norm=1.0)
    engine = types.SimpleNamespace(accumulation_steps=3, scaler=None,
                                   state=types.SimpleNamespace(iteration=0, epoch_length=7))
    steps = []
    for it in range(1, 8):
        engine.state.iteration = it
        param.grad = torch.full((3,), 10.0)
        clip(engine)
        steps.append(optimizer_steps_now(engine))
        assert param.grad.norm().item() == pytest.approx(1.0 if steps[-1] else np.sqrt(300))
    assert steps == [False, False, True, False, False, True, True]  # MONAI flushes at the end of the epoch
    assert effective_batch(16, 16) == 256


def test_a_prepare_rerun_with_other_settings_is_refused(phantom, tmp_path):
    settings = dict(mimic_dir=phantom, output_dir=tmp_path, num_workers=1)
    _workflow(PREPARE, "infer", **settings).run()
    with pytest.raises(RuntimeError) as err:
        _workflow(PREPARE, "infer", **settings, views=["PA"])
    assert "  --views: ['PA', 'AP'] -> ['PA']\n" in str(_root_cause(err.value))
    assert f"delete index.csv, settings.json in {tmp_path}" in str(_root_cause(err.value))


@pytest.mark.slow
def test_a_training_rerun_with_other_settings_is_refused_and_one_with_the_same_proceeds(phantom, tiny_sd, tmp_path,
                                                                                          capsys):
    out = tmp_path / "train"
    settings = dict(mimic_dir=phantom, pretrained=tiny_sd, output_dir=out, max_steps=1, batch_size=2, warmup_steps=1)
    with pytest.raises(RuntimeError):  # the data does not fit: nothing is recorded, so the fix below is no change
        _workflow(TRAIN, **{**settings, "batch_size": 1000})
    wf = _workflow(TRAIN, **settings)
    wf.run()
    wf.finalize()
    assert json.loads((out / "settings.json").read_text())["lr"] == 0.0005 and (out / "model").is_dir()

    with pytest.raises(RuntimeError) as err:
        _workflow(TRAIN, **{**settings, "lr": 0.001})
    assert str(_root_cause(err.value)) == (
        f"{out} holds the outputs of other settings (recorded in {out / 'settings.json'}):\n  --lr: 0.0005 -> 0.001\n"
        f"A rerun into it would mix old and new outputs: delete index.csv, checkpoints, train_log.json, model, "
        f"settings.json in {out}, or pass another --output_dir")

    capsys.readouterr()
    wf = _workflow(TRAIN, **settings, log_interval=1, num_workers=1, tracking="mlflow")  # nothing the result depends on
    wf.run()
    assert "training already finished at iteration 1" in capsys.readouterr().out
    wf = _workflow(TRAIN, **{**settings, "max_steps": 2})  # more steps: the finished run continues
    wf.run()
    assert wf.parser.get_parsed_content("train#trainer").state.iteration == 2


def test_paper_override_has_the_papers_settings():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([TRAIN, PAPER])
    assert parser["lr"] == pytest.approx(5e-5) and parser["max_steps"] == 60000 and parser["image_size"] == 512
    assert parser["batch_size"] * parser["accumulation_steps"] == 256
    assert parser["caption_dropout"] == pytest.approx(0.1) and parser["cache_rate"] == 0
    with pytest.raises(RuntimeError) as err:
        parser.get_parsed_content("mimic_dir")
    assert "needs --mimic_dir" in repr(err.value.__cause__)


@pytest.mark.slow
def test_finetuning_lowers_the_loss_tracks_mlflow_resumes_and_saves_the_model(phantom, tiny_sd, tmp_path, capsys):
    from ignite.engine import Events
    from mlflow.tracking import MlflowClient
    from monai.utils import path_to_sqlite_uri

    from foba_core.models import load_pipeline

    out = tmp_path / "train"
    settings = dict(mimic_dir=phantom, pretrained=tiny_sd, output_dir=out, max_steps=150, batch_size=8, lr=2e-3,
                    warmup_steps=10, checkpoint_interval=30, tracking="mlflow")
    wf = _workflow(TRAIN, **settings)
    assert "effective batch 8 = batch 8 per process x 1 process(es) x 1 accumulation step(s)" in capsys.readouterr().out
    trainer = wf.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=70), lambda e: e.terminate())  # an interruption
    wf.run()
    assert trainer.state.iteration == 70
    first = json.loads((out / "train_log.json").read_text())
    assert "checkpoint_iteration=60.pt" in os.listdir(out / "checkpoints")

    wf = _workflow(TRAIN, **settings)  # a new process would do exactly this
    # the interrupted run also left its final checkpoint (MONAI's save_final), which is furthest: iteration 70
    assert f"resumed from {out / 'checkpoints' / 'checkpoint_final_iteration.pt'} at iteration 70" in capsys.readouterr().out
    wf.run()
    wf.finalize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 150  # continued from 70, did not start over
    second = json.loads((out / "train_log.json").read_text())
    assert second["iterations_this_run"] == 80 and second["losses"][:70] == first["losses"]  # the whole run's curve
    losses = second["losses"]
    assert np.mean(losses[-30:]) < 0.75 * np.mean(losses[:20])

    pipe = load_pipeline(out / "model")
    assert pipe.text_attention_mask is True  # kept from the source model
    foba = json.loads((out / "model" / "foba.json").read_text())
    assert foba["finetuned_from"] == str(tiny_sd.resolve()) and foba["image_size"] == 16
    assert foba["training"]["iterations"] == 150
    source = load_pipeline(tiny_sd)
    assert not torch.equal(pipe.unet.conv_in.weight, source.unet.conv_in.weight)  # the U-Net was fine-tuned
    for name in ("text_encoder", "vae"):  # frozen
        for a, b in zip(getattr(pipe, name).state_dict().values(), getattr(source, name).state_dict().values()):
            assert torch.equal(a, b)

    client = MlflowClient(path_to_sqlite_uri(str(out / "mlruns.db")))
    runs = client.search_runs([client.get_experiment_by_name("foba_cxr_train").experiment_id])
    assert len(runs) == 2  # the interrupted run and the resumed one
    for run in runs:
        params = run.data.params
        assert params["lr"] == "0.002" and params["max_steps"] == "150"
        assert params["pretrained"] == str(tiny_sd.resolve())
        assert int(params["n_train_images"]) > 0
    curves = sorted([sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss"))
                     for run in runs])  # the loss of every iteration, the resumed run from iteration 71 on
    assert [[step for step, _ in curve] for curve in curves] == [list(range(1, 71)), list(range(71, 151))]
    assert np.allclose([v for _, v in curves[0]], first["losses"])

    wf = _workflow(TRAIN, **{**settings, "tracking": None})  # a finished run is not trained again
    wf.run()
    assert "training already finished at iteration 150" in capsys.readouterr().out
