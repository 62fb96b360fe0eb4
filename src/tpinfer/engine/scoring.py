"""Teacher-forced scoring: the logits of every position of whole sequences, on every rank in lockstep.

``tpinfer verify`` compares these across TP sizes (and against HF transformers). Each sequence runs as one prefill
from position 0 through the model's plain forward (the reference path), in cache slot 0; the vocabulary-parallel
logits are gathered, so every rank of the last pipeline stage holds the full (len, vocab) float32 tensor, which reaches rank 0, and
rank 0 returns it.
"""

from __future__ import annotations

import torch

from tpinfer.engine import messages
from tpinfer.engine.kv_cache import Batch


@torch.inference_mode()
def run_score(engine, message: messages.Score) -> list[torch.Tensor]:  # noqa: ANN001
    model, cache = engine.model, engine.generator.cache
    out = []
    for sequence in message.sequences:
        if not sequence or len(sequence) > cache.max_seq_len:
            raise ValueError(f"a scored sequence needs 1 to {cache.max_seq_len} tokens, got {len(sequence)}")
        batch = Batch.build([sequence], [0], [0], engine.ctx.device, all_logits=True)
        logits = engine.to_first(model.gather_logits(model(batch, cache)), 1, len(sequence))
        if logits is not None:
            out.append(logits[0].cpu())
    return out
