"""Stages of the main job: skipped when current, rerun with their dependants when a setting changes, resumed when
unfinished; and the composed configs: every stage of both main jobs resolves from the list of config files."""

from __future__ import annotations

import json
import os

import pytest

from foba_core.stages import RECORD, SETTINGS, Stage, changed_settings, guard_folder, read_record, stage_seconds

ROOT = os.path.join(os.path.dirname(__file__), "..")
STAGE_FILES = [f"configs/stages/{s}.yaml" for s in ("stage1", "finetune", "refine", "segment", "guidance", "report")]


def chain(out, calls, a=1, b=2):
    """Three stages: first (setting a) <- second (setting b) <- third; each work appends its name to ``calls``."""
    def work(name):
        def run():
            calls.append(name)
            with open(os.path.join(out, name, "out.txt"), "w") as f:
                f.write(name)
        return run

    return [Stage("first", out, {"a": a}, work=work("first")),
            Stage("second", out, {"b": b}, needs=["first"], work=work("second")),
            Stage("third", out, {}, needs=["second"], work=work("third"))]


def run_all(stages):
    for stage in stages:
        stage.run()


def test_a_rerun_with_the_same_settings_skips_every_stage_and_says_so(tmp_path, capsys):
    calls = []
    run_all(chain(tmp_path, calls))
    assert calls == ["first", "second", "third"]
    assert all(read_record(tmp_path / n)["complete"] for n in calls)
    capsys.readouterr()
    run_all(chain(tmp_path, calls))
    assert calls == ["first", "second", "third"]  # nothing ran again
    out = capsys.readouterr().out
    assert all(f"stage {n}: skipped" in out for n in ("first", "second", "third"))


def test_one_changed_setting_reruns_exactly_the_stages_that_depend_on_it(tmp_path, capsys):
    calls = []
    run_all(chain(tmp_path, calls))
    (tmp_path / "second" / "stale.txt").write_text("from the old settings")
    calls.clear()
    capsys.readouterr()
    run_all(chain(tmp_path, calls, b=3))
    assert calls == ["second", "third"]  # first is untouched, its dependants rerun
    out = capsys.readouterr().out
    assert "stage first: skipped" in out and "b: 2 -> 3" in out and "upstream stage second changed" in out
    assert not (tmp_path / "second" / "stale.txt").exists()  # a rerun starts from an empty folder
    calls.clear()
    run_all(chain(tmp_path, calls, a=5, b=3))
    assert calls == ["first", "second", "third"]


