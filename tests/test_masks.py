"""Tests of the GMM binariser, mean filter, M_pre, M_crop and refined masks (foba_core.masks)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from foba_core.masks import (
    GMMBinarizer,
    binarize_gmm,
    flip_crop_inpaint,
    largest_rectangle,
    mean_filter,
    preliminary_masks,
    refined_mask,
    upsample_mask,
)


def _bimodal_map(seed: int = 0, size: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """A heat map with a planted bright block (values ~0.8) on a dim background (~0.1)."""
    g = torch.Generator().manual_seed(seed)
    planted = torch.zeros(size, size, dtype=torch.bool)
    planted[5:14, 8:19] = True
    heat = 0.1 + 0.03 * torch.randn(size, size, generator=g)
    heat[planted] += 0.7
    return heat, planted


def test_gmm_recovers_planted_foreground():
    heat, planted = _bimodal_map()
    mask = binarize_gmm(heat)
    assert mask.dtype == torch.bool and mask.shape == planted.shape
    assert torch.equal(mask, planted)


def test_gmm_is_scale_invariant_per_map():
    heat, planted = _bimodal_map(seed=1)
    assert torch.equal(binarize_gmm(heat * 1e-4), planted)
    assert torch.equal(binarize_gmm(heat * 1e4 + 7), planted)


def test_constant_map_gives_empty_mask_and_warning():
    with pytest.warns(UserWarning, match="distinct finite value"):
        mask = binarize_gmm(torch.full((8, 8), 0.3))
    assert mask.shape == (8, 8) and not mask.any()


def test_single_finite_value_among_nans_warns():
    heat = torch.full((6, 6), float("nan"))
    heat[0, 0] = 1.0
    with pytest.warns(UserWarning):
        assert not binarize_gmm(heat).any()


def test_nan_values_are_ignored():
    heat, planted = _bimodal_map(seed=2)
    holes = torch.zeros_like(planted)
    holes[::5, ::3] = True
    with_nan = heat.clone()
    with_nan[holes] = float("nan")
    with_inf = heat.clone()
    with_inf[holes] = float("inf")
    finite_only = GMMBinarizer().fit(heat[~holes])
    for damaged in (with_nan, with_inf):
        fitted = GMMBinarizer().fit(damaged)
        assert fitted.threshold_ == pytest.approx(finite_only.threshold_)
        mask = fitted.predict(damaged)
        assert not mask[holes].any()
        assert torch.equal(mask[~holes], planted[~holes])


def test_seed_makes_fit_reproducible():
    g = torch.Generator().manual_seed(3)
    heat = torch.rand(20, 20, generator=g) ** 2  # no clear modes: the fit depends on the initialisation
    a = GMMBinarizer(random_state=5).fit(heat)
    b = GMMBinarizer(random_state=5).fit(heat)
    assert a.threshold_ == b.threshold_
    assert np.array_equal(a.means_, b.means_)
    assert torch.equal(a.predict(heat), b.predict(heat))


def test_threshold_is_monotone_when_foreground_component_is_wide():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.02, 3000), rng.normal(0.6, 0.3, 1000), [-0.5]])
    fitted = GMMBinarizer().fit(values)
    # the posterior alone gives the far-left outlier to the wide (foreground) component ...
    z = (values[-1:] - values.mean()) / values.std()
    assert fitted.gmm_.predict(z[:, None])[0] == np.argmax(fitted.gmm_.means_.ravel())
    # ... the binariser keeps it background, and everything above the threshold foreground
    mask = fitted.predict(values)
    assert not mask[-1]
    assert np.array_equal(mask, values >= fitted.threshold_)
    assert fitted.means_[0] < fitted.threshold_ < fitted.means_[1]


def test_three_components_brightest_or_all_but_darkest():
    g = torch.Generator().manual_seed(4)
    levels = torch.zeros(30, 30)
    levels[:, 10:20] = 1.0  # e.g. lung field
    levels[12:18, 12:18] = 2.0  # e.g. finding
    heat = levels + 0.05 * torch.randn(30, 30, generator=g)
    assert torch.equal(GMMBinarizer(n_components=3).fit_predict(heat), levels == 2)
    assert torch.equal(GMMBinarizer(n_components=3, foreground="not_min_mean").fit_predict(heat), levels >= 1)
    assert torch.equal(binarize_gmm(heat, n_components=3), levels == 2)


def test_invalid_parameters_are_refused():
    heat, _ = _bimodal_map()
    with pytest.raises(ValueError, match="n_components"):
        GMMBinarizer(n_components=1).fit(heat)
    with pytest.raises(ValueError, match="max_mean"):
        GMMBinarizer(foreground="brightest").fit(heat)


def test_predict_follows_input_type():
    heat, planted = _bimodal_map()
    fitted = GMMBinarizer().fit(heat.numpy())
    assert isinstance(fitted.predict(heat), torch.Tensor)
    out = fitted.predict(heat.numpy())
    assert isinstance(out, np.ndarray) and out.dtype == bool
    assert np.array_equal(out, planted.numpy())


def test_mean_filter_removes_orphan_and_keeps_block():
    mask = torch.zeros(12, 12, dtype=torch.bool)
    mask[2, 2] = True  # orphan
    mask[6:9, 6:9] = True  # 3x3 block
    out = mean_filter(mask)
    assert out.dtype == torch.bool
    assert not out[2, 2]
    plus = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
    assert torch.equal(out[6:9, 6:9], plus)  # the block survives; its corners see 4 of 9 and are rounded off
    assert out.sum() == 5
    big = torch.zeros(12, 12, dtype=torch.bool)
    big[3:8, 3:8] = True
    assert mean_filter(big)[4:7, 4:7].all() and mean_filter(big).sum() == 25 - 4


def test_mean_filter_fills_isolated_hole_and_keeps_border_objects():
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[:, :4] = True  # object touching the left edge
    mask[5, 1] = False  # isolated hole inside it
    out = mean_filter(mask)
    expected = torch.zeros_like(mask)
    expected[:, :4] = True
    assert torch.equal(out, expected)  # replicate padding: the edge column survives


def test_mean_filter_batches_and_validates():
    masks = torch.zeros(2, 3, 7, 7, dtype=torch.bool)
    masks[1, 2, 1:6, 1:6] = True
    masks[0, 1, 3, 3] = True
    out = mean_filter(masks)
    assert out.shape == masks.shape
    assert torch.equal(out[1, 2], mean_filter(masks[1, 2]))
    assert not out[0].any()
    with pytest.raises(ValueError, match="odd"):
        mean_filter(masks, size=2)


def test_preliminary_masks_are_instance_wise():
    heat_a, planted_a = _bimodal_map(seed=5)
    heat_b, planted_b = _bimodal_map(seed=6)
    heat_b = heat_b.flip(0) * 50  # a different place and scale: a shared threshold would fail
    planted_b = planted_b.flip(0)
    out = preliminary_masks(torch.stack([heat_a, heat_b]))
    assert out.shape == (2, 24, 24) and out.dtype == torch.bool
    assert torch.equal(out[0], mean_filter(planted_a))
    assert torch.equal(out[1], mean_filter(planted_b))
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        preliminary_masks(heat_a)


def test_upsample_mask_is_nearest_neighbour():
    g = torch.Generator().manual_seed(7)
    mask = torch.rand(2, 5, 6, generator=g) > 0.5
    up = upsample_mask(mask, (20, 24))
    assert up.dtype == torch.bool and up.shape == (2, 20, 24)
    assert torch.equal(up, mask.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2))
    assert upsample_mask(mask[0], 13).shape == (13, 13)


def _brute_force_largest(region: np.ndarray) -> int:
    best = 0
    h, w = region.shape
    for y1, y2 in itertools.combinations(range(h + 1), 2):
        for x1, x2 in itertools.combinations(range(w + 1), 2):
            if region[y1:y2, x1:x2].all():
                best = max(best, (y2 - y1) * (x2 - x1))
    return best


def test_largest_rectangle_matches_brute_force():
    rng = np.random.default_rng(8)
    for _ in range(20):
        region = rng.random((5, 6)) > 0.3
        rect = largest_rectangle(torch.from_numpy(region))
        if not region.any():
            assert rect is None
            continue
        x1, y1, x2, y2 = rect
        assert region[y1:y2, x1:x2].all()
        assert (x2 - x1) * (y2 - y1) == _brute_force_largest(region)


def test_largest_rectangle_on_upsampled_mask():
    small = torch.ones(4, 4, dtype=torch.bool)
    small[1:3, 2] = False
    assert largest_rectangle(upsample_mask(small, 32)) == (0, 0, 16, 32)  # columns 0..15, all rows
    assert largest_rectangle(torch.zeros(3, 3, dtype=torch.bool)) is None


def _scene(noisy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A 3×32×32 image: a bright square object (rows/cols 10..21) on dark background, either
    horizontal stripes in two tones or (``noisy``) a flat tone with a little pixel noise."""
    image = torch.zeros(3, 32, 32)
    if noisy:
        image += 0.2 + 0.02 * torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(10))
    else:
        image[:, ::2] = 0.2
        image[:, 1::2] = 0.3
    obj = torch.zeros(32, 32, dtype=torch.bool)
    obj[10:22, 10:22] = True
    image[:, obj] = torch.tensor([0.9, 0.1, 0.8])[:, None]
    return image, obj


