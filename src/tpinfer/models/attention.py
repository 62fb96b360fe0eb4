"""Attention over the KV cache, shared by every family: cache writes, masks, and the attention itself.

Two cache layouts (``tpinfer.engine.kv_cache``):

* **full**: position p at index p. The step's keys and values are written first, then a query attends indices
  [0, kv_len) with a causal mask (none at all for a lone sequence's prefill from position 0 or its decode),
  restricted to the last W positions for a sliding-window layer whose window W is too long for a ring.
* **ring**: a sliding-window layer of window W <= max_seq_len / 2 keeps W entries, position p at p mod W. A query
  attends the ring as it was before the step (entries of the W positions before the row's first new token) plus
  the step's own keys, masked to positions in (q - W, q]; afterwards the last W real tokens of each row are
  written. Padding is never written into a ring (it would evict a position the next query still needs).

A packed batch (several sequences in one row, no padding) runs each of them as its own single-row step.

Scores are scaled by ``scale`` (None: 1/sqrt(head_dim)); ``softcap`` caps them as c * tanh(s / c) before the mask
(Gemma 2), which SDPA cannot do, so that path computes attention explicitly (softmax in float32, as HF does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tpinfer.engine.kv_cache import Batch, KVCache

_SDPA_GQA = "enable_gqa" in torch.nn.functional.scaled_dot_product_attention.__doc__


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, cache: KVCache, batch: Batch,
                     scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """q (B, H_local, T, D) and k, v (B, H_kv_local, T, D), rope applied; returns (B, H_local, T, D)."""
    if batch.segments:  # a packed row: each sequence attends its own slot
        return torch.cat([cached_attention(q[:, :, o : o + part.lengths[0]], k[:, :, o : o + part.lengths[0]],
                                           v[:, :, o : o + part.lengths[0]], layer, cache, part, scale, softcap)
                          for o, part in batch.segments], dim=2)
    window = cache.ring[layer]
    if window is not None:
        return _ring_attention(q, k, v, layer, cache, batch, window, scale, softcap)
    k_cache, v_cache = cache.keys[layer], cache.values[layer]
    B, _, T, _ = q.shape
    if batch.single_row_start is not None:  # one sequence: its tokens are one slice of its slot
        slot, start = batch.single_row_start
        k_cache[slot, :, start : start + T] = k[0]
        v_cache[slot, :, start : start + T] = v[0]
    else:
        rows = batch.slots[:, None].expand(B, T)
        k_cache[rows, :, batch.positions] = k.transpose(1, 2)  # (B, T, H_kv_local, D) into its slots
        v_cache[rows, :, batch.positions] = v.transpose(1, 2)
    if batch.contiguous:
        first = int(batch.slots[0])
        keys = k_cache[first : first + B, :, : batch.kv_len]  # (B, H_kv_local, L, D)
        values = v_cache[first : first + B, :, : batch.kv_len]
    else:
        keys = k_cache.index_select(0, batch.slots)[:, :, : batch.kv_len]
        values = v_cache.index_select(0, batch.slots)[:, :, : batch.kv_len]
    mask = _full_mask(batch, cache.window[layer])
    # A lone sequence's prefill from position 0 is plain causal attention (SDPA's fused causal kernel).
    causal = mask is None and T > 1
    return attend(q, keys, values, mask, causal, scale, softcap)


def _full_mask(batch: Batch, window: int | None) -> torch.Tensor | None:
    T = batch.input_ids.shape[1]
    if window is not None and batch.kv_len <= window:
        window = None  # every position of this step is within the window
    if window is None and batch.single_row_start is not None and (T == 1 or batch.single_row_start[1] == 0):
        # One sequence: a single new token sees every cached position; a prefill from position 0 is
        # causal over exactly its own tokens (kv_len == T). Either way no mask tensor is needed.
        return None
    key = ("full", window)
    if key not in batch.masks:
        k_pos = torch.arange(batch.kv_len, device=batch.positions.device)[None, None, :]
        q_pos = batch.positions[:, :, None]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        batch.masks[key] = mask.unsqueeze(1)  # (B, 1, T, L)
    return batch.masks[key]


def _ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, cache: KVCache, batch: Batch,
                    window: int, scale: float | None, softcap: float | None) -> torch.Tensor:
    k_cache, v_cache = cache.keys[layer], cache.values[layer]
    if batch.contiguous:
        first = int(batch.slots[0])
        old_k, old_v = k_cache[first : first + q.shape[0]], v_cache[first : first + q.shape[0]]
    else:
        old_k, old_v = k_cache.index_select(0, batch.slots), v_cache.index_select(0, batch.slots)
    keys = torch.cat((old_k, k), dim=2)  # (B, H_kv_local, W + T, D)
    values = torch.cat((old_v, v), dim=2)
    out = attend(q, keys, values, _ring_mask(batch, window), False, scale, softcap)
    _ring_write(k, v, k_cache, v_cache, batch, window)
    return out


def _ring_mask(batch: Batch, window: int) -> torch.Tensor:
    key = ("ring", window)
    if key not in batch.masks:
        positions = batch.positions  # (B, T)
        before = positions[:, :1] - 1  # the last position already cached, per row
        index = torch.arange(window, device=positions.device)
        old_positions = before - (before - index[None, :]) % window  # latest cached position at each ring index
        key_positions = torch.cat((old_positions, positions), dim=1)  # (B, W + T)
        valid = torch.cat((old_positions >= 0, torch.ones_like(positions, dtype=torch.bool)), dim=1)
        q_pos, k_pos = positions[:, :, None], key_positions[:, None, :]
        mask = valid[:, None, :] & (k_pos <= q_pos) & (k_pos > q_pos - window)
        batch.masks[key] = mask.unsqueeze(1)  # (B, 1, T, W + T)
    return batch.masks[key]


def _ring_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: Batch,
                window: int) -> None:
    """Each row's last ``window`` real tokens into its ring (position p at p mod window)."""
    B, _, T, _ = k.shape
    if T == 1:
        index = batch.positions[:, 0] % window
        k_cache[batch.slots, :, index] = k[:, :, 0]
        v_cache[batch.slots, :, index] = v[:, :, 0]
        return
    lengths = torch.tensor(batch.lengths, device=k.device)[:, None]
    t = torch.arange(T, device=k.device)[None, :]
    rows, cols = ((t < lengths) & (t >= lengths - window)).nonzero(as_tuple=True)
    index = batch.positions[rows, cols] % window
    k_cache[batch.slots[rows], :, index] = k[rows, :, cols]
    v_cache[batch.slots[rows], :, index] = v[rows, :, cols]


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, causal: bool,
           scale: float | None, softcap: float | None) -> torch.Tensor:
    """softmax(mask(cap(q k^T * scale))) v, with grouped KV heads; mask True = attend."""
    heads, kv_heads = q.shape[1], keys.shape[1]
    if softcap is None:
        if heads == kv_heads:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, scale=scale)
        if _SDPA_GQA:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, scale=scale,
                                                  enable_gqa=True)
    if heads != kv_heads:
        groups = heads // kv_heads
        keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    if softcap is None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, scale=scale)
    scores = torch.matmul(q, keys.transpose(2, 3)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    if causal:
        T, L = q.shape[2], keys.shape[2]
        mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(L - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, values)
