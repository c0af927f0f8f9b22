"""MONAI latent diffusion models in the bundle layout of MONAI's model zoo, read as foba reads diffusers pipelines.

A bundle folder holds ``configs/inference.json`` (or ``.yaml``) defining the networks and the noise scheduler,
and the weights ``models/autoencoder.pth`` and ``models/diffusion_model.pth``; e.g. the zoo's
``cxr_image_synthesis_latent_diffusion_model`` (an ``AutoencoderKL`` with 3 x 64 x 64 latents, a
``DiffusionModelUNet`` with cross-attention on the 1024-d CLIP text encoder of Stable Diffusion 2.1 base, DDIM with
v-prediction). Only the definitions are instantiated (``monai.bundle.ConfigParser``), never the file's other lines
(which download the text encoder and load the weights without ``weights_only``). Definitions written for MONAI
Generative (``generative.networks.*``, ``num_channels``, ``beta_schedule``) are read as MONAI's own classes, and
their checkpoints converted with MONAI's ``load_old_state_dict``. The text side comes from a folder with
``tokenizer/`` and ``text_encoder/`` (a Stable Diffusion 2.1 base folder works), or from the bundle itself.

:class:`MonaiLDM` offers what the stages use of a diffusers ``StableDiffusionPipeline``: the U-Net is called as
``unet(z_t, t, encoder_hidden_states)``, the VAE encodes images in [-1, 1] to a latent Gaussian and decodes back,
the scheduler (MONAI's own) answers ``add_noise``, ``get_velocity``, ``set_timesteps`` and ``step(...).prev_sample``.
``save_pretrained`` writes a bundle folder that :func:`load_bundle` (and MONAI's ConfigParser) read again.
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

logger = logging.getLogger(__name__)

CONFIG_FILES = ("configs/inference.json", "configs/inference.yaml", "configs/inference.yml")
AUTOENCODER_FILE, DIFFUSION_FILE = "models/autoencoder.pth", "models/diffusion_model.pth"
# The definition names the zoo's bundles use (the CXR model: diffusion_def / scheduler; the BraTS ones:
# network_def / noise_scheduler).
DEFINITIONS = {"autoencoder": ("autoencoder_def",), "diffusion": ("diffusion_def", "network_def"),
               "scheduler": ("scheduler", "noise_scheduler")}
# The CXR model's sampler multiplies latents by 0.3 (scripts/sampler.py); its configs do not name the factor.
ZOO_SCALE_FACTOR = 0.3
ZOO_LATENT_SIZE = 64  # its noise is 3 x 64 x 64 (512 x 512 images)
TEXT_HINT = ("pass --text_encoder DIR: a folder with tokenizer/ and text_encoder/ (e.g. a local Stable Diffusion 2.1 "
             "base folder, whose CLIP text encoder the model zoo's CXR LDM was trained on)")
SCHEDULE_ARGS = ("beta_start", "beta_end", "sig_range", "s")  # passed through MONAI's **schedule_args


def config_file(folder) -> Path | None:
    """Return the bundle's inference config of ``folder``, or None when it is not a MONAI bundle folder."""
    folder = Path(folder)
    return next((folder / name for name in CONFIG_FILES if (folder / name).is_file()), None)


def _modern(definition: dict) -> dict:
    """Return a network or scheduler definition in MONAI's names (MONAI Generative's renamed; ``_requires_`` dropped)."""
    out = {k: v for k, v in definition.items() if k != "_requires_"}  # (it would load the weights)
    target = str(out.get("_target_", ""))
    if target.startswith("generative.networks."):
        out["_target_"] = "monai.networks." + target[len("generative.networks."):]
    if "num_channels" in out and "channels" not in out:
        out["channels"] = out.pop("num_channels")
    if "beta_schedule" in out and "schedule" not in out:
        schedule = str(out.pop("beta_schedule"))
        out["schedule"] = schedule if schedule.endswith("_beta") or schedule == "cosine" else f"{schedule}_beta"
    return out


