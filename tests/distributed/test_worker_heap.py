"""A worker rank moves its startup heap (modules, the model) out of the garbage collector's reach before it serves
(``engine.runtime.freeze_startup_heap``): a full collection of that heap stalled a worker, and every rank waiting on
it, ~70 ms every few seconds. Rank 0 in the caller's process leaves the caller's heap alone."""

import gc

import pytest

from helpers import run_ranks
from tpinfer.engine.runtime import EngineSpec, load_engine
from tpinfer.engine.sampling import SamplingParams

pytestmark = [pytest.mark.timeout(180)]


def _on_rank(ctx, model: str) -> tuple[int, list | None]:  # noqa: ANN001
    engine = load_engine(EngineSpec(model, tensor_parallel_size=ctx.world_size, dtype="float32"), ctx)
    if ctx.rank != 0:
        engine.serve_forever()  # until rank 0's stop
        return gc.get_freeze_count(), None
    params = SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True)
    tokens = [out.token_ids for out in engine.run([[1, 5, 9]], params)]  # one generation across the ranks
    engine.stop_workers()
    return gc.get_freeze_count(), tokens


def test_a_worker_freezes_its_startup_heap_and_still_serves(checkpoints):
    (rank0_frozen, tokens), (worker_frozen, _) = run_ranks(2, _on_rank, str(checkpoints["llama"]))
    assert rank0_frozen == 0  # the caller's process: not frozen
    # the worker's heap after loading (torch, transformers' config classes, the model): tens of thousands of objects
    assert worker_frozen > 10_000
    assert len(tokens[0]) == 3
