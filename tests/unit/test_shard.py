"""Shard arithmetic, checked for every (rank, world) pair."""

import pytest

from tpinfer.config import ModelConfig
from tpinfer.parallel.shard import (
    kv_head_range,
    padded_vocab_size,
    parameter_shapes,
    rank_parameter_bytes,
    shard_range,
    tp_failure_reason,
    valid_tp_sizes,
    vocab_range,
)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_shard_range_tiles_the_whole(world):
    size = 24
    ranges = [shard_range(size, r, world) for r in range(world)]
    assert ranges[0][0] == 0
    for (start, length), (next_start, _) in zip(ranges, ranges[1:], strict=False):
        assert start + length == next_start
    assert sum(length for _, length in ranges) == size


def test_shard_range_refuses_uneven():
    with pytest.raises(ValueError, match="not divisible"):
        shard_range(10, 0, 4)


@pytest.mark.parametrize("vocab,world", [(251, 1), (251, 2), (251, 4), (32000, 3), (5, 8)])
def test_vocab_padding_covers_every_token_once(vocab, world):
    padded = padded_vocab_size(vocab, world)
    assert padded % world == 0 and vocab <= padded < vocab + world
    owners = []
    for rank in range(world):
        start, length = vocab_range(vocab, rank, world)
        owners += [rank] * length
        assert start == rank * length
    assert len(owners) == padded


@pytest.mark.parametrize("kv,world", [(8, 1), (8, 2), (8, 8), (2, 4), (2, 8), (1, 4), (4, 16)])
def test_kv_heads_match_their_query_heads(kv, world):
    heads = 16 if world <= 16 else world
    group = heads // kv
    for rank in range(world):
        first, count = kv_head_range(kv, rank, world)
        local_heads = heads // world
        for q in range(rank * local_heads, (rank + 1) * local_heads):
            assert first <= q // group < first + count, (rank, q)
        if world > kv:
            assert count == 1


def _config(**kw):
    raw = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, **kw}
    return ModelConfig.from_dict(raw)


def test_valid_sizes_and_reasons():
    config = _config()
    assert valid_tp_sizes(config) == [1, 2, 4, 8]
    assert "8 attention heads are not divisible by tp=3" in tp_failure_reason(config, 3)
    assert "intermediate_size 100" in tp_failure_reason(_config(intermediate_size=100), 8)
    assert "KV heads" in tp_failure_reason(_config(num_attention_heads=12, num_key_value_heads=4, hidden_size=48), 6)


def test_llama3_70b_valid_sizes_match_the_seed():
    config = _config(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                     num_key_value_heads=8, vocab_size=128256)
    assert valid_tp_sizes(config) == [1, 2, 4, 8, 16, 32, 64]


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_rank_bytes_sum_to_the_model_plus_padding_and_replicas(tp):
    config = _config(vocab_size=1001)
    full = sum(1 for _ in parameter_shapes(config, 1, 0, padded=False))
    assert full == len(parameter_shapes(config, tp, 0))
    per_rank = rank_parameter_bytes(config, tp, 0, 2)
    assert all(rank_parameter_bytes(config, tp, r, 2) == per_rank for r in range(tp))
