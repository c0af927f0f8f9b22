"""Grounding metrics (foba_med.grounding) against values worked out by hand on 4 x 4 maps and boxes: CNR (signed and
not), BioViL's mIoU, the pointing game (ties) and the centre-of-mass distance (nearest of several boxes), with
their edge cases: a constant map, a box covering the image, an empty box mask, no box."""

import math

import pytest
import torch

from foba_med.grounding import compute_cnr, compute_com_distance, compute_miou, compute_pointing_hit

BOX = torch.zeros(4, 4, dtype=torch.bool)
BOX[:2, :2] = True  # the box x1 y1 x2 y2 = 0 0 2 2
CNR_MAP = torch.tensor([[1.0, 1.0, 0.0, 1.0],
                        [0.5, 0.5, 0.0, 0.0],
                        [0.0, 0.0, 1.0, 0.0],
                        [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
# inside: 1, 1, 0.5, 0.5 -> mu_in = 0.75, var_in = 4 * 0.25^2 / 4 = 0.0625
# outside: three 1s and nine 0s -> mu_out = 3 / 12 = 0.25, var_out = 3 / 12 - 0.25^2 = 0.1875
# CNR = |0.75 - 0.25| / sqrt(0.0625 + 0.1875) = 0.5 / 0.5 = 1.0 (sample variances would give 0.5 / 0.5366 = 0.932)
MIOU_MAP = torch.tensor([[0.5, 0.4, 0.0, 0.0],
                         [0.3, 0.2, 0.1, 0.0],
                         [0.0, 0.0, 0.0, 0.0],
                         [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
# map >= t against the 4 box pixels: t = 0.1: 5 pixels, 4 in the box -> IoU 4/5; t = 0.2: the 4 box pixels -> 1;
# t = 0.3: 3 -> 3/4; t = 0.4: 2 -> 2/4; t = 0.5: 1 -> 1/4; mean (0.8 + 1 + 0.75 + 0.5 + 0.25) / 5 = 0.66
# (map > t instead would give (1 + 0.75 + 0.5 + 0.25 + 0) / 5 = 0.5)


def test_cnr_uses_population_variances_and_the_signed_cnr_keeps_the_sign():
    assert compute_cnr(CNR_MAP, BOX) == pytest.approx(1.0)
    assert compute_cnr(CNR_MAP, BOX, signed=True) == pytest.approx(1.0)
    # 1 - map: mu_in = 0.25, mu_out = 0.75, the same variances -> signed -1.0, CNR 1.0
    assert compute_cnr(1 - CNR_MAP, BOX) == pytest.approx(1.0)
    assert compute_cnr(1 - CNR_MAP, BOX, signed=True) == pytest.approx(-1.0)
    assert compute_cnr(CNR_MAP.float(), BOX.int()) == pytest.approx(1.0)  # float32 map, 0/1 mask


def test_cnr_of_a_constant_map_is_0_and_of_a_map_equal_to_the_box_infinite():
    for value in (0.0, 0.7):  # 0.7: float means of equal values may differ from them; the contrast is still 0
        assert compute_cnr(torch.full((4, 4), value), BOX) == 0.0
        assert compute_cnr(torch.full((4, 4), value), BOX, signed=True) == 0.0
    # constant inside and outside, different values: noise 0, contrast 1 -> perfect separation
    assert compute_cnr(BOX.double(), BOX) == math.inf
    assert compute_cnr(1 - BOX.double(), BOX) == math.inf
    assert compute_cnr(1 - BOX.double(), BOX, signed=True) == -math.inf


def test_cnr_is_nan_when_the_box_covers_the_image_or_nothing():
    for mask in (torch.ones(4, 4, dtype=torch.bool), torch.zeros(4, 4, dtype=torch.bool)):
        assert math.isnan(compute_cnr(CNR_MAP, mask)) and math.isnan(compute_cnr(CNR_MAP, mask, signed=True))


def test_miou_averages_the_iou_of_the_map_at_or_above_each_threshold():
    assert compute_miou(MIOU_MAP, BOX) == pytest.approx(0.66)
    assert compute_miou(MIOU_MAP, BOX, thresholds=(0.2,)) == pytest.approx(1.0)
    assert compute_miou(torch.zeros(4, 4), BOX) == 0.0  # what min_max makes of a constant map: no pixel reaches 0.1
    # a box covering the image: CNR_MAP >= t holds the seven pixels 1 or 0.5 at every t -> 7/16
    assert compute_miou(CNR_MAP, torch.ones(4, 4, dtype=torch.bool)) == pytest.approx(7 / 16)
    assert math.isnan(compute_miou(MIOU_MAP, torch.zeros(4, 4, dtype=torch.bool)))  # a box outside the crop


def test_pointing_takes_the_first_maximum_in_row_major_order():
    heat = torch.zeros(4, 4)
    heat[0, 3] = heat[1, 0] = 1.0  # flat indices 3 (outside the box) and 4 (inside): index 3 decides
    assert compute_pointing_hit(heat, BOX) == 0.0
    heat = torch.zeros(4, 4)
    heat[0, 1] = heat[2, 0] = 1.0  # flat indices 1 (inside) and 8 (outside)
    assert compute_pointing_hit(heat, BOX) == 1.0
    assert compute_pointing_hit(MIOU_MAP, BOX) == 1.0 and compute_pointing_hit(1 - MIOU_MAP, BOX) == 0.0
    assert compute_pointing_hit(torch.zeros(4, 4), ~BOX) == 0.0  # constant: pixel (0, 0), outside ~BOX
    assert compute_pointing_hit(CNR_MAP, torch.ones(4, 4, dtype=torch.bool)) == 1.0
    assert math.isnan(compute_pointing_hit(CNR_MAP, torch.zeros(4, 4, dtype=torch.bool)))


def test_centre_of_mass_distance_is_to_the_nearest_box_centre():
    heat = torch.zeros(4, 4)
    heat[0, 3], heat[2, 3] = 1.0, 3.0
    # centre of mass: x = 3.5, y = (1 * 0.5 + 3 * 2.5) / 4 = 2.0; box centres (1, 1) and (3, 2):
    # distances sqrt(2.5^2 + 1^2) = sqrt(7.25) and sqrt(0.5^2 + 0^2) = 0.5
    boxes = torch.tensor([[0, 0, 2, 2], [2, 1, 4, 3]])
    assert compute_com_distance(heat, boxes) == pytest.approx(0.5)
    assert compute_com_distance(heat, boxes[:1]) == pytest.approx(math.sqrt(7.25))
    assert compute_com_distance(heat, boxes, relative=True) == pytest.approx(0.5 / math.hypot(4, 4))
    # (H, W) = (2, 4), mass at row 1, column 2: centre (2.5, 1.5); box 1 0 2 1 centred at (1.5, 0.5):
    # distance sqrt(1^2 + 1^2) = sqrt(2) (rows and columns swapped would give 2); diagonal sqrt(2^2 + 4^2)
    wide = torch.zeros(2, 4)
    wide[1, 2] = 0.5
    assert compute_com_distance(wide, [[1, 0, 2, 1]]) == pytest.approx(math.sqrt(2))
    assert compute_com_distance(wide, [[1, 0, 2, 1]], relative=True) == pytest.approx(math.sqrt(2) / math.sqrt(20))


def test_centre_of_mass_of_an_all_zero_map_or_without_a_box_is_nan():
    assert math.isnan(compute_com_distance(torch.zeros(4, 4), [[0, 0, 2, 2]]))
    assert math.isnan(compute_com_distance(CNR_MAP, torch.zeros(0, 4)))  # every box cropped away


def test_bad_inputs_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="one shape"):
        compute_cnr(torch.zeros(2, 2), BOX)
    with pytest.raises(ValueError, match="bool"):
        compute_miou(CNR_MAP, CNR_MAP)
    with pytest.raises(ValueError, match="non-finite"):
        compute_pointing_hit(torch.full((4, 4), math.nan), BOX)
    with pytest.raises(ValueError, match="non-negative"):
        compute_com_distance(CNR_MAP - 1, [[0, 0, 2, 2]])
