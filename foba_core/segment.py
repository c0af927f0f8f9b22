"""The segmentation network trained on the refined masks M (paper Sec. 3, last step; supplement Sec. 1).

A U-Net (MONAI's ``UNet``) with one output channel (foreground logits) is trained with sigmoid +
binary cross-entropy and Adam on (image, mask) pairs, for a fixed number of steps (paper: 12,000
steps, batch 32, learning rate 1e-3, random 128x128 crops for training, centre crops for
testing). Training runs in ``engines.ResumableTrainer`` (MONAI's ``SupervisedTrainer``); ``epoch_length = steps``
with one epoch, so ignite re-iterates the data loader as often as the step count needs.

Training frames (``segment_frame``): "square" trains on the cached centre squares of the model's resolution;
"full" is the authors' augmentation (supplement Sec. 1): each training image's whole frame with its shortest side
resized to the U-Net's side, so that a random square crop slides along the long side. The labels (refined masks,
ground truth) exist on the centre square only, so the frame's other pixels are ``UNLABELLED`` and left out of
the loss (``PartialBCEWithLogitsLoss``).

Evaluation protocol (centre-crop testing): predict on the centre crop of each test image and score
against the centre crop of its ground truth, both cut by the same ``center_crop``, i.e.
``predict_masks(net, images, crop)`` against ``center_crop(masks, crop)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from foba_core.seeds import derive_seed

SEGMENTATION_KEYS = ("image", "label")
SEGMENT_FRAMES = ("square", "full")  # what a U-Net trains on: the cached centre squares, or the whole frames
UNLABELLED = -1  # a label pixel without a label (a full frame outside its labelled centre square)


def segmentation_network(channels: tuple[int, ...] = (32, 64, 128, 256, 512), strides: tuple[int, ...] | None = None,
                         num_res_units: int = 2, seed: int = 0) -> torch.nn.Module:
    """Return a seeded 2D MONAI U-Net: 3 input channels (RGB in [0, 1]), 1 output channel (foreground logits).

    ``strides`` defaults to 2 between every pair of levels; inputs must be multiples of their
    product (``predict_masks`` pads whole images as needed). The toy world's 24-pixel crops take
    e.g. ``channels=(16, 32, 64, 128), strides=(1, 2, 2)`` (total stride 4).

    MONAI's U-Net applies ``strides[0]`` in its first layer and works at full resolution again only in
    the last transposed convolution, so with a first stride of 2 every output pixel is decoded from
    half-resolution features; ``strides=(1, 2, ...)`` keeps a full-resolution level (the toy bundle's
    32-pixel scenes need it for exact boundaries, docs/README.md of bundles/foba_toy).
    """
    from monai.networks.nets import UNet

    channels = tuple(int(c) for c in channels)
    if len(channels) < 2:
        raise ValueError(f"channels must list at least two levels, got {channels}")
    strides = tuple(int(s) for s in strides) if strides is not None else (2,) * (len(channels) - 1)
    if len(strides) != len(channels) - 1:
        raise ValueError(f"strides needs one entry per level transition ({len(channels) - 1}), got {strides}")
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's global RNG
        torch.manual_seed(seed)
        return UNet(spatial_dims=2, in_channels=3, out_channels=1, channels=channels, strides=strides,
                    num_res_units=num_res_units)


def total_stride(network: torch.nn.Module) -> int:
    """Return the factor that input sizes must be multiples of (product of a MONAI U-Net's strides; else 1)."""
    return int(math.prod(int(np.max(s)) for s in getattr(network, "strides", (1,))))


def center_crop(x: torch.Tensor, crop: int) -> torch.Tensor:
    """Return the central ``crop`` x ``crop`` window of the last two dimensions of ``x`` (images or masks)."""
    from monai.transforms import CenterSpatialCrop
    from monai.utils import convert_to_tensor

    if x.shape[-2] < crop or x.shape[-1] < crop:
        raise ValueError(f"crop {crop} exceeds the image size {tuple(x.shape[-2:])}; choose crop <= the shorter side")
    flat = x.reshape(-1, *x.shape[-2:])  # (N, H, W): MONAI crops all spatial dims after the first
    out = convert_to_tensor(CenterSpatialCrop((crop, crop))(flat), track_meta=False)
    return out.reshape(*x.shape[:-2], crop, crop)


def _check_pairs(images, masks) -> None:
    """Images (N, 3, H, W) or a list of (3, H, W) (float in [0, 1] or uint8); masks (N, H, W) or a list of (H, W),
    bool or 0/1 with ``UNLABELLED`` where there is no label."""
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} masks: pass one mask per image")
    for i, (image, mask) in enumerate(zip(images, masks)):
        if image.ndim != 3 or image.shape[0] != 3 or not (image.is_floating_point() or image.dtype == torch.uint8):
            raise ValueError(f"image {i} must be a float (in [0, 1]) or uint8 tensor (3, H, W), got {image.dtype} "
                             f"{tuple(image.shape)}")
        if tuple(mask.shape) != tuple(image.shape[1:]):
            raise ValueError(f"masks must have shape (N, H, W) to match the images: mask {i} is {tuple(mask.shape)}, "
                             f"its image {tuple(image.shape[1:])}")
        if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1) | (mask == UNLABELLED)).all():
            raise ValueError(f"mask {i} must be bool or 0/1 (and {UNLABELLED} where unlabelled); threshold soft "
                             "masks first")


