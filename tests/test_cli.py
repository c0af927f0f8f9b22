"""On/off settings given on the command line (python-fire leaves `false` a truthy string)."""

import os

import pytest

from foba_core.cli import as_flag

ROOT = os.path.join(os.path.dirname(__file__), "..")
TOY_JOB = [f"configs/stages/{s}.yaml" for s in ("stage1", "finetune", "refine", "segment", "guidance", "report")] + [
    "configs/datasets/toy.yaml", "bundles/foba_toy/configs/pipeline.yaml"]


@pytest.mark.parametrize("value,expected", [(True, True), (False, False), (None, False), (1, True), (0, False),
                                            ("true", True), ("False", False), ("false", False), (" YES ", True),
                                            ("no", False), ("on", True), ("off", False), ("1", True), ("0", False)])
def test_as_flag_reads_every_common_spelling(value, expected):
    assert as_flag(value) is expected


@pytest.mark.parametrize("value", ["maybe", 2, 0.5, "ture"])
def test_as_flag_names_the_setting_it_cannot_read(value):
    with pytest.raises(ValueError, match="--amp must be true or false"):
        as_flag(value, "amp")


@pytest.mark.parametrize("config,key", [(TOY_JOB, "finetune#stage#settings#amp"),
                                        (TOY_JOB, "segment#settings#flip"),
                                        ("bundles/foba_cxr/configs/train.yaml", "train#trainer#amp"),
                                        ("bundles/foba_cxr/configs/evaluate.yaml", "step#fallback_all_tokens")])
def test_configs_read_false_from_the_command_line_as_off(config, key, monkeypatch):
    from monai.bundle import ConfigParser

    monkeypatch.chdir(ROOT)  # configs name configs/fragments relative to the repository root
    parser = ConfigParser()
    parser.read_config(config)
    setting = {"flip": "segment_flip"}.get(key.rsplit("#", 1)[1], key.rsplit("#", 1)[1])
    for given, expected in (("false", False), ("true", True), (False, False)):
        parser[setting] = given  # what `--amp false` hands over
        parser.parse()
        assert parser.get_parsed_content(key) is expected
