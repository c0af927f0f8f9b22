"""Benchmarks of stage 1 (and refinement) against the authors' way, measured side by side in one process.

``python -m foba_core.bench attention [--images 4] [--latent 32] [--t0 40] [--repeats 3]``
    Heat maps only, on a random U-Net with Stable Diffusion 1.x's layer layout at 1/5 width and 32×32 latents.
``python -m foba_core.bench paper-scale [--images 3] [--t0 40] [--ddim_steps 50] [--dtype float32] [--quick]``
    Stage 1 AND refinement at the paper's scale: Stable Diffusion v1.4's exact architecture (U-Net, VAE, CLIP
    text encoder built from ``foba_core/model_configs/sd14``, random seeded weights, nothing downloaded) on
    three random 512×512 images, prompt "a photo of a bird" (CLIP token ids, target token 5: "bird").
``python -m foba_core.bench cxr-paper-scale [--t0 40] [--dtype float32] [--quick]``
    The chest X-ray evaluation at the paper's scale: one MS-CXR-like 512×512 radiograph and finding through
    ``foba_med.evaluate.CXREvalStep`` on SD 2.x base's architecture (``foba_core/model_configs/sd2_base``).
``python -m foba_core.bench zoo-cxr [--t0 40] [--dtype float32]``
    The MONAI model zoo CXR LDM's exact architecture with random weights, written as a bundle folder and read
    by ``models.load_pipeline``; one 512×512 MS-CXR finding of the phantom through the evaluation: parameters,
    seconds per image, peak memory (``foba_med.zoo_model``; no (a) / (b) comparison).

The first three run, on the same model and inputs, in one process:
  (a) reference, the authors' way (``reference_heat_maps``): one timestep per U-Net forward pass, explicit
      softmax attention in every layer (self and cross, as CompVis' attention computes it), every
      cross-attention map of every token stored and reduced afterwards; paper-scale then binarises and
      refines with the same code as (c);
  (b) floor: only the forward passes the work needs - the VAE encoder, the U-Net with its default fused
      attention batched exactly like (c), capturing nothing (``floor_forwards``), and for paper-scale the
      U-Net forwards of the DDIM inpainting and the VAE decoder (``floor_inpaint_forwards``);
  (c) ours, the project's stage code: ``capture.heat_maps`` (attention bench); paper-scale:
      ``diffusion.encode_latents`` + ``capture.heat_maps`` + ``masks.preliminary_masks`` (GMM + mean
      filter) for stage 1, then ``refine.refine_masks`` (Eq. 6 latent-blended DDIM inpainting under y_b,
      one inpainting, then Eq. 5 with the paper's GMM fit on the whole difference map); cxr-paper-scale:
      ``foba_med.evaluate.CXREvalStep`` on the item.
They print a table and, as the last line, JSON: speedup = t(a)/t(c), overhead = t(c)/t(b), the captured-map
bytes of (a) and (c), and (paper-scale, cxr-paper-scale) peak process RSS and peak GPU memory of each run,
device, dtype and thread count. Where (a) would not fit in memory (its stored maps, T0 × Σ_l heads_l × Q_l ×
L × element size × images, plus its largest explicit self-attention, against the available RAM or free GPU
memory) it is skipped: the JSON says how many bytes it would need, and speedup is null.

``--dtype`` sets the U-Net's dtype (float16 / bfloat16: mixed precision); the VAE and the text encoder stay
float32, as diffusers upcasts SD's VAE, and the captured maps, their sums M̂ and the GMMs are float32 whatever
the U-Net's dtype (``capture.AttentionCapture``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from foba_core.capture import _layer_grid, authors_timesteps, default_budget_bytes, heat_maps, rows_per_chunk
from foba_core.prompts import BACKGROUND_PROMPT, object_prompt

MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"
BENCH_PROMPT = object_prompt("bird")  # y_f of the paper-scale bench: "a photo of a bird"
BENCH_TARGET = 5  # "bird</w>" in [BOS, a, photo, of, a, bird, EOS, padding ...]
MEMORY_MARGIN = 0.9  # (a) runs only when its estimate is within this fraction of the available memory


class _ReferenceProcessor:
    """Explicit-softmax attention (CompVis style) that stores every cross-attention probability map."""

    def __init__(self, store: list | None, name: str):
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        batch, _, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B*heads, Q, L)
        if self.store is not None:
            self.store.append((self.name, probs.view(batch, attn.heads, *probs.shape[1:]).clone()))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def _unet_dtype(unet) -> torch.dtype:
    return next(unet.parameters()).dtype


@torch.inference_mode()
def reference_heat_maps(unet, scheduler, z0, text_hidden, weights, text_mask=None, timesteps=None, seed: int = 0):
    """Return (M̂ (N, n, h, w) float32, per-layer dict, stored bytes) computed the naive way, for tests and benchmarks."""
    timesteps = authors_timesteps(40, scheduler.config.num_train_timesteps) if timesteps is None else list(timesteps)
    latent_hw = tuple(z0.shape[-2:])
    dtype = _unet_dtype(unet)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(timesteps), *z0.shape), generator=gen).to(z0)  # same draws as heat_maps
    store: list = []
    original = dict(unet.attn_processors)
    unet.set_attn_processor({n: _ReferenceProcessor(store if ".attn2." in n + "." else None, n.rsplit(".processor", 1)[0])
                             for n in original})
    try:
        for k, t in enumerate(timesteps):  # one timestep per forward pass
            tt = torch.full((z0.shape[0],), t, device=z0.device)
            kwargs = {"encoder_attention_mask": text_mask} if text_mask is not None else {}
            unet(scheduler.add_noise(z0, noise[k], tt).to(dtype), tt, text_hidden.to(dtype), **kwargs)
    finally:
        unet.set_attn_processor(original)
    stored = sum(p.nbytes for _, p in store)
    total = torch.zeros(z0.shape[0], weights.shape[-1], *latent_hw, device=z0.device, dtype=torch.float32)
    per_layer: dict[str, torch.Tensor] = {}
    for name, probs in store:  # reduce afterwards: head mean, token selection, upsampling, sums
        maps = torch.einsum("bql,bln->bnq", probs.float().mean(1), weights.float())
        h, w = _layer_grid(maps.shape[-1], latent_hw)
        maps = F.interpolate(maps.reshape(*maps.shape[:2], h, w), size=latent_hw, mode="bilinear", align_corners=False)
        total += maps
        per_layer[name] = per_layer.get(name, 0) + maps
    return total, per_layer, stored


@torch.inference_mode()
def floor_forwards(unet, scheduler, z0, text_hidden, timesteps, chunk: int, seed: int = 0) -> None:
    """Run the same (image, timestep) chunks as ``heat_maps`` through the default processors, capturing nothing."""
    dtype = _unet_dtype(unet)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(timesteps), *z0.shape), generator=gen).to(z0)
    t_all = torch.tensor(timesteps, device=z0.device)
    rows = [(i, k) for i in range(z0.shape[0]) for k in range(len(timesteps))]
    for start in range(0, len(rows), chunk):
        img = torch.tensor([r[0] for r in rows[start:start + chunk]], device=z0.device)
        tk = torch.tensor([r[1] for r in rows[start:start + chunk]], device=z0.device)
        z_t = scheduler.add_noise(z0[img], noise[tk, img], t_all[tk])
        unet(z_t.to(dtype), t_all[tk], text_hidden[img].to(dtype))


@torch.inference_mode()
def floor_inpaint_forwards(pipe, z0: torch.Tensor, text_hidden: torch.Tensor, num_inference_steps: int) -> torch.Tensor:
    """Return the decoded images (B, 3, H, W) after a plain DDIM run from latents z0 under ``text_hidden``: the U-Net
    forwards and the VAE decoder that an inpainting needs, without its noise, masks or latent blending."""
    from foba_core.diffusion import decode_latents
    from foba_core.models import make_scheduler

    sampler = make_scheduler(pipe, "DDIMScheduler")
    sampler.set_timesteps(num_inference_steps, device=z0.device)
    dtype = _unet_dtype(pipe.unet)
    latents = z0.float()
    for t in sampler.timesteps:
        eps = pipe.unet(latents.to(dtype), t, encoder_hidden_states=text_hidden.to(dtype)).sample
        latents = sampler.step(eps.float(), t, latents).prev_sample
    return decode_latents(pipe, latents)


def sd1_fifth_unet(cross_attention_dim: int = 256, sample_size: int = 32):
    """Return a random U-Net with Stable Diffusion 1.x's layer layout at 1/5 of its width."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(64, 128, 256, 256),
        layers_per_block=2, attention_head_dim=8, cross_attention_dim=cross_attention_dim,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).eval()