class PartialBCEWithLogitsLoss(torch.nn.Module):
    """Sigmoid + binary cross-entropy averaged over the labelled pixels (label 0 or 1; ``UNLABELLED`` ones are left
    out). On a fully labelled batch it is ``torch.nn.BCEWithLogitsLoss()`` itself."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labelled = labels != UNLABELLED
        if labelled.all():
            return F.binary_cross_entropy_with_logits(logits, labels)
        total = F.binary_cross_entropy_with_logits(logits, labels.clamp(min=0), weight=labelled.float(),
                                                   reduction="sum")
        return total / labelled.sum().clamp(min=1)


class SegmentationData(torch.utils.data.Dataset):
    """Items {image (3, c, c) float, label (1, c, c) float 0/1 or ``UNLABELLED``} from in-memory images and masks
    (stacked tensors, or lists of frames of different sizes: ``frame_images``, ``frame_labels``).

    Training (``train=True``): a random ``crop`` x ``crop`` window (MONAI ``RandSpatialCropd``;
    optionally a random left-right flip, ``RandFlipd``) cut identically from image and mask.
    Testing: the centre crop (``CenterSpatialCropd``), or the whole image when ``crop`` is None.
    A training item is addressed as ``data[index]`` or ``data[(index, draw)]``: its crop is seeded by
    ``(seed, index, draw)`` (``draw`` = 0 for a plain index), so the sampler decides which draw of
    an image is served, which keeps a run reproducible and resumable. The transforms run without MONAI's
    meta-data tracking (plain tensors), which draws the same windows: on the toy world's 32-pixel images
    the tracking cost about as much as the U-Net's training step.
    """

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, crop: int | None = None, train: bool = True,
                 seed: int = 0, flip: bool = False):
        from monai.transforms import CenterSpatialCropd, Compose, RandFlipd, RandSpatialCropd

        _check_pairs(images, masks)
        shortest = min(min(image.shape[-2:]) for image in images) if len(images) else 0
        if crop is not None and not 0 < crop <= shortest:
            raise ValueError(f"crop {crop} must lie in [1, {shortest}] for images whose shortest side is {shortest}; "
                             "pass a smaller crop (or None for whole images)")
        self.images, self.masks = images, masks
        self.crop, self.train, self.seed, self.flip = crop, bool(train), int(seed), bool(flip)
        keys = list(SEGMENTATION_KEYS)
        steps = []
        if crop is not None:
            roi = (int(crop), int(crop))
            steps.append(RandSpatialCropd(keys, roi_size=roi, random_size=False) if train
                         else CenterSpatialCropd(keys, roi_size=roi))
        if train and flip:
            steps.append(RandFlipd(keys, prob=0.5, spatial_axis=1))
        self.transform = Compose(steps)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key) -> dict:
        from monai.data import get_track_meta, set_track_meta
        from monai.utils import convert_to_tensor

        index, draw = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)
        image = self.images[index]
        item = {"image": image.float() / 255 if image.dtype == torch.uint8 else image.float(),
                "label": self.masks[index][None].float()}
        if self.train:
            self.transform.set_random_state(seed=derive_seed(self.seed, "augmentation", index, draw))
        tracking = get_track_meta()
        set_track_meta(False)  # plain tensors through the crops: the same windows, at less than half the cost
        try:
            out = self.transform(item)
        finally:
            set_track_meta(tracking)
        return {k: convert_to_tensor(out[k], track_meta=False) for k in SEGMENTATION_KEYS}


def segmentation_loader(data: SegmentationData, batch_size: int = 32, steps: int = 12000,
                        seed: int = 0) -> torch.utils.data.DataLoader:
    """Return the training loader: ``steps`` batches of (index, draw) keys (``sampling.ShuffledBatches``)."""
    from foba_core.sampling import ShuffledBatches

    return torch.utils.data.DataLoader(data, batch_sampler=ShuffledBatches(len(data), batch_size, steps, seed,
                                                                           draws=True))


def segmentation_trainer(network: torch.nn.Module, optimizer: torch.optim.Optimizer, loader, steps: int,
                         device=None, handlers: list | None = None, progress: bool = True,
                         output_dir: str | None = None, checkpoint_interval: int = 500):
    """Return the resumable trainer (``engines.ResumableTrainer``) of ``steps`` iterations of sigmoid + BCE over the
    labelled pixels (``PartialBCEWithLogitsLoss``).

    ``loader`` yields {image, label} batches (``segmentation_loader``). ``handlers`` become extra
    ``train_handlers`` (a bundle passes ``@train#handlers`` here, so that ``--tracking mlflow`` can add its
    handler); an ignite ProgressBar is attached when ``progress``. With ``output_dir``, the network, the
    optimiser and the trainer are checkpointed to ``output_dir/checkpoints`` every
    ``checkpoint_interval`` steps and at the end, the loss curve goes to ``output_dir/train_log.json``, and the
    trainer resumes from the latest checkpoint there.
    """
    from foba_core.engines import ResumableTrainer

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = torch.device(device) if device is not None else next(network.parameters()).device
    return ResumableTrainer(
        device=device, max_steps=int(steps), train_data_loader=loader, network=network, optimizer=optimizer,
        loss_function=PartialBCEWithLogitsLoss(), output_dir=output_dir, checkpoint_interval=checkpoint_interval,
        state={"network": network, "optimizer": optimizer}, log_interval=None,
        progress=progress, train_handlers=handlers,
    )


def train_segmenter(images, masks, steps: int = 12000, batch_size: int = 32,
                    lr: float = 1e-3, crop: int | None = 128, seed: int = 0, device=None, output_dir: str | None = None,
                    handlers: list | None = None, network: torch.nn.Module | None = None, flip: bool = False,
                    checkpoint_interval: int = 500, progress: bool = True) -> torch.nn.Module:
    """Return the segmentation U-Net trained on (image, mask) pairs with random crops (supplement Sec. 1).

    ``images`` and ``masks`` are stacked tensors (N, 3, H, W) and (N, H, W), or lists of frames of different sizes
    (``frame_images``, ``frame_labels``); a mask's ``UNLABELLED`` pixels are left out of the loss.

    ``network`` defaults to ``segmentation_network(seed=seed)``. With ``output_dir``, checkpoints
    (network, optimiser, trainer) go to ``output_dir/checkpoints`` every
    ``checkpoint_interval`` steps and at the end, the loss curve to ``output_dir/train_log.json``, and a
    rerun with the same ``output_dir`` resumes from the latest checkpoint (a finished run is not
    repeated).
    """
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                          else "cpu")
    network = (network if network is not None else segmentation_network(seed=seed)).to(device)
    stride = total_stride(network)
    sizes = {crop} if crop is not None else {s for image in images for s in image.shape[-2:]}
    if any(size % stride for size in sizes):
        raise ValueError(f"training crops of {sorted(sizes)} pixels are not all a multiple of the network's total "
                         f"stride {stride}; choose a crop that is, or a network with fewer or smaller strides")
    data = SegmentationData(images, masks, crop=crop, train=True, seed=seed, flip=flip)
    loader = segmentation_loader(data, batch_size, steps, seed)
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    segmentation_trainer(network, optimizer, loader, steps, device=device, handlers=handlers, progress=progress,
                         output_dir=output_dir, checkpoint_interval=checkpoint_interval).run()
    return network.eval()


@torch.no_grad()
def segmentation_logits(network: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Return the network's foreground logits (N, H, W) for whole images, padded to its stride and cut back."""
    was_training = network.training
    network.eval()
    device = next(network.parameters()).device
    stride = total_stride(network)
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % stride, -width % stride
    out = []
    try:
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device, torch.float32)  # (B, 3, H, W)
            if pad_h or pad_w:
                x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
            out.append(network(x)[:, 0, :height, :width].float().cpu())  # (B, H, W)
    finally:
        network.train(was_training)
    return torch.cat(out)


