"""Loading the latent diffusion model (LDM) that the concepts are distilled from, offline.

``load_pipeline`` accepts a local diffusers folder in the Stable Diffusion 1.x/2.x layout (the toy LDM
is one: the configs that use it name its folder) or one ``.ckpt`` / ``.safetensors`` file in the original
CompVis/Stability layout. Nothing is ever downloaded: every diffusers call gets ``local_files_only=True``,
and the safety checker is never loaded.

A model folder may hold a ``foba.json`` next to ``model_index.json``; its ``text_attention_mask``
says whether the U-Net was trained to ignore EOS and padding tokens (the toy LDM is, real Stable
Diffusion is not). ``encode_prompts`` returns that mask so that attention capture, fine-tuning
and sampling call the U-Net the way it was trained.

The tokenizer is always the fast (Rust) CLIP tokenizer, built by ``fast_tokenizer`` from the model's own
tokenizer files: words are mapped to tokens through character offsets, which slow tokenizers lack.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from foba_core import monai_ldm
from foba_core.diffusion import encode_text
from foba_core.io import temp_folder

FOBA_JSON = "foba.json"
# What a diffusers SD folder must hold; safety_checker/ and feature_extractor/ are never needed.
FOLDER_PARTS = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Component configs that from_single_file takes from a local folder given as ``config``.
CONFIG_FILES = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "scheduler/scheduler_config.json", "tokenizer")
SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors")
CONFIG_HINT = ("pass config=<a local diffusers SD folder with the same architecture> (CLI: --pretrained_config), "
               "from which the component configs, tokenizer and scheduler are read")


def load_pipeline(source, *, config=None, original_config=None, torch_dtype: torch.dtype = torch.float32,
                  device="cpu", text_encoder=None):
    """Return the StableDiffusionPipeline of ``source`` (a diffusers SD folder or a single checkpoint file), offline.

    The pipeline gets two attributes: ``text_attention_mask`` (bool, from ``foba.json``; False when
    absent) and ``foba_source`` (the resolved path it was loaded from). For a single file,
    ``config`` is a local diffusers folder to take the component configs from, ``original_config``
    the original LDM yaml (U-Net and VAE architecture); ``foba.json`` and the tokenizer are read from
    ``config``. The tokenizer is always a fast one (see ``fast_tokenizer``). A MONAI bundle folder
    (``configs/inference.json`` and ``models/*.pth``, as MONAI's model zoo ships LDMs) gives a
    ``foba_core.monai_ldm.MonaiLDM`` with the same attributes; its tokenizer and text encoder come from
    ``text_encoder`` (a folder with ``tokenizer/`` and ``text_encoder/``) or the bundle folder itself.
    """
    if isinstance(torch_dtype, str):  # config files may name the dtype: "float16", "bfloat16", ...
        torch_dtype = getattr(torch, torch_dtype, torch_dtype)
    if not isinstance(torch_dtype, torch.dtype):
        raise TypeError(f"torch_dtype must be a torch.dtype such as torch.float16, got {torch_dtype!r}")
    path = Path(source).expanduser()
    if monai_ldm.config_file(path) is not None:
        if config is not None or original_config is not None:
            raise ValueError(f"{path} is a MONAI bundle folder, which carries its own configs; config and "
                             "original_config apply to single checkpoint files only")
        return monai_ldm.load_bundle(path, text_encoder, torch_dtype, device)
    if text_encoder is not None:
        raise ValueError(f"text_encoder={text_encoder} applies to MONAI bundle folders only; {path} brings its own "
                         "(a diffusers folder or checkpoint)")
    if path.is_dir() and (config is not None or original_config is not None):
        raise ValueError(f"{path} is a diffusers folder, which carries its own configs; config and original_config "
                         "apply to single checkpoint files only")
    if path.is_dir():
        pipe = _load_folder(path, torch_dtype)
        settings = read_foba_json(path)
        tokenizer = path / "tokenizer"
    elif path.is_file():
        pipe = _load_single_file(path, config, original_config, torch_dtype)
        settings = read_foba_json(Path(config)) if config is not None else {}
        # original_config alone: the CLIP tokenizer diffusers took from the Hugging Face cache
        tokenizer = Path(config).expanduser() / "tokenizer" if config is not None else pipe.tokenizer
    else:
        raise FileNotFoundError(
            f"model source {str(source)!r} not found: expected a local diffusers SD folder or a "
            f"{'/'.join(SINGLE_FILE_SUFFIXES)} file (nothing is downloaded)"
        )
    pipe.register_modules(tokenizer=fast_tokenizer(tokenizer))
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.text_attention_mask = settings.get("text_attention_mask", False)
    pipe.foba_source = str(path.resolve())
    return pipe


def fast_tokenizer(source):
    """Return the fast CLIP tokenizer of a tokenizer folder or of a loaded tokenizer (itself if already fast).

    ``capture.token_indices`` maps words to their sub-tokens through character offsets
    (``return_offsets_mapping``), which only fast (Rust) tokenizers return. transformers 4.x loads
    the slow ``CLIPTokenizer`` that the ``model_index.json`` of every SD 1.x release names (and
    cannot build it from a folder holding only tokenizer.json); in transformers 5 ``CLIPTokenizer``
    is the fast class and ``CLIPTokenizerFast`` an alias of it. The fast tokenizer is built from the
    same files: tokenizer.json, or vocab.json + merges.txt, with tokenizer_config.json (maximum
    length, padding); a slow tokenizer is saved first to get them.
    """
    from transformers import CLIPTokenizerFast

    if getattr(source, "is_fast", False):
        return source
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(source, (str, os.PathLike)):
            folder, name = Path(source), str(source)
        else:
            source.save_pretrained(tmp)
            folder, name = Path(tmp), f"the slow {type(source).__name__}"
        if not (folder / "tokenizer.json").is_file() and _missing(folder, ("vocab.json", "merges.txt")):
            raise FileNotFoundError(
                f"{name} has no CLIP tokenizer files (tokenizer.json, or vocab.json + merges.txt) to build the fast "
                "tokenizer from, which mapping words to tokens needs; pass a model whose tokenizer/ folder holds them"
            )
        return CLIPTokenizerFast.from_pretrained(folder, local_files_only=True)


def _missing(folder: Path, parts) -> list[str]:
    return [p for p in parts if not (folder / p).exists()]


def _load_folder(path: Path, torch_dtype):
    from diffusers import StableDiffusionPipeline

    missing = _missing(path, FOLDER_PARTS)
    if missing:
        raise FileNotFoundError(
            f"{path} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)} "
            f"(expected {', '.join(FOLDER_PARTS)})"
        )
    return StableDiffusionPipeline.from_pretrained(  # tokenizer=None: load_pipeline loads the fast one
        path, dtype=torch_dtype, local_files_only=True, tokenizer=None,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _load_single_file(path: Path, config, original_config, torch_dtype):
    from diffusers import StableDiffusionPipeline

    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ValueError(
            f"{path}: unsupported checkpoint suffix {path.suffix!r}; expected a diffusers folder or one of "
            f"{', '.join(SINGLE_FILE_SUFFIXES)}"
        )
    if config is None and original_config is None:
        raise ValueError(f"{path}: a single checkpoint file holds weights only; {CONFIG_HINT}")
    kwargs = {}
    if config is not None:
        config = Path(config).expanduser()
        if not config.is_dir():
            raise FileNotFoundError(f"config {config} for {path} is not a folder; {CONFIG_HINT}")
        missing = _missing(config, CONFIG_FILES)
        if missing:
            raise FileNotFoundError(
                f"config folder {config} for {path} lacks {', '.join(missing)} "
                f"(expected {', '.join(CONFIG_FILES)}); {CONFIG_HINT}"
            )
        kwargs.update(config=str(config), tokenizer=None)  # load_pipeline loads the fast tokenizer from config
    if original_config is not None:
        if not Path(original_config).is_file():
            raise FileNotFoundError(f"original_config {original_config} for {path} is not a file; "
                                    "pass the original LDM yaml (e.g. v1-inference.yaml) of this checkpoint")
        kwargs["original_config"] = str(original_config)
    try:
        return StableDiffusionPipeline.from_single_file(
            str(path), dtype=torch_dtype, local_files_only=True,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False, **kwargs,
        )
    except (OSError, ValueError) as err:
        if config is not None:
            raise
        # With original_config alone diffusers looks for the base model's CLIP tokenizer and text
        # encoder configs in the Hugging Face cache; offline they are usually not there.
        raise ValueError(
            f"{path}: loading with original_config alone needs the CLIP tokenizer and text encoder configs of "
            f"the base model in the local Hugging Face cache ({err}); {CONFIG_HINT}"
        ) from err


def read_foba_json(folder: Path) -> dict:
    """Return the settings of a model folder's foba.json ({} when absent), validated."""
    file = Path(folder) / FOBA_JSON
    if not file.is_file():
        return {}
    try:
        settings = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON ({err}); fix or delete it") from err
    if not isinstance(settings, dict):
        raise ValueError(f"{file} must hold a JSON object such as {{\"text_attention_mask\": true}}")
    flag = settings.get("text_attention_mask", False)
    if not isinstance(flag, bool):
        raise ValueError(f"{file}: text_attention_mask must be true or false, got {flag!r}")
    return settings


def encode_prompts(pipe, prompts: list[str], device=None):
    """Return the frozen text encoder's embeddings of the prompts (B, L, D) and the U-Net key mask (B, L) or None.

    Tokens are padded to the tokenizer's ``model_max_length``. The mask is returned only when
    ``pipe.text_attention_mask`` is True: it hides EOS and padding from cross-attention, exactly as
    in training, and must be passed to the U-Net as ``encoder_attention_mask``.
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a list of strings, got {prompts!r}; wrap a single prompt as [prompt]")
    if len(prompts) == 0:
        raise ValueError("prompts is empty; pass at least one prompt")
    use_mask = bool(getattr(pipe, "text_attention_mask", False))
    return encode_text(pipe.tokenizer, pipe.text_encoder, list(prompts), use_mask, device)  # (B, L, D), (B, L)


def save_pipeline(pipe, folder, extra: dict | None = None) -> Path:
    """Write the pipeline as a diffusers folder (safetensors) with foba.json, replacing ``folder`` atomically.

    A ``MonaiLDM`` is written in the MONAI bundle layout instead (``MonaiLDM.save_pretrained``). ``foba.json``
    holds ``text_attention_mask`` (from the pipeline) and the keys of ``extra``. An existing ``folder`` is
    replaced only if it is empty or a saved pipeline (has model_index.json or configs/inference.json).
    """
    folder = Path(folder).expanduser().resolve()
    saved = (folder / FOLDER_PARTS[0]).is_file() or monai_ldm.config_file(folder) is not None
    if folder.exists() and not (folder.is_dir() and (saved or not any(folder.iterdir()))):
        raise FileExistsError(f"{folder} exists and is not a saved pipeline (no {FOLDER_PARTS[0]} or "
                              f"{monai_ldm.CONFIG_FILES[0]}); choose a new or empty folder, it would be replaced")
    extra = dict(extra or {})
    if "text_attention_mask" in extra:
        raise ValueError("extra must not set text_attention_mask; set pipe.text_attention_mask instead")
    settings = json.dumps({"text_attention_mask": bool(getattr(pipe, "text_attention_mask", False)), **extra},
                          indent=2)  # fails here, before any write, if extra is not JSON-serialisable
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder(folder.parent, f".{folder.name}.tmp-")
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / FOBA_JSON).write_text(settings + "\n")
        if folder.exists():  # a non-empty folder cannot be renamed over: move the old one aside first
            old = temp_folder(folder.parent, f".{folder.name}.old-")
            os.replace(folder, old / folder.name)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def make_scheduler(pipe, scheduler="DDIMScheduler"):
    """Return a fresh scheduler by class name (or a copy of an instance) on the pipeline's noise schedule.

    diffusers' classes for a diffusers pipeline; MONAI's (``MonaiScheduler.variant``) for a MONAI bundle's LDM.
    """
    from monai.utils import look_up_option

    if isinstance(pipe.scheduler, monai_ldm.MonaiScheduler):  # MONAI's own classes on the bundle's schedule
        return pipe.scheduler.variant(scheduler if isinstance(scheduler, str) else type(scheduler.scheduler).__name__)
    if not isinstance(scheduler, str):
        return type(scheduler).from_config(scheduler.config)
    options = {cls.__name__: cls for cls in [type(pipe.scheduler), *pipe.scheduler.compatibles]}
    cls = options[look_up_option(scheduler, sorted(options))]  # unknown names: error with the closest match
    return cls.from_config(pipe.scheduler.config)