def _sync(device: torch.device | None = None) -> None:
    if (device is None or device.type == "cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def bench_attention(images: int = 4, latent: int = 32, t0: int = 40, repeats: int = 3, seq_len: int = 77,
                    device: str | None = None, dtype: str = "float32") -> dict:
    """Time (a) reference, (b) floor, (c) ours on the same inputs; return the ratios and raw timings."""
    from diffusers import DDPMScheduler

    dev = _device(device)
    dt = getattr(torch, dtype)
    unet = sd1_fifth_unet(sample_size=latent).to(dev, dt)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    gen = torch.Generator().manual_seed(1)
    z0 = torch.randn(images, 4, latent, latent, generator=gen).to(dev)
    hidden = torch.randn(images, seq_len, unet.config.cross_attention_dim, generator=gen).to(dev)
    weights = torch.zeros(images, seq_len, 1)
    weights[:, BENCH_TARGET, 0] = 1.0  # the object word of "a photo of a bird" after BOS: one target token
    weights = weights.to(dev)
    timesteps = authors_timesteps(t0)
    chunk = rows_per_chunk(unet, (latent, latent), seq_len, default_budget_bytes(dev))
    runs = {
        "reference": lambda: reference_heat_maps(unet, scheduler, z0, hidden, weights, timesteps=timesteps),
        "floor": lambda: floor_forwards(unet, scheduler, z0, hidden, timesteps, chunk),
        "ours": lambda: heat_maps(unet, scheduler, z0, hidden, weights, timesteps=timesteps),
    }
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):  # interleaved repetitions
        for name, fn in runs.items():
            times[name].append(_time(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    ref_bytes = reference_heat_maps(unet, scheduler, z0, hidden, weights, timesteps=timesteps)[2]
    ours_bytes = heat_maps(unet, scheduler, z0, hidden, weights, timesteps=timesteps).capture_bytes
    return {
        "speedup": med["reference"] / med["ours"],
        "overhead": med["ours"] / med["floor"],
        "memory_ratio": ref_bytes / ours_bytes,
        "images_per_s": images / med["ours"],
        "device": _device_name(dev),
        "seconds": {k: round(v, 4) for k, v in med.items()},
        "captured_bytes": {"reference": ref_bytes, "ours": ours_bytes},
        "rows_per_chunk": chunk, "images": images, "latent": latent, "t0": t0, "repeats": repeats, "dtype": dtype,
    }


# ----------------------------------------------------------------------------------------------------------------
# Paper scale: the published architectures with random weights


class FixedTokenizer:
    """CLIP's token ids of the paper-scale bench's two prompts, so that it needs no tokenizer files.

    The ids are those of CLIP's BPE (Stable Diffusion 1.x's tokenizer): BOS 49406, "a</w>" 320, "photo</w>"
    1125, "of</w>" 539, "bird</w>" 3329, "background</w>" 5994, EOS 49407; padded with EOS to 77 positions as
    SD 1.x pads. The target word "bird" is token ``BENCH_TARGET`` = 5. Called like a transformers tokenizer
    by ``diffusion.encode_text`` (``input_ids``, ``attention_mask``).
    """

    ids = {BENCH_PROMPT: (49406, 320, 1125, 539, 320, 3329, 49407),
           BACKGROUND_PROMPT: (49406, 320, 1125, 539, 320, 5994, 49407)}
    pad_token_id = 49407

    def __init__(self, model_max_length: int = 77):
        self.model_max_length = int(model_max_length)

    def __call__(self, prompts, padding="max_length", max_length=None, truncation=True, return_tensors="pt"):
        from transformers import BatchEncoding

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        unknown = sorted({p for p in prompts if p not in self.ids})
        if unknown:
            raise KeyError(f"FixedTokenizer has the token ids of {sorted(self.ids)} only, got {unknown}")
        length = int(max_length or self.model_max_length)
        input_ids = torch.full((len(prompts), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(len(prompts), length, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids = self.ids[prompt][:length]
            input_ids[i, :len(ids)] = torch.tensor(ids)
            attention_mask[i, :len(ids)] = 1
        return BatchEncoding({"input_ids": input_ids, "attention_mask": attention_mask})


COMPONENT_FILES = ("unet.json", "vae.json", "text_encoder.json", "scheduler.json")


def read_config(path) -> dict:
    """Return the component config in the JSON file ``path`` without its notes (keys starting with "_")."""
    return {k: v for k, v in json.loads(Path(path).read_text()).items() if not k.startswith("_")}


def sd_components(config_dir, tokenizer, seed: int = 0, device: str | torch.device = "cpu",
                  unet_dtype: torch.dtype = torch.float32) -> SimpleNamespace:
    """Return a Stable Diffusion pipeline's parts (unet, vae, text_encoder, tokenizer, scheduler, as the stage code
    reads them) built from the component configs in ``config_dir`` (``COMPONENT_FILES``), random weights seeded.

    The U-Net is cast to ``unet_dtype``; the VAE and the text encoder stay float32.
    """
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(config_dir)
    missing = [name for name in COMPONENT_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks the component configs {missing} (see {MODEL_CONFIGS})")
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's global RNG
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(read_config(folder / "unet.json"))
        torch.manual_seed(seed)
        vae = AutoencoderKL.from_config(read_config(folder / "vae.json"))
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(read_config(folder / "text_encoder.json")))
    scheduler_class = json.loads((folder / "scheduler.json").read_text())["_class_name"]
    scheduler = getattr(diffusers, scheduler_class).from_config(read_config(folder / "scheduler.json"))
    unet = unet.to(device).eval()
    if unet_dtype != torch.float32:
        unet = _cast(unet, unet_dtype)
    return SimpleNamespace(
        unet=unet, vae=vae.to(device).eval(), text_encoder=text_encoder.to(device).eval(),
        tokenizer=tokenizer, scheduler=scheduler, vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
        text_attention_mask=False, foba_source=str(folder),
    )


def _cast(model, dtype: torch.dtype):
    """``model.to(dtype)`` without diffusers' warning about float32 modules, of which its U-Net and VAE have none."""
    import logging

    log = logging.getLogger("diffusers.models.modeling_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return model.to(dtype)
    finally:
        log.setLevel(level)


def attention_geometry(unet, latent_hw: tuple[int, int], kind: str = "attn2") -> list[tuple[str, int, int]]:
    """Return (layer name, heads, queries) of each ``kind`` attention layer ("attn2": cross, "attn1": self) of a
    UNet2DConditionModel on latents of size ``latent_hw``.

    Down block i works on the latents downsampled i times (each halving rounds up), the middle block on the
    lowest level, up block j on level (levels - 1 - j).
    """
    levels = len(unet.config.block_out_channels)
    out = []
    for name, module in unet.named_modules():
        if name.rsplit(".", 1)[-1] != kind:
            continue
        block, index = name.split(".")[:2]
        if block == "down_blocks":
            level = int(index)
        elif block == "up_blocks":
            level = levels - 1 - int(index)
        else:  # mid_block
            level = levels - 1
        h, w = (math.ceil(s / 2**level) for s in latent_hw)
        out.append((name, module.heads, h * w))
    return out


def reference_memory(unet, latent_hw: tuple[int, int], seq_len: int, n_timesteps: int, n_images: int) -> dict:
    """Return the bytes that (a), ``reference_heat_maps``, needs on ``n_images`` images at once.

    ``stored``: every cross-attention map it keeps, T0 × N × Σ_l heads_l × Q_l × L × element size;
    ``self_attention``: its largest explicit self-attention, scores and softmax (2 × N × heads × Q² × element
    size), formed on top of them in the last forward pass.
    """
    itemsize = next(unet.parameters()).element_size()
    per_pass = sum(heads * q for _, heads, q in attention_geometry(unet, latent_hw, "attn2")) * seq_len * itemsize
    largest = max((heads * q * q for _, heads, q in attention_geometry(unet, latent_hw, "attn1")), default=0)
    return {"stored": n_timesteps * n_images * per_pass, "self_attention": 2 * n_images * largest * itemsize}


def available_bytes(device: torch.device) -> int:
    """Return the memory a run on ``device`` may still take: free GPU memory, or the RAM the kernel reports available."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def reference_fits(need: dict, device: torch.device, memory_limit: float | None = None) -> tuple[bool, str | None]:
    """Return (fits, reason): whether (a)'s estimated bytes ``need`` fit ``MEMORY_MARGIN`` of the available memory
    (``memory_limit`` if given, else ``available_bytes``), and, when not, a sentence with the numbers."""
    available = available_bytes(device) if memory_limit is None else int(memory_limit)
    total = need["stored"] + need["self_attention"]
    if total <= MEMORY_MARGIN * available:
        return True, None
    where = "free GPU memory" if device.type == "cuda" else "available RAM"
    return False, (f"(a) would need {total} bytes ({need['stored']} of stored cross-attention maps + "
                   f"{need['self_attention']} of explicit self-attention) but {available} bytes of {where} are left; "
                   f"it was not run")


def _rss_bytes() -> int:
    """The process's resident set size now (Linux), or its peak so far where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _rss_peak_bytes()


def _rss_peak_bytes() -> int:
    """The process's peak resident set size so far (getrusage: kB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if os.uname().sysname == "Darwin" else peak * 1024


class PeakMemory:
    """Context manager: wall time (``seconds``), peak process RSS (``rss``, sampled every ``interval`` s) and, on
    CUDA, peak GPU memory allocated (``gpu``) during the block."""

    def __init__(self, device: torch.device, interval: float = 0.01):
        self.device, self.interval = device, interval
        self.seconds, self.rss, self.gpu = 0.0, 0, None

    def __enter__(self) -> "PeakMemory":
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rss = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        self._start = time.perf_counter()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.rss = max(self.rss, _rss_bytes())

    def __exit__(self, *exc) -> None:
        _sync(self.device)
        self.seconds = time.perf_counter() - self._start
        self._stop.set()
        self._thread.join()
        self.rss = max(self.rss, _rss_bytes())
        if self.device.type == "cuda":
            self.gpu = int(torch.cuda.max_memory_allocated(self.device))


class _Laps:
    """Wall time of consecutive parts of one run (device-synchronised)."""

    def __init__(self, device: torch.device):
        self.device, self.parts = device, {}
        _sync(device)
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        _sync(self.device)
        now = time.perf_counter()
        self.parts[name] = self.parts.get(name, 0.0) + now - self._last
        self._last = now


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |a|."""
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def _size(n: int | None) -> str:
    """Bytes in decimal units (kB, MB, GB), "-" for None."""
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _print_table(res: dict, parts: tuple[str, ...]) -> None:
    """Print the seconds of each part, the total, the peak RSS (and GPU memory) and the captured bytes of (a)/(b)/(c)."""
    gpu = res.get("peak_gpu_bytes") is not None
    head = "".join(f"{p:>11}" for p in parts) + f"{'total':>11}{'peak RSS':>12}" + (f"{'peak GPU':>12}" if gpu else "")
    print(f"{'':>10}{head}{'captured maps':>16}")
    for run, label in (("reference", "(a) ref"), ("floor", "(b) floor"), ("ours", "(c) ours")):
        if res["seconds"][run] is None:
            print(f"{label:>10}  skipped: {res['reference_skipped']}")
            continue
        row = "".join(f"{res['seconds_' + p][run]:>9.2f} s" for p in parts) + f"{res['seconds'][run]:>9.2f} s"
        row += f"{_size(res['peak_rss_bytes'][run]):>12}" + (f"{_size(res['peak_gpu_bytes'][run]):>12}" if gpu else "")
        print(f"{label:>10}{row}{_size(res['captured_bytes'].get(run)):>16}")
    speedup = "null" if res["speedup"] is None else f"{res['speedup']:.2f}x"
    print(f"speedup (a)/(c) {speedup}, overhead (c)/(b) {res['overhead']:.2f}x; {res['device']}, {res['dtype']}")


def measure_runs(device: torch.device, runs: dict, skip: tuple[str, ...] = ()) -> tuple[dict, dict, dict]:
    """Run each ``runs[name](laps)`` once, in order, except those in ``skip``; return their results, their
    ``PeakMemory`` meters and their timed parts (``_Laps.parts``), each by name."""
    import gc

    results, meters, parts = {}, {}, {}
    for name, fn in runs.items():
        if name in skip:
            continue
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with PeakMemory(device) as meter:
            laps = _Laps(device)
            results[name] = fn(laps)
        meters[name], parts[name] = meter, laps.parts
    return results, meters, parts


def _summary(device: torch.device, order: tuple[str, ...], meters: dict, parts: dict, part_names: tuple[str, ...]) -> dict:
    """The seconds (per part and total), speedup, overhead and peak memory of the runs, None for a run left out."""
    seconds = {n: (sum(parts[n].values()) if n in parts else None) for n in order}
    out = {"seconds": seconds}
    for p in part_names:
        out[f"seconds_{p}"] = {n: (parts[n].get(p, 0.0) if n in parts else None) for n in order}
    out["speedup"] = _ratio(seconds["reference"], seconds["ours"])
    out["overhead"] = _ratio(seconds["ours"], seconds["floor"])
    if len(part_names) > 1:
        first = out[f"seconds_{part_names[0]}"]
        out[f"speedup_{part_names[0]}"] = _ratio(first["reference"], first["ours"])
        out[f"overhead_{part_names[0]}"] = _ratio(first["ours"], first["floor"])
    out["peak_rss_bytes"] = {n: (meters[n].rss if n in meters else None) for n in order}
    out["process_peak_rss_bytes"] = _rss_peak_bytes()
    out["peak_gpu_bytes"] = ({n: (meters[n].gpu if n in meters else None) for n in order}
                             if device.type == "cuda" else None)
    return out


def bench_paper_scale(images: int = 3, t0: int = 40, ddim_steps: int = 50, dtype: str = "float32",
                      device: str | None = None, seed: int = 0, quick: bool = False, configs=None,
                      memory_limit: float | None = None) -> dict:
    """Time (a), (b), (c) of stage 1 + refinement on SD v1.4's architecture, one run each; return seconds, ratios, memory.

    ``configs`` is a folder with other ``COMPONENT_FILES`` (tests: tiny ones), ``memory_limit`` the bytes (a) may
    take instead of the available memory.
    """
    from foba_core.capture import token_weights
    from foba_core.diffusion import decode_latents, encode_latents, model_resolution
    from foba_core.masks import preliminary_masks
    from foba_core.models import encode_prompts
    from foba_core.refine import refine_masks

    dev = _device(device)
    unet_dtype = getattr(torch, dtype)
    config_dir = Path(configs) if configs is not None else MODEL_CONFIGS / "sd14"
    pipe = sd_components(config_dir, FixedTokenizer(), seed, dev, unet_dtype)
    size = model_resolution(pipe)
    x = torch.rand(images, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))  # (N, 3, S, S) in [0, 1]
    timesteps = authors_timesteps(t0, pipe.scheduler.config.num_train_timesteps)
    seq_len = pipe.tokenizer.model_max_length
    latent_hw = (size // pipe.vae_scale_factor,) * 2
    weights = token_weights([[[BENCH_TARGET]]] * images, seq_len).to(dev)  # (N, L, 1): "bird"
    need = reference_memory(pipe.unet, latent_hw, seq_len, len(timesteps), images)
    fits, skipped = reference_fits(need, dev, memory_limit)
    chunk = rows_per_chunk(pipe.unet, latent_hw, seq_len, default_budget_bytes(dev))  # as heat_maps chunks

    def ours_maps(z0, hidden, key_mask):
        maps = heat_maps(pipe.unet, pipe.scheduler, z0, hidden, weights, text_mask=key_mask, timesteps=timesteps,
                         seed=seed)
        return maps.total, maps.capture_bytes

    def reference_maps(z0, hidden, key_mask):
        total, _, stored = reference_heat_maps(pipe.unet, pipe.scheduler, z0, hidden, weights, key_mask, timesteps, seed)
        return total, stored

    def stage1_and_refinement(maps_of):
        def run(laps):
            z0 = encode_latents(pipe, x)  # (N, 4, h, w)
            hidden, key_mask = encode_prompts(pipe, [BENCH_PROMPT] * images, device=dev)  # (N, L, D)
            m_hat, captured = maps_of(z0, hidden, key_mask)  # M̂ (N, 1, h, w), Eq. 4
            m_pre = preliminary_masks(m_hat[:, 0].float().cpu(), random_state=seed)  # GMM + mean filter
            laps.lap("stage1")
            masks = refine_masks(pipe, x, m_pre, num_inference_steps=ddim_steps, seed=seed, n_samples=1,
                                 fit="image", z0=z0)[0]  # Eq. 6 inpainting under y_b, then Eq. 5
            laps.lap("refine")
            return {"m_hat": m_hat.cpu(), "m_pre": m_pre, "masks": masks, "captured": captured}
        return run

    def floor(laps):
        z0 = encode_latents(pipe, x)
        hidden = encode_prompts(pipe, [BENCH_PROMPT] * images, device=dev)[0]
        floor_forwards(pipe.unet, pipe.scheduler, z0, hidden, timesteps, chunk, seed)
        laps.lap("stage1")
        background = encode_prompts(pipe, [BACKGROUND_PROMPT] * images, device=dev)[0]
        floor_inpaint_forwards(pipe, z0, background, ddim_steps)
        laps.lap("refine")
        return {}

    with torch.inference_mode():  # warm-up: one image through the VAE encoder, the U-Net and the VAE decoder
        z = encode_latents(pipe, x[:1])
        pipe.unet(z.to(unet_dtype), torch.tensor([1], device=dev),
                  encode_prompts(pipe, [BENCH_PROMPT], device=dev)[0].to(unet_dtype))
        decode_latents(pipe, z)
    rss_before = _rss_bytes()
    runs = {"floor": floor, "ours": stage1_and_refinement(ours_maps), "reference": stage1_and_refinement(reference_maps)}
    results, meters, parts = measure_runs(dev, runs, skip=() if fits else ("reference",))
    order = ("reference", "floor", "ours")
    res = {"bench": "paper-scale", "model": "Stable Diffusion v1.4 architecture, random weights",
           "configs": str(config_dir), "device": _device_name(dev), "dtype": dtype, "threads": torch.get_num_threads(),
           "images": images, "resolution": size, "latent": list(latent_hw), "t0": t0, "ddim_steps": ddim_steps, "quick": quick,
           "prompt": BENCH_PROMPT, "target_token": BENCH_TARGET}
    res.update(_summary(dev, order, meters, parts, ("stage1", "refine")))
    res["captured_bytes"] = {"reference": results.get("reference", {}).get("captured"),
                             "ours": results["ours"]["captured"]}
    res["reference_need_bytes"] = need
    res["reference_skipped"] = skipped
    res["rss_before_bytes"] = rss_before
    res["maps_rel_diff"] = (_rel_diff(results["reference"]["m_hat"], results["ours"]["m_hat"])
                            if "reference" in results else None)  # same noise: M̂ of (a) and (c) agree
    res["rows_per_chunk"] = chunk
    res["seed"] = seed
    return res


def main(argv=None, *, configs=None, memory_limit: float | None = None) -> dict:
    """Run a benchmark from the command line, print its table and, last, its JSON; return the JSON's dict.

    ``configs`` (a folder of ``COMPONENT_FILES``) and ``memory_limit`` (bytes) are for tests: other model sizes
    through the same code, another memory budget for (a). They are not command-line options.
    """
    parser = argparse.ArgumentParser(prog="python -m foba_core.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["attention", "paper-scale", "cxr-paper-scale", "zoo-cxr"])
    parser.add_argument("--images", type=int, default=None, help="images per batch (attention: 4, paper-scale: 3)")
    parser.add_argument("--latent", type=int, default=32, help="attention: latent side length")
    parser.add_argument("--t0", type=int, default=None, help="timesteps of M̂ (default 40; --quick: 2)")
    parser.add_argument("--ddim_steps", type=int, default=None,
                        help="paper-scale: DDIM steps of the inpainting (default 50 as the paper; --quick: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="attention: interleaved repetitions (median)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="the U-Net's dtype (the captured maps and the GMMs are float32 always)")
    parser.add_argument("--quick", action="store_true",
                        help="paper-scale, cxr-paper-scale: a CPU-sized smoke run of the same models (T0 2, DDIM 2)")
    args = parser.parse_args(argv)
    if args.what == "attention":
        if args.quick or args.ddim_steps is not None:
            parser.error("--quick and --ddim_steps apply to paper-scale and cxr-paper-scale only")
        if args.repeats < 3:
            parser.error("--repeats must be at least 3 (the median of interleaved repetitions is reported)")
        t0 = 40 if args.t0 is None else args.t0
        res = bench_attention(args.images or 4, args.latent, t0, args.repeats, device=args.device, dtype=args.dtype)
        for k in ("reference", "floor", "ours"):
            print(f"{k:>10}: {res['seconds'][k]:8.3f} s  (median of {args.repeats})")
        print(json.dumps(res))
        return res
    t0 = args.t0 if args.t0 is not None else (2 if args.quick else 40)
    if args.what == "zoo-cxr":
        if args.images not in (None, 1) or args.ddim_steps is not None:
            parser.error("zoo-cxr evaluates one image and refines nothing: no --images, no --ddim_steps")
        import tempfile

        from foba_med.zoo_model import measure

        with tempfile.TemporaryDirectory() as tmp:  # the random bundle (2.4 GB) and its phantom, removed after
            res = measure(tmp, t0, args.device, args.dtype)
        print(f"zoo-cxr: the model zoo CXR LDM's architecture (random weights), one {res['image_size']}x"
              f"{res['image_size']} MS-CXR finding, T0 {t0}: {res['seconds_per_image']} s per image")
    elif args.what == "cxr-paper-scale":
        if args.images not in (None, 1) or args.ddim_steps is not None:
            parser.error("cxr-paper-scale evaluates one image and refines nothing: no --images, no --ddim_steps")
        from foba_med.bench import bench_cxr_paper_scale

        res = bench_cxr_paper_scale(t0, args.dtype, args.device, quick=args.quick, configs=configs,
                                    memory_limit=memory_limit)
        print(f"cxr-paper-scale: SD 2.x base architecture, one {res['resolution']}x{res['resolution']} radiograph, "
              f"finding {res['finding']!r} ({len(res['token_index'])} tokens), T0 {t0}")
        _print_table(res, ("heat_maps",))
    else:
        steps = args.ddim_steps if args.ddim_steps is not None else (2 if args.quick else 50)
        images = 3 if args.images is None else args.images
        if images < 1 or steps < 1:
            parser.error("--images and --ddim_steps must be at least 1")
        res = bench_paper_scale(images, t0, steps, args.dtype, args.device, quick=args.quick, configs=configs,
                                memory_limit=memory_limit)
        print(f"paper-scale: SD v1.4 architecture, {images} image(s) of {res['resolution']}x{res['resolution']}, "
              f"T0 {t0}, DDIM {steps} steps; seconds per batch of {images}")
        _print_table(res, ("stage1", "refine"))
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
