"""Rotary position embeddings: the inverse frequencies of every rope type HF checkpoints use, and the cos/sin tables.

Each type follows the published formula as HF transformers computes it (same operations in float32, so the tables
are bitwise HF's): ``default``; ``linear`` (positions divided by ``factor``); ``dynamic`` (NTK: the base grows once a
sequence passes ``max_position_embeddings``); ``llama3`` (low frequencies divided by ``factor``, a smooth ramp
between); ``yarn`` (a ramp between interpolated and extrapolated frequencies, cos/sin scaled by an attention
factor); ``longrope`` (per-frequency factors, short below ``original_max_position_embeddings`` and long above,
cos/sin scaled). Layout is HF's rotate-half; ``partial_rotary_factor`` rotates the first part of each head only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def rotary_dim(params: dict[str, Any], head_dim: int) -> int:
    return int(head_dim * float(params.get("partial_rotary_factor", 1.0)))


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def inv_freq(params: dict[str, Any], head_dim: int, max_position_embeddings: int,
             seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (rotary_dim/2,) float32, attention scaling of cos/sin) for a sequence of ``seq_len``."""
    kind, base = params["rope_type"], float(params["rope_theta"])
    dim = rotary_dim(params, head_dim)
    if kind == "default":
        return _base_inv_freq(base, dim), 1.0
    if kind == "linear":
        return _base_inv_freq(base, dim) / params["factor"], 1.0
    if kind == "dynamic":
        factor = params["factor"]
        length = max(seq_len or max_position_embeddings, max_position_embeddings)
        base = base * ((factor * length / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if kind == "llama3":
        return _llama3(params, _base_inv_freq(base, dim)), 1.0
    if kind == "yarn":
        return _yarn(params, base, dim, max_position_embeddings)
    if kind == "longrope":
        return _longrope(params, base, dim, max_position_embeddings, seq_len)
    raise ValueError(f"rope type {kind!r} is not supported")


def _llama3(params: dict[str, Any], freqs: torch.Tensor) -> torch.Tensor:
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > low_wavelen, freqs / factor, freqs)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(params: dict[str, Any], base: float, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_position_embeddings / original
    attention = params.get("attention_factor")
    if attention is None:
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = float(_mscale(factor, mscale) / _mscale(factor, mscale_all)) if mscale and mscale_all else (
            _mscale(factor))
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the ramp needs a width
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # share of each frequency kept as trained (extrapolated)
    return interpolation * (1 - keep) + extrapolation * keep, attention


def _longrope(params: dict[str, Any], base: float, dim: int, max_position_embeddings: int,
              seq_len: int | None) -> tuple[torch.Tensor, float]:
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_position_embeddings / original
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    long = seq_len is not None and seq_len > original
    ext = torch.tensor(params["long_factor" if long else "short_factor"], dtype=torch.float32)
    return 1.0 / (ext * base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), attention


def _tables(freqs: torch.Tensor, scaling: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    angles = positions.float()[..., None] * freqs
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


class Rope(nn.Module):
    """cos/sin for positions [0, max_seq_len) of one layer type, looked up per token.

    Static types keep one float32 table. ``longrope`` keeps two: a sequence uses the short factors while it is
    within the original length and the long ones once it is longer (as HF decides per forward of one sequence).
    ``dynamic`` uses the plain table up to ``max_position_embeddings`` and, for a sequence longer than that,
    frequencies recomputed for its length. Both decide per sequence, so a batch gives each row what it would get
    alone.
    """

    def __init__(self, params: dict[str, Any], head_dim: int, max_position_embeddings: int, max_seq_len: int,
                 device: torch.device):
        super().__init__()
        self.params, self.head_dim, self.max_position_embeddings = params, head_dim, max_position_embeddings
        self.kind = params["rope_type"]
        self.rotary_dim = rotary_dim(params, head_dim)
        positions = torch.arange(max_seq_len)
        freqs, self.scaling = inv_freq(params, head_dim, max_position_embeddings)
        cos, sin = _tables(freqs, self.scaling, positions)
        self.register_buffer("cos", cos.to(device), persistent=False)
        self.register_buffer("sin", sin.to(device), persistent=False)
        self.long: tuple[torch.Tensor, torch.Tensor] | None = None
        self.original = params.get("original_max_position_embeddings", max_position_embeddings)
        if self.kind == "longrope" and max_seq_len > self.original:
            long, _ = inv_freq(params, head_dim, max_position_embeddings, seq_len=self.original + 1)
            self.long = tuple(t.to(device) for t in _tables(long, self.scaling, positions))
        self.limit = self.original if self.long is not None else (
            max_position_embeddings if self.kind == "dynamic" else None)  # sequences longer than this change tables

    @property
    def static(self) -> bool:
        """Whether one table serves every sequence (the native decode kernels take it as given)."""
        return self.limit is None or self.cos.shape[0] <= self.limit

    def forward(self, positions: torch.Tensor, dtype: torch.dtype,
                seq_lens: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, 1, T, rotary_dim) in ``dtype``, broadcast over heads; ``seq_lens`` are the rows' lengths
        (their last real position + 1), which decide the tables of longrope and dynamic rope."""
        cos, sin = self.cos[positions], self.sin[positions]
        if self.limit is not None and seq_lens is not None and max(seq_lens) > self.limit:
            cos, sin = cos.clone(), sin.clone()
            for row, length in enumerate(seq_lens):
                if length <= self.limit:
                    continue
                if self.long is not None:
                    cos[row], sin[row] = self.long[0][positions[row]], self.long[1][positions[row]]
                else:
                    freqs, _ = inv_freq(self.params, self.head_dim, self.max_position_embeddings, seq_len=length)
                    cos[row], sin[row] = _tables(freqs.to(positions.device), self.scaling, positions[row])
        return cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin over the first cos.shape[-1] features of each head; the rest pass through."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
