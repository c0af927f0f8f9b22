"""Settings checked before any work: each check returns the value it was given or raises a ValueError that names
the option as it is typed on the command line (``--finetune_steps must be an integer >= 1, got 0``).

The bundles run them in ``initialize``, which ``monai.bundle run`` runs before the ``run`` list and before a
``run_<stage>`` list given as run id: the main job through ``configs/fragments/checks.yaml``
(:func:`check_main_job`), the training bundles through :func:`check_training`, the other bundles through the
single checks listed in their ``checks`` entry.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
from collections.abc import Sequence

from foba_core.data import DATASETS, is_generated
from foba_core.segment import SEGMENT_FRAMES

AMP_DTYPES = ("bfloat16", "float16")
AUTHORS_GRID = 50  # the 50-step DDIM grid that T0 counts timesteps of (foba_core.capture.authors_timesteps)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(value, name: str, minimum: int = 1, maximum: int | None = None, optional: bool = False):
    """Return ``value``, an integer in [minimum, maximum] (or None when ``optional``)."""
    if (optional and value is None) or (_is_int(value) and minimum <= value and (maximum is None or value <= maximum)):
        return value
    bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    raise ValueError(f"--{name} must be an integer {bound}{' or null' if optional else ''}, got {value!r}")


def number(value, name: str, low: float, high: float | None = None, open_low: bool = False, optional: bool = False):
    """Return ``value``, a finite number >= ``low`` (> with ``open_low``) and <= ``high`` (or None when ``optional``)."""
    if optional and value is None:
        return value
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value <= high
    if ok:
        return value
    if high is None:
        bound = f"{'>' if open_low else '>='} {low:g}"
    else:
        bound = f"in {'(' if open_low else '['}{low:g}, {high:g}]"
    raise ValueError(f"--{name} must be a number {bound}{' or null' if optional else ''}, got {value!r}")


def probability(value, name: str) -> float:
    """Return ``value``, a number in [0, 1]."""
    return number(value, name, 0, 1)


def positive(value, name: str, optional: bool = False):
    """Return ``value``, a number > 0 (or None when ``optional``)."""
    return number(value, name, 0, open_low=True, optional=optional)


def _did_you_mean(value, options: Sequence) -> str:
    close = difflib.get_close_matches(str(value), [str(o) for o in options], n=3)
    if not close:
        return ""
    others = f" (or {', '.join(close[1:])})" if close[1:] else ""
    return f"; did you mean {close[0]}{others}?"


def choice(value, name: str, options: Sequence):
    """Return ``value`` if it is one of ``options``; the error suggests the closest ones."""
    if isinstance(value, str) and value in options:
        return value
    raise ValueError(f"--{name} must be one of {', '.join(map(str, options))}, got {value!r}"
                     f"{_did_you_mean(value, options)}")


def choices(values, name: str, options: Sequence | None = None) -> list:
    """Return ``values``, a non-empty list of distinct strings, each one of ``options`` when they are given."""
    if isinstance(values, str) or not isinstance(values, Sequence) or not values or not all(
            isinstance(v, str) for v in values) or len(set(values)) != len(values):
        among = f" of {', '.join(options)}" if options is not None else ""
        raise ValueError(f"--{name} must be a non-empty list of distinct names{among}, got {values!r}")
    for value in values if options is not None else ():
        choice(value, name, options)
    return list(values)


def scheduler_class(value, name: str = "scheduler") -> str:
    """Return ``value`` if it names a diffusers scheduler class (a ``diffusers.SchedulerMixin`` subclass)."""
    import diffusers

    cls = getattr(diffusers, value, None) if isinstance(value, str) else None
    if isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin) and cls is not diffusers.SchedulerMixin:
        return value
    names = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("Flax"))
    raise ValueError(f"--{name} must name a diffusers scheduler class such as DDIMScheduler, got {value!r}"
                     f"{_did_you_mean(value, names)}")


def path(value, name: str, what: str, optional: bool = False):
    """Return ``value``, an existing file or folder (None when ``optional``); ``what`` says what it should hold."""
    if value is None:
        if optional:
            return None
        raise ValueError(f"--{name} is required: {what}")
    if not os.path.exists(os.path.expanduser(str(value))):
        raise ValueError(f"--{name} {value} does not exist: expected {what}")
    return value


def fits(batch_size: int, n_images: int, name: str, what: str) -> int:
    """Return ``batch_size`` if it is at most ``n_images``: a larger batch would hold some images twice (and is
    almost always a typo or the wrong data folder)."""
    if batch_size > n_images:
        raise ValueError(f"--{name} {batch_size} is larger than the {n_images} {what}: every batch would hold some "
                         f"images twice; pass --{name} {n_images} or less, or point to the full data set")
    return batch_size


def check_timesteps(t0, timesteps) -> None:
    """Check the heat maps' timesteps: an explicit list of integers >= 0, or else T0 in [1, 50] (the authors' grid)."""
    if timesteps is None:
        integer(t0, "t0", 1, AUTHORS_GRID)
    elif isinstance(timesteps, str) or not isinstance(timesteps, Sequence) or not timesteps or not all(
            _is_int(t) and t >= 0 for t in timesteps):
        raise ValueError(f"--timesteps must be null or a non-empty list of integers >= 0, got {timesteps!r}")


def _trainer_options(accumulation_steps, lr_drop_step, lr_drop_factor, max_grad_norm, caption_dropout,
                     checkpoint_interval, amp_dtype) -> None:
    """Check the keys of configs/fragments/diffusion_trainer.yaml that every training config shares."""
    integer(accumulation_steps, "accumulation_steps")
    integer(lr_drop_step, "lr_drop_step", 0, optional=True)
    number(lr_drop_factor, "lr_drop_factor", 0, 1, open_low=True)
    positive(max_grad_norm, "max_grad_norm", optional=True)
    probability(caption_dropout, "caption_dropout")
    integer(checkpoint_interval, "checkpoint_interval", 0)  # 0: the final checkpoint only
    choice(amp_dtype, "amp_dtype", AMP_DTYPES)


def check_training(max_steps, batch_size, lr, warmup_steps, accumulation_steps=1, lr_drop_step=None,
                   lr_drop_factor=1.0, max_grad_norm=None, caption_dropout=0.0, checkpoint_interval=0,
                   amp_dtype="bfloat16") -> None:
    """Check the settings of a diffusion training config (MIMIC-CXR train.yaml, toy pretrain.yaml)."""
    integer(max_steps, "max_steps")
    integer(batch_size, "batch_size")
    positive(lr, "lr")
    integer(warmup_steps, "warmup_steps", 0)
    _trainer_options(accumulation_steps, lr_drop_step, lr_drop_factor, max_grad_norm, caption_dropout,
                     checkpoint_interval, amp_dtype)


def check_main_job(*, dataset, dataset_dir, pretrained, pretrained_config, text_encoder, splits, n_train, n_test, t0,
                   timesteps, stage1_batch_size, n_overlays, finetune_steps, finetune_batch_size, finetune_lr,
                   finetune_warmup_steps, p_inpaint, accumulation_steps, lr_drop_step, lr_drop_factor, max_grad_norm,
                   caption_dropout, checkpoint_interval, amp_dtype, scheduler, inference_steps, refine_samples,
                   refine_gmm_fit, refine_batch_size, synthetic_stage1_model, segment_steps, segment_batch_size,
                   segment_lr, segment_crop, segment_size, segment_frame, n_synthetic, sample_batch_size, fid_samples,
                   fid_ws, n_backgrounds, chunk_size) -> None:
    """Check the main job's settings (configs/stages/*.yaml, configs/datasets/*.yaml) before any stage runs.

    A generated dataset (the toy world) needs the numbers of images n_train and n_test; a stored one needs its
    dataset_dir. The splits are among the main job's train and test.
    """
    choice(dataset, "dataset", DATASETS)
    generated = is_generated(dataset)
    if not generated:
        path(dataset_dir, "dataset_dir", f"the folder of the {dataset} files (docs/datasets.md)")
    path(pretrained, "pretrained", "a local Stable Diffusion folder (diffusers layout), a single .ckpt / "
                                   ".safetensors file with --pretrained_config, or a MONAI bundle folder (nothing is "
                                   "downloaded)")
    path(pretrained_config, "pretrained_config", "a local diffusers Stable Diffusion folder", optional=True)
    path(text_encoder, "text_encoder", "a folder with tokenizer/ and text_encoder/ for a MONAI bundle", optional=True)
    choices(splits, "splits", ("train", "test"))
    integer(n_train, "n_train", optional=not generated)
    integer(n_test, "n_test", optional=not generated)
    check_timesteps(t0, timesteps)
    integer(stage1_batch_size, "stage1_batch_size")
    integer(n_overlays, "n_overlays", 0)
    integer(finetune_steps, "finetune_steps")
    integer(finetune_batch_size, "finetune_batch_size")
    positive(finetune_lr, "finetune_lr")
    integer(finetune_warmup_steps, "finetune_warmup_steps", 0)
    probability(p_inpaint, "p_inpaint")
    _trainer_options(accumulation_steps, lr_drop_step, lr_drop_factor, max_grad_norm, caption_dropout,
                     checkpoint_interval, amp_dtype)
    scheduler_class(scheduler)
    integer(inference_steps, "inference_steps")
    integer(refine_samples, "refine_samples")
    choice(refine_gmm_fit, "refine_gmm_fit", ("image", "m_pre"))
    integer(refine_batch_size, "refine_batch_size")
    choice(synthetic_stage1_model, "synthetic_stage1_model", ("base", "finetuned"))
    integer(segment_steps, "segment_steps")
    integer(segment_batch_size, "segment_batch_size")
    positive(segment_lr, "segment_lr")
    integer(segment_crop, "segment_crop")
    integer(segment_size, "segment_size", optional=True)
    choice(segment_frame, "segment_frame", SEGMENT_FRAMES)
    integer(n_synthetic, "n_synthetic")
    integer(sample_batch_size, "sample_batch_size")
    integer(fid_samples, "fid_samples")
    if isinstance(fid_ws, str) or not isinstance(fid_ws, Sequence) or not fid_ws or not all(
            isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) for w in fid_ws):
        raise ValueError(f"--fid_ws must be a non-empty list of guidance scales (numbers), got {fid_ws!r}")
    integer(n_backgrounds, "n_backgrounds")
    integer(chunk_size, "chunk_size")
