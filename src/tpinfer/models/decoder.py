"""What every decoder-only family shares: embedding, a stack of the family's layers, final norm, LM head, cache.

A family file defines its decoder layer (attention and MLP) and norm, then subclasses ``CausalLM``. Module names
are HF's (``model.embed_tokens``, ``model.layers.{i}``, ``model.norm``, ``lm_head``), so loading is an identity
mapping. Rope tables are built once per layer type ("full_attention", "sliding_attention") and handed to each
layer with its step.

A pipeline stage (``ctx.pp_size > 1``) builds only its layers (``tpinfer.parallel.mesh.stage_layers``), under their
global names; the first stage also the embedding, the last the final norm and the head (with tied embeddings, a
head of its own that loads the embedding's tensor). A stage's forward starts from the previous stage's hidden states
and hands its own to the next (``ctx.pipe``); only the last returns logits, the others None.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tpinfer.config import ModelConfig
from tpinfer.engine.kv_cache import Batch, KVCache
from tpinfer.models.family import EMBED, LM_HEAD
from tpinfer.models.rope import Rope
from tpinfer.parallel.context import ParallelContext
from tpinfer.parallel.layers import ParallelModule, embedding_layer, head_layer, linear_layer
from tpinfer.parallel.mesh import stage_layers
from tpinfer.parallel.plan import ResolvedPlan
from tpinfer.parallel.shard import kv_cache_lengths
from tpinfer.parallel.spec import Embedding, Head, Linear
from tpinfer.quant.layers import quant_head_layer, quant_linear_layer


def build_linear(module: Linear, plan: ResolvedPlan, ctx: ParallelContext, dtype: torch.dtype) -> ParallelModule:
    """The parallel layer for a declared projection, as the plan says (and quantized where it says so)."""
    scheme = plan.scheme(module.name)
    if scheme is not None:
        return quant_linear_layer(module, scheme, plan.strategy(module.name), ctx, dtype)
    return linear_layer(module, plan.strategy(module.name), ctx, dtype)


class LayerStack(nn.Module):
    """The decoder layers this rank holds, registered under their global indices (``model.layers.{i}``)."""

    def __init__(self, layers: dict[int, nn.Module]) -> None:
        super().__init__()
        self.indices = list(layers)
        for i, layer in layers.items():
            self.add_module(str(i), layer)

    def __iter__(self):  # noqa: ANN204
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, position: int) -> nn.Module:
        return self._modules[str(self.indices[position])]


class DecoderModel(nn.Module):
    """Embedding -> layers -> final norm. ``make_layer(i)`` builds the family's layer i; ``make_norm(size)`` its norm.
    ``embed_scale`` multiplies the embedding output (Gemma: sqrt(hidden_size), in the weights' dtype)."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, plan: ResolvedPlan, dtype: torch.dtype,
                 max_seq_len: int, make_layer: Callable[[int], nn.Module], make_norm: Callable[[int], nn.Module],
                 embed_scale: float | None = None):
        super().__init__()
        self.ctx, self.hidden_size, self.dtype = ctx, config.hidden_size, dtype
        self.sequence_parallel = plan.sequence_parallel and ctx.tp_size > 1
        embed = Embedding(EMBED, config.vocab_size, config.hidden_size)
        self.embed_tokens = embedding_layer(embed, plan.strategy(EMBED), ctx, dtype) if ctx.is_first_stage else None
        held = stage_layers(config.num_hidden_layers, ctx.pp_size, ctx.pp_rank)
        self.layers = LayerStack({i: make_layer(i) for i in held})
        self.norm = make_norm(config.hidden_size) if ctx.is_last_stage else None
        types = sorted({config.layer_type(i) for i in held})
        self.rotary_emb = nn.ModuleDict({
            t: Rope(config.rope_parameters[t], config.head_dim, config.max_position_embeddings, max_seq_len, ctx.device)
            for t in types})
        self.layer_types = [config.layer_type(i) for i in held]
        scale = None if embed_scale is None else torch.tensor(embed_scale).to(dtype).to(ctx.device)
        self.register_buffer("embed_scale", scale, persistent=False)

    def forward(self, batch: Batch, cache: KVCache) -> torch.Tensor | None:
        """Final hidden states (B, T, hidden) on the last stage; None on the others, which send theirs on.

        With a sequence-parallel plan, a prefill step (T > 1) keeps the residual stream split along the sequence
        between layers: each rank holds (B, T / tp, hidden) of it (``Communicator.sum_partials``)."""
        comm, T = self.ctx.comm, batch.input_ids.shape[1]
        if self.sequence_parallel and T > 1:
            comm.sequence_len = T
        try:
            return self._forward(batch, cache)
        finally:
            comm.end_sequence_parallel()

    def _forward(self, batch: Batch, cache: KVCache) -> torch.Tensor | None:
        comm, T = self.ctx.comm, batch.input_ids.shape[1]
        x = self.embed(batch.input_ids) if self.embed_tokens is not None else self.ctx.pipe.recv_prev(
            (*batch.input_ids.shape, self.hidden_size), self.dtype)
        if comm.sequence_len is not None and x.shape[1] == T:  # a replicated embedding, or the previous stage's
            x = comm.scatter_sequence(x)
        seq_lens = None
        if not self.packable:  # tables that depend on the length
            if batch.segments:
                raise ValueError("a packed batch needs rope tables that do not depend on the sequence length")
            seq_lens = [int(start) + n for start, n in zip(batch.positions[:, 0].tolist(), batch.lengths, strict=True)]
        ropes = {t: rope(batch.positions, x.dtype, seq_lens) for t, rope in self.rotary_emb.items()}
        for layer, kind in zip(self.layers, self.layer_types, strict=True):
            x = layer(x, ropes[kind], batch, cache)
        if self.norm is None:
            self.ctx.pipe.send_next(comm.gather_sequence(x))
            return None
        return comm.gather_sequence(self.norm(x))

    @property
    def packable(self) -> bool:
        """Whether several sequences can share one row (``Batch.packed``): not with rope tables chosen by length."""
        return all(rope.limit is None for rope in self.rotary_emb.values())

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        return x * self.embed_scale if self.embed_scale is not None else x


