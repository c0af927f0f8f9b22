"""The phantom world as an oracle of the CXR chain: with fine-tuning skipped, the evaluation's AUC falls.

The chain as a user runs it (train.yaml, then evaluate.yaml), on the default phantom world with the shipped toy LDM,
but with 200 fine-tuning steps instead of 4500 and T0 = 10 instead of 40, against the same evaluation of the
un-fine-tuned toy LDM. Two findings carry the check: atelectasis and pneumothorax are the ones that a short
fine-tuning already localises (measured here: 86.3 and 66.6 after 200 steps against 64.5 and 52.4 untrained; the
mean over all eight only 57.6 against 55.5); the others need the default 4500 steps (bundles/foba_cxr/docs/evaluate.md)
and would make a slow test. The whole check takes about 90 s on 2 CPU cores (the default phantom's 1000 subjects
written once, 15 s).
"""

from __future__ import annotations

import os

import pandas as pd
import pytest

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "bundles", "foba_cxr", "configs")
TOY_LDM = os.path.join(os.path.dirname(__file__), "..", "bundles", "foba_toy", "models", "toy_ldm")
FAST_FINDINGS = ["Atelectasis", "Pneumothorax"]


def _evaluate(phantom, model, out) -> pd.Series:
    from monai.bundle import run

    run(config_file=os.path.join(CONFIGS, "evaluate.yaml"), phantom_dir=str(phantom), model_dir=str(model),
        output_dir=str(out), t0=10, wrong_word_control=False, n_overlays=0)
    return pd.read_csv(out / "auc_per_disease.csv").set_index("category_name")["auc_roc"]


@pytest.mark.slow
def test_skipping_cxr_finetuning_loses_the_findings_it_localises(tmp_path):
    from monai.bundle import run

    phantom = tmp_path / "phantom"
    run(config_file=os.path.join(CONFIGS, "train.yaml"), phantom_dir=str(phantom), output_dir=str(tmp_path / "train"),
        max_steps=200)
    finetuned = _evaluate(phantom, tmp_path / "train" / "model", tmp_path / "finetuned")
    skipped = _evaluate(phantom, TOY_LDM, tmp_path / "skipped")
    gain = finetuned[FAST_FINDINGS] - skipped[FAST_FINDINGS]
    assert (gain > 0.08).all(), gain
    assert gain.mean() > 0.12, gain