def test_flip_crop_fills_foreground_with_background_pixels():
    image, obj = _scene()
    m_pre_up = torch.zeros_like(obj)
    m_pre_up[8:24, 8:24] = True  # the preliminary mask overestimates the object
    out = flip_crop_inpaint(image, m_pre_up)
    assert out.shape == image.shape and out.dtype == image.dtype
    assert torch.equal(out[:, ~m_pre_up], image[:, ~m_pre_up])  # background untouched
    background_colours = {tuple(c) for c in image[:, ~obj].T.tolist()}
    assert {tuple(c) for c in out[:, m_pre_up].T.tolist()} <= background_colours
    assert not torch.equal(out, image)


def test_flip_crop_tiles_when_foreground_box_exceeds_crop():
    image, _ = _scene()
    m_pre_up = torch.ones(32, 32, dtype=torch.bool)
    m_pre_up[:, :3] = False  # background is a 3-pixel strip; the foreground box is 29 wide
    out = flip_crop_inpaint(image, m_pre_up)
    background_colours = {tuple(c) for c in image[:, :, :3].reshape(3, -1).T.tolist()}
    assert {tuple(c) for c in out.reshape(3, -1).T.tolist()} <= background_colours
    assert torch.equal(out[:, :, :3], image[:, :, :3])


