"""Toy-only evaluation that the foba_toy bundle attaches to the main job: what the toy feature network can tell.

The toy feature network (``foba_core.toy.features``) is a classifier of the toy classes
plus an object-free class, so besides FID features it scores P(an object is present) of any image
(``object_score``). The guidance stage takes it as its ``scorer``; :func:`object_rows` adds the fid.csv rows
that put those scores in context: the background samples (w = -1), the real scenes, and object-free toy
textures through the VAE (what a perfect background sample scores after the decoder).
"""

from __future__ import annotations

import math

import torch

from foba_core.diffusion import reconstruct
from foba_core.fid import fid_label
from foba_core.toy.features import object_score
from foba_core.toy.world import toy_backgrounds

VAE_BACKGROUNDS = "vae_reconstruction_backgrounds"  # fid.csv row: object-free toy textures through the VAE


def object_rows(pipe, network, backgrounds: torch.Tensor, real, n_real: int, seed: int,
                paper_column: str = "paper_cub_fid") -> list[dict]:
    """Return the fid.csv rows of object scores: background samples (w = -1), real scenes, VAE backgrounds."""
    label = fid_label(network)
    real_images = torch.stack([real[i]["image"] for i in range(min(n_real, len(real)))])
    textures = reconstruct(pipe, toy_backgrounds(len(backgrounds), seed, domain=real.domain))  # the scenes' domain

    def row(w, fid: float, images: torch.Tensor) -> dict:
        return {"w": w, "fid": fid, "object_score": float(object_score(network, images).mean()),
                "features": label, paper_column: None}

    return [row(-1.0, math.nan, backgrounds), row("real", 0.0, real_images), row(VAE_BACKGROUNDS, math.nan, textures)]
