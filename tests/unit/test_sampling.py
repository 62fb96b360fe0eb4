import pytest
import torch

from tpinfer.engine.sampling import SamplingParams, filter_logits, make_generator, sample, token_logprobs

LOGITS = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0], [5.0, 0.0, 0.0, 0.0, 4.0]])


def test_greedy_is_argmax():
    assert sample(LOGITS, SamplingParams(temperature=0), None).tolist() == [1, 0]


def test_top_k_keeps_only_the_k_likeliest():
    kept = filter_logits(LOGITS, 1.0, 2, 1.0).isfinite()
    assert kept.tolist() == [[False, True, False, True, False], [True, False, False, False, True]]


def test_top_p_keeps_the_smallest_set_covering_p():
    probs = LOGITS[0].softmax(-1)  # sorted: 1 (0.64), 3 (0.24), 2 (0.09), ...
    kept = filter_logits(LOGITS[:1], 1.0, 0, 0.8).isfinite()[0]
    assert kept.tolist() == [False, True, False, True, False]
    assert probs[1] < 0.8 <= probs[1] + probs[3]


def test_seeded_sampling_repeats_and_follows_the_distribution():
    params = SamplingParams(temperature=1.0, seed=7)
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(4000, 1)
    a = sample(logits, params, make_generator(7, torch.device("cpu")))
    b = sample(logits, params, make_generator(7, torch.device("cpu")))
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=3).float() / len(a)
    # 4000 draws: the standard error of each frequency is <= 0.008, so 0.03 is ~4 sigma.
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


def test_logprob_is_of_the_unmodified_distribution():
    lp = token_logprobs(LOGITS, torch.tensor([1, 4]))
    assert torch.allclose(lp, LOGITS.log_softmax(-1)[[0, 1], [1, 4]])


@pytest.mark.parametrize(
    "kwargs,message",
    [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"), ({"top_k": -2}, "top_k"),
     ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p")],
)
def test_invalid_params_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [1, 5])
def test_candidates_from_vocab_shards_equal_the_full_vocabulary(world, k):
    from tpinfer.engine.sampling import local_candidates, merge_candidates
    from tpinfer.parallel.shard import vocab_range

    torch.manual_seed(world * 10 + k)
    vocab = 101
    logits = torch.randn(3, vocab)
    logits[0, 7] = logits[0, 60] = logits.max() + 1  # a tie across shards: the lower id must win
    packed = []
    for rank in range(world):
        start, length = vocab_range(vocab, rank, world)
        shard = torch.zeros(3, length)  # padded rows past the vocabulary hold garbage that must be ignored
        valid = max(0, min(vocab - start, length))
        shard[:, :valid] = logits[:, start : start + valid]
        shard[:, valid:] = 1e9
        packed.append(local_candidates(shard, start, valid, k))
    values, ids, lse = merge_candidates(packed, k)
    ref_values, _ = logits.topk(k, dim=-1)
    assert torch.equal(values, ref_values)
    assert ids[0, 0].item() == 7
    assert torch.equal(logits.gather(-1, ids), values)
    assert torch.allclose(lse, logits.logsumexp(-1), atol=1e-6)


def test_a_shard_with_fewer_tokens_than_k_still_sends_full_width():
    from tpinfer.engine.sampling import local_candidates, merge_candidates

    small = local_candidates(torch.tensor([[1.0, 2.0, 0.0, 0.0]]), 8, 2, 4)  # 2 real tokens, 2 padding rows
    empty = local_candidates(torch.zeros(1, 4), 12, 0, 4)  # a shard that is all padding
    full = local_candidates(torch.tensor([[0.5, 3.0, -1.0, 0.0, 0.1, 0.2, 0.3, 0.4]]), 0, 8, 4)
    assert small.shape == empty.shape == (1, 9)
    values, ids, _ = merge_candidates([full, small, empty], 4)
    assert ids.tolist() == [[1, 9, 8, 0]] and values.tolist() == [[3.0, 2.0, 1.0, 0.5]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_candidates_without_log_sum_exp_pick_the_same_tokens(world, dtype):
    """A step nobody asked logprobs of skips the log-sum-exp (and, for k = 1, the float32 copy): the same
    candidates as with it; for k = 1 the token is the full vocabulary's argmax, whose ties go to the lower id across
    shards and within one (top-k's order among equal values within a shard is unspecified); padding ignored."""
    from tpinfer.engine.sampling import local_candidates, merge_candidates
    from tpinfer.parallel.shard import vocab_range

    torch.manual_seed(world)
    vocab = 101
    logits = torch.randn(4, vocab).to(dtype)
    logits[0, 7] = logits[0, 60] = logits[0].max() + 1  # across shards
    logits[1, 20] = logits[1, 21] = logits[1].max() + 1  # within one
    for k in (1, 3):
        with_lse, without = [], []
        for rank in range(world):
            start, length = vocab_range(vocab, rank, world)
            valid = max(0, min(vocab - start, length))
            shard = torch.full((4, length), 1e4, dtype=dtype)  # padding past the vocabulary: never a candidate
            shard[:, :valid] = logits[:, start : start + valid]
            with_lse.append(local_candidates(shard, start, valid, k))
            without.append(local_candidates(shard, start, valid, k, lse=False))
        values, ids, _ = merge_candidates(without, k)
        ref_values, ref_ids, lse = merge_candidates(with_lse, k)
        assert torch.equal(values, ref_values) and (k > 1 or torch.equal(ids, ref_ids))
        assert torch.allclose(lse, logits.float().logsumexp(-1), atol=1e-5)
        assert torch.equal(logits.float().gather(-1, ids), values)
        if k == 1:
            assert torch.equal(ids[:, 0], logits.argmax(-1)) and ids[:2, 0].tolist() == [7, 20]
        assert torch.equal(without[0][:, -1], torch.zeros(4))  # no log-sum-exp computed
