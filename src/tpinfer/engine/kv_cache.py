"""A KV cache preallocated per rank for its local KV heads.

Layout per layer: (max_seqs, local_kv_heads, length, head_dim). A sequence owns one slot. In a layer that attends
every earlier position, length is max_seq_len and the token at position p lives at [slot, :, p]; a query at
position p attends positions <= p of its slot, so stale entries past a sequence's length are never read. A
sliding-window layer whose window W is at most half of max_seq_len keeps only W positions, as a ring: position p
lives at [slot, :, p mod W]; one with a longer window keeps every position and masks to the window (see
``tpinfer.models.attention``).

Why slots, not a block table: joining and leaving the running batch copies nothing either way (a step names each
row's slot, and the native decode kernel and attention read the slot's positions in place), and a slot's positions
are one strided view, which the decode kernel walks without an indirection per block. What a block table adds is
sharing a prefix's pages between sequences; here a shared prefix is copied instead (``copy_prefix``: per layer,
2 x prefix x local KV heads x head_dim elements, e.g. 200 tokens of the 250M benchmark Llama at TP=2 are 6.3 MiB
per rank in float32, a few milliseconds, against about half a second to prefill them), or taken over whole when
its slot is free. The price is memory: every slot reserves max_seq_len positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class KVCache:
    def __init__(
        self,
        lengths: list[int],
        max_seqs: int,
        num_local_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        windows: list[int | None] | None = None,
        held: list[int] | None = None,
    ) -> None:
        # A pipeline stage holds only its layers (``held``, global indices); the others' entries are None.
        held = set(range(len(lengths)) if held is None else held)
        shapes = [(max_seqs, num_local_kv_heads, length, head_dim) if i in held else None
                  for i, length in enumerate(lengths)]
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) if shape else None for shape in shapes]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) if shape else None for shape in shapes]
        # Per layer: the ring's size W for a sliding-window layer that keeps only its window, else None.
        self.ring = [length if length < max_seq_len else None for length in lengths]
        # Per layer: a sliding window that a full-length cache masks to (shorter than max_seq_len), else None.
        windows = windows or [None] * len(lengths)
        self.window = [w if ring is None and w is not None and w < max_seq_len else None
                       for w, ring in zip(windows, self.ring, strict=True)]
        self.max_seqs, self.max_seq_len = max_seqs, max_seq_len

    @property
    def reusable(self) -> bool:
        """Whether one slot's cached positions can seed another's (prefix caching): not with a ring, whose older
        positions are overwritten."""
        return all(ring is None for ring in self.ring)

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Positions [0, length) of slot ``source`` into slot ``target``, in every layer this rank holds."""
        for k, v in zip(self.keys, self.values, strict=True):
            if k is not None:
                k[target, :, :length] = k[source, :, :length]
                v[target, :, :length] = v[source, :, :length]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


@dataclass
class Batch:
    """What one forward step runs: every rank builds the same Batch from the same message.

    ``slots`` are cache slots per row; ``positions`` (B, T) per token. ``kv_len`` is how many cache
    positions the step attends (max position + 1). ``contiguous`` marks slots = first..first+B-1,
    which lets attention read the cache as a view instead of gathering it. ``lengths`` are each row's real
    tokens (the rest of a row is padding).
    """

    input_ids: torch.Tensor  # (B, T)
    positions: torch.Tensor  # (B, T)
    slots: torch.Tensor  # (B,)
    kv_len: int
    contiguous: bool
    logits_index: torch.Tensor | None = None  # (B,) token index per row whose logits are wanted
    single_row_start: tuple[int, int] | None = None  # (slot, first position) when B == 1
    lengths: tuple[int, ...] = ()
    all_logits: bool = False  # logits of every position (scoring), not only logits_index
    masks: dict = field(default_factory=dict, repr=False)  # attention masks built once per step, by kind
    segments: tuple[tuple[int, Batch], ...] = ()  # packed: (offset in the row, the segment's own Batch)

    @classmethod
    def packed(cls, token_ids: list[list[int]], start_positions: list[int], slots: list[int],
               device: torch.device) -> Batch:
        """Sequences' new tokens in one row, back to back; sequence i's sit at start_positions[i], +1, ..."""
        flat = [t for toks in token_ids for t in toks]
        positions = torch.cat([torch.arange(s, s + len(toks)) for s, toks in zip(start_positions, token_ids,
                                                                                    strict=True)])
        ids = torch.tensor(flat, dtype=torch.long, device=device)[None]
        positions = positions.to(device)[None]
        segments, offset = [], 0
        for toks, start, slot in zip(token_ids, start_positions, slots, strict=True):
            n = len(toks)
            part = cls(ids[:, offset : offset + n], positions[:, offset : offset + n],
                       torch.tensor([slot], dtype=torch.long, device=device), start + n, True,
                       torch.tensor([n - 1], device=device), (slot, start), (n,))
            segments.append((offset, part))
            offset += n
        last = torch.tensor([o + p.lengths[0] - 1 for o, p in segments], dtype=torch.long, device=device)
        return cls(ids, positions, torch.tensor(slots, dtype=torch.long, device=device),
                   max(p.kv_len for _, p in segments), False, last, None, (len(flat),), segments=tuple(segments))

    @classmethod
    def build(
        cls,
        token_ids: list[list[int]],
        start_positions: list[int],
        slots: list[int],
        device: torch.device,
        pad_id: int = 0,
        all_logits: bool = False,
    ) -> Batch:
        """Rows of new tokens, right-padded; row b's tokens sit at start_positions[b], +1, ..."""
        width = max(len(t) for t in token_ids)
        # one tensor from padded lists: a decode step builds this for every row, on rank 0 between the step message
        # and the forward, where each torch call also waits for the GIL the event loop holds
        ids = torch.tensor([t if len(t) == width else list(t) + [pad_id] * (width - len(t)) for t in token_ids],
                           dtype=torch.long)
        starts = torch.tensor(start_positions, dtype=torch.long)
        positions = starts[:, None] + torch.arange(width)[None, :]
        last = torch.tensor([len(t) - 1 for t in token_ids], dtype=torch.long)
        kv_len = max(start_positions) + width
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        return cls(
            ids.to(device),
            positions.to(device),
            torch.tensor(slots, dtype=torch.long, device=device),
            kv_len,
            contiguous,
            last.to(device),
            (slots[0], start_positions[0]) if len(slots) == 1 else None,
            tuple(len(t) for t in token_ids),
            all_logits,
        )
