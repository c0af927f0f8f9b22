"""Segmentation U-Net: crops, training on a trivial mask data set, exact resume, whole-image prediction."""

import json

import pytest
import torch
from ignite.engine import Events

from foba_core.metrics import foreground_iou
from foba_core.segment import (SegmentationData, center_crop, predict_masks, segmentation_network,
                               train_segmenter)


def squares(n=32, size=16, side=6, seed=0):
    """Dim noise images with one bright square each, and the square's mask."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=gen) * 0.3
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        y, x = torch.randint(0, size - side, (2,), generator=gen).tolist()
        masks[i, y:y + side, x:x + side] = True
    return images + 0.6 * masks[:, None], masks


def small_net(seed=0):
    return segmentation_network(channels=(8, 16, 32), strides=(2, 2), num_res_units=1, seed=seed)


def test_training_crops_cut_image_and_mask_together():
    images, masks = squares(4, size=20)
    images[:, 0] = masks.float()  # channel 0 repeats the mask, so a crop can be checked against its label
    data = SegmentationData(images, masks, crop=12, train=True, seed=0)
    first = data[(1, 0)]
    assert first["image"].shape == (3, 12, 12) and first["label"].shape == (1, 12, 12)
    assert type(first["image"]) is torch.Tensor  # plain tensors, not MONAI MetaTensors
    assert torch.equal(first["image"][0], first["label"][0])
    draws = [data[(1, d)]["image"] for d in range(6)]
    assert any(not torch.equal(draws[0], x) for x in draws[1:])  # another draw, another window
    assert torch.equal(data[(1, 3)]["image"], SegmentationData(images, masks, 12, True, seed=0)[(1, 3)]["image"])
    reseeded = SegmentationData(images, masks, 12, True, seed=1)
    assert not all(torch.equal(data[(1, d)]["image"], reseeded[(1, d)]["image"]) for d in range(6))


def test_training_crops_draw_the_windows_of_monai_with_meta_tracking():
    from monai.data import get_track_meta
    from monai.utils import convert_to_tensor

    from foba_core.seeds import derive_seed

    images, masks = squares(4, size=20)
    data = SegmentationData(images, masks, crop=12, train=True, seed=0, flip=True)
    assert get_track_meta()  # MONAI's default, which the crops leave as they found it
    for index, draw in [(0, 0), (1, 2), (3, 5)]:
        item = {"image": images[index], "label": masks[index][None].float()}
        data.transform.set_random_state(seed=derive_seed(0, "augmentation", index, draw))
        tracked = data.transform(item)  # the same transforms, MetaTensors throughout
        plain = data[(index, draw)]
        assert get_track_meta()
        for key in ("image", "label"):
            assert torch.equal(plain[key], convert_to_tensor(tracked[key], track_meta=False))


def test_a_first_stride_of_one_keeps_a_full_resolution_level():
    net = segmentation_network(channels=(8, 16, 32), strides=(1, 2), num_res_units=1, seed=0)
    assert net.model[0].conv.unit0.conv.stride == (1, 1)  # MONAI applies strides[0] in the first layer
    pred = predict_masks(net, torch.rand(2, 3, 10, 10))
    assert pred.shape == (2, 10, 10)
    with pytest.raises(ValueError, match="one entry per level transition"):
        segmentation_network(channels=(8, 16, 32), strides=(1, 2, 2))


def test_test_crops_are_central_and_whole_images_pass_unchanged():
    images, masks = squares(3, size=20)
    centre = SegmentationData(images, masks, crop=12, train=False)[2]
    assert torch.equal(centre["image"], images[2, :, 4:16, 4:16])
    assert torch.equal(centre["label"][0].bool(), center_crop(masks, 12)[2])
    assert torch.equal(center_crop(masks, 12), masks[:, 4:16, 4:16])
    whole = SegmentationData(images, masks, crop=None, train=False)[0]
    assert torch.equal(whole["image"], images[0])
    with pytest.raises(ValueError, match="crop 24"):
        SegmentationData(images, masks, crop=24)
    with pytest.raises(ValueError, match="masks must have shape"):
        SegmentationData(images, masks[:, :10])


def test_segmenter_learns_a_trivial_mask_data_set():
    images, masks = squares(32, seed=0)
    net = train_segmenter(images, masks, steps=70, batch_size=12, lr=3e-3, crop=12, device="cpu", network=small_net(),
                          progress=False)
    test_images, test_masks = squares(16, seed=1)
    pred = predict_masks(net, test_images, crop=12)  # the paper's centre-crop testing
    assert pred.dtype == torch.bool and pred.shape == (16, 12, 12)
    assert foreground_iou(pred, center_crop(test_masks, 12)) > 0.8
    untrained = predict_masks(small_net(), test_images, crop=12)
    assert foreground_iou(untrained, center_crop(test_masks, 12)) < 0.5


def test_interrupted_training_resumes_exactly(tmp_path):
    images, masks = squares(20)
    kwargs = dict(steps=6, batch_size=8, crop=12, seed=5, device="cpu", checkpoint_interval=3, progress=False)
    full = train_segmenter(images, masks, network=small_net(3), output_dir=str(tmp_path / "full"), **kwargs)

    class StopAt3:
        def attach(self, engine):
            engine.add_event_handler(Events.ITERATION_COMPLETED(once=3), lambda e: e.terminate())

    part = train_segmenter(images, masks, network=small_net(3), output_dir=str(tmp_path / "part"),
                           handlers=[StopAt3()], **kwargs)
    assert (tmp_path / "part" / "checkpoints" / "checkpoint_iteration=3.pt").is_file()
    assert not all(torch.equal(p, q) for p, q in zip(full.parameters(), part.parameters()))
    resumed = train_segmenter(images, masks, network=small_net(3), output_dir=str(tmp_path / "part"), **kwargs)
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert (tmp_path / "part" / "train_log.json").is_file()
    with pytest.raises(ValueError, match="run of 6 steps, not 4"):  # fewer steps than were run: refused
        train_segmenter(images, masks, network=small_net(3), output_dir=str(tmp_path / "part"),
                        **{**kwargs, "steps": 4})
    longer = train_segmenter(images, masks, network=small_net(3), output_dir=str(tmp_path / "part"),
                             **{**kwargs, "steps": 9})  # more steps: the finished run continues from step 6
    assert json.loads((tmp_path / "part" / "train_log.json").read_text())["iterations"] == 9
    assert not all(torch.equal(p, q) for p, q in zip(full.parameters(), longer.parameters()))


def test_predict_masks_handles_sizes_off_the_network_stride():
    net = small_net()
    images = torch.rand(3, 3, 18, 14)
    pred = predict_masks(net, images, batch_size=2)
    assert pred.shape == (3, 18, 14) and pred.dtype == torch.bool
    assert net.training  # the caller's mode is restored
    with pytest.raises(ValueError, match="multiple of the network's total stride 4"):
        train_segmenter(images, torch.zeros(3, 18, 14, dtype=torch.bool), steps=1, crop=10, network=net,
                        device="cpu", progress=False)


def test_frame_labels_put_the_masks_on_the_centre_square_and_leave_the_rest_unlabelled():
    from foba_core.segment import UNLABELLED, frame_labels

    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :, :4] = True  # left half of the first square, at the model's resolution 8
    masks[1, 2:6, 2:6] = True
    frames = [torch.zeros(3, 4, 6), torch.zeros(3, 7, 4)]  # landscape and portrait frames, shortest side 4
    wide, tall = frame_labels(masks, frames)
    assert wide.shape == (4, 6) and tall.shape == (7, 4) and wide.dtype == torch.int8
    assert (wide[:, 0] == UNLABELLED).all() and (wide[:, 5] == UNLABELLED).all()  # square at columns 1..4
    assert wide[:, 1:3].eq(1).all() and wide[:, 3:5].eq(0).all()
    assert (tall[0] == UNLABELLED).all() and (tall[5:] == UNLABELLED).all()  # square at rows 1..4 (top = 3 // 2)
    assert tall[1:5].eq(masks[1, ::2, ::2]).all()
    square = frame_labels(masks, [torch.zeros(3, 8, 8)] * 2)  # square frames are labelled whole
    assert all(torch.equal(label, m.to(torch.int8)) for label, m in zip(square, masks))
    with pytest.raises(ValueError, match="shortest sides differ"):
        frame_labels(masks, [torch.zeros(3, 4, 6), torch.zeros(3, 5, 6)])
    with pytest.raises(ValueError, match="2 masks for 1 training images"):
        frame_labels(masks, frames[:1])


def test_the_loss_leaves_unlabelled_pixels_out():
    from foba_core.segment import UNLABELLED, PartialBCEWithLogitsLoss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 4, 6, generator=gen, requires_grad=True)
    labels = (torch.rand(2, 1, 4, 6, generator=gen) > 0.5).float()
    loss = PartialBCEWithLogitsLoss()
    assert torch.equal(loss(logits, labels), torch.nn.BCEWithLogitsLoss()(logits, labels))  # fully labelled
    partial = labels.clone()
    partial[..., :2] = UNLABELLED
    value = loss(logits, partial)
    expected = torch.nn.BCEWithLogitsLoss()(logits[..., 2:], labels[..., 2:])
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    value.backward()
    assert (logits.grad[..., :2] == 0).all() and (logits.grad[..., 2:] != 0).any()


def test_full_frame_crops_slide_along_the_long_side_with_their_labels():
    from foba_core.segment import UNLABELLED, frame_labels

    frame = torch.zeros(3, 8, 20, dtype=torch.uint8)
    frame[0] = torch.arange(20, dtype=torch.uint8)  # channel 0 says the column
    labels = frame_labels(torch.ones(1, 8, 8, dtype=torch.bool), [frame])  # labelled columns 6..13
    data = SegmentationData([frame], labels, crop=8, train=True, seed=0, flip=False)
    lefts = set()
    for draw in range(40):
        item = data[(0, draw)]
        left = round(item["image"][0, 0, 0].item() * 255)
        lefts.add(left)
        assert item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.float32
        columns = torch.arange(left, left + 8)
        expected = torch.where((columns >= 6) & (columns < 14), 1.0, float(UNLABELLED))
        assert torch.equal(item["label"][0, 0], expected)  # the label moved with the pixels
    assert min(lefts) <= 2 and max(lefts) >= 10  # the window covers the frame, not only its centre square
    with pytest.raises(ValueError, match="shortest side is 8"):
        SegmentationData([frame], labels, crop=10)


def test_a_unet_learns_from_full_frames_whose_sides_are_unlabelled():
    from foba_core.segment import UNLABELLED

    images, masks = squares(32, size=16, seed=0)
    frames, labels = [], []
    for image, mask in zip(images, masks):  # 16x24 frames: the scene, and noise beside it that has no label
        side = torch.rand(3, 16, 8, generator=torch.Generator().manual_seed(len(frames))) * 0.9
        frames.append(torch.cat([side[:, :, :4], image, side[:, :, 4:]], dim=2))
        unknown = torch.full((16, 4), UNLABELLED, dtype=torch.int8)
        labels.append(torch.cat([unknown, mask.to(torch.int8), unknown], dim=1))
    net = train_segmenter(frames, labels, steps=70, batch_size=12, lr=3e-3, crop=12, device="cpu",
                          network=small_net(), progress=False)
    test_images, test_masks = squares(16, seed=1)
    assert foreground_iou(predict_masks(net, test_images, crop=12), center_crop(test_masks, 12)) > 0.8
