"""Fréchet distance between image sets in the feature space of a TorchScript network (FID, paper Table 3).

The standard network is NVIDIA's TorchScript Inception-v3 ``inception-2015-12-05.pt`` (the
feature extractor of StyleGAN2-ADA and clean-fid): ``net(images, return_features=True)`` with
uint8 images (N, 3, H, W) in [0, 255] of any size (it resizes to 299 internally) returns the
2048-d pool features (N, 2048). It cannot be downloaded here; ``load_feature_network`` takes a
local copy. Any network with the same call works; one with a ``fid_label`` attribute (the toy
feature network of ``foba_core.toy.features``) has its distances reported under that name.
"""

from __future__ import annotations

from pathlib import Path

import torch

from foba_core.metrics import feature_statistics, frechet_distance
from foba_core.visualize import quantise

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
FID_LABEL = "FID"


def load_feature_network(path, device="cpu") -> torch.jit.ScriptModule:
    """Return the TorchScript feature network at ``path`` (e.g. inception-2015-12-05.pt), checked and in eval mode.

    The network must follow the Inception FID call ``net(uint8 (N, 3, H, W), return_features=True)
    -> (N, D)``; a two-image probe checks that. Nothing is downloaded.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"feature network {path} not found. The standard FID network is NVIDIA's TorchScript Inception-v3 "
            f"{INCEPTION_FILE} (used by StyleGAN2-ADA and clean-fid): fetch it on a machine with internet from "
            f"{INCEPTION_URL} and pass its local path; nothing is downloaded here. For the toy world, train one "
            "with foba_core.toy.features.train_toy_feature_network(world, out_path=...)."
        )
    try:
        net = torch.jit.load(str(path), map_location=device)
    except Exception as err:  # torch raises RuntimeError or ValueError for truncated or non-TorchScript files
        raise ValueError(f"{path} is not a TorchScript file that torch.jit.load can read ({err}); "
                         f"re-fetch it ({INCEPTION_URL} for Inception) or re-save it with torch.jit.save") from err
    net.eval()
    try:
        with torch.no_grad():
            probe = net(torch.zeros(2, 3, 32, 32, dtype=torch.uint8, device=device), return_features=True)
    except Exception as err:
        raise ValueError(f"{path} does not accept the FID call net(uint8 images (N, 3, H, W), return_features=True) "
                         f"({err})") from err
    if not torch.is_tensor(probe) or probe.ndim != 2 or probe.shape[0] != 2:
        shape = tuple(probe.shape) if torch.is_tensor(probe) else type(probe).__name__
        raise ValueError(f"{path}: net(images, return_features=True) must return features (N, D), got {shape}")
    return net


def _device(network) -> torch.device:
    return next(iter(network.parameters()), torch.empty(0)).device


@torch.no_grad()
def extract_features(network, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Return the feature vectors (N, D) float64 of images (float in [0, 1] or uint8) under the FID network."""
    images, device = quantise(images), _device(network)
    out = [network(images[i:i + batch_size].to(device), return_features=True).double().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def fid(network, images_a: torch.Tensor, images_b: torch.Tensor, batch_size: int = 64) -> float:
    """Return the Fréchet distance between the Gaussians fitted to the features of two image sets (FID)."""
    stats_a = feature_statistics(extract_features(network, images_a, batch_size))
    stats_b = feature_statistics(extract_features(network, images_b, batch_size))
    return frechet_distance(*stats_a, *stats_b)


def fid_label(network) -> str:
    """Return the name to report a distance under: the network's own ``fid_label`` attribute, else "FID"."""
    return str(getattr(network, "fid_label", FID_LABEL))


