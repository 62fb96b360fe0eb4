"""Model families: one module each, declaring itself with a ``FAMILY`` (see ``family.py``).

Adding a family is adding a module and a line to ``FAMILY_MODULES``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from tpinfer.config import ModelConfig
    from tpinfer.models.family import Family
    from tpinfer.parallel.context import ParallelContext
    from tpinfer.parallel.plan import ResolvedPlan

# model_type -> the module that declares its family
FAMILY_MODULES = {
    "llama": "tpinfer.models.llama",
    "mistral": "tpinfer.models.llama",
    "qwen2": "tpinfer.models.llama",
    "qwen3": "tpinfer.models.qwen3",
    "gemma2": "tpinfer.models.gemma",
    "gemma3_text": "tpinfer.models.gemma",
    "phi3": "tpinfer.models.phi3",
    "mixtral": "tpinfer.models.moe",
    "qwen2_moe": "tpinfer.models.moe",
    "qwen3_moe": "tpinfer.models.moe",
    "bert": "tpinfer.models.bert",
    "roberta": "tpinfer.models.bert",
    "xlm-roberta": "tpinfer.models.bert",
}
SUPPORTED_MODEL_TYPES = tuple(FAMILY_MODULES)


def family_for(model_type: str | None) -> Family:
    from tpinfer.config import ConfigError

    if model_type not in FAMILY_MODULES:
        hint = " (a multimodal Gemma 3 checkpoint: tpinfer runs its text-only form, gemma3_text)" if (
            model_type == "gemma3") else ""
        raise ConfigError(f"model_type {model_type!r} is not supported{hint}; supported: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    module = importlib.import_module(FAMILY_MODULES[model_type])
    # A module declaring several families (models/moe.py) names them in FAMILIES; the others have one FAMILY.
    return module.FAMILIES[model_type] if hasattr(module, "FAMILIES") else module.FAMILY


def build_model(config: ModelConfig, ctx: ParallelContext, plan: ResolvedPlan, dtype: torch.dtype,
                max_seq_len: int) -> torch.nn.Module:
    """The model for ``config.model_type`` with this rank's (empty) parameters allocated."""
    return family_for(config.model_type).model(config, ctx, plan, dtype, max_seq_len)
