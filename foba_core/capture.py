"""Cross-attention capture, words -> tokens, and the mean attention heat maps M̂ (paper Eq. 3-4).

``AttentionCapture`` installs a capturing processor on every cross-attention layer (``attn2``) of a
diffusers ``UNet2DConditionModel`` and restores the original processors on exit; on MONAI's
``DiffusionModelUNet`` (``foba_core.monai_ldm``) it replaces the ``forward`` of each ``attn2``
``CrossAttentionBlock`` the same way, and the class's forward (flash attention, if configured) returns on
exit. The processor computes the attention probabilities psi = softmax(Q K^T / sqrt(d)) (Eq. 2) itself, keeps only the
target tokens' columns, averages them over heads, upsamples them to the latent resolution and adds
them to running sums. Self-attention keeps its fused kernel. Under mixed precision (a float16 / bfloat16
U-Net) the captured probabilities are computed from the layer's Q and K in float32, and the running sums and M̂
are float32.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def authors_timesteps(t0: int = 40, num_train_timesteps: int = 1000, inference_steps: int = 50) -> list[int]:
    """Return the T0 timesteps of the authors' code: the lowest T0 of a 50-step DDIM grid (781, 761, ..., 1 for T0=40)."""
    step = num_train_timesteps // inference_steps
    if not 1 <= t0 <= inference_steps:
        raise ValueError(f"T0 must be in [1, {inference_steps}] for a {inference_steps}-step grid, got {t0}")
    return [1 + step * i for i in reversed(range(t0))]


def span_token_indices(tokenizer, prompt: str, spans: list[tuple[int, int]]) -> list[int]:
    """Return the sorted indices of ALL prompt sub-tokens overlapping any character span (start, end).

    Special tokens (BOS, EOS, padding) cover no characters and are never returned; a span beyond the
    truncation at ``tokenizer.model_max_length`` yields no index.
    """
    enc = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    return sorted({i for (s, e) in spans for i, (a, b) in enumerate(offsets) if b > a and a < e and b > s})


def token_indices(tokenizer, prompt: str, words: list[str] | str) -> list[list[int]]:
    """Return, for each target word (or phrase), the indices of ALL its sub-tokens in the tokenised prompt."""
    words = [words] if isinstance(words, str) else list(words)
    out = []
    for word in words:
        spans = [m.span() for m in re.finditer(rf"(?<!\w){re.escape(word.strip())}(?!\w)", prompt, flags=re.IGNORECASE)]
        idx = span_token_indices(tokenizer, prompt, spans)
        if not idx:
            ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
            tokens = tokenizer.convert_ids_to_tokens(ids)
            raise ValueError(f"word {word!r} is not in the prompt {prompt!r} (or was truncated at "
                             f"{tokenizer.model_max_length} tokens); the prompt's tokens are {tokens}")
        out.append(idx)
    return out


def token_weights(index_lists: list[list[list[int]]], seq_len: int) -> torch.Tensor:
    """Return the selection matrix W (B, L, n): W[b, l, k] = 1 if token l belongs to target k of prompt b."""
    n = max(len(x) for x in index_lists)
    w = torch.zeros(len(index_lists), seq_len, n)
    for b, targets in enumerate(index_lists):
        for k, idx in enumerate(targets):
            w[b, idx, k] = 1.0
    return w


