"""What the fine-tuned model m' synthesises: the synthetic training set D'_s and the guidance/FID rows (paper Sec. 3-4).

- :func:`synthesise`: images under foreground/background guidance w (supplement Eq. 4), spread evenly over the
  object words (one word for real data; the toy world's six classes).
- :func:`synthetic_set`: D'_s, images synthesised under y_f (w = 1) labelled by repeating the pipeline on them
  (stage 1 with the same model, then the refined masks of Eq. 5), at the U-Net's side.
- :func:`guidance_rows`: FID of synthesis at each w against real images, the VAE-reconstruction reference row,
  and the background samples of w = -1, with optional extra scores (the toy bundle attaches its object score).
Long loops are stored in chunks (``outputs.cached``), so an interrupted stage resumes chunk by chunk.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from foba_core.guidance import sample_images
from foba_core.metrics import feature_statistics, frechet_distance
from foba_core.outputs import cached
from foba_core.prompts import object_prompt
from foba_core.seeds import derive_seed

FID_NOT_COMPUTED = "not computed (pass --fid_network)"
VAE_RECONSTRUCTION = "vae_reconstruction"  # fid.csv row: real images encoded and decoded by the VAE alone


def chunked(cache_dir: str, name: str, n: int, chunk_size: int, compute) -> dict:
    """Return ``compute(a, b)`` over the chunks [a, b) of n items, each stored in ``cache_dir``, joined per key."""
    prefix = f"{name}_" if name else ""
    parts = [cached(os.path.join(cache_dir, f"{prefix}{a:07d}-{b:07d}.safetensors"), lambda a=a, b=b: compute(a, b))
             for a, b in ((a, min(a + chunk_size, n)) for a in range(0, n, chunk_size))]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def synthesise(pipe, n: int, w: float, words: list[str], seed: int, **sample_kwargs) -> tuple[torch.Tensor, list]:
    """Return ``n`` images (n, 3, H, W) synthesised with fg/bg guidance scale ``w`` and their object words.

    The images are spread evenly over ``words`` (word k from ``derive_seed(seed, "word", k)``); ``sample_kwargs`` go to
    ``guidance.sample_images`` (scheduler, num_inference_steps, batch_size).
    """
    per_word = [n // len(words) + (k < n % len(words)) for k in range(len(words))]
    images, labels = [], []
    for k, (word, m) in enumerate(zip(words, per_word)):
        if m:
            images.append(sample_images(pipe, m, w, object_prompt(word), seed=derive_seed(seed, "word", k),
                                        **sample_kwargs))
            labels += [word] * m
    return torch.cat(images), labels


def synthetic_set(pipe, n: int, words: list[str], stage1_step, refine_step, size: int, seed: int,
                  cache_dir: str, chunk_size: int = 256, **sample_kwargs) -> dict:
    """Return D'_s: {"images" (n, 3, s, s), "masks" (n, s, s)} at the U-Net's side ``size`` (Sec. 3).

    Chunk [a, b) is synthesised from ``derive_seed(seed, "synthetic", a)`` under y_f (w = 1); ``stage1_step`` (a
    ``Stage1Step``) gives its M_pre, ``refine_step.masks_of`` its refined masks M (as a split named "synthetic").
    """
    from foba_core.segment import resize_images, resize_masks

    def compute(start: int, stop: int) -> dict:
        images, labels = synthesise(pipe, stop - start, 1.0, words, derive_seed(seed, "synthetic", start),
                                    **sample_kwargs)
        m_pre = []
        for s in range(0, len(images), 32):
            items = [{"image": images[k], "caption": object_prompt(labels[k]), "label": labels[k],
                      "id": f"synthetic-{start + k}"} for k in range(s, min(s + 32, len(images)))]
            m_pre.append(stage1_step(None, items)["m_pre"])
        m_pre = torch.cat(m_pre)  # (B, h, w)
        batch = refine_step.batch_size
        masks = torch.cat([refine_step.masks_of(images[s:s + batch], m_pre[s:s + batch], start + s, "synthetic")
                           for s in range(0, len(images), batch)])
        return {"images": resize_images(images, size), "masks": resize_masks(masks, size)}

    return chunked(cache_dir, "", n, chunk_size, compute)


def _features(network, images: torch.Tensor, scorer: Callable | None) -> dict:
    from foba_core.fid import extract_features

    out = {"features": extract_features(network, images)}
    if scorer is not None:
        out["score"] = scorer(images)
    return out


def guidance_rows(pipe, network, real, ws, n_samples: int, words: list[str], seed: int, cache_dir: str,
                  paper: dict | None = None, paper_column: str = "paper_fid", scorer: Callable | None = None,
                  score_column: str = "score", chunk_size: int = 256, **sample_kwargs) -> list[dict]:
    """Return the rows of fid.csv: FID of ``n_samples`` syntheses at each w against real images, and the VAE row.

    ``real`` is a dataset of items (the first ``min(n_samples, len(real))`` are used); ``paper`` maps w to the
    paper's FID (column ``paper_column``); ``scorer`` (images -> (N,) scores) adds their mean in
    ``score_column``. Without ``network`` every row says ``FID_NOT_COMPUTED``.
    """
    from foba_core.diffusion import reconstruct
    from foba_core.fid import fid_label

    paper = {float(k): v for k, v in (paper or {}).items()}
    if network is None:
        return [{"w": w, "fid": FID_NOT_COMPUTED, "features": "", paper_column: paper.get(float(w))} for w in ws]
    label = fid_label(network)
    n_real = min(n_samples, len(real))

    def real_images(a: int, b: int) -> torch.Tensor:
        return torch.stack([real[i]["image"] for i in range(a, b)])

    def joined(name: str, n: int, compute) -> dict:
        return chunked(cache_dir, name, n, chunk_size, compute)

    real_stats = feature_statistics(joined("real", n_real, lambda a, b: _features(
        network, real_images(a, b), None))["features"])

    def row(w, computed: dict) -> dict:
        out = {"w": w, "fid": frechet_distance(*real_stats, *feature_statistics(computed["features"]))}
        if "score" in computed:
            out[score_column] = float(computed["score"].float().mean())
        return {**out, "features": label, paper_column: paper.get(float(w)) if w != VAE_RECONSTRUCTION else None}

    rows = [row(w, joined(f"w{w:g}", n_samples, lambda a, b, w=w: _features(
        network, synthesise(pipe, b - a, w, words, derive_seed(seed, "samples", a), **sample_kwargs)[0], scorer)))
        for w in ws]  # the same starting noise at every w
    # the same real images through the VAE alone: what the decoder lets any sample reach
    rows.append(row(VAE_RECONSTRUCTION, joined("vae_reconstruction", n_real, lambda a, b: _features(
        network, reconstruct(pipe, real_images(a, b)), scorer))))
    return rows
