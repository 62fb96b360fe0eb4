"""Model families. Each is one file built from ``tpinfer.parallel``; ``build_model`` picks by model_type."""

from __future__ import annotations

import torch

from tpinfer.config import ModelConfig
from tpinfer.parallel.context import ParallelContext
from tpinfer.parallel.plan import ResolvedPlan


def build_model(config: ModelConfig, ctx: ParallelContext, plan: ResolvedPlan, dtype: torch.dtype, max_seq_len: int):
    """The model for ``config.model_type`` with this rank's (empty) parameters allocated."""
    from tpinfer.models.llama import LlamaForCausalLM

    families = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM, "qwen2": LlamaForCausalLM}
    return families[config.model_type](config, ctx, plan, dtype, max_seq_len)
