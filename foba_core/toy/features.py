"""The toy feature network: a small CNN classifier of toy scenes that stands in for Inception on the toy world.

It follows Inception's FID call, ``net(uint8 images (N, 3, H, W), return_features=True) -> (N, D)``, so
``foba_core.fid`` measures with it as with the real network, but its distances are NOT comparable to
Inception FIDs: it reports them under ``FID_LABEL_TOY`` (its ``fid_label`` attribute). Trained with an
object-free class besides the toy classes, it also tells whether an object is present (:func:`object_score`),
which the toy bundle attaches to the guidance stage.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from foba_core.seeds import derive_seed
from foba_core.visualize import quantise

FID_LABEL_TOY = "FID (toy feature network, not Inception)"
BACKGROUND_CLASS = "background"


class ToyFeatureNet(torch.nn.Module):
    """A small CNN classifier of toy scenes with Inception's FID call: ``net(uint8 (N, 3, H, W), return_features)``.

    Images are resized to ``image_size`` inside; the features are the global-average-pooled last
    convolution (N, ``feature_dim``), the logits a linear layer on top over ``classes``.
    """

    def __init__(self, classes: list[str], image_size: int = 32, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.classes = list(classes)
        self.image_size = int(image_size)
        self.fid_label = FID_LABEL_TOY  # its distances are no Inception FIDs (foba_core.fid.fid_label)

        def block(c_in: int, c_out: int) -> torch.nn.Sequential:
            return torch.nn.Sequential(torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.BatchNorm2d(c_out),
                                       torch.nn.SiLU(), torch.nn.Conv2d(c_out, c_out, 3, padding=1),
                                       torch.nn.BatchNorm2d(c_out), torch.nn.SiLU())

        self.body = torch.nn.Sequential(block(3, width), torch.nn.MaxPool2d(2), block(width, 2 * width),
                                        torch.nn.MaxPool2d(2), block(2 * width, feature_dim))
        self.head = torch.nn.Linear(feature_dim, len(self.classes))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if x.shape[1] != 3:
            raise ValueError("ToyFeatureNet expects RGB images (N, 3, H, W) with values in [0, 255]")
        x = x.float() / 255.0  # (N, 3, H, W) in [0, 1]
        if x.shape[-2] != self.image_size or x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=[self.image_size, self.image_size], mode="bilinear", align_corners=False)
        features = self.body(x * 2 - 1).mean(dim=(2, 3))  # (N, D)
        if return_features:
            return features
        return self.head(features)  # (N, classes) logits


def _save_script(module: torch.jit.ScriptModule, out_path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    torch.jit.save(module, str(tmp))
    os.replace(tmp, out_path)
    return out_path


def random_blur(images: torch.Tensor, max_sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Return images (B, C, H, W) each blurred by a Gaussian of its own sigma drawn uniformly from [0, max_sigma]."""
    if max_sigma <= 0:
        return images
    b, c, h, w = images.shape
    sigma = torch.rand(b, generator=generator) * max_sigma + 1e-3  # (B,)
    radius = max(1, math.ceil(2 * max_sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-x[None] ** 2 / (2 * sigma[:, None] ** 2))  # (B, K)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0).to(images)  # (B*C, K)
    out = F.pad(images.reshape(1, b * c, h, w), (radius,) * 4, mode="reflect")
    out = F.conv2d(out, kernel[:, None, None, :], groups=b * c)  # along x
    out = F.conv2d(out, kernel[:, None, :, None], groups=b * c)  # along y
    return out.reshape(b, c, h, w)


def train_toy_feature_network(world, steps: int = 1500, seed: int = 0, out_path=None, batch_size: int = 64,
                              lr: float = 2e-3, device=None, max_blur: float = 1.0,
                              **net_kwargs) -> torch.jit.ScriptModule:
    """Return the toy feature network (TorchScript) trained to classify the toy classes and background-only scenes.

    ``world`` is a ToyWorld split (items with ``image`` and ``label``); every batch also holds
    background-only images of the world's textures (its domain's; class ``"background"``), as many as an object
    class on average. Every training image is blurred by a Gaussian of random sigma in [0, ``max_blur``]
    pixels, so that the network judges objects and textures, not sharpness: an LDM's samples all pass
    through its VAE decoder, which blurs. Saved atomically to ``out_path`` when given.
    """
    from foba_core.toy.world import random_background

    classes = [*world.classes, BACKGROUND_CLASS]
    size = world.image_size
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                          else "cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ToyFeatureNet(classes, image_size=size, **net_kwargs)
    net.to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    rng = np.random.default_rng(derive_seed(seed, "feature batches"))  # which images, which backgrounds
    n_background = max(1, batch_size // len(classes))
    blur_generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        items = [world[int(i)] for i in rng.integers(len(world), size=batch_size - n_background)]
        backgrounds = [random_background(rng, size, world.domain)[1] for _ in range(n_background)]  # (H, W, 3)
        images = torch.cat([torch.stack([it["image"] for it in items]),
                            torch.from_numpy(np.stack(backgrounds)).permute(0, 3, 1, 2)])  # (B, 3, H, W)
        images = random_blur(images, max_blur, blur_generator)
        labels = torch.tensor([classes.index(it["label"]) for it in items] + [len(classes) - 1] * n_background)
        logits = net(quantise(images).to(device))
        loss = F.cross_entropy(logits, labels.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    scripted = torch.jit.script(net.eval().cpu())
    if out_path is not None:
        _save_script(scripted, out_path)
    return scripted


@torch.no_grad()
def object_score(network, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Return P(an object, not background only, is present) (N,) for each image under the toy feature network."""
    classes = list(getattr(network, "classes", []))
    if BACKGROUND_CLASS not in classes:
        raise ValueError(f"object_score needs a classifier with a {BACKGROUND_CLASS!r} class (the toy feature "
                         f"network of train_toy_feature_network); this network has classes {classes or 'none'}")
    images, device = quantise(images), next(iter(network.parameters()), torch.empty(0)).device
    probs = torch.cat([network(images[i:i + batch_size].to(device)).float().softmax(-1).cpu()
                       for i in range(0, len(images), batch_size)])  # (N, classes)
    return 1 - probs[:, classes.index(BACKGROUND_CLASS)]
