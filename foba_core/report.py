"""The report stage: the main job's tables and pictures, read from the stages' outputs (paper Tables 1-3, Fig. 8).

``write_report`` writes ``results.csv`` / ``results.md`` (every method's scores on the test split next to the
paper's CUB numbers, or the box IoU of Table 3 on box data sets), ``fid.csv`` (the guidance rows, plus the rows
of any extra stage a bundle attaches), ``table3.csv`` / ``table3.md`` (real data sets), ``mask_grid.png`` and
``timings.json``. Nothing is recomputed but the scores of M_pre, which stage 1 keeps at latent resolution.
"""

from __future__ import annotations

import json
import math
import os


from foba_core.io import atomic_write, write_csv, write_json
from foba_core.masks import upsample_mask
from foba_core.outputs import load_masks, read_scores, score_masks
from foba_core.stages import stage_seconds
from foba_core.visualize import draw_boxes, mask_overlay, save_grid, thumbnail, to_uint8

# method -> the stage folder holding its test masks (None: M_pre, from stage 1), in the tables' order
METHODS = {"M_pre": None, "M_crop": "crop", "M_refined_unfinetuned": "refine_base",
           "M_refined_paper_eq5": "refine_eq5", "M_refined": "refine", "unet_M_pre": "unet_M_pre", "unet_M": "unet_M",
           "unet_M_plus_synthetic": "unet_M_plus_synthetic", "unet_supervised": "unet_supervised"}
# ablation rows, reported where their stage ran: M by Eq. 5 with the un-fine-tuned m (no stage 2), and M by the
# paper's Eq. 5 (one inpainting, g on the whole map) where the default refinement is another variant
OPTIONAL = ("M_refined_unfinetuned", "M_refined_paper_eq5")
PAPER_CUB = {  # Table 2 (CUB), ACC / IoU / mIoU in %
    "M_pre": (83.5, 29.0, 55.7), "M_crop": (90.0, 30.7, 60.0), "unet_M_pre": (91.7, 66.5, 78.2),
    "M_refined": (92.4, 63.6, 77.4), "unet_M": (95.2, 75.1, 84.8), "unet_M_plus_synthetic": (95.6, 77.2, 86.0),
    "unet_supervised": (97.9, 88.3, 93.0),
}
PAPER_TABLE3 = {  # Table 3, "Ours": FID of synthesis (w = 1) and IoU (%) of the U-Net trained on D_s
    "cub": (9.8, 75.1), "dogs": (43.1, 63.8), "cars": (13.4, 55.2), "h36m": (63.7, 69.2),
}
TABLE3_TITLES = {"cub": "CUB", "dogs": "Stanford Dogs", "cars": "Stanford Cars", "h36m": "Human3.6m"}
GRID_METHODS = ("M_pre", "M_crop", "M_refined", "unet_M", "unet_M_plus_synthetic", "unet_supervised")


def number(value, digits: int) -> str:
    """Return a table cell: numbers rounded, NaN empty, text (e.g. "not computed") as it is."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "" if math.isnan(value) else f"{value:.{digits}f}"


def test_masks(output_dir: str, test, box_evaluation: bool, leave_out: tuple = ()) -> tuple[dict, dict]:
    """Return ({method: its test scores}, {method: its test masks (N, S, S)}) from the stages' outputs (the
    ``OPTIONAL`` ablations only where their stage ran, none of ``leave_out``)."""
    from foba_core.finetune import load_stage1

    scores, masks = {}, {}
    for method, stage in METHODS.items():
        if method in leave_out or (method in OPTIONAL and not os.path.isfile(
                os.path.join(output_dir, stage, "test", "scores.json"))):
            continue
        if stage is None:
            m_pre = load_stage1(os.path.join(output_dir, "stage1", "test", "stage1.pt"))["m_pre"]
            masks[method] = upsample_mask(m_pre, (test.size, test.size))
            scores[method] = score_masks(masks[method], test, box_evaluation)
        else:
            masks[method] = load_masks(os.path.join(output_dir, stage, "test", "masks.safetensors"))
            scores[method] = read_scores(os.path.join(output_dir, stage, "test", "scores.json"))
    return scores, masks


def results_lines(rows: list[dict], box_evaluation: bool, n_test: int, skipped: int, paper_iou=None) -> list[str]:
    """Return the Markdown table of every method: pixel ACC / IoU / mIoU next to CUB's, or the box IoU."""
    if box_evaluation:
        lines = ["| method | box IoU | best single-box IoU | paper (Table 3, U-Net on D_s) |", "|---|---|---|---|"]
        for r in rows:
            paper = f"{paper_iou:.1f}" if r["method"] == "unet_M" and paper_iou is not None else ""
            lines.append(f"| {r['method']} | {r['box_iou']:.1f} | {r['box_iou_best']:.1f} | {paper} |")
        return lines + ["", "Box IoU: the bounding box of each predicted mask against the box enclosing all "
                            f"ground-truth objects (best single object in the second column), {n_test - skipped} "
                            "test images" + (f" ({skipped} without a box inside the centre crop skipped)."
                                             if skipped else ".")]
    lines = ["| method | ACC | IoU | mIoU | paper (CUB) ACC / IoU / mIoU |", "|---|---|---|---|---|"]
    for r in rows:
        paper = " / ".join(f"{v:.1f}" for v in PAPER_CUB[r["method"]]) if r["method"] in PAPER_CUB else ""
        lines.append(f"| {r['method']} | {r['acc']:.1f} | {r['iou']:.1f} | {r['miou']:.1f} | {paper} |")
    return lines


