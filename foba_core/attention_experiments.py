"""Experiments on the heat maps M̂ of stage 1 (paper Sec. 3, Eq. 3-4), each a stage of its own (configs/experiments/).

- :class:`T0Sweep`: the AUC-ROC of M̂ against T0 = 1 ... 50 (paper Fig. 3);
- :class:`MonteCarlo`: the AUC-ROC of Eq. 3 with its expectation estimated from N noise draws per timestep
  (supplement Sec. 3, supp. Fig. 2);
- :class:`TokenAUC`: the AUC-ROC of M̂ of every token of the prompt and of the inverted start-of-text map
  (supplement Sec. 6, supp. Fig. 3).

Each takes the first ``n_images`` images of a split (``foba_core.splits.SplitImages``, at the model's resolution) and
their ground truth: pixel masks, or each image's boxes filled (``outputs.box_masks``) where a data set has boxes only.
Each image's q_sample noise comes from the generator stage 1 seeds for it, ``derive_seed(seed, "q_sample", id)``.
M̂ is scored as stage 1 scores it: bilinearly upsampled to the ground truth, the per-image AUC-ROC averaged over the
images whose ground truth has both classes (``auc_roc``) and the pooled AUC-ROC of every pixel (``auc_roc_pooled``).
``run()`` writes a CSV, a PNG plot and ``metrics.json`` into ``folder`` and keeps the metrics in ``metrics``.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from foba_core import validate
from foba_core.capture import authors_timesteps, token_indices
from foba_core.diffusion import text_token_mask
from foba_core.io import write_csv, write_json
from foba_core.masks import normalise
from foba_core.metrics import auc_roc
from foba_core.outputs import box_masks
from foba_core.preliminary import image_heat_maps
from foba_core.seeds import derive_seed
from foba_core.visualize import save_plot


def ground_truth(item: dict) -> torch.Tensor:
    """Return an item's foreground (S, S) bool: its mask, else its boxes filled (the data sets with boxes only)."""
    if item["mask"] is not None:
        return item["mask"]
    if item["boxes"] is not None:
        return box_masks([item["boxes"]], item["image"].shape[-1])[0]
    raise ValueError(f"image {item['id']!r} has neither a mask nor boxes: the experiments score M̂ against them")


