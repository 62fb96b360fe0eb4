"""tpinfer: tensor-parallel inference for Hugging Face Llama-family checkpoints.

The public names load lazily, so ``import tpinfer.planner`` (pure arithmetic) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "tpinfer.api",
    "EmbeddingOutput": "tpinfer.api",
    "RankFailure": "tpinfer.api",
    "RequestOutput": "tpinfer.api",
    "TPModel": "tpinfer.api",
    "from_pretrained": "tpinfer.api",
    "SamplingParams": "tpinfer.engine.sampling",
    "Tokenizer": "tpinfer.tokenizer",
    "AutoTokenizer": "tpinfer.tokenizer",  # the seeds' scripts say AutoTokenizer.from_pretrained(path)
}
__all__ = [*_EXPORTS, "assets"]


def __getattr__(name: str) -> Any:
    if name == "assets":
        return importlib.import_module("tpinfer.assets")
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        return getattr(module, "Tokenizer" if name == "AutoTokenizer" else name)
    raise AttributeError(f"module 'tpinfer' has no attribute {name!r}")