def test_flip_crop_edge_cases():
    image, _ = _scene()
    assert torch.equal(flip_crop_inpaint(image, torch.zeros(32, 32, dtype=torch.bool)), image)
    with pytest.warns(UserWarning, match="no background"):
        out = flip_crop_inpaint(image, torch.ones(32, 32, dtype=torch.bool))
    assert torch.equal(out, image)
    with pytest.raises(ValueError, match="upsample_mask"):
        flip_crop_inpaint(image, torch.ones(16, 16, dtype=torch.bool))


def test_refined_mask_returns_planted_object():
    image, obj = _scene()
    g = torch.Generator().manual_seed(9)
    inpainted = image.clone()
    inpainted[:, obj] = 0.25  # the model painted background over the object ...
    inpainted += 0.01 * torch.randn(image.shape, generator=g)  # ... and the decoder adds a little noise
    m_pre_up = torch.zeros_like(obj)
    m_pre_up[7:25, 6:26] = True
    refined = refined_mask(image, inpainted, m_pre_up)
    assert refined.dtype == torch.bool
    assert torch.equal(refined, obj)


def test_refined_mask_with_flip_crop_recovers_object():
    image, obj = _scene(noisy=True)
    m_pre_up = torch.zeros_like(obj)
    m_pre_up[7:25, 6:26] = True  # the coarse mask is too large, as M_pre usually is
    refined = refined_mask(image, flip_crop_inpaint(image, m_pre_up), m_pre_up)
    assert torch.equal(refined, obj)


def test_refined_mask_checks_shapes():
    image, obj = _scene()
    with pytest.raises(ValueError, match="refined_mask"):
        refined_mask(image, image[:, :16], obj)
    with pytest.raises(ValueError, match="refined_mask"):
        refined_mask(image, image[None, :, :16], obj)
    with pytest.raises(ValueError, match="did you mean 'image'"):
        refined_mask(image, image, obj, fit="imag")


def _difference_scene():
    """A black image, its object (difference 0.5 after inpainting), a halo of background inside M_pre (0.3)."""
    obj = torch.zeros(32, 32, dtype=torch.bool)
    obj[12:20, 12:20] = True
    m_pre_up = torch.zeros(32, 32, dtype=torch.bool)
    m_pre_up[6:26, 6:26] = True  # M_pre overestimates the object: a halo of background around it
    g = torch.Generator().manual_seed(3)
    diff = 0.002 * torch.rand(32, 32, generator=g)  # outside M_pre: the VAE's reconstruction error only
    diff[m_pre_up] = 0.3 + 0.01 * torch.randn(int(m_pre_up.sum()), generator=g)
    diff[obj] = 0.5 + 0.01 * torch.randn(int(obj.sum()), generator=g)
    return torch.zeros(3, 32, 32), obj, m_pre_up, diff


def test_refined_mask_fits_g_inside_m_pre_where_the_halo_is_a_mode_of_its_own():
    image, obj, m_pre_up, diff = _difference_scene()
    inpainted = diff.expand(3, -1, -1)  # |x - x_hat| = diff
    assert torch.equal(refined_mask(image, inpainted, m_pre_up, fit="m_pre"), obj)
    # the whole map's low mode is the unchanged outside, so the halo joins the object
    assert torch.equal(refined_mask(image, inpainted, m_pre_up, fit="image"), m_pre_up)
    assert not refined_mask(image, inpainted, torch.zeros_like(obj)).any()  # no M_pre, no foreground


def test_refined_mask_averages_the_differences_of_several_inpaintings():
    image, obj, m_pre_up, _ = _difference_scene()
    g = torch.Generator().manual_seed(5)
    draws = torch.rand(8, 32, 32, generator=g) * 0.5  # each inpainting redraws the halo: 0 .. 0.5, mean 0.25
    draws[:, obj] = 0.6 + 0.02 * torch.randn(8, int(obj.sum()), generator=g)
    draws[:, ~m_pre_up] = 0.0
    inpainted = draws[:, None].expand(-1, 3, -1, -1)  # (K, 3, H, W)
    single = refined_mask(image, inpainted[0], m_pre_up)
    averaged = refined_mask(image, inpainted, m_pre_up)
    assert torch.equal(averaged, refined_mask(image, draws.mean(0).expand(3, -1, -1), m_pre_up))  # the mean |x - x_hat|
    assert (single ^ obj).sum() > 10  # one draw: halo pixels that happened to differ much join the object
    assert torch.equal(averaged, obj)