def read_definitions(folder) -> dict:
    """Return the bundle's definitions {autoencoder, diffusion, scheduler} in MONAI's names, with the rest of its
    config (what the definitions may refer to, e.g. ``@spatial_dims``) under ``"config"``."""
    from monai.bundle import ConfigParser

    file = config_file(folder)
    if file is None:
        raise FileNotFoundError(f"{folder} is not a MONAI bundle folder: no {' or '.join(CONFIG_FILES)}")
    try:
        config = ConfigParser.load_config_file(str(file))
    except Exception as err:  # a syntax error of json / yaml
        raise ValueError(f"{file} cannot be read as a MONAI bundle config ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a mapping of definitions, got {type(config).__name__}")
    out = {"config": {k: v for k, v in config.items() if k != "imports"}}
    for part, names in DEFINITIONS.items():
        name = next((n for n in names if isinstance(config.get(n), dict)), None)
        if name is None:
            raise ValueError(f"{file} defines no {part} network as {' or '.join(names)} (a dict with _target_)")
        out[part] = _modern(config[name])
    return out


def instantiate(definitions: dict, part: str):
    """Return the MONAI object of one definition (``part``: autoencoder, diffusion or scheduler)."""
    from monai.bundle import ConfigParser

    config = {**definitions["config"], "_foba_": definitions[part]}
    try:
        return ConfigParser(config).get_parsed_content("_foba_")
    except Exception as err:
        raise ValueError(f"cannot build the bundle's {part} definition {definitions[part]} ({err})") from err


def load_weights(module: nn.Module, file: Path) -> None:
    """Load a state dict (``weights_only``) into a MONAI network; MONAI Generative's key layout is converted."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a MONAI bundle keeps this network's weights there "
                                f"({AUTOENCODER_FILE}, {DIFFUSION_FILE})")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{file} cannot be read as a PyTorch state dict ({err}); is the download complete?") from err
    if not isinstance(state, dict):
        raise ValueError(f"{file} holds a {type(state).__name__}, not a state dict of {type(module).__name__}")
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        try:
            module.load_old_state_dict(dict(state))  # MONAI Generative's names (to_out.0, proj_attn, conv)
        except (KeyError, RuntimeError) as old_err:
            raise ValueError(f"{file} does not fit the {type(module).__name__} of the bundle config, neither in "
                             f"MONAI's key layout ({str(err).splitlines()[0]}) nor in MONAI Generative's "
                             f"({old_err!r})") from err


@dataclass
class LatentGaussian:
    """q(z | x) of MONAI's ``AutoencoderKL``: what diffusers' ``latent_dist`` offers the stages."""

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype).to(self.mean.device)
        return self.mean + self.std * noise


class _Wrapper(nn.Module):
    """A MONAI network behind diffusers' calls; like a diffusers model it tells its ``device`` and ``dtype``."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class MonaiVAE(_Wrapper):
    """MONAI ``AutoencoderKL`` behind the diffusers VAE calls: images in [-1, 1] in, ``latent_dist`` out, and back.

    The bundle's images are in [0, 1] (the CXR model's preprocessing); a 3-channel input is averaged to the
    model's one channel (the stages replicate grayscale to RGB) and decoded images are replicated to 3 channels.
    ``config.scaling_factor`` is the bundle's ``scale_factor``.
    """

    def __init__(self, model: nn.Module, scale_factor: float):
        super().__init__()
        self.model = model
        self.channels = int(model.encoder.in_channels)
        self.config = SimpleNamespace(scaling_factor=float(scale_factor), latents_mean=None, latents_std=None,
                                      in_channels=self.channels)

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        x = (x + 1) / 2  # [-1, 1] -> the bundle's [0, 1]
        if x.shape[1] != self.channels and self.channels == 1:
            x = x.mean(1, keepdim=True)
        mu, sigma = self.model.encode(x)
        return SimpleNamespace(latent_dist=LatentGaussian(mu, sigma))

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        x = self.model.decode(z) * 2 - 1
        return SimpleNamespace(sample=x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)


class MonaiUNet(_Wrapper):
    """MONAI ``DiffusionModelUNet`` called as diffusers' ``UNet2DConditionModel``: ``unet(z_t, t, text_hidden).sample``.

    ``config`` carries what the stages read (sample_size, channels, block_out_channels, the most heads of a
    level, cross_attention_dim). MONAI's cross-attention has no key mask, so ``encoder_attention_mask`` must be
    None or all ones.
    """

    def __init__(self, model: nn.Module, sample_size: int):
        super().__init__()
        self.model = model
        channels = list(model.block_out_channels)
        head_channels = model.num_head_channels
        head_channels = [head_channels] * len(channels) if isinstance(head_channels, int) else list(head_channels)
        heads = [c // h for c, h, on in zip(channels, head_channels, model.attention_levels) if on and h]
        cross = next((m.to_k.in_features for n, m in model.named_modules() if n.endswith("attn2")), None)
        self.config = SimpleNamespace(sample_size=int(sample_size), in_channels=int(model.in_channels),
                                      out_channels=int(model.out_channels), block_out_channels=tuple(channels),
                                      num_attention_heads=max(heads, default=1), attention_head_dim=None,
                                      cross_attention_dim=cross)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, return_dict: bool = True):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        if encoder_attention_mask is not None and not bool(encoder_attention_mask.bool().all()):
            raise ValueError("MONAI's DiffusionModelUNet has no cross-attention key mask; this model must be run "
                             "without one (foba.json text_attention_mask: false)")
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(sample.shape[0]) if t.ndim == 0 else t  # MONAI wants one timestep per row
        out = self.model(sample, t, context=encoder_hidden_states)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


