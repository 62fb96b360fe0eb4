"""Encoder forward and pooling, on every rank in lockstep: token sequences in, sentence embeddings out.

Every rank receives the same sequences (``messages.Embed``) and runs the same batches: the longest first, at most
``max_batch_size`` rows each, right-padded with an attention mask (the order sentence-transformers' ``encode``
uses, so batches pad little). The row-parallel layers' all-reduces leave every rank the whole hidden states; each
pools them (``tpinfer.pooling.pool``) and rank 0 returns the embeddings in the order the sequences came.
"""

from __future__ import annotations

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
    def embed(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """One float32 embedding per sequence, in their order."""
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        out: list[torch.Tensor | None] = [None] * len(sequences)
        for start in range(0, len(order), self.max_batch_size):
            rows = order[start : start + self.max_batch_size]
            width = len(sequences[rows[0]])
            ids = torch.tensor([sequences[i] + [PAD_ID] * (width - len(sequences[i])) for i in rows], dtype=torch.long)
            lengths = torch.tensor([len(sequences[i]) for i in rows])
            mask = (torch.arange(width)[None] < lengths[:, None]).long()
            ids, mask = ids.to(self.device), mask.to(self.device)
            if self._pooled is not None:
                vectors = self._pooled(ids, mask, self.pooling).cpu()
            else:
                vectors = pool(self.forward(ids, mask), mask, self.pooling).cpu()
            for row, i in enumerate(rows):
                out[i] = vectors[row]
            real = int(mask.sum())
            self.stats.forwards += 1
            self.stats.tokens += real
            self.stats.padding += ids.numel() - real
        return out  # type: ignore[return-value]