def predict_masks(network: torch.nn.Module, images: torch.Tensor, crop: int | None = None,
                  batch_size: int = 64) -> torch.Tensor:
    """Return the predicted foreground masks, sigmoid > 0.5 (bool (N, H, W); (N, crop, crop) with ``crop``).

    With ``crop`` the network sees only the centre crop of each image (the paper's centre-crop
    testing); score the result against ``center_crop(ground_truth, crop)``.
    """
    images = torch.as_tensor(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
    if crop is not None:
        images = center_crop(images, crop)
    return segmentation_logits(network, images, batch_size) > 0  # sigmoid(logit) > 0.5  <=>  logit > 0


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Return square images (N, 3, S, S) resized to the U-Net's side ``size`` (unchanged when already that size)."""
    from foba_core.transforms import resize_center_crop

    if images.shape[-1] == size:
        return images
    return torch.stack([resize_center_crop(x, size) for x in images])


def split_images(split, size: int) -> torch.Tensor:
    """Return every image of a cached split (``splits.SplitImages``) at the U-Net's side (N, 3, size, size).

    Each image is resized on its own, so the split is never held at the model's resolution all at once.
    """
    return torch.stack([resize_images(split[i]["image"][None], size)[0] for i in range(len(split))])


def resize_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Return square masks (N, S, S) resized (nearest neighbour) to ``size``, in slices to bound memory."""
    from foba_core.masks import upsample_mask

    if masks.shape[-1] == size:
        return masks
    return torch.cat([upsample_mask(masks[s:s + 256], size) for s in range(0, len(masks), 256)])


def frame_images(split, size: int, frame: str = "square", dataset: str | None = None, root=None,
                 count: int | None = None) -> list[torch.Tensor]:
    """Return the U-Net's training images of a cached split (``splits.SplitImages``), one (3, h, w) tensor each.

    ``frame`` "square": the cached centre squares resized to ``size`` (float). "full": the authors' augmentation
    (supplement Sec. 1): the split's original images, read again from ``dataset`` at ``root`` (the same ``count``
    as the images stage), each with its shortest side resized to ``size`` and the whole frame kept (uint8), so
    that random ``size`` crops slide along the long side.
    """
    from monai.utils import look_up_option
    from tqdm.auto import tqdm

    from foba_core.data import open_images
    from foba_core.transforms import resize_shortest_side

    if look_up_option(frame, SEGMENT_FRAMES) == "square":
        return list(split_images(split, size))
    data = open_images(dataset, root, split.split, count)
    ids = [str(data[i]["id"]) for i in range(len(data))] if len(data) == len(split) else None
    if ids != split.ids:
        raise ValueError(f"the {split.split} split of {dataset} at {root} is not the one cached in {split.folder} "
                         f"({len(data)} images, {len(split)} cached): the dataset changed since the images stage; "
                         "rerun the main job with a new --output_dir")
    frames = []
    for i in tqdm(range(len(data)), desc=f"U-Net frames {split.split}", unit="image"):
        image = data[i]["image"]
        image = image.expand(3, -1, -1) if image.shape[0] == 1 else image
        frames.append((resize_shortest_side(image, size) * 255).round().to(torch.uint8))
    return frames


def frame_labels(masks: torch.Tensor, frames: list[torch.Tensor]) -> list[torch.Tensor]:
    """Return one int8 label (h, w) per training frame (``frame_images``) from masks (N, S, S) of the centre squares.

    Each mask is resized (nearest neighbour) to the frames' shortest side and placed on the frame's centre square
    (``transforms.square_geometry``); the frame's other pixels are ``UNLABELLED``.
    """
    from foba_core.transforms import square_geometry

    if len(masks) != len(frames):
        raise ValueError(f"{len(masks)} masks for {len(frames)} training images: pass one mask per image")
    sides = {min(f.shape[-2:]) for f in frames}
    if len(sides) > 1:
        raise ValueError(f"the training images' shortest sides differ ({sorted(sides)}); make them with frame_images")
    side = sides.pop() if sides else 0
    squares = resize_masks(masks, side).to(torch.int8)
    labels = []
    for square, f in zip(squares, frames):
        height, width = f.shape[-2:]
        if (height, width) == (side, side):
            labels.append(square)
            continue
        _, top, left = square_geometry(height, width, side)
        label = torch.full((height, width), UNLABELLED, dtype=torch.int8)
        label[top:top + side, left:left + side] = square
        labels.append(label)
    return labels


class PredictStep:
    """``iteration_update`` of a U-Net's test evaluation: split items -> {"items", "masks" (B, S, S)}.

    The images (at the model's resolution S) are resized to the U-Net's side ``size``; its logits are
    upsampled (bilinear) back to S, so its masks are scored on the same square as every other method.
    """

    def __init__(self, network: torch.nn.Module, size: int | None = None):
        self.network, self.size = network, size

    def __call__(self, engine, items: list[dict]) -> dict:
        images = torch.stack([it["image"] for it in items])  # (B, 3, S, S)
        full = images.shape[-1]
        size = self.size or full
        if size == full:
            return {"items": items, "masks": predict_masks(self.network, images)}
        logits = segmentation_logits(self.network, resize_images(images, size))[:, None]  # (B, 1, s, s)
        up = F.interpolate(logits, size=(full, full), mode="bilinear", align_corners=False)
        return {"items": items, "masks": up[:, 0] > 0}  # (B, S, S)
