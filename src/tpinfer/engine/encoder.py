"""Encoder forward and pooling, on every rank in lockstep: token sequences in, sentence embeddings out.

Every rank receives the same sequences (``messages.Embed``) and runs the same batches: the longest first, at most
``max_batch_size`` rows each, right-padded with an attention mask (the order sentence-transformers' ``encode``
uses, so batches pad little). The row-parallel layers' all-reduces leave every rank the whole hidden states; each
pools them (``tpinfer.pooling.pool``) and rank 0 returns the embeddings in the order the sequences came.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tpinfer.pooling import PoolingConfig, pool

PAD_ID = 0  # what fills a padded position; the attention mask keeps it out of every real token's result


@dataclass
class EncodeStats:
    forwards: int = 0  # batches run
    tokens: int = 0  # real tokens
    padding: int = 0  # padded positions computed alongside them


class Encoder:
    """Runs batches of token sequences through one rank's encoder and pools them."""

    def __init__(self, model: torch.nn.Module, pooling: PoolingConfig, max_batch_size: int = 32,
                 forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.model, self.pooling, self.max_batch_size = model, pooling, max_batch_size
        # The model's forward, or the family's native adapter around it (same contract, kernels.encoder_adapter)
        self.forward = forward or model
        self._pooled = getattr(self.forward, "pooled", None)  # the native forward pools without copying its states
        self.device = model.ctx.device
        self.stats = EncodeStats()

    @torch.inference_mode()
    def embed(self, ids: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
        """One float32 embedding per sequence, in their order: ``ids`` holds every sequence's token ids one after
        another (int64), ``lengths`` how many are each one's."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        starts = list(itertools.accumulate(lengths, initial=0))  # where each sequence's ids begin in the run
        out: list[torch.Tensor | None] = [None] * len(lengths)
        for first in range(0, len(order), self.max_batch_size):
            rows = order[first : first + self.max_batch_size]
            width = lengths[rows[0]]
            row_lengths = torch.tensor([lengths[i] for i in rows])
            positions = torch.arange(width)
            mask = positions[None] < row_lengths[:, None]
            # each row's ids gathered from the run (a padded position reads the row's first id, then PAD_ID)
            index = (torch.tensor([starts[i] for i in rows])[:, None] + positions[None]).masked_fill_(~mask, 0)
            batch = ids[index].masked_fill_(~mask, PAD_ID).to(self.device)
            mask = mask.long().to(self.device)
            if self._pooled is not None:
                vectors = self._pooled(batch, mask, self.pooling).cpu()
            else:
                vectors = pool(self.forward(batch, mask), mask, self.pooling).cpu()
            for row, i in enumerate(rows):
                out[i] = vectors[row]
            real = int(row_lengths.sum())
            self.stats.forwards += 1
            self.stats.tokens += real
            self.stats.padding += batch.numel() - real
        return out  # type: ignore[return-value]