def auc_scores(maps: torch.Tensor, truths: torch.Tensor) -> tuple[float, float]:
    """Return (mean per-image AUC-ROC, pooled AUC-ROC) of heat maps (N, h, w) against ground truth (N, S, S).

    The maps are upsampled bilinearly to S x S; images whose ground truth has one class only have no AUC-ROC and are
    left out of the mean (nan when none is left), not out of the pooled score.
    """
    up = F.interpolate(maps[:, None].float(), size=truths.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    both = [i for i, t in enumerate(truths) if t.any() and not t.all()]
    per_image = [auc_roc(up[i], truths[i]) for i in both]
    return (float(np.mean(per_image)) if per_image else math.nan), auc_roc(up, truths)


def t0_sums(per_timestep: torch.Tensor, grid: list[int], t0s: list[int], num_train_timesteps: int) -> torch.Tensor:
    """Return M̂ for each T0 of ``t0s`` (len(t0s), ..., h, w): the per-timestep maps (..., T, h, w) over ``grid``
    summed over the timesteps ``authors_timesteps(T0)`` (Eq. 4).

    ``authors_timesteps(T0)`` holds the lowest T0 timesteps of the 50-step grid (1, 21, ..., 1 + 20 (T0 - 1)), so the
    grid of the largest T0 holds every smaller one (its last T0 entries, not its first): one extraction serves all.
    """
    out = []
    for t0 in t0s:
        wanted = authors_timesteps(t0, num_train_timesteps)
        missing = sorted(set(wanted) - set(grid))
        if missing:
            raise ValueError(f"T0 = {t0} needs the timesteps {missing}, which the extraction grid lacks")
        out.append(per_timestep[..., [grid.index(t) for t in wanted], :, :].sum(-3))
    return torch.stack(out)


def _image_tokens(pipe, prompt: str) -> tuple[list[str], list[bool]]:
    """Return the prompt's tokens (start of text, words, end of text) and whether the U-Net's cross-attention sees
    each (a model with a key mask hides the end-of-text token, ``diffusion.text_token_mask``)."""
    enc = pipe.tokenizer(prompt, truncation=True, max_length=pipe.tokenizer.model_max_length)
    tokens = [t.replace("</w>", "") for t in pipe.tokenizer.convert_ids_to_tokens(enc["input_ids"])]
    seen = [True] * len(tokens)
    if getattr(pipe, "text_attention_mask", False):  # the key mask hides the end-of-text token (and padding)
        seen = text_token_mask(torch.tensor([enc["attention_mask"]]))[0].bool().tolist()
    return tokens, seen


def _save_plot(draw, path: str, xlabel: str, ylabel: str, title: str) -> str:
    """Draw with ``draw(ax)``, label the axes, grid and legend, and write the PNG (``visualize.save_plot``)."""

    def labelled(ax):
        draw(ax)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()

    return save_plot(labelled, path)


def _listed(values, name: str) -> list:
    """Return ``values`` as a non-empty list (a config's list or tuple)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__") or not list(values):
        raise ValueError(f"--{name} must be a non-empty list, got {values!r}")
    return list(values)


class _Experiment:
    """The shared parts: the split's first ``n_images`` images, their prompts' object words, the output folder."""

    name = ""

    def __init__(self, pipe, split, folder: str, n_images: int, word: str | None, seed: int,
                 budget_bytes: float | None):
        self.pipe, self.split, self.folder, self.word = pipe, split, folder, word
        self.n_images = validate.integer(n_images, f"{self.name}_images", 1, len(split))
        self.seed, self.budget = int(seed), budget_bytes
        self.n_train = pipe.scheduler.config.num_train_timesteps
        self.metrics: dict = {}

    def items(self):
        """Yield (item, ground truth (S, S), object-word token indices) of the first ``n_images`` images."""
        for i in tqdm(range(self.n_images), desc=self.name, mininterval=2):
            item = self.split[i]
            word = self.word if self.word is not None else item["label"]
            yield item, ground_truth(item), token_indices(self.pipe.tokenizer, item["caption"], [word])

    def maps(self, item: dict, targets: list[list[int]], timesteps: list[int], **kwargs):
        """Return ``image_heat_maps`` of one item, its noise seeded as stage 1 seeds it."""
        seed = derive_seed(self.seed, "q_sample", str(item["id"]))
        return image_heat_maps(self.pipe, item["image"], item["caption"], targets, timesteps, seed,
                               budget_bytes=self.budget, **kwargs)

    def finish(self, rows: list[dict], metrics: dict) -> dict:
        """Write the CSV and ``metrics.json``, keep the metrics and return them."""
        write_csv(rows, os.path.join(self.folder, f"{self.name}.csv"))
        write_json(metrics, os.path.join(self.folder, "metrics.json"))
        self.metrics = metrics
        return metrics


class T0Sweep(_Experiment):
    """Paper Fig. 3: the AUC-ROC of M̂ for T0 = 1 ... ``t0_max`` from one extraction per image.

    Each image's per-timestep maps over the authors' grid of ``t0_max`` (981, 961, ..., 1 for 50) are captured once;
    M̂ of a T0 sums those of its own grid, the lowest T0 timesteps (:func:`t0_sums`). Writes ``t0_sweep.csv``
    (t0, auc_roc, auc_roc_pooled), ``t0_sweep.png`` and ``metrics.json``: the AUC-ROC at T0 = 1, at the main job's
    ``t0`` and the largest, with the T0 where it is reached.
    """

    name = "t0_sweep"

    def __init__(self, pipe, split, folder: str, n_images: int = 128, t0_max: int = 50, t0: int = 40,
                 word: str | None = None, seed: int = 0, budget_bytes: float | None = None):
        super().__init__(pipe, split, folder, n_images, word, seed, budget_bytes)
        self.t0_max = validate.integer(t0_max, "t0_sweep_max", 1, validate.AUTHORS_GRID)
        self.t0 = validate.integer(t0, "t0", 1, validate.AUTHORS_GRID)
        if self.t0 > self.t0_max:
            raise ValueError(f"--t0_sweep_max {t0_max} is below --t0 {t0}: the sweep reports the AUC-ROC at the main "
                             f"job's T0; pass --t0_sweep_max {t0} or more")

    def run(self) -> dict:
        """Sweep T0, write the outputs and return the metrics."""
        grid = authors_timesteps(self.t0_max, self.n_train)
        t0s = list(range(1, self.t0_max + 1))
        maps, truths = [], []
        for item, truth, targets in self.items():
            per_t = self.maps(item, targets, grid, per_timestep=True).per_timestep[0, :, 0].float().cpu()  # (T, h, w)
            maps.append(t0_sums(per_t, grid, t0s, self.n_train))  # (len(t0s), h, w)
            truths.append(truth)
        maps, truths = torch.stack(maps, 1), torch.stack(truths)  # (len(t0s), N, h, w), (N, S, S)
        rows = []
        for t0, m in zip(t0s, maps):
            mean, pooled = auc_scores(m, truths)
            rows.append({"t0": t0, "auc_roc": mean, "auc_roc_pooled": pooled})
        best = max(rows, key=lambda r: r["auc_roc"])
        metrics = {"auc_roc_t0_1": rows[0]["auc_roc"], "auc_roc_t0_default": rows[self.t0 - 1]["auc_roc"],
                   "auc_roc_max": best["auc_roc"], "t0_of_max": best["t0"], "n_images": self.n_images}

        def draw(ax):
            ax.plot(t0s, [r["auc_roc"] for r in rows], marker=".", label="mean per-image AUC-ROC")
            ax.plot(t0s, [r["auc_roc_pooled"] for r in rows], marker=".", label="pooled AUC-ROC")
            ax.axvline(self.t0, color="grey", linestyle="--", label=f"main job's T0 = {self.t0}")

        _save_plot(draw, os.path.join(self.folder, "t0_sweep.png"), "T0 (timesteps summed, Eq. 4)",
                   "AUC-ROC of M̂", f"AUC-ROC against T0 ({self.n_images} images; paper Fig. 3)")
        return self.finish(rows, metrics)


class MonteCarlo(_Experiment):
    """Supplement Sec. 3, supp. Fig. 2: the AUC-ROC of M̂ with Eq. 3's expectation over the noise estimated from N
    draws per timestep, for each N of ``n_samples`` and each T0 of ``t0s``.

    Each image's maps come from ``seeds`` x max(N) independent q_sample draws of every timestep of the grid of the
    largest T0 (one extraction; smaller T0 sum the lowest timesteps, :func:`t0_sums`). The draws are cut into
    disjoint groups of N, each group's mean one estimate of Eq. 3 (N = 1: Eq. 4, what stage 1 computes), so an N
    has floor(``seeds`` x max(N) / N) independent estimates. Writes ``monte_carlo.csv`` (t0, n_samples, n_seeds and the
    mean and standard deviation over them of the mean per-image and of the pooled AUC-ROC), ``monte_carlo.png`` and
    ``metrics.json``.
    """

    name = "monte_carlo"

    def __init__(self, pipe, split, folder: str, n_images: int = 8, n_samples: list[int] = (1, 2, 4, 8),
                 seeds: int = 4, t0s: list[int] = (1, 40), word: str | None = None, seed: int = 0,
                 budget_bytes: float | None = None):
        super().__init__(pipe, split, folder, n_images, word, seed, budget_bytes)
        self.n_samples = sorted({validate.integer(n, "monte_carlo_n") for n in _listed(n_samples, "monte_carlo_n")})
        self.t0s = sorted({validate.integer(t, "monte_carlo_t0s", 1, validate.AUTHORS_GRID)
                           for t in _listed(t0s, "monte_carlo_t0s")})
        self.seeds = validate.integer(seeds, "monte_carlo_seeds", 2)

    def run(self) -> dict:
        """Estimate Eq. 3 for every N and T0, write the outputs and return the metrics."""
        grid = authors_timesteps(max(self.t0s), self.n_train)
        pool = self.seeds * max(self.n_samples)
        estimates = {(t0, n): [] for t0 in self.t0s for n in self.n_samples}  # -> per image (pool // n, h, w)
        truths = []
        for item, truth, targets in self.items():
            per_t = self.maps(item, targets, grid, samples=pool, per_timestep=True).per_timestep[:, :, 0]
            draws = t0_sums(per_t.float().cpu(), grid, self.t0s, self.n_train)  # (len(t0s), pool, h, w)
            for t0, d in zip(self.t0s, draws):
                for n in self.n_samples:
                    groups = pool // n
                    estimates[t0, n].append(d[:groups * n].reshape(groups, n, *d.shape[-2:]).mean(1))  # Eq. 3
            truths.append(truth)
        truths = torch.stack(truths)
        rows = []
        for (t0, n), per_image in estimates.items():
            scores = np.array([auc_scores(group, truths) for group in torch.stack(per_image, 1)])  # (groups, 2)
            rows.append({"t0": t0, "n_samples": n, "n_seeds": len(scores),
                         "auc_roc_mean": scores[:, 0].mean(), "auc_roc_std": scores[:, 0].std(ddof=1),
                         "auc_roc_pooled_mean": scores[:, 1].mean(), "auc_roc_pooled_std": scores[:, 1].std(ddof=1)})
        metrics = {f"{key}_t0_{r['t0']}_n_{r['n_samples']}": r[key] for r in rows
                   for key in ("auc_roc_mean", "auc_roc_std")}

        def draw(ax):
            for t0 in self.t0s:
                sel = [r for r in rows if r["t0"] == t0]
                ax.errorbar([r["n_samples"] for r in sel], [r["auc_roc_mean"] for r in sel],
                            yerr=[r["auc_roc_std"] for r in sel], marker="o", capsize=4, label=f"T0 = {t0}")
            ax.set_xscale("log", base=2)
            ax.set_xticks(self.n_samples, [str(n) for n in self.n_samples])

        _save_plot(draw, os.path.join(self.folder, "monte_carlo.png"), "N, noise draws per timestep (Eq. 3)",
                   "mean per-image AUC-ROC of M̂ (± std over seeds)",
                   f"Monte-Carlo Eq. 3 ({self.n_images} images; supp. Fig. 2)")
        return self.finish(rows, {**metrics, "n_images": self.n_images})


class TokenAUC(_Experiment):
    """Supplement Sec. 6, supp. Fig. 3: the AUC-ROC of M̂ of every token of the prompt, one extraction per image.

    Every token of the tokenised prompt (start of text, the words, end of text) is a target of its own, so one
    capture yields all their maps, summed over ``timesteps`` (stage 1's: with the same seed the object word's map is
    stage 1's M̂). A token the U-Net's cross-attention does not see (end of text under a model's key mask) has no
    map and no score. The inverted start-of-text map is 1 - its per-image min-max normalisation. Writes
    ``token_auc.csv`` (token_index, token: the token's texts over the images, attended, object: the fraction of
    images where the token is the object word's, n_images, auc_roc, auc_roc_pooled), ``token_auc.png`` and
    ``metrics.json``.
    """

    name = "token_auc"

    def __init__(self, pipe, split, folder: str, n_images: int = 256, t0: int = 40,
                 timesteps: list[int] | None = None, word: str | None = None, seed: int = 0,
                 budget_bytes: float | None = None):
        super().__init__(pipe, split, folder, n_images, word, seed, budget_bytes)
        validate.check_timesteps(t0, timesteps)
        self.timesteps = list(timesteps) if timesteps is not None else authors_timesteps(t0, self.n_train)

    def run(self) -> dict:
        """Score every token's map, write the outputs and return the metrics."""
        positions: dict[int, dict] = {}  # token index -> its texts over the images, attended, object flags, maps
        inverted = {"maps": [], "truths": []}
        for item, truth, targets in self.items():
            tokens, seen = _image_tokens(self.pipe, item["caption"])
            one_hot = [[k] for k in range(len(tokens))]  # every token a target of its own
            total = self.maps(item, one_hot, self.timesteps).total[0].float().cpu()  # (n_tokens, h, w)
            for k, token in enumerate(tokens):
                rec = positions.setdefault(k, {"texts": set(), "seen": True, "object": [], "maps": [], "truths": []})
                rec["texts"].add(token)
                rec["seen"] &= seen[k]
                rec["object"].append(k in targets[0])
                rec["maps"].append(total[k])
                rec["truths"].append(truth)
            sot = total[0]
            inverted["maps"].append(1 - normalise(sot))
            inverted["truths"].append(truth)
        rows = [_token_row(k, "|".join(sorted(r["texts"])), r["seen"], float(np.mean(r["object"])), r["maps"],
                           r["truths"]) for k, r in sorted(positions.items())]
        start = rows[0]["token"]
        rows.append(_token_row(0, f"inverted {start}", True, 0.0, inverted["maps"], inverted["truths"]))
        tokens, objects = rows[:-1], [r for r in rows[:-1] if r["object"] == 1.0]
        best = max((r for r in tokens if r["attended"]), key=lambda r: r["auc_roc"])
        metrics = {"auc_roc_best_token": best["auc_roc"], "best_token_index": best["token_index"],
                   "best_token_is_object": float(best["object"] == 1.0),
                   "auc_roc_object": max((r["auc_roc"] for r in objects), default=math.nan),
                   "auc_roc_start": rows[0]["auc_roc"], "auc_roc_start_inverted": rows[-1]["auc_roc"],
                   "n_images": self.n_images}

        def draw(ax):
            # a position whose word changes from image to image but is always the object word: "<object word>"
            labels = [f"{r['token_index']}: {'<object word>' if r in objects and '|' in r['token'] else r['token']}"
                      for r in tokens] + [f"1 - {start}"]
            colours = ["tab:red" if r in objects else "tab:blue" for r in tokens] + ["tab:gray"]
            ax.bar(range(len(rows)), [0 if math.isnan(r["auc_roc"]) else r["auc_roc"] for r in rows], color=colours)
            ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right")
            ax.axhline(0.5, color="black", linewidth=0.8, linestyle=":", label="chance")
            ax.set_ylim(0, 1)

        _save_plot(draw, os.path.join(self.folder, "token_auc.png"), "prompt token (not attended: no bar)",
                   "mean per-image AUC-ROC of M̂", f"AUC-ROC per token ({self.n_images} images; supp. Fig. 3)")
        return self.finish(rows, metrics)


def _token_row(index: int, token: str, attended: bool, objects: float, maps: list, truths: list) -> dict:
    """Return a row of ``token_auc.csv``: a token's maps (h, w) scored against the images' ground truth (S, S)."""
    mean, pooled = auc_scores(torch.stack(maps), torch.stack(truths)) if attended else (math.nan, math.nan)
    return {"token_index": index, "token": token, "attended": attended, "object": objects, "n_images": len(maps),
            "auc_roc": mean, "auc_roc_pooled": pooled}