def fid_lines(fids: list[dict], fid_network, fid_samples: int, paper_column: str, score_column: str) -> list[str]:
    """Return the Markdown FID table of the guidance rows (with a score column where a bundle added one)."""
    if fid_network is None:
        lines = ["", "FID of synthesis: not computed (pass --fid_network <TorchScript Inception, "
                     "inception-2015-12-05.pt>); background samples (w = -1) are in backgrounds.png.", ""]
    else:
        title = fids[0]["features"] if fids and fids[0]["features"] != "FID" else os.path.basename(str(fid_network))
        lines = ["", f"FID ({title}) of synthesis from the fine-tuned model, {fid_samples} samples:", ""]
    scored = any(score_column in r for r in fids)
    lines += [f"| w | FID | {score_column.replace('_', ' ')} | paper (CUB, Inception) |" if scored
              else "| w | FID | paper |", "|---|---|---|---|" if scored else "|---|---|---|"]
    for r in fids:
        paper = r.get(paper_column)
        paper = "" if paper is None or (isinstance(paper, float) and math.isnan(paper)) else paper
        cells = [str(r["w"]), number(r["fid"], 2)] + ([f"{r[score_column]:.3f}"] if scored else []) + [str(paper)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_grid(path: str, test, masks: dict, box_evaluation: bool, n: int = 8) -> str:
    """Write mask_grid.png: the first test images, their ground truth and the masks of each method."""
    grid = []
    for i in range(min(n, len(test))):
        item = test[i]
        small = thumbnail(item["image"])
        if box_evaluation:
            scale = small.shape[-1] / test.size
            truth = draw_boxes(to_uint8(small), (item["boxes"].float() * scale).tolist())
        else:
            truth = mask_overlay(small, item["mask"], colour=(40, 255, 40))
        grid.append([to_uint8(small), truth] + [mask_overlay(small, masks[m][i]) for m in GRID_METHODS])
    return save_grid(grid, path, column_titles=["image", "truth"] + list(GRID_METHODS))


def table3_row(dataset: str, rows: list[dict], fids: list[dict], box_evaluation: bool, fid_samples: int,
               n_train: int, n_test: int) -> dict:
    """Return this run's row of Table 3: FID of synthesis at w = 1 and the IoU (%) of the U-Net trained on D_s."""
    unet = next(r for r in rows if r["method"] == "unet_M")
    at_1 = [r for r in fids if r["w"] == 1.0]
    paper_fid, paper_iou = PAPER_TABLE3[dataset]
    return {
        "dataset": dataset, "fid": at_1[0]["fid"] if at_1 else "not computed (w = 1 not in fid_ws)",
        "iou": unet["box_iou"] if box_evaluation else unet["iou"], "paper_fid": paper_fid, "paper_iou": paper_iou,
        "iou_kind": "box IoU (union of the ground-truth boxes)" if box_evaluation else "pixel IoU",
        "fid_features": at_1[0]["features"] if at_1 else "", "fid_samples": fid_samples,
        "n_train": n_train, "n_test": n_test,
    }


def write_table3(rows: list[dict], output_dir: str) -> list[dict]:
    """Write table3.csv (one row per dataset) and table3.md (the paper's Table 3 shape, next to its numbers)."""
    write_csv(rows, os.path.join(output_dir, "table3.csv"))
    by_dataset = {r["dataset"]: r for r in rows}
    head = "| | " + " | ".join(f"{TABLE3_TITLES[d]} FID ↓ | {TABLE3_TITLES[d]} IoU ↑" for d in PAPER_TABLE3) + " |"
    lines = [head, "|---" * (1 + 2 * len(PAPER_TABLE3)) + "|",
             "| Ours (paper, SD v1.4) | " + " | ".join(f"{f} | {i}" for f, i in PAPER_TABLE3.values()) + " |"]
    cells = []
    for d in PAPER_TABLE3:
        r = by_dataset.get(d)
        cells += [number(r["fid"], 1), number(r["iou"], 1)] if r else ["–", "–"]
    lines += ["| this implementation | " + " | ".join(cells) + " |", ""]
    for r in rows:
        features = f"{r['fid_features']}, {r['fid_samples']} samples" if r["fid_features"] else "no feature network"
        lines.append(f"- {TABLE3_TITLES[r['dataset']]}: {r['iou_kind']} of the U-Net trained on D_s "
                     f"({r['n_train']} training, {r['n_test']} test images); FID at w = 1 ({features}).")
    atomic_write(os.path.join(output_dir, "table3.md"), lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    return rows


def collect_table3(runs: list[str], output_dir: str) -> list[dict]:
    """Merge the table3.csv of several runs (one per dataset) into one Table 3 in ``output_dir``; return its rows."""
    import pandas as pd

    rows = []
    for run in runs:
        path = os.path.join(run, "table3.csv")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"missing {path}: run the foba_natural main job with --output_dir {run} first")
        rows += pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")
    seen = [r["dataset"] for r in rows]
    if len(set(seen)) != len(seen):
        raise ValueError(f"several runs report the same dataset ({seen}); pass one run per dataset")
    return write_table3(rows, output_dir)


def refinement_line(output_dir: str, n_images: int, settings: tuple) -> str:
    """Return the results.md lines on the refinement: which Eq. 5 made M, and its speed per image.

    ``settings`` = (scheduler, steps, inpaintings per image, where g is fitted, batch size, device).
    """
    scheduler, steps, samples, fit, batch, device = settings
    where = {"image": "the whole difference map (the paper)", "m_pre": "the difference map inside M_pre,up"}[fit]
    method = (f"Refinement (Eq. 5): |x - x_hat| of {samples} inpainting(s) per image"
              f"{' (the paper: 1)' if int(samples) != 1 else ''}, g fitted on {where}.")
    seconds = stage_seconds(output_dir, ["refine"]).get("refine")
    if seconds is None or not n_images:
        return method + " Refinement throughput: not measured."
    return (f"{method} Refinement throughput: {seconds / n_images:.3f} s per image ({n_images} images, {scheduler} "
            f"with {steps} steps, batch {batch}, on {device}).")


def ablation_lines(rows: list[dict]) -> list[str]:
    """Return the results.md lines that say what the ablation rows present in ``rows`` are."""
    what = {"M_refined_unfinetuned": "M_refined_unfinetuned: the same Eq. 5 with the un-fine-tuned model m (no "
                                     "fine-tuning stage), what fine-tuning contributes.",
            "M_refined_paper_eq5": "M_refined_paper_eq5: the fine-tuned m' with Eq. 5 as the paper states it (one "
                                   "inpainting, g fitted on the whole difference map), beside this run's variant."}
    present = [what[r["method"]] for r in rows if r["method"] in what]
    return ["", " ".join(present)] if present else []


def write_report(output_dir: str, test, n_train: int, box_evaluation: bool, fid_parts: list[str],
                 fid_network=None, fid_samples: int = 0, paper_column: str = "paper_fid",
                 score_column: str = "score", dataset: str | None = None, refine_settings: tuple = (),
                 stages: list[str] = ()) -> list[dict]:
    """Write results.csv/.md, fid.csv, table3.csv/.md (``dataset`` in Table 3), mask_grid.png and timings.json.

    ``test`` is the test split (``splits.SplitImages``), ``fid_parts`` the JSON files of fid.csv rows in order
    (stage folders relative to ``output_dir``); returns the results rows.
    """
    paper_eq5 = len(refine_settings) > 3 and (int(refine_settings[2]), refine_settings[3]) == (1, "image")
    # where M itself is the paper's Eq. 5, an M_refined_paper_eq5 of an earlier run with other settings is left out
    scores, masks = test_masks(output_dir, test, box_evaluation, ("M_refined_paper_eq5",) if paper_eq5 else ())
    rows = [{"method": m, **scores[m]} for m in METHODS if m in scores]
    fids = []
    for part in fid_parts:
        with open(os.path.join(output_dir, part)) as f:
            fids += json.load(f)
    write_csv(rows, os.path.join(output_dir, "results.csv"))
    write_csv(fids, os.path.join(output_dir, "fid.csv"))
    skipped = sum(b is None or len(b) == 0 for b in test.boxes())
    paper_iou = PAPER_TABLE3[dataset][1] if dataset in PAPER_TABLE3 else None
    lines = results_lines(rows, box_evaluation, len(test), skipped, paper_iou)
    lines += fid_lines(fids, fid_network, fid_samples, paper_column, score_column)
    n_refined = n_train + len(test)
    lines += ["", refinement_line(output_dir, n_refined, refine_settings)]
    lines += ablation_lines(rows)
    seconds = stage_seconds(output_dir, stages)
    lines += ["", f"Stage timings (s): {', '.join(f'{k} {v:.0f}' for k, v in seconds.items())}; "
                  f"total {sum(seconds.values()):.0f} s."]
    atomic_write(os.path.join(output_dir, "results.md"), lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    write_json({"seconds": sum(seconds.values()), "timings": seconds}, os.path.join(output_dir, "timings.json"))
    if dataset in PAPER_TABLE3:
        write_table3([table3_row(dataset, rows, fids, box_evaluation, fid_samples, n_train, len(test))], output_dir)
    write_grid(os.path.join(output_dir, "mask_grid.png"), test, masks, box_evaluation)
    print("\n".join(lines), flush=True)
    return rows
