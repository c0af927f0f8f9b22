"""Binary masks from heat maps: the GMM binariser g, the orphan-pixel mean filter, the preliminary
masks M_pre (paper Sec. 3), the refined masks M (Eq. 5) and the M_crop ablation (supplement Sec. 5).

Heat maps are float tensors, masks bool tensors. Every map is binarised on its own (instance-wise):
one Gaussian mixture per map, fitted on the map's finite values.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from monai.utils import look_up_option
from sklearn.base import BaseEstimator
from sklearn.mixture import GaussianMixture
from sklearn.utils.validation import check_is_fitted

FOREGROUND_RULES = ("max_mean", "not_min_mean")


def _numpy(values) -> np.ndarray:
    """``values`` as a float64 numpy array (tensors are detached and moved to the CPU)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().to(torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


class GMMBinarizer(BaseEstimator):
    """Gaussian-mixture binariser of one map's values: the paper's g (Sec. 3, Eq. 5).

    A ``GaussianMixture`` with ``n_components`` components is fitted on the finite values of one map
    (a single feature, standardised for numerical stability). ``foreground`` chooses which components
    are foreground: ``"max_mean"`` the component with the highest mean (the paper's bimodal rule; with
    ``n_components=3`` the brightest of three, e.g. background / lung field / finding in chest X-rays),
    ``"not_min_mean"`` every component except the darkest one.

    The decision is a threshold on the value, so the mask is monotone in the map: a pixel is foreground
    when its value is at least ``threshold_``, the lowest observed value between the two neighbouring
    component means that the mixture assigns to a foreground component. (Assigning by posterior alone
    can label values *below* the background mean as foreground when the foreground component is much
    wider.) Non-finite values are never foreground. With fewer than ``n_components`` distinct finite
    values (e.g. a constant map) the fit warns and every value is predicted background.
    """

    def __init__(self, n_components: int = 2, random_state: int | None = 0, foreground: str = "max_mean"):
        self.n_components = n_components
        self.random_state = random_state
        self.foreground = foreground

    def fit(self, values) -> GMMBinarizer:
        """Return self, fitted on the finite entries of ``values`` (any shape)."""
        if not isinstance(self.n_components, (int, np.integer)) or self.n_components < 2:
            raise ValueError(f"GMMBinarizer: n_components must be an integer >= 2, got {self.n_components!r}")
        look_up_option(self.foreground, FOREGROUND_RULES)
        x = _numpy(values).ravel()
        x = x[np.isfinite(x)]
        distinct = np.unique(x)
        if distinct.size < self.n_components:
            warnings.warn(
                f"GMMBinarizer: the map has {distinct.size} distinct finite value(s), fewer than "
                f"n_components={self.n_components}; every pixel is predicted background",
                stacklevel=2,
            )
            self.gmm_, self.means_, self.threshold_ = None, None, np.inf
            return self
        centre, scale = x.mean(), x.std()
        z = (x - centre) / scale  # standardised values: reg_covar then means the same for every map scale
        gmm = GaussianMixture(n_components=self.n_components, random_state=self.random_state).fit(z[:, None])
        order = np.argsort(gmm.means_.ravel())  # component indices, darkest first
        first_fg = self.n_components - 1 if self.foreground == "max_mean" else 1
        low, high = gmm.means_.ravel()[order[first_fg - 1]], gmm.means_.ravel()[order[first_fg]]
        z_distinct = (distinct - centre) / scale
        between = z_distinct[(z_distinct >= low) & (z_distinct <= high)]  # ascending
        is_fg = np.isin(gmm.predict(between[:, None]), order[first_fg:]) if between.size else np.zeros(0, bool)
        z_threshold = between[is_fg.argmax()] if is_fg.any() else (low + high) / 2
        self.gmm_ = gmm
        self.means_ = np.sort(gmm.means_.ravel()) * scale + centre  # component means in map units, ascending
        self.threshold_ = float(z_threshold * scale + centre)
        return self

    def predict(self, values):
        """Return the foreground mask of ``values`` (bool, same shape; a tensor for a tensor input)."""
        check_is_fitted(self, "threshold_")
        if isinstance(values, torch.Tensor):
            return torch.isfinite(values) & (values >= self.threshold_)
        x = _numpy(values)
        return np.isfinite(x) & (x >= self.threshold_)

    def fit_predict(self, values):
        """Return the foreground mask of ``values`` after fitting on them."""
        return self.fit(values).predict(values)


def binarize_gmm(heatmap, random_state: int | None = 0, n_components: int = 2) -> torch.Tensor:
    """Return g(heatmap): the GMM foreground mask of one map, fitted on that map alone (bool tensor)."""
    mask = GMMBinarizer(n_components=n_components, random_state=random_state).fit_predict(heatmap)
    return torch.as_tensor(mask, dtype=torch.bool)


def mean_filter(mask: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Return the mask after a ``size``×``size`` mean filter thresholded at 0.5 (orphan pixels removed).

    Works on (H, W) or (..., H, W). The border is replicate-padded, so objects touching the image
    edge are not eroded by phantom background outside the image.
    """
    if not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"mean_filter: size must be a positive odd integer, got {size!r}")
    if mask.ndim < 2:
        raise ValueError(f"mean_filter: expected a mask of shape (..., H, W), got shape {tuple(mask.shape)}")
    x = mask.reshape(-1, 1, *mask.shape[-2:]).float()  # (N, 1, H, W)
    pad = size // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    mean = F.avg_pool2d(x, kernel_size=size, stride=1)  # (N, 1, H, W)
    return (mean >= 0.5).reshape(mask.shape)


def preliminary_masks(heatmaps: torch.Tensor, random_state: int | None = 0, n_components: int = 2) -> torch.Tensor:
    """Return M_pre (B, h, w) bool: the mean-filtered GMM mask of each heat map M̂ (paper Sec. 3)."""
    if heatmaps.ndim != 3:
        raise ValueError(
            f"preliminary_masks: expected heat maps of shape (B, h, w), got shape {tuple(heatmaps.shape)}; "
            "add a batch dimension with heatmap[None] for a single map"
        )
    masks = [binarize_gmm(m, random_state=random_state, n_components=n_components) for m in heatmaps]
    return mean_filter(torch.stack(masks).to(heatmaps.device))


def normalise(heat: torch.Tensor) -> torch.Tensor:
    """Return each map of ``heat`` (..., h, w) min-max normalised to [0, 1] (per image, as the paper scores M̂;
    a constant map becomes 0)."""
    low = heat.amin(dim=(-2, -1), keepdim=True)
    high = heat.amax(dim=(-2, -1), keepdim=True)
    return (heat - low) / (high - low).clamp_min(1e-12)


def upsample_mask(mask: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Return the mask resized to ``size`` (H, W) by nearest neighbour (M_pre,up in Eq. 5)."""
    if mask.ndim < 2:
        raise ValueError(f"upsample_mask: expected a mask of shape (..., h, w), got shape {tuple(mask.shape)}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    x = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    up = F.interpolate(x, size=size, mode="nearest-exact") > 0.5  # (N, 1, H, W)
    return up.reshape(*mask.shape[:-2], *size)


def _runs(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start indices and lengths of the runs of identical consecutive rows of ``a``."""
    change = np.ones(a.shape[0], dtype=bool)
    change[1:] = (a[1:] != a[:-1]).any(axis=1)
    starts = np.flatnonzero(change)
    return starts, np.diff(np.append(starts, a.shape[0]))


def largest_rectangle(region: torch.Tensor) -> tuple[int, int, int, int] | None:
    """Return the largest axis-aligned rectangle (x1, y1, x2, y2, exclusive end) inside ``region``.

    ``region`` is a bool (H, W) map; None when it is empty. Runs of identical rows and columns are
    merged first (an optimal rectangle can always be widened to whole runs), so a nearest-upsampled
    mask costs as much as the latent-resolution one.
    """
    grid = np.asarray(region.detach().cpu() if isinstance(region, torch.Tensor) else region, dtype=bool)
    if grid.ndim != 2:
        raise ValueError(f"largest_rectangle: expected a (H, W) map, got shape {grid.shape}")
    if not grid.any():
        return None
    row_starts, row_lengths = _runs(grid)
    col_starts, col_lengths = _runs(grid[row_starts].T)
    cells = grid[np.ix_(row_starts, col_starts)]  # (R, C) merged grid
    col_edges = np.concatenate([[0], np.cumsum(col_lengths)])  # pixel x of each merged column edge
    heights = np.zeros(cells.shape[1] + 1, dtype=np.int64)  # pixel height of the open column; sentinel 0
    best_area, best = 0, None
    for r, row_end in enumerate(np.cumsum(row_lengths)):
        heights[:-1] = np.where(cells[r], heights[:-1] + row_lengths[r], 0)
        stack: list[tuple[int, int]] = []  # (first merged column, height), heights increasing
        for c, h in enumerate(heights.tolist()):  # largest rectangle under a histogram
            start = c
            while stack and stack[-1][1] >= h:
                start, top = stack.pop()
                area = top * int(col_edges[c] - col_edges[start])
                if area > best_area:
                    best_area = area
                    best = (int(col_edges[start]), int(row_end - top), int(col_edges[c]), int(row_end))
            stack.append((start, h))
    return best


def flip_crop_inpaint(image: torch.Tensor, m_pre_up: torch.Tensor) -> torch.Tensor:
    """Return the M_crop "inpainting": the foreground covered by the flipped largest background crop.

    Supplement Sec. 5: the largest axis-aligned rectangle lying wholly in the background of M_pre,up
    is mirrored left-right and laid over the bounding box of the foreground, tiled by further mirroring
    when the box is larger than the crop; only foreground pixels are replaced. The result stands in
    for m'(z̃0, y_b) in Eq. 5. Without foreground the image is returned unchanged; without background
    there is nothing to copy, so the image is returned unchanged with a warning.
    """
    if image.ndim != 3 or m_pre_up.shape != image.shape[-2:]:
        raise ValueError(
            f"flip_crop_inpaint: expected image (C, H, W) and mask (H, W), got {tuple(image.shape)} and "
            f"{tuple(m_pre_up.shape)}; upsample M_pre with upsample_mask(m_pre, image.shape[-2:])"
        )
    fg = m_pre_up.detach().cpu().numpy().astype(bool)
    out = image.clone()
    if not fg.any():
        return out
    rect = largest_rectangle(~fg)
    if rect is None:
        warnings.warn("flip_crop_inpaint: M_pre,up has no background to copy; image returned unchanged", stacklevel=2)
        return out
    x1, y1, x2, y2 = rect
    crop = image[:, y1:y2, x1:x2].flip(-1).detach().cpu().numpy()  # (C, h, w) mirrored background
    ys, xs = np.nonzero(fg)
    fy1, fx1, fy2, fx2 = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
    bh, bw = fy2 - fy1, fx2 - fx1
    pad = ((0, 0), (0, max(0, bh - crop.shape[1])), (0, max(0, bw - crop.shape[2])))
    fill = torch.from_numpy(np.pad(crop, pad, mode="symmetric")[:, :bh, :bw]).to(image)  # (C, bh, bw)
    box = out[:, fy1:fy2, fx1:fx2]
    out[:, fy1:fy2, fx1:fx2] = torch.where(m_pre_up[fy1:fy2, fx1:fx2].to(image.device), fill, box)
    return out


GMM_FITS = ("m_pre", "image")


def refined_mask(
    image: torch.Tensor, inpainted: torch.Tensor, m_pre_up: torch.Tensor, random_state: int | None = 0,
    fit: str = "m_pre",
) -> torch.Tensor:
    """Return the refined mask M = M_pre,up ⊙ g(|x − x̂|) of Eq. 5 (bool (H, W)).

    |x − x̂| is the absolute difference averaged over channels; ``inpainted`` is one inpainting x̂
    (C, H, W) or K of them (K, C, H, W), whose differences are averaged: an estimate of the expected
    |x − x̂| over the model's inpaintings with less of any single draw's noise. g is the two-component
    GMM with the higher-difference component as foreground, fitted (``fit``) on the differences inside
    M_pre,up, the only pixels Eq. 5 keeps (``"m_pre"``), or on the whole map (``"image"``), where the
    pixels outside M_pre, which differ only by the VAE's reconstruction error, pull the threshold down.
    """
    look_up_option(fit, GMM_FITS)
    several = inpainted if inpainted.ndim == 4 else inpainted[None]  # (K, C, H, W)
    if image.ndim != 3 or several.shape[1:] != image.shape or m_pre_up.shape != image.shape[-2:]:
        raise ValueError(
            "refined_mask: expected image (C, H, W), inpainted (C, H, W) or (K, C, H, W) of the same image shape and "
            f"m_pre_up (H, W), got {tuple(image.shape)}, {tuple(inpainted.shape)} and {tuple(m_pre_up.shape)}"
        )
    diff = (image.float() - several.float()).abs().mean(dim=(0, 1))  # (H, W) |x − x̂|, Eq. 5
    region = m_pre_up.bool().to(diff.device)
    if fit == "image":
        return region & binarize_gmm(diff, random_state=random_state)
    if not region.any():
        return region
    binarizer = GMMBinarizer(random_state=random_state).fit(diff[region])
    return region & binarizer.predict(diff)