class CausalLM(nn.Module):
    """A decoder with its LM head: local (vocab-sharded) logits of the tokens a batch asks for."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, plan: ResolvedPlan, dtype: torch.dtype,
                 max_seq_len: int, model: DecoderModel):
        super().__init__()
        self.config, self.ctx, self.dtype, self.max_seq_len = config, ctx, dtype, max_seq_len
        self.model = model
        self.lm_head = self._head(config, ctx, plan, dtype) if ctx.is_last_stage else None
        self.num_local_kv_heads = model.layers[0].self_attn.num_local_kv_heads
        # A sequence reaching this length has its cache recomputed from position 0 (see Phi-3); None: never.
        self.recompute_length: int | None = None

    @property
    def packable(self) -> bool:
        """Whether a step may pack several sequences into one row (``Batch.packed``)."""
        return self.model.packable

    def _head(self, config: ModelConfig, ctx: ParallelContext, plan: ResolvedPlan, dtype: torch.dtype) -> ParallelModule:
        """The LM head; tied to the embedding when this rank holds both, else (a last pipeline stage) its own copy
        of the embedding's rows, loaded from the embedding's tensor."""
        tied = config.tie_word_embeddings
        shared = self.model.embed_tokens if tied else None
        head = Head(LM_HEAD, config.vocab_size, config.hidden_size, EMBED if shared is not None else None)
        scheme = plan.scheme(LM_HEAD)
        if scheme is not None:  # --quantize-lm-head
            return quant_head_layer(head, scheme, plan.strategy(LM_HEAD), ctx, dtype)
        layer = head_layer(head, plan.strategy(LM_HEAD), ctx, dtype, tied_to=shared)
        if tied and shared is None:
            layer.source_name = EMBED
        return layer

    def new_cache(self, max_seqs: int, max_seq_len: int | None = None) -> KVCache:
        """K and V of this rank's layers (None for the layers of other pipeline stages)."""
        length = max_seq_len or self.max_seq_len
        layers = self.config.num_hidden_layers
        windows = [self.config.window(i) for i in range(layers)]
        return KVCache(kv_cache_lengths(self.config, length), max_seqs, self.num_local_kv_heads, length,
                       self.config.head_dim, self.dtype, self.ctx.device, windows, self.model.layers.indices)

    def forward(self, batch: Batch, cache: KVCache) -> torch.Tensor | None:
        """Local logits of the tokens at ``batch.logits_index``: (B, local vocab); (B, T, local vocab) with
        ``batch.all_logits``. None on a pipeline stage before the last."""
        hidden = self.model(batch, cache)
        if hidden is None:
            return None
        if batch.all_logits:
            return self.logits(hidden)
        if batch.logits_index is not None:
            hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch.logits_index]
        else:
            hidden = hidden[:, -1]
        return self.logits(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head on final hidden states, soft-capped as c * tanh(logits / c) where the config says so."""
        out = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            out = torch.tanh(out / cap) * cap
        return out

    def gather_logits(self, local_logits: torch.Tensor | None) -> torch.Tensor | None:
        """Full float32 logits (B, vocab_size) on every rank of the last stage (None elsewhere)."""
        if local_logits is None:
            return None
        return self.lm_head.gather(local_logits).float()
