"""One source of truth: the bytes `tpinfer info` and the planner report per rank equal what the engine allocates."""

import argparse
import re

import pytest
import torch

from helpers import hf_model, make_checkpoint
from tpinfer.assets import demo_model_path
from tpinfer.cli.info import model_info, run
from tpinfer.config import ModelConfig
from tpinfer.models import build_model
from tpinfer.parallel.comm import Communicator
from tpinfer.parallel.context import ParallelContext
from tpinfer.parallel.plan import PlanError, resolve_plan
from tpinfer.parallel.shard import valid_tp_sizes
from tpinfer.planner import per_rank_weight_bytes
from tpinfer.quant.formats import parse


def allocated_bytes(config: ModelConfig, tp: int, rank: int, dtype: torch.dtype, quantization: str | None = None,
                    moe_parallel: str = "tensor") -> int:
    """Build rank ``rank``'s model at ``tp`` on the meta device (shapes without memory) and count its parameters.

    Model construction never communicates, so a context that only knows its rank is enough.
    """
    meta = torch.device("meta")
    ctx = ParallelContext(rank, tp, rank, tp, meta, Communicator(None, rank, tp, meta))
    scheme = parse(quantization) if quantization else None
    plan = resolve_plan(config, tp, "auto", scheme, moe_parallel=moe_parallel)
    model = build_model(config, ctx, plan, dtype, max_seq_len=8)
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


@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_info_bytes_equal_engine_allocation_in_both_layouts(checkpoints, variant):
    """Under --moe-parallel tensor and expert, the bytes info reports per rank are what every rank of the engine
    allocates, at every size either layout allows; the tensor layout's are the dense ``param_bytes_per_rank``."""
    path = checkpoints[variant]
    config = ModelConfig.from_pretrained(path)
    info = model_info(str(path), "float32")
    for entry in info["tp_sizes"]:
        tp = entry["tp"]
        for layout, held in entry["moe"].items():
            if not held["valid"]:
                with pytest.raises(PlanError, match=re.escape(held["reason"])):
                    resolve_plan(config, tp, "auto", moe_parallel=layout)
                continue
            for rank in range(tp):
                assert allocated_bytes(config, tp, rank, torch.float32, moe_parallel=layout) == held["bytes_per_rank"]
        if entry["valid"]:
            assert entry["moe"]["tensor"]["bytes_per_rank"] == entry["param_bytes_per_rank"]
    assert info["moe_valid_tp_sizes"] == {"tensor": [1, 2, 4, 8], "expert": [1, 2, 4, 8]}


@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_active_parameters_equal_a_count_of_hf_model(checkpoints, variant):
    """Active parameters: every HF parameter, except that of each layer's experts (stored as one tensor with a
    leading axis of E) only top-k of E count. Qwen2-MoE's dense first layer and shared expert count whole."""
    model = hf_model(checkpoints[variant])
    config = ModelConfig.from_pretrained(checkpoints[variant])
    k, experts = config.num_experts_per_tok, config.num_experts
    expected = 0
    for name, p in model.named_parameters():
        if ".experts." in name:
            assert p.shape[0] == experts, name
            expected += p[0].numel() * k
        else:
            expected += p.numel()
    info = model_info(str(checkpoints[variant]))
    assert info["active_parameters"] == expected < info["params"] == sum(p.numel() for p in model.parameters())


def test_info_names_sizes_the_experts_do_not_divide(tmp_path, capsys):
    """6 experts and 8 heads: TP 4 and 8 split every expert (tensor) but cannot give each rank whole experts."""
    path = make_checkpoint(tmp_path / "six", "mixtral", num_local_experts=6)
    info = model_info(str(path), "float32")
    assert info["valid_tp_sizes"] == info["moe_valid_tp_sizes"]["tensor"] == [1, 2, 4, 8]
    assert info["moe_valid_tp_sizes"]["expert"] == [1, 2]
    four = info["tp_sizes"][3]["moe"]
    assert four["expert"] == {"valid": False, "reason": "6 experts are not divisible by tp=4 (expert parallelism)"}
    # Per decode token: the embedding's all-reduce, then attention's and the MoE block's in each of the 2 layers,
    # each of one float32 hidden state.
    assert {k: v for k, v in four["tensor"].items() if k != "bytes_per_rank"} == {
        "valid": True, "all_reduces_per_token": 5, "all_reduce_message_bytes": 64 * 4,
        "all_reduce_bytes_per_token": 5 * 64 * 4}
    run(argparse.Namespace(model=str(path), dtype="float32", quantization=None, quantize_lm_head=False, json=False))
    out = capsys.readouterr().out
    assert "valid TP sizes: 1, 2, 4, 8 (--moe-parallel tensor), 1, 2 (--moe-parallel expert)" in out
    assert f"{info['active_parameters']:,} active parameters per token" in out
    assert "--moe-parallel expert at tp=4: 6 experts are not divisible by tp=4 (expert parallelism); valid sizes: 1, 2" in out
    assert "5 x 256 B" in out


def test_demo_model_allows_tp_1_2_4():
    assert {1, 2, 4} <= set(model_info(demo_model_path())["valid_tp_sizes"])