class MonaiScheduler:
    """A MONAI noise scheduler behind the diffusers scheduler calls the stages make.

    ``config`` has ``num_train_timesteps`` and ``prediction_type``; ``step`` returns an object with ``prev_sample``.
    ``variant(name)`` is the same noise schedule in another MONAI scheduler class.
    """

    order = 1
    init_noise_sigma = 1.0

    def __init__(self, scheduler, definition: dict):
        self.scheduler, self.definition = scheduler, dict(definition)
        self.config = SimpleNamespace(num_train_timesteps=int(scheduler.num_train_timesteps),
                                      prediction_type=str(getattr(scheduler, "prediction_type", "epsilon")))

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        self.scheduler.set_timesteps(int(num_inference_steps), device=device)

    def set_begin_index(self, index: int) -> None:
        """diffusers' call before starting part way (refinement's ``strength``): MONAI's step needs no index."""

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(original, noise, timesteps.long())  # q_sample(z0, t)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.get_velocity(sample, noise, timesteps.long())

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None) -> SimpleNamespace:
        """One reverse step; ``generator`` (one, or one per row as diffusers takes them) feeds a stochastic step."""
        t = int(timestep)
        if generator is None or "generator" not in inspect.signature(self.scheduler.step).parameters:
            prev, original = self.scheduler.step(model_output, t, sample)
        elif isinstance(generator, (list, tuple)):  # row by row, each with its own generator
            rows = [self.scheduler.step(model_output[i:i + 1], t, sample[i:i + 1], generator=g)
                    for i, g in enumerate(generator)]
            prev, original = (torch.cat(parts) for parts in zip(*rows))
        else:
            prev, original = self.scheduler.step(model_output, t, sample, generator=generator)
        return SimpleNamespace(prev_sample=prev, pred_original_sample=original)

    def variant(self, name: str) -> "MonaiScheduler":
        """Return this noise schedule in MONAI's scheduler class ``name`` (DDIMScheduler, DDPMScheduler, PNDMScheduler)."""
        from monai.networks import schedulers
        from monai.utils import look_up_option

        options = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler")
        cls = getattr(schedulers, look_up_option(name, options))
        accepted = set(inspect.signature(cls.__init__).parameters) | set(SCHEDULE_ARGS)
        kwargs = {k: v for k, v in self.definition.items() if k in accepted}
        return MonaiScheduler(cls(**kwargs), {"_target_": f"monai.networks.schedulers.{cls.__name__}", **kwargs})


class MonaiLDM:
    """A MONAI bundle's LDM with the attributes of a diffusers ``StableDiffusionPipeline`` that foba uses."""

    text_attention_mask = False

    def __init__(self, unet: MonaiUNet, vae: MonaiVAE, text_encoder, tokenizer, scheduler: MonaiScheduler,
                 definitions: dict):
        self.unet, self.vae, self.text_encoder, self.tokenizer, self.scheduler = unet, vae, text_encoder, tokenizer, scheduler
        self.definitions = definitions
        self.vae_scale_factor = 2 ** _down_levels(vae.model)
        self.foba_source = None

    def to(self, device=None, dtype=None) -> "MonaiLDM":
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device=device, dtype=dtype)
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        """diffusers' call; the stages show their own progress bars."""

    def save_pretrained(self, folder, safe_serialization: bool = True) -> None:
        """Write the bundle layout: configs/inference.json, models/*.pth, tokenizer/ and text_encoder/."""
        folder = Path(folder)
        (folder / "configs").mkdir(parents=True, exist_ok=True)
        (folder / "models").mkdir(exist_ok=True)
        config = {"bundle_root": ".", "scale_factor": self.vae.config.scaling_factor,
                  "latent_shape": [self.unet.config.in_channels, self.unet.config.sample_size,
                                   self.unet.config.sample_size],
                  "autoencoder_def": self.definitions["autoencoder"], "diffusion_def": self.definitions["diffusion"],
                  "scheduler": self.scheduler.definition,
                  # for MONAI users: the lines that load the weights, as the zoo's bundles have them
                  "load_autoencoder": f"$@autoencoder_def.load_state_dict(torch.load(@bundle_root + '/{AUTOENCODER_FILE}', weights_only=True))",
                  "load_diffusion": f"$@diffusion_def.load_state_dict(torch.load(@bundle_root + '/{DIFFUSION_FILE}', weights_only=True))"}
        (folder / CONFIG_FILES[0]).write_text(json.dumps(config, indent=2) + "\n")
        torch.save(self.vae.model.state_dict(), folder / AUTOENCODER_FILE)
        torch.save(self.unet.model.state_dict(), folder / DIFFUSION_FILE)
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=safe_serialization)


