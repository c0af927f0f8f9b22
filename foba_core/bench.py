"""Benchmarks: ``python -m foba_core.bench attention [--images 4] [--latent 32] [--t0 40] [--repeats 3]``.

Runs, on the same U-Net and inputs, in one process and interleaved:
  (a) reference: the authors' way - one timestep per forward pass, explicit softmax attention in
      every attention layer (self and cross, as CompVis' attention computes it), every
      cross-attention map of every token stored and reduced afterwards;
  (b) floor: the U-Net with its default fused attention processors, batched exactly like (c),
      capturing nothing (the cost of the U-Net forwards themselves);
  (c) ours: ``foba_core.capture.heat_maps``.
Prints a table and, as its last line, JSON with speedup = t(a)/t(c), overhead = t(c)/t(b),
memory_ratio = captured-map bytes (a)/(c), images_per_s and device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from foba_core.capture import _layer_grid, authors_timesteps, default_budget_bytes, heat_maps, rows_per_chunk


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


@torch.inference_mode()
def reference_heat_maps(unet, scheduler, z0, text_hidden, weights, text_mask=None, timesteps=None, seed: int = 0):
    """Return (M̂ (N, n, h, w), per-layer dict, stored bytes) computed the naive way, for tests and benchmarks."""
    timesteps = authors_timesteps(40, scheduler.config.num_train_timesteps) if timesteps is None else list(timesteps)
    latent_hw = tuple(z0.shape[-2:])
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
            unet(scheduler.add_noise(z0, noise[k], tt), tt, text_hidden, **kwargs)
    finally:
        unet.set_attn_processor(original)
    stored = sum(p.nbytes for _, p in store)
    total = torch.zeros(z0.shape[0], weights.shape[-1], *latent_hw, device=z0.device)
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
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(timesteps), *z0.shape), generator=gen).to(z0)
    t_all = torch.tensor(timesteps, device=z0.device)
    rows = [(i, k) for i in range(z0.shape[0]) for k in range(len(timesteps))]
    for start in range(0, len(rows), chunk):
        img = torch.tensor([r[0] for r in rows[start:start + chunk]], device=z0.device)
        tk = torch.tensor([r[1] for r in rows[start:start + chunk]], device=z0.device)
        unet(scheduler.add_noise(z0[img], noise[tk, img], t_all[tk]), t_all[tk], text_hidden[img])


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


def _time(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_attention(images: int = 4, latent: int = 32, t0: int = 40, repeats: int = 3, seq_len: int = 77,
                    device: str | None = None, dtype: str = "float32") -> dict:
    """Time (a) reference, (b) floor, (c) ours on the same inputs; return the ratios and raw timings."""
    from diffusers import DDPMScheduler

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = getattr(torch, dtype)
    unet = sd1_fifth_unet(sample_size=latent).to(dev, dt)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    gen = torch.Generator().manual_seed(1)
    z0 = torch.randn(images, 4, latent, latent, generator=gen).to(dev, dt)
    hidden = torch.randn(images, seq_len, unet.config.cross_attention_dim, generator=gen).to(dev, dt)
    weights = torch.zeros(images, seq_len, 1)
    weights[:, 5, 0] = 1.0  # the object word of "a photo of a bird" after BOS: one target token
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
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "seconds": {k: round(v, 4) for k, v in med.items()},
        "captured_bytes": {"reference": ref_bytes, "ours": ours_bytes},
        "rows_per_chunk": chunk, "images": images, "latent": latent, "t0": t0, "repeats": repeats, "dtype": dtype,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m foba_core.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["attention"])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--t0", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be at least 3 (the median of interleaved repetitions is reported)")
    res = bench_attention(args.images, args.latent, args.t0, args.repeats, device=args.device, dtype=args.dtype)
    for k in ("reference", "floor", "ours"):
        print(f"{k:>10}: {res['seconds'][k]:8.3f} s  (median of {args.repeats})")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
