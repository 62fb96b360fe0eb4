"""The native decode stack (all layers and their shared-memory all-reduces in one C call) against the per-layer
path (two C calls per layer, all-reduces in Python): bitwise equal logits, rounds kept in step, late peers."""

import time

import pytest
import torch

from helpers import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _decode_both_ways(ctx, path, dtype, late_rank, moe_parallel="tensor"):
    from tpinfer import kernels
    from tpinfer.engine.kv_cache import Batch
    from tpinfer.engine.runtime import EngineSpec, load_engine
    from tpinfer.engine.sampling import SamplingParams

    torch.set_num_threads(1)
    engine = load_engine(EngineSpec(str(path), tensor_parallel_size=ctx.world_size, dtype=dtype,
                                    moe_parallel=moe_parallel), ctx)
    forward, cache, comm = engine.forward, engine.generator.cache, ctx.comm
    assert kernels.available() and engine.native_decode
    engine.generator.generate([[1, 5, 9, 13], [1, 7]], SamplingParams(max_new_tokens=3, temperature=0.0))
    finished = []
    finish_native = comm.finish_native
    comm.finish_native = lambda t: (finished.append(1), finish_native(t))[1]
    stack_native_group = comm.native_group
    outs = {}
    with torch.inference_mode():
        for name, per_layer in (("stack", False), ("per_layer", True), ("stack_again", False)):
            comm.native_group = (lambda nbytes: (False, None)) if per_layer else stack_native_group
            steps = []
            for step in range(3):
                batch = Batch.build([[20 + step], [30 + step]], [7 + step, 5 + step], [0, 1], torch.device("cpu"))
                stack = forward.stack(cache)
                if name == "stack_again" and ctx.rank == late_rank and step == 1:
                    # Late inside the stack (after the embedding's all-reduce): the others' first native all-reduce
                    # waits past native code's budget and Python finishes that round.
                    run = stack.run
                    stack.run = lambda *args, run=run: (time.sleep(0.05), run(*args))[1]
                steps.append(forward(batch, cache).float())
                stack.__dict__.pop("run", None)
            outs[name] = torch.stack(steps)
    calls = comm.stats.snapshot().get("all_reduce", {}).get("calls", 0)
    return {name: t.tolist() for name, t in outs.items()}, len(finished), calls


@pytest.mark.parametrize(("world", "dtype", "variant", "moe_parallel"), [
    (2, "float32", "qwen2", "tensor"), (2, "bfloat16", "qwen2", "tensor"), (4, "bfloat16", "qwen2", "tensor"),
    (2, "bfloat16", "qwen2_moe", "tensor"), (2, "float32", "mixtral", "expert")])
def test_stack_equals_per_layer_path_bitwise(checkpoints, world, dtype, variant, moe_parallel):
    results = run_ranks(world, _decode_both_ways, checkpoints[variant], dtype, 1, moe_parallel)
    for outs, _, calls in results:
        # Same kernels, same sums in the same rank order and rounding: the same bits, and the rounds of both
        # paths interleave (a round mismatch would hang or mix slots).
        assert outs["stack"] == outs["per_layer"] == outs["stack_again"]
        assert calls > 0
    # Rank 0 waited on late rank 1 past native code's budget at least once and finished that round in Python.
    assert results[0][1] >= 1


@pytest.mark.parametrize("world", [1, 2])
def test_stack_counts_its_all_reduces(checkpoints, world):
    results = run_ranks(world, _count_all_reduces, checkpoints["llama"])
    layers = results[0][1]
    for per_step, _ in results:
        assert per_step == (0 if world == 1 else 2 * layers + 1)  # 2 per layer + the vocab-parallel embedding's


def _count_all_reduces(ctx, path):
    from tpinfer.engine.kv_cache import Batch
    from tpinfer.engine.runtime import EngineSpec, load_engine

    engine = load_engine(EngineSpec(str(path), tensor_parallel_size=ctx.world_size), ctx)
    engine.generator.generate([[1, 2, 3]], __import__("tpinfer.engine.sampling", fromlist=["x"]).SamplingParams(
        max_new_tokens=2, temperature=0.0))
    ctx.comm.stats.reset()
    with torch.inference_mode():
        engine.forward(Batch.build([[4]], [3], [0], torch.device("cpu")), engine.generator.cache)
    return ctx.comm.stats.snapshot().get("all_reduce", {}).get("calls", 0), engine.config.num_hidden_layers
