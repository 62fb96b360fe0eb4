"""One source of truth: the bytes `tpinfer info` and the planner report per rank equal what the engine allocates."""

import pytest
import torch

from tpinfer.assets import demo_model_path
from tpinfer.cli.info import model_info
from tpinfer.config import ModelConfig
from tpinfer.models import build_model
from tpinfer.parallel.comm import Communicator
from tpinfer.parallel.context import ParallelContext
from tpinfer.parallel.plan import PlanError, resolve_plan
from tpinfer.parallel.shard import valid_tp_sizes
from tpinfer.planner import per_rank_weight_bytes
from tpinfer.quant.formats import parse


def allocated_bytes(config: ModelConfig, tp: int, rank: int, dtype: torch.dtype, quantization: str | None = None) -> int:
    """Build rank ``rank``'s model at ``tp`` on the meta device (shapes without memory) and count its parameters.

    Model construction never communicates, so a context that only knows its rank is enough.
    """
    meta = torch.device("meta")
    ctx = ParallelContext(rank, tp, rank, tp, meta, Communicator(None, rank, tp, meta))
    scheme = parse(quantization) if quantization else None
    model = build_model(config, ctx, resolve_plan(config, tp, "auto", scheme), dtype, max_seq_len=8)
    unique = {id(p): p for p in model.parameters()}.values()  # a tied LM head shares the embedding
    return sum(p.numel() * p.element_size() for p in unique)


@pytest.mark.parametrize("variant", ["demo", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_info_bytes_equal_engine_allocation_at_every_valid_size(checkpoints, variant, dtype):
    path = demo_model_path() if variant == "demo" else checkpoints[variant]
    config = ModelConfig.from_pretrained(path)
    info = model_info(str(path), dtype)
    assert info["valid_tp_sizes"] == valid_tp_sizes(config)
    for entry in info["tp_sizes"]:
        if not entry["valid"]:
            assert entry["reason"]
            continue
        tp = entry["tp"]
        planned = per_rank_weight_bytes(config, tp, dtype)
        for rank in range(tp):
            allocated = allocated_bytes(config, tp, rank, getattr(torch, dtype))
            assert allocated == entry["param_bytes_per_rank"] == planned, (tp, rank)


@pytest.mark.parametrize("variant", ["demo", "qwen2", "gemma2", "phi3"])
@pytest.mark.parametrize("dtype", ["int8", "int4", "fp8"])
def test_quantized_bytes_equal_engine_allocation(checkpoints, variant, dtype):
    """The planner's int8/int4/fp8 bytes are the engine's --quantization allocation (bf16 around it), per rank."""
    path = demo_model_path() if variant == "demo" else checkpoints[variant]
    config = ModelConfig.from_pretrained(path)
    for tp in valid_tp_sizes(config):
        try:
            resolve_plan(config, tp, "auto", parse(dtype))
        except PlanError:
            continue  # a group cut at this size: refused before anything is allocated
        planned = per_rank_weight_bytes(config, tp, dtype)
        for rank in range(tp):
            assert allocated_bytes(config, tp, rank, torch.bfloat16, dtype) == planned, (tp, rank)
        assert planned < per_rank_weight_bytes(config, tp, "bf16")


def test_demo_model_allows_tp_1_2_4():
    assert {1, 2, 4} <= set(model_info(demo_model_path())["valid_tp_sizes"])