def _layer_grid(q_len: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """Return the (h, w) of a U-Net layer whose attention has ``q_len`` queries (downsampling rounds up)."""
    h, w = latent_hw
    for k in range(8):
        hk, wk = math.ceil(h / 2**k), math.ceil(w / 2**k)
        if hk * wk == q_len:
            return hk, wk
    raise ValueError(f"cannot place {q_len} attention queries on a grid derived from the latent size {latent_hw}")


class _CaptureProcessor:
    """Cross-attention processor with explicit probabilities that hands them to an ``AttentionCapture``."""

    def __init__(self, capture: "AttentionCapture", name: str):
        self.capture, self.name = capture, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, hh, ww = hidden_states.shape
            hidden_states = hidden_states.view(b, c, hh * ww).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, seq_len, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = self.capture._project_context(attn, context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, Q, d)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, L, d)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # psi in float32 whatever the U-Net's dtype (mixed precision): the captured maps keep full precision
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale  # (B, heads, Q, L)
        if attention_mask is not None:
            scores = scores + attention_mask.float()
        probs = scores.softmax(dim=-1)  # psi(Q_l, K_l^T), Eq. 2
        self.capture._add(self.name, probs)
        probs = probs.to(value.dtype)
        hidden_states = torch.matmul(probs, value).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, hh, ww)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _monai_capture_forward(capture: "AttentionCapture", name: str, block):
    """Return a ``forward`` for MONAI's ``CrossAttentionBlock`` with explicit probabilities handed to ``capture``."""

    def forward(x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        query = block.input_rearrange(block.to_q(x))  # (B, heads, Q, d)
        key, value = capture._project_context(block, context)
        key, value = block.input_rearrange(key), block.input_rearrange(value)  # (B, heads, L, d)
        # psi in float32 whatever the U-Net's dtype (MONAI's attention_dtype included), as for diffusers
        scores = torch.einsum("bhqd,bhld->bhql", query.float(), key.float()) * block.scale  # (B, heads, Q, L)
        probs = scores.softmax(dim=-1)  # psi(Q_l, K_l^T), Eq. 2
        capture._add(name, probs)
        out = torch.einsum("bhql,bhld->bhqd", probs.to(value.dtype), value)
        return block.drop_output(block.out_proj(block.out_rearrange(out)))

    return forward


def _monai_cross_attention(unet) -> dict[str, torch.nn.Module]:
    """Return the cross-attention blocks (``attn2``) of a MONAI ``DiffusionModelUNet`` by name, in forward order."""
    from monai.networks.blocks import CrossAttentionBlock

    blocks = {n: m for n, m in unet.named_modules() if n.endswith("attn2") and isinstance(m, CrossAttentionBlock)}
    for name, block in blocks.items():
        if block.causal or block.rel_positional_embedding is not None:
            raise ValueError(f"{name}: causal or relative-position cross-attention is not captured")
    return blocks


class _AllLayersCaptured(Exception):
    """Raised by a capture with ``stop_after_last=True`` once every cross-attention layer has been read."""


class AttentionCapture:
    """Context manager capturing the target tokens' cross-attention of a U-Net as running sums.

    Before each forward pass call ``select(weights)`` with the selection matrix W (B, L, n) of the rows
    to read (``token_weights``); after it, ``pop()`` returns the sum over layers of the head-averaged,
    upsampled maps (B, n, H, W) and, with ``per_layer=True``, the same per layer. With
    ``conditional_half=True`` the U-Net batch is [unconditional; conditional] (classifier-free
    guidance, as diffusers pipelines stack it) and only the conditional half is read. With
    ``stop_after_last=True`` (maps only, the U-Net's output is not wanted) the forward pass stops
    right after the last cross-attention layer; run it through ``forward(...)``.
    """

    def __init__(self, unet, latent_hw: tuple[int, int], per_layer: bool = False, conditional_half: bool = False,
                 stop_after_last: bool = False):
        self.unet, self.latent_hw = unet, tuple(latent_hw)
        self.per_layer, self.conditional_half, self.stop_after_last = per_layer, conditional_half, stop_after_last
        self._weights: torch.Tensor | None = None
        self._cols: torch.Tensor | None = None
        self._context_rows: tuple[torch.Tensor, torch.Tensor] | None = None
        self._n_layers, self._n_added = 0, 0
        self._total: torch.Tensor | None = None
        self._layers: dict[str, torch.Tensor] = {}
        self._original = None
        self.peak_bytes = 0  # most bytes of captured maps held at once (running sums of one forward pass)

    def __enter__(self) -> "AttentionCapture":
        if not hasattr(self.unet, "attn_processors"):  # MONAI: each attn2 block's forward, until exit
            blocks = _monai_cross_attention(self.unet)
            for name, block in blocks.items():
                block.forward = _monai_capture_forward(self, name, block)  # an instance attribute shadows the class's
            self._original, self._n_layers = blocks, len(blocks)
        else:
            self._original = dict(self.unet.attn_processors)
            procs = {}
            for name, proc in self._original.items():
                procs[name] = _CaptureProcessor(self, name.rsplit(".processor", 1)[0]) if ".attn2." in name + "." else proc
            self._n_layers = sum(isinstance(p, _CaptureProcessor) for p in procs.values())
            self.unet.set_attn_processor(procs)  # (diffusers empties the dict it is given)
        if not self._n_layers:
            self.__exit__()
            raise ValueError("this U-Net has no cross-attention layers (attn2) to capture")
        return self

    def __exit__(self, *exc) -> None:
        if hasattr(self.unet, "attn_processors"):
            self.unet.set_attn_processor(self._original)
        else:
            for block in self._original.values():
                del block.forward  # the class's forward again (flash attention as configured)
        self._original = None

    @property
    def layer_names(self) -> list[str]:
        """Names of the captured cross-attention layers, in forward order."""
        if not hasattr(self.unet, "attn_processors"):
            return list(_monai_cross_attention(self.unet))
        return [n.rsplit(".processor", 1)[0] for n in self.unet.attn_processors if ".attn2." in n + "."]

    def select(self, weights: torch.Tensor, context_rows: torch.Tensor | None = None) -> None:
        """Set the selection matrix W (B, L, n) for the next forward pass (B = conditional rows).

        ``context_rows`` (B,) optionally says which rows share one text context (e.g. the image index of
        (image, timestep) rows): keys and values are then projected once per distinct context.
        """
        self._cols = weights.abs().sum(dim=(0, 2)).nonzero().flatten()  # tokens used by any row
        self._weights = weights[:, self._cols, :].float()  # (B, k, n)
        self._total, self._layers, self._n_added = None, {}, 0
        self._context_rows = None
        if context_rows is not None:
            distinct, inverse = torch.unique(context_rows, return_inverse=True)
            first = torch.full_like(distinct, len(context_rows)).scatter_reduce(
                0, inverse, torch.arange(len(context_rows), device=context_rows.device), "amin")
            self._context_rows = (first, inverse)

    def _project_context(self, attn, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return K = to_k(context) and V = to_v(context), computed once per distinct context of the batch."""
        if self._context_rows is None or self.conditional_half or context.shape[0] != len(self._context_rows[1]):
            return attn.to_k(context), attn.to_v(context)
        first, inverse = self._context_rows
        distinct = context.index_select(0, first)
        return attn.to_k(distinct).index_select(0, inverse), attn.to_v(distinct).index_select(0, inverse)

    def _add(self, name: str, probs: torch.Tensor) -> None:
        if self._weights is None:
            raise RuntimeError("call AttentionCapture.select(weights) before running the U-Net")
        if self.conditional_half:
            probs = probs[probs.shape[0] // 2:]
        b, heads, q_len, _ = probs.shape
        if b != self._weights.shape[0]:
            raise ValueError(f"the U-Net batch has {b} rows to read but select() was given {self._weights.shape[0]}")
        cols = probs.index_select(-1, self._cols.to(probs.device)).float().sum(1) / heads  # (B, Q, k) head mean
        maps = torch.bmm(cols, self._weights.to(cols.device)).transpose(1, 2)  # (B, n, Q)
        h, w = _layer_grid(q_len, self.latent_hw)
        maps = maps.reshape(b, -1, h, w)
        if (h, w) != self.latent_hw:
            maps = F.interpolate(maps, size=self.latent_hw, mode="bilinear", align_corners=False)
        self._total = maps if self._total is None else self._total + maps  # sum over layers l (Eq. 4)
        if self.per_layer:
            self._layers[name] = maps
        held = self._total.nbytes + sum(m.nbytes for m in self._layers.values())
        self.peak_bytes = max(self.peak_bytes, held)
        self._n_added += 1
        if self.stop_after_last and self._n_added == self._n_layers:
            raise _AllLayersCaptured  # the rest of the forward pass (last feed-forward, conv_out) feeds no map

    def forward(self, *args, **kwargs) -> None:
        """Run the U-Net for its maps only: with ``stop_after_last`` it ends after the last captured layer."""
        try:
            self.unet(*args, **kwargs)
        except _AllLayersCaptured:
            pass

    def pop(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the captured layer sum (B, n, H, W) and the per-layer maps of the last forward pass."""
        if self._total is None:
            raise RuntimeError("nothing was captured: did the U-Net run inside the capture?")
        out = (self._total, self._layers)
        self._total, self._layers = None, {}
        return out


@dataclass
class HeatMaps:
    """Mean attention heat maps M̂ (Eq. 4) at latent resolution, with the optional views users ask for."""

    total: torch.Tensor  # (N, n_targets, h, w): sum over layers and timesteps
    timesteps: list[int]
    layer_names: list[str]
    per_timestep: torch.Tensor | None = None  # (N, T0, n_targets, h, w)
    per_layer: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (N, n_targets, h, w)
    capture_bytes: int = 0  # peak bytes of captured maps: the outputs plus one forward pass's running sums


def rows_per_chunk(unet, latent_hw: tuple[int, int], seq_len: int, budget_bytes: float) -> int:
    """Return how many (image, timestep) rows fit one U-Net forward within ``budget_bytes`` (an estimate)."""
    h, w = latent_hw
    channels = unet.config.block_out_channels
    itemsize = next(unet.parameters()).element_size()
    # Activations kept alive at one time are a few feature maps per resolution level, plus the
    # largest attention score matrix (self-attention on CPU forms it; cross-attention always does).
    feats = sum(12 * c * math.ceil(h / 2**k) * math.ceil(w / 2**k) for k, c in enumerate(channels))
    # UNet2DConditionModel takes num_attention_heads, or else attention_head_dim, as the number of heads.
    heads = unet.config.num_attention_heads or unet.config.attention_head_dim
    heads = max(heads) if isinstance(heads, (list, tuple)) else int(heads)
    attn = heads * (h * w) * max(h * w, seq_len)
    return max(1, int(budget_bytes // ((feats + attn) * itemsize)))


def default_budget_bytes(device: torch.device) -> float:
    """Return the memory budget for one extraction chunk: half the free GPU memory, or 2 GiB on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.5 * free
    return 2 * 1024**3


@torch.inference_mode()
def heat_maps(unet, scheduler, z0: torch.Tensor, text_hidden: torch.Tensor, weights: torch.Tensor,
              text_mask: torch.Tensor | None = None, timesteps: list[int] | None = None, seed: int = 0,
              per_timestep: bool = False, per_layer: bool = False, budget_bytes: float | None = None,
              progress: bool = False) -> HeatMaps:
    """Return M̂ = sum_t sum_l psi_{z_t,l} (Eq. 4) for latents z0 (N, C, h, w) and their prompts' target tokens.

    ``text_hidden`` (N, L, D) and ``weights`` (N, L, n) belong to each image's prompt; each z_t is an
    independent ``q_sample(z0, t)`` with noise from a generator seeded by ``seed``. Images x timesteps
    run through the U-Net in chunks sized by ``budget_bytes``. z_t and the text go into the U-Net at its dtype
    (z0 may be float32 for a float16 / bfloat16 U-Net); the maps are float32 whatever that dtype.
    """
    timesteps = authors_timesteps(40, scheduler.config.num_train_timesteps) if timesteps is None else list(timesteps)
    n_img, n_t = z0.shape[0], len(timesteps)
    latent_hw = tuple(z0.shape[-2:])
    device = z0.device
    dtype = next(unet.parameters()).dtype  # z_t and the text go in at the U-Net's dtype; M̂ is summed in float32
    budget = default_budget_bytes(device) if budget_bytes is None else budget_bytes
    sized = unet
    if not hasattr(unet, "config"):  # MONAI's DiffusionModelUNet itself: its widths through the adapter's config
        from foba_core.monai_ldm import MonaiUNet

        sized = MonaiUNet(unet, latent_hw[0])
    chunk = rows_per_chunk(sized, latent_hw, text_hidden.shape[1], budget)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((n_t, *z0.shape), generator=gen).to(z0)  # independent noise per (t, image)
    t_all = torch.tensor(timesteps, device=device)
    rows = [(i, k) for i in range(n_img) for k in range(n_t)]  # image-major: an image's timesteps stay together
    total = torch.zeros(n_img, weights.shape[-1], *latent_hw, device=device, dtype=torch.float32)
    per_t = (torch.zeros(n_img, n_t, weights.shape[-1], *latent_hw, device=device, dtype=torch.float32)
             if per_timestep else None)
    layers: dict[str, torch.Tensor] = {}
    with AttentionCapture(unet, latent_hw, per_layer=per_layer, stop_after_last=True) as cap:
        for start in tqdm(range(0, len(rows), chunk), desc="attention heat maps", disable=not progress, mininterval=2):
            img = torch.tensor([r[0] for r in rows[start:start + chunk]], device=device)
            tk = torch.tensor([r[1] for r in rows[start:start + chunk]], device=device)
            z_t = scheduler.add_noise(z0[img], noise[tk, img], t_all[tk])  # q_sample(z0, t)
            cap.select(weights[img], context_rows=img)  # an image's timesteps share its prompt's K and V
            kwargs = {"encoder_attention_mask": text_mask[img]} if text_mask is not None else {}
            cap.forward(z_t.to(dtype), t_all[tk], text_hidden[img].to(dtype), **kwargs)
            maps, per_layer_maps = cap.pop()
            total.index_add_(0, img, maps)  # sum over t (Eq. 4)
            if per_t is not None:
                per_t[img, tk] = maps
            for name, m in per_layer_maps.items():
                layers.setdefault(name, torch.zeros_like(total)).index_add_(0, img, m)
        names = cap.layer_names
    held = total.nbytes + (per_t.nbytes if per_t is not None else 0) + sum(m.nbytes for m in layers.values())
    return HeatMaps(total=total, timesteps=timesteps, layer_names=names, per_timestep=per_t, per_layer=layers,
                    capture_bytes=held + cap.peak_bytes)