def _down_levels(autoencoder: nn.Module) -> int:
    """Return how many times the autoencoder's encoder halves the image (its downsampling blocks)."""
    return sum(type(b).__name__.endswith("Downsample") for b in autoencoder.encoder.blocks)


def text_side(folder: Path, text_encoder) -> Path:
    """Return the folder holding ``tokenizer/`` and ``text_encoder/`` for a bundle: ``text_encoder`` or the bundle."""
    source = Path(text_encoder).expanduser() if text_encoder is not None else Path(folder)
    missing = [part for part in ("tokenizer", "text_encoder") if not (source / part).is_dir()]
    if missing:
        where = f"--text_encoder {source}" if text_encoder is not None else f"the MONAI bundle {folder}"
        raise FileNotFoundError(f"{where} has no {' or '.join(p + '/' for p in missing)}; {TEXT_HINT}")
    return source


def scale_factor(definitions: dict, file: Path) -> float:
    """Return the bundle's latent ``scale_factor`` (its config's, else the CXR zoo sampler's 0.3)."""
    value = definitions["config"].get("scale_factor")
    if value is None:
        logger.info("%s names no scale_factor: using %s, the model zoo CXR sampler's", file, ZOO_SCALE_FACTOR)
        return ZOO_SCALE_FACTOR
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{file}: scale_factor must be a positive number, got {value!r}")
    return float(value)


def latent_size(definitions: dict, file: Path) -> int:
    """Return the latents' side (the config's ``latent_shape``, else the CXR zoo model's 64)."""
    shape = definitions["config"].get("latent_shape")
    if shape is None:
        return ZOO_LATENT_SIZE
    if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) for s in shape[1:]) or len(set(shape[1:])) != 1:
        raise ValueError(f"{file}: latent_shape must be [channels, side, side] in numbers, got {shape!r}")
    return int(shape[1])


def load_bundle(folder, text_encoder=None, torch_dtype: torch.dtype = torch.float32, device="cpu") -> MonaiLDM:
    """Return the MONAI bundle's LDM (in eval mode, on ``device``) with the text side of ``text_encoder``."""
    from transformers import CLIPTextModel

    from foba_core.models import fast_tokenizer, read_foba_json

    folder = Path(folder).expanduser()
    file = config_file(folder)
    definitions = read_definitions(folder)
    source = text_side(folder, text_encoder)  # checked before the networks are built
    autoencoder, diffusion = instantiate(definitions, "autoencoder"), instantiate(definitions, "diffusion")
    load_weights(autoencoder, folder / AUTOENCODER_FILE)
    load_weights(diffusion, folder / DIFFUSION_FILE)
    scheduler = MonaiScheduler(instantiate(definitions, "scheduler"), definitions["scheduler"])
    if read_foba_json(folder).get("text_attention_mask"):
        raise ValueError(f"{folder}/foba.json asks for a text attention mask, which MONAI's DiffusionModelUNet has not")
    encoder = CLIPTextModel.from_pretrained(source / "text_encoder", local_files_only=True, dtype=torch_dtype)
    pipe = MonaiLDM(MonaiUNet(diffusion, latent_size(definitions, file)),
                    MonaiVAE(autoencoder, scale_factor(definitions, file)), encoder,
                    fast_tokenizer(source / "tokenizer"), scheduler, definitions)
    pipe.to(device=device, dtype=torch_dtype)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval()  # as diffusers loads them: the stages that train set what they train
    pipe.foba_source = str(folder.resolve())
    return pipe