def test_an_unfinished_stage_resumes_in_its_folder_and_a_missing_upstream_is_named(tmp_path, capsys):
    calls = []
    first, second, _ = chain(tmp_path, calls)
    with pytest.raises(RuntimeError, match="'first'.*has not run"):
        second.run()

    def crash():
        (tmp_path / "first" / "part.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Stage("first", tmp_path, {"a": 1}, work=crash).run()
    assert read_record(tmp_path / "first")["complete"] is False
    with pytest.raises(RuntimeError, match="is unfinished"):
        second.run()
    first.run()
    assert (tmp_path / "first" / "part.txt").read_text() == "half"  # same settings: the folder is kept
    assert "resuming" in capsys.readouterr().out
    assert set(stage_seconds(tmp_path, ["first", "second"])) == {"first"}


def test_an_unreadable_record_names_itself(tmp_path):
    (tmp_path / "first").mkdir()
    (tmp_path / "first" / RECORD).write_text("{not json")
    with pytest.raises(ValueError, match="first.*stage.json"):
        Stage("first", tmp_path, {}).run()


def test_settings_are_recorded_as_json(tmp_path):
    import torch

    Stage("s", tmp_path, {"device": torch.device("cpu"), "sizes": (1, 2), "path": tmp_path}, work=lambda: None).run()
    record = json.loads((tmp_path / "s" / RECORD).read_text())
    assert record["settings"] == {"device": "cpu", "sizes": [1, 2], "path": str(tmp_path)}


def test_changed_settings_name_old_and_new_values():
    assert changed_settings({"lr": 0.0005, "seed": 0, "views": ["PA"]}, {"lr": 0.001, "seed": 0, "amp": True}) == [
        "amp: '<unset>' -> True", "lr: 0.0005 -> 0.001", "views: ['PA'] -> '<unset>'"]


def test_a_guarded_folder_records_its_settings_and_refuses_others_once_it_holds_outputs(tmp_path):
    out = tmp_path / "out"
    settings = {"lr": 0.0005, "views": ("PA", "AP"), "seed": 0}
    assert guard_folder(out, settings, ["checkpoints", "model"], record=False) == {**settings, "views": ["PA", "AP"]}
    assert not out.exists()  # record=False only compares
    guard_folder(out, settings, ["checkpoints", "model"])
    assert json.loads((out / SETTINGS).read_text()) == {"lr": 0.0005, "views": ["PA", "AP"], "seed": 0}
    guard_folder(out, settings, ["checkpoints", "model"])  # the same settings: a rerun proceeds
    guard_folder(out, {**settings, "lr": 0.001}, ["checkpoints", "model"])  # no outputs yet: nothing can mix
    assert json.loads((out / SETTINGS).read_text())["lr"] == 0.001
    (out / "checkpoints").mkdir()
    with pytest.raises(FileExistsError) as err:
        guard_folder(out, {**settings, "seed": 1}, ["checkpoints", "model"])
    assert str(err.value) == (
        f"{out} holds the outputs of other settings (recorded in {out / SETTINGS}):\n"
        "  --lr: 0.001 -> 0.0005\n  --seed: 0 -> 1\n"
        f"A rerun into it would mix old and new outputs: delete checkpoints, settings.json in {out}, or pass "
        "another --output_dir")
    (out / SETTINGS).write_text("{not json")
    with pytest.raises(ValueError, match="settings.json is unreadable"):
        guard_folder(out, settings)


@pytest.mark.parametrize("dataset, bundle", [("toy", "foba_toy"), ("cub", "foba_natural"), ("dogs", "foba_natural")])
def test_the_composed_main_jobs_define_every_stage_they_run(dataset, bundle, monkeypatch):
    from monai.bundle import ConfigParser

    monkeypatch.chdir(ROOT)  # the macros of the stage files name configs/ relative to the repository root
    parser = ConfigParser()
    parser.read_config(STAGE_FILES + [f"configs/datasets/{dataset}.yaml", f"bundles/{bundle}/configs/pipeline.yaml"])
    parser.parse()
    run = [line.replace("::", "#") for line in parser["run"]]  # MONAI writes nested ids with ::
    assert run[0] == "$@images#stage.run()" and run[-1] == "$@report#write()"
    for line in run[:-1]:
        assert parser[line[len("$@"):].rsplit(".", 1)[0]]["_target_"] == "foba_core.stages.Stage"
    names = [parser.get_parsed_content(line[2:].rsplit(".", 1)[0] + "#name") for line in run[:-1]]
    assert len(set(names)) == len(names)  # one folder per stage
    # the U-Net template, copied once per training set, reads each copy's own name
    assert [parser.get_parsed_content(f"segment#{n}#engine#stage#name") for n in ("unet_M_pre", "unet_M")] == [
        "unet_M_pre", "unet_M"]
    # the toy U-Net keeps a full-resolution level (segment_strides); the natural bundles keep the paper's strides
    network = parser.get_parsed_content("segment#unet_M#engine#network")
    assert tuple(network.strides) == ((1, 2, 2) if dataset == "toy" else (2, 2, 2, 2))


@pytest.mark.slow
def test_stage1_sharded_over_two_processes_writes_what_one_process_writes(tmp_path, monkeypatch):
    import torch
    from monai.bundle import ConfigWorkflow
    from test_distributed import _torchrun, one_thread
    from tiny_sd import save_tiny_sd

    save_tiny_sd(tmp_path / "sd", seed=0, text_attention_mask=True)
    files = STAGE_FILES + ["configs/datasets/toy.yaml", "bundles/foba_toy/configs/pipeline.yaml"]
    settings = {"pretrained": str(tmp_path / "sd"), "splits": ["test"], "n_test": 7, "stage1_batch_size": 3,
                "timesteps": [501, 1], "n_overlays": 5}
    monkeypatch.chdir(ROOT)
    wf = ConfigWorkflow(config_file=files, workflow_type="infer", run_id="run_stage1",
                        output_dir=str(tmp_path / "single"), **settings)
    wf.initialize()
    with one_thread():
        wf.run()
    args = [f"--{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in settings.items()]
    _torchrun(files + ["configs/fragments/multi_gpu_stage1.yaml"], "run_stage1", *args,
              f"--output_dir={tmp_path / 'sharded'}")
    single, sharded = (tmp_path / "single" / "stage1" / "test", tmp_path / "sharded" / "stage1" / "test")
    a, b = torch.load(single / "stage1.pt", weights_only=True), torch.load(sharded / "stage1.pt", weights_only=True)
    assert a["ids"] == b["ids"] and len(a["ids"]) == 7
    torch.testing.assert_close(b["heatmaps"], a["heatmaps"], rtol=0, atol=1e-6)
    assert torch.equal(a["m_pre"], b["m_pre"])
    for name in ("per_image.csv", "metrics.json"):
        assert (sharded / name).read_text() == (single / name).read_text()
    assert sorted(os.listdir(sharded / "overlays")) == sorted(os.listdir(single / "overlays"))
    assert read_record(tmp_path / "sharded" / "stage1")["complete"]
