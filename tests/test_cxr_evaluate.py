"""MS-CXR evaluation (foba_med.evaluate and .scoring, bundles/foba_cxr/configs/evaluate.yaml): box masks through
the image's resize/crop, multi-token summation, pixel AUC-ROC, skipped and missing findings, the bundle end to end,
and a rerun into its output folder with other settings refused."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from foba_core.seeds import derive_seed
from foba_med.evaluate import (
    TRAIN_COMMAND,
    CXREvalStep,
    ensure_phantom,
    finding_tokens,
    load_model,
    open_findings,
    prepare_item,
)
from foba_med.grounding import compute_com_distance, compute_miou, compute_pointing_hit
from foba_med.mimic import CXRImageError
from foba_med.ms_cxr import MS_CXR_FILE, box_mask
from foba_med.scoring import CXREvalWriter, centre_prior, min_max, score_finding

EVALUATE = Path(__file__).resolve().parent.parent / "bundles" / "foba_cxr" / "configs" / "evaluate.yaml"
TINY_PHANTOM = dict(n_subjects=6, seed=3, size=32, ms_cxr_fraction=1.0, p_normal=0.0, p_lateral=0.0)


def _item(height, width, boxes, caption="Bilateral apical pneumothoraces", category="Pneumothorax"):
    boxes = torch.tensor(boxes, dtype=torch.int64)
    mask = box_mask(boxes, height, width)
    return {"image": mask[None].float(), "mask": mask, "boxes": boxes, "caption": caption, "category_name": category,
            "id": f"img__{category.lower()}", "dicom_id": "img", "split": "test"}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom") / "mimic"
    return ensure_phantom(str(root), str(root), TINY_PHANTOM)  # the default run's path: generated when missing


def test_a_phantom_of_other_parameters_at_the_phantom_path_is_refused_and_read_as_mimic_dir(phantom, tmp_path):
    other = {**TINY_PHANTOM, "n_subjects": 7}  # e.g. the phantom of an earlier default at runs/foba_cxr/phantom
    with pytest.raises(FileExistsError, match=r"n_subjects=6 \(asked for 7\)"):
        ensure_phantom(str(phantom), str(phantom), other)
    assert ensure_phantom(str(phantom), str(tmp_path / "default"), other) == phantom  # --mimic_dir: as it is
    assert not (tmp_path / "default").exists()


@pytest.fixture(scope="module")
def tiny_pipe():
    from tiny_sd import tiny_pipeline

    return tiny_pipeline(seed=0, text_attention_mask=True)


@pytest.mark.parametrize("shape, box, expected", [
    ((60, 90), [20, 10, 40, 30], [3, 5, 13, 15]),  # wide: scale 1/2, 45 -> 30 columns, 7 cut on the left
    ((90, 60), [10, 20, 30, 40], [5, 3, 15, 13]),  # tall: 7 rows cut at the top
])
def test_box_mask_follows_the_image_through_resize_and_centre_crop(shape, box, expected):
    prep = prepare_item(_item(*shape, [box]), size=30)
    assert prep["image"].shape == (3, 30, 30) and prep["mask"].shape == (30, 30)
    assert torch.equal(prep["mask"], box_mask([expected], 30, 30))
    assert prep["boxes"].tolist() == [expected]
    assert torch.equal(prep["image"][0] > 0.5, prep["mask"])  # the bright box of the image lands on the mask


def test_box_mask_at_a_non_integer_scale_stays_on_the_image_box():
    prep = prepare_item(_item(50, 77, [[30, 12, 50, 31], [5, 40, 20, 50]]), size=32)  # two boxes, union mask
    bright, mask = prep["image"][0] > 0.5, prep["mask"]
    inter, union = (bright & mask).sum().item(), (bright | mask).sum().item()
    assert mask.any() and inter / union > 0.8
    # every mapped box encloses its part of the mask (map_boxes rounds outwards)
    drawn = box_mask(prep["boxes"], 32, 32)
    assert not (mask & ~drawn).any()


def test_finding_tokens_take_all_sub_tokens_and_say_when_none(tiny_pipe):
    tok = tiny_pipe.tokenizer
    prompt = "Small left pleural effusion and bilateral apical pneumothoraces"
    idx, source = finding_tokens(tok, prompt, "Pneumothorax")
    tokens = tok.convert_ids_to_tokens(tok(prompt).input_ids)
    assert source == "disease_words" and len(idx) >= 2  # an unknown inflection splits into sub-tokens
    assert "".join(tokens[i] for i in idx).replace("</w>", "") == "pneumothoraces"
    idx, _ = finding_tokens(tok, prompt, "Pleural Effusion")
    assert [tokens[i] for i in idx] == ["pleural</w>", "effusion</w>"]
    assert finding_tokens(tok, "Mild cardiomegaly", "Edema") == ([], "none")
    idx, source = finding_tokens(tok, "Mild cardiomegaly", "Edema", fallback_all_tokens=True)
    ids = tok("Mild cardiomegaly").input_ids
    assert source == "all_tokens" and idx == list(range(1, len(ids) - 1))  # every token but BOS and EOS


def test_multi_token_summation_equals_the_sum_of_separate_captures(tiny_pipe):
    from foba_core.bench import reference_heat_maps
    from foba_core.capture import token_weights
    from foba_core.diffusion import encode_latents
    from foba_core.models import encode_prompts

    item = _item(40, 60, [[30, 5, 50, 20]])
    step = CXREvalStep(tiny_pipe, timesteps=[501, 101], seed=3)
    rec = step(None, [item])["records"][0]
    assert len(rec["token_index"]) >= 2 and rec["heat"].shape == (8, 8)
    # reference: every cross-attention map of every token stored (one timestep per pass, explicit softmax),
    # then the finding's sub-token columns summed afterwards, same noise
    prep = prepare_item(item, 16)
    z0 = encode_latents(tiny_pipe, prep["image"][None])
    hidden, key_mask = encode_prompts(tiny_pipe, [item["caption"]])
    ref = reference_heat_maps(tiny_pipe.unet, tiny_pipe.scheduler, z0, hidden,
                              token_weights([[rec["token_index"]]], hidden.shape[1]), text_mask=key_mask,
                              timesteps=[501, 101], seed=derive_seed(3, "q_sample", item["id"]))[0][0, 0]
    assert torch.allclose(rec["heat"], ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(rec["token_maps"].sum(0), ref, rtol=1e-5, atol=1e-6)
    assert all(not torch.allclose(m, ref, rtol=1e-2) for m in rec["token_maps"])  # no single token is the sum


def test_a_prompt_without_the_disease_word_is_left_out_unless_the_fallback_is_asked_for(tiny_pipe, caplog):
    item = _item(40, 60, [[30, 5, 50, 20]], caption="Moderate cardiomegaly", category="Edema")
    with caplog.at_level("WARNING"):
        rec = CXREvalStep(tiny_pipe, timesteps=[101])(None, [item])["records"][0]
    assert rec["heat"] is None and rec["token_source"] == "none" and item["id"] in caplog.text
    rec = CXREvalStep(tiny_pipe, timesteps=[101], fallback_all_tokens=True)(None, [item])["records"][0]
    assert rec["token_source"] == "all_tokens" and rec["heat"].shape == (8, 8)
    assert "".join(rec["tokens"]).replace("</w>", "") == "moderatecardiomegaly"


def _record(heat, mask, category="Edema", tokens=("edema</w>",), token_maps=None, boxes=((0, 0, 2, 2),)):
    return {"id": f"x__{category}", "dicom_id": "x", "category_name": category, "split": "test", "prompt": "p",
            "token_source": "disease_words", "tokens": list(tokens), "image": torch.rand(3, *mask.shape),
            "mask": mask, "boxes": torch.tensor(boxes), "heat": heat,
            "token_maps": heat[None] if token_maps is None and heat is not None else token_maps}


def test_auc_equals_sklearn_on_the_same_pixels(tmp_path):
    g = torch.Generator().manual_seed(0)
    heat = torch.rand(8, 8, generator=g) * 7 + 3
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[3:9, 5:14] = True
    up = F.interpolate(min_max(heat)[None, None], size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
    expected = roc_auc_score(mask.ravel().numpy(), up.ravel().numpy())
    assert score_finding(heat, mask) == pytest.approx(expected, abs=1e-12)
    writer = CXREvalWriter(str(tmp_path))
    maps = torch.stack([heat, torch.rand(8, 8, generator=g)])
    writer.update([_record(heat, mask, "Pleural Effusion", ("pleural</w>", "effusion</w>"), maps, ((5, 3, 14, 9),))])
    row = writer.rows[-1]
    assert row["status"] == "scored" and row["auc_roc"] == pytest.approx(expected, abs=1e-12)
    assert row["per_token_auc"].startswith(f"pleural</w>={expected:.4f} effusion</w>=")
    prior = roc_auc_score(mask.ravel().numpy(), centre_prior(16, 16).ravel().numpy())
    assert row["auc_centre_prior"] == pytest.approx(prior, abs=1e-12)
    per_disease, per_token, _ = writer.tables()
    assert per_disease.iloc[0]["auc_roc"] == pytest.approx(expected) and per_disease.iloc[-1]["category_name"] == "mean"
    assert per_token["token"].tolist() == ["pleural</w>", "effusion</w>"]
    # the grounding metrics of the same normalised, upsampled map against the mask and its box (x1 y1 x2 y2)
    inside, outside = up[mask].double().numpy(), up[~mask].double().numpy()
    contrast, noise = inside.mean() - outside.mean(), np.sqrt(inside.var() + outside.var())  # population variances
    assert row["cnr"] == pytest.approx(abs(contrast) / noise) and row["cnr_signed"] == pytest.approx(contrast / noise)
    assert row["miou"] == pytest.approx(compute_miou(up, mask))
    assert row["pointing_acc"] == compute_pointing_hit(up, mask)
    assert row["com_distance"] == pytest.approx(compute_com_distance(up, [[5, 3, 14, 9]]))
    assert row["com_distance_rel"] == pytest.approx(row["com_distance"] / np.hypot(16, 16))
    metrics = writer.write()
    table = pd.read_csv(tmp_path / "auc_per_disease.csv")
    new = ["cnr", "cnr_std", "cnr_signed", "cnr_signed_std", "miou", "miou_std", "pointing_acc", "com_distance",
           "com_distance_std", "com_distance_rel", "com_distance_rel_std"]
    means = [c for c in new if not c.endswith("_std")]
    assert list(table.columns[-len(new):]) == new and set(means) <= set(pd.read_csv(tmp_path / "per_image.csv"))
    disease, mean = table.iloc[0], table.iloc[-1]
    assert all(np.isfinite(disease[c]) for c in new) and disease["cnr"] == pytest.approx(abs(contrast) / noise)
    assert all(mean[c] == pytest.approx(disease[c]) for c in means) and disease["cnr_std"] == 0  # one finding
    for c in means:  # MLflow: the disease's and the mean's values
        assert metrics[f"{c}_pleural_effusion"] == pytest.approx(disease[c]) == metrics[f"{c}_mean"]
    assert metrics["miou_std_pleural_effusion"] == 0 and "miou_std_mean" not in metrics  # NaN: left out
    report = (tmp_path / "auc_per_disease.md").read_text()
    assert f"| {abs(contrast) / noise:.2f} ± 0.00 | {disease['miou']:.3f} ± 0.000 |" in report
    assert "## Published MS-CXR averages" in report and "| BioViL |" in report and "| BioViL-T |" in report
    assert "| 1.07 | 0.229 | Boecking et al." in report and "| 1.33 | 0.240 | Bannur et al." in report


def test_a_constant_map_scores_cnr_0_and_miou_0_and_has_no_centre_of_mass(tmp_path):
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:4] = True
    boxes = ((0, 0, 8, 4),)
    writer = CXREvalWriter(str(tmp_path))
    with pytest.warns(UserWarning, match="distinct finite value"):  # the GMMs of the constant map
        writer.update([_record(torch.arange(16.0).reshape(4, 4).flip(0), mask, boxes=boxes),  # brightest on top
                       _record(torch.full((4, 4), 2.0), mask, boxes=boxes)])
    informative, constant = writer.rows
    assert constant["cnr"] == 0 and constant["miou"] == 0 and np.isnan(constant["com_distance"])
    assert np.isnan(constant["com_distance_rel"]) and informative["cnr"] > 0
    edema = writer.tables()[0].set_index("category_name").loc["Edema"]
    assert edema["cnr"] == pytest.approx(informative["cnr"] / 2)  # the constant map's 0 counts
    assert edema["com_distance"] == pytest.approx(informative["com_distance"]) and edema["com_distance_std"] == 0


def test_centre_prior_ranks_a_centred_disc_perfectly():
    prior = centre_prior(20, 30)
    assert prior.shape == (20, 30) and prior.argmax().item() in {9 * 30 + 14, 9 * 30 + 15, 10 * 30 + 14, 10 * 30 + 15}
    assert score_finding(prior, prior > -6) == 1.0  # a disc around the centre: every inside pixel ranks higher


def test_one_class_mask_is_skipped_with_a_warning(tmp_path):
    writer = CXREvalWriter(str(tmp_path))
    heat = torch.rand(4, 4)
    with pytest.warns(UserWarning, match="one class only"):
        writer.update([_record(heat, torch.zeros(8, 8, dtype=torch.bool))])
    good = torch.zeros(8, 8, dtype=torch.bool)
    good[:4] = True
    writer.update([_record(heat, good), {**_record(None, good), "token_source": "none", "tokens": []}])
    assert [r["status"] for r in writer.rows] == ["one_class_mask", "scored", "no_disease_word"]
    per_disease, _, per_image = writer.tables()
    edema = per_disease.set_index("category_name").loc["Edema"]
    assert edema["n_images"] == 1 and edema["n_one_class_mask"] == 1 and edema["n_no_disease_word"] == 1
    assert per_image["auc_roc"].notna().sum() == 1


def test_missing_images_are_counted_and_fatal_only_when_all_are_missing(phantom, tmp_path, caplog):
    import shutil

    mimic = tmp_path / "mimic"
    shutil.copytree(phantom, mimic)
    full = open_findings(str(mimic / MS_CXR_FILE), str(mimic))
    assert not full.missing and len(full.dataset) > 1
    first = full.dataset.dataset.findings[0]
    next(mimic.glob(f"files/**/{first.dicom_id}.jpg")).unlink()
    n_first = sum(f.dicom_id == first.dicom_id for f in full.dataset.dataset.findings)
    with caplog.at_level("WARNING"):
        part = open_findings(str(mimic / MS_CXR_FILE), str(mimic))
    assert len(part.missing) == n_first and len(part.dataset) == len(full.dataset) - n_first
    assert {m["dicom_id"] for m in part.missing} == {first.dicom_id} and first.dicom_id in caplog.text
    shutil.rmtree(mimic / "files")
    with pytest.raises(FileNotFoundError, match="none of the"):
        open_findings(str(mimic / MS_CXR_FILE), str(mimic))


def _evaluate(pipe, findings, output_dir):
    """Run the evaluation's step and writer over ``findings`` (what evaluate.yaml's Evaluator does); return metrics."""
    step, writer = CXREvalStep(pipe, timesteps=[101]), CXREvalWriter(str(output_dir), findings.missing, n_overlays=1)
    for batch in torch.utils.data.DataLoader(findings.dataset, batch_size=4, collate_fn=lambda items: items):
        writer.update(step(None, batch)["records"])
    return writer.write()


def test_unreadable_images_are_counted_and_fatal_only_when_none_is_readable(phantom, tiny_pipe, tmp_path, caplog):
    import re
    import shutil

    mimic = tmp_path / "mimic"
    shutil.copytree(phantom, mimic)
    findings = open_findings(str(mimic / MS_CXR_FILE), str(mimic))
    all_findings = findings.dataset.dataset.findings
    first = all_findings[0]
    broken = next(mimic.glob(f"files/**/{first.dicom_id}.jpg"))
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    n_broken = sum(f.dicom_id == first.dicom_id for f in all_findings)
    with caplog.at_level("WARNING"):
        metrics = _evaluate(tiny_pipe, findings, tmp_path / "out")
    assert str(broken) in caplog.text  # the warning names the file
    per_image = pd.read_csv(tmp_path / "out" / "per_image.csv")
    unreadable = per_image[per_image["status"] == "unreadable"]
    assert len(per_image) == len(all_findings) and len(unreadable) == n_broken
    assert set(unreadable["dicom_id"]) == {first.dicom_id} and set(unreadable["path"]) == {str(broken)}
    assert unreadable["error"].str.contains(broken.name).all() and (per_image["status"] == "scored").any()
    mean = pd.read_csv(tmp_path / "out" / "auc_per_disease.csv").iloc[-1]
    assert mean["n_unreadable"] == n_broken == metrics["n_unreadable"]
    report = (tmp_path / "out" / "auc_per_disease.md").read_text()
    assert f"{n_broken} finding(s) left out because their image cannot be decoded: 1 image(s), {first.dicom_id}" \
        in report
    for path in mimic.glob("files/**/*.jpg"):  # every image truncated
        path.write_bytes(path.read_bytes()[:300])
    n_images = len({f.dicom_id for f in all_findings})
    with pytest.raises(CXRImageError, match=f"all {n_images} MS-CXR images on disk under {re.escape(str(mimic))}"):
        _evaluate(tiny_pipe, open_findings(str(mimic / MS_CXR_FILE), str(mimic)), tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_missing_model_names_the_train_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.yaml") as err:
        load_model(str(tmp_path / "no_model"))
    assert TRAIN_COMMAND in str(err.value)


@pytest.mark.slow
def test_bundle_runs_end_to_end_with_mlflow(phantom, tmp_path):
    import mlflow
    from monai.bundle import ConfigWorkflow
    from tiny_sd import save_tiny_sd

    save_tiny_sd(tmp_path / "model", text_attention_mask=True)
    out = tmp_path / "out"
    wf = ConfigWorkflow(config_file=str(EVALUATE), workflow_type="infer", tracking="mlflow", mimic_dir=str(phantom),
                        model_dir=str(tmp_path / "model"), output_dir=str(out), timesteps=[501, 101], n_overlays=2)
    wf.initialize()
    wf.run()
    per_disease = pd.read_csv(out / "auc_per_disease.csv")
    assert list(per_disease.columns[:3]) == ["category_name", "n_images", "auc_roc"]
    diseases, mean = per_disease.iloc[:-1], per_disease.iloc[-1]
    assert mean["category_name"] == "mean" and mean["auc_roc"] == pytest.approx(diseases["auc_roc"].mean())
    per_image = pd.read_csv(out / "per_image.csv")
    n_findings = len(pd.read_csv(phantom / MS_CXR_FILE).groupby(["dicom_id", "category_name"]))
    assert len(per_image) == n_findings and mean["n_images"] == (per_image["status"] == "scored").sum()
    assert ((per_image["auc_roc"] >= 0) & (per_image["auc_roc"] <= 1)).sum() == mean["n_images"]
    scored = per_image[per_image["status"] == "scored"]  # the wrong-word control (evaluate.yaml's default)
    assert scored["auc_wrong_word"].between(0, 1).all() and (scored["control_prompt"] != scored["prompt"]).all()
    assert mean["auc_wrong_word"] == pytest.approx(diseases["auc_wrong_word"].mean())
    assert "79.6" in (out / "auc_per_disease.md").read_text() and (out / "auc_per_token.csv").is_file()
    assert {p.stem for p in (out / "overlays").glob("*.png")} == {
        c.lower().replace(" ", "_") for c in diseases[diseases["n_images"] > 0]["category_name"]}
    client = mlflow.tracking.MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and runs[0].data.metrics["auc_roc_mean"] == pytest.approx(mean["auc_roc"])
    assert runs[0].data.metrics["miou_mean"] == pytest.approx(mean["miou"])
    # a missing model fails before anything else happens, naming the train command
    wf = ConfigWorkflow(config_file=str(EVALUATE), workflow_type="infer", phantom_dir=str(tmp_path / "new"),
                        mimic_dir=str(tmp_path / "new"), model_dir=str(tmp_path / "absent"), output_dir=str(out))
    with pytest.raises(RuntimeError) as err:  # MONAI wraps the expression's error; ours is the cause
        wf.initialize()
    assert TRAIN_COMMAND in str(err.value.__cause__)
    assert not (tmp_path / "new").exists()


def test_no_overlays_asked_for_writes_the_tables_and_no_overlay(phantom, tiny_pipe, tmp_path):
    findings = open_findings(str(phantom / MS_CXR_FILE), str(phantom))
    step, writer = CXREvalStep(tiny_pipe, timesteps=[101]), CXREvalWriter(str(tmp_path), findings.missing, n_overlays=0)
    for batch in torch.utils.data.DataLoader(findings.dataset, batch_size=4, collate_fn=lambda items: items):
        writer.update(step(None, batch)["records"])
    writer.write()
    assert (tmp_path / "auc_per_disease.csv").exists() and not list(tmp_path.glob("overlays/*.png"))


@pytest.mark.slow
def test_an_evaluation_rerun_with_other_settings_is_refused(phantom, tmp_path):
    from monai.bundle import ConfigWorkflow
    from tiny_sd import save_tiny_sd

    save_tiny_sd(tmp_path / "model", text_attention_mask=True)
    out = tmp_path / "out"
    settings = dict(mimic_dir=str(phantom), model_dir=str(tmp_path / "model"), output_dir=str(out), t0=1, n_overlays=1)
    with pytest.raises(RuntimeError) as err:  # checked before the model is loaded
        ConfigWorkflow(config_file=str(EVALUATE), workflow_type="infer", **{**settings, "split": "tset"}).initialize()
    assert str(err.value.__cause__) == (
        "--split must be one of train, val, test, all, got 'tset'; did you mean test?")
    wf = ConfigWorkflow(config_file=str(EVALUATE), workflow_type="infer", **settings)
    wf.initialize()
    wf.run()
    wf = ConfigWorkflow(config_file=str(EVALUATE), workflow_type="infer", **{**settings, "t0": 2})
    with pytest.raises(RuntimeError) as err:
        wf.initialize()
    message = str(err.value.__cause__)
    assert "  --t0: 1 -> 2\n" in message and message.endswith(
        f"delete auc_per_disease.csv, auc_per_disease.md, auc_per_token.csv, per_image.csv, overlays, settings.json "
        f"in {out}, or pass another --output_dir")
