"""With do_sample=True every rank returns the same tokens (rank 0's draw), even with differently seeded RNGs."""

import pytest
import torch

from helpers import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _sample_on_rank(ctx, path, top_k):
    from tpinfer.api import TPModel
    from tpinfer.engine.runtime import EngineSpec, load_engine

    torch.manual_seed(1000 + ctx.rank)  # each rank's own RNG differs: only the broadcast can make them agree
    model = TPModel(load_engine(EngineSpec(str(path), tensor_parallel_size=ctx.world_size), ctx))
    ids = torch.tensor([[1, 10, 20, 30], [1, 40, 50, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=1.5, top_k=top_k,
                         ignore_eos=True)
    return out.tolist()


@pytest.mark.parametrize("top_k", [0, 20])
def test_sampled_tokens_agree_across_ranks(checkpoints, top_k):
    results = run_ranks(2, _sample_on_rank, checkpoints["llama"], top_k)
    assert results[0] == results[1]
    assert len(results[0][0]) == 4 + 12 and results[0][1][:3] == [1, 40, 50]
