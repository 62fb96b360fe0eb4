"""The server's scheduler in process (TP=1): packed and chunked prefill under a token budget, prefix caching, and
prompt tokens folded into the decode forward.

Every sequence's greedy tokens are checked against HF transformers' own greedy continuation of the same prompt, so
packing, chunking and reusing another slot's keys and values must each compute what a lone full prefill computes.
"""

from __future__ import annotations

import pytest
import torch

from helpers import hf_greedy, hf_model, make_checkpoint
from tpinfer import kernels
from tpinfer.engine import messages
from tpinfer.engine.runtime import EngineSpec, load_engine
from tpinfer.engine.sampling import SamplingParams
from tpinfer.engine.scheduler import (
    FOLD_MIN_TOKENS,
    MAX_NUM_BATCHED_TOKENS,
    PREFIX_MIN_TOKENS,
    Scheduler,
    Sequence,
    fold_prefill,
)
from tpinfer.parallel.context import ParallelContext
from tpinfer.parallel.layers import NATIVE_MAX_ROWS

pytestmark = pytest.mark.timeout(300)

NEW = 6


class Output:
    def __init__(self, log: list[tuple[str, int]], name: str) -> None:
        self.log, self.name = log, name

    def add(self, token_id, logprob, top) -> bool:  # noqa: ANN001
        self.log.append((self.name, token_id))
        return False

    def finish(self, reason: str) -> None:
        pass

    def prompt(self, token_ids, logprobs, top) -> None:  # noqa: ANN001
        pass


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("sched") / "llama", "llama", max_position_embeddings=256)


@pytest.fixture(scope="module")
def engine(model_dir):
    return load_engine(EngineSpec(str(model_dir), max_batch_size=4, max_model_len=256), ParallelContext.single())


@pytest.fixture(scope="module")
def hf(model_dir):
    return hf_model(model_dir)


def _prompt(seed: int, length: int) -> list[int]:
    return torch.randint(3, 250, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _run(scheduler: Scheduler, prompts: dict[str, list[int]], log: list | None = None) -> dict[str, list[int]]:
    log = [] if log is None else log
    sequences = {name: Sequence(p, SamplingParams(max_new_tokens=NEW, temperature=0, ignore_eos=True),
                                Output(log, name)) for name, p in prompts.items()}
    assert scheduler.add(list(sequences.values()))
    while scheduler.step():
        pass
    return {name: seq.token_ids for name, seq in sequences.items()}


def test_packed_and_chunked_prefill_equal_hf(engine, hf):
    prompts = {"a": _prompt(1, 5), "b": _prompt(2, 23), "c": _prompt(3, 2), "long": _prompt(4, 70)}
    scheduler = Scheduler(engine, 4, 4, max_num_batched_tokens=16, prefix_caching=False)
    log: list[tuple[str, int]] = []
    got = _run(scheduler, prompts, log)
    for name, prompt in prompts.items():
        assert got[name] == hf_greedy(hf, prompt, NEW)[0], name
    # The 70-token prompt was prefilled in chunks of at most 16 tokens a step, the others' decodes running meanwhile:
    # "a" and "c" had most of their tokens before "long" had its first.
    order = [name for name, _ in log]
    before_long = order[: order.index("long")]
    assert before_long.count("a") == NEW and before_long.count("c") >= NEW - 1
    assert scheduler.prefill_tokens == sum(len(p) for p in prompts.values())  # packed: nothing padded
    assert scheduler.prefix_hit_tokens == 0
    # Where the native kernels run decode, the chunks of at most 16 tokens rode in the decode forwards.
    assert (scheduler.folded_steps > 0) == hasattr(engine.forward, "takes")


def test_prefix_cache_reuses_a_shared_prefix_and_changes_no_token(engine, hf):
    system = _prompt(10, 40)
    prompts = {f"u{i}": system + _prompt(20 + i, 3 + i) for i in range(4)}
    expected = {name: hf_greedy(hf, p, NEW)[0] for name, p in prompts.items()}
    scheduler = Scheduler(engine, 4, 4, max_num_batched_tokens=64)
    assert scheduler.prefix_caching
    assert _run(scheduler, prompts) == expected
    # The first prompt took the step's budget; the other three started from its 40 cached positions (copied from its
    # running slot), and only their own tokens were computed.
    assert scheduler.prefix_hit_tokens == 3 * 40
    assert scheduler.prefill_tokens == sum(len(p) for p in prompts.values()) - 3 * 40
    # A second round: each prompt finds itself in a free slot (prompt and generated tokens) and computes one token.
    before = scheduler.prefix_hit_tokens
    assert _run(scheduler, prompts) == expected
    assert scheduler.prefix_hit_tokens - before == sum(len(p) - 1 for p in prompts.values())
    # A prompt that continues a finished sequence's prompt and output (a second turn) reuses all of it.
    turn = prompts["u0"] + expected["u0"][:-1] + _prompt(30, 4)
    before = scheduler.prefix_hit_tokens
    assert _run(scheduler, {"turn": turn}) == {"turn": hf_greedy(hf, turn, NEW)[0]}
    assert scheduler.prefix_hit_tokens - before == len(prompts["u0"]) + NEW - 1


def test_prefix_cache_off_and_where_it_cannot_work(engine, checkpoints):
    prompts = {f"u{i}": _prompt(10, 40) + [5 + i] for i in range(3)}
    off = Scheduler(engine, 4, 4, max_num_batched_tokens=64, prefix_caching=False)
    on = Scheduler(engine, 4, 4, max_num_batched_tokens=64)
    assert _run(off, prompts) == _run(on, prompts)
    assert off.prefix_hit_tokens == 0 and on.prefix_hit_tokens == 2 * 40
    assert off.prefill_tokens == sum(len(p) for p in prompts.values())
    short = {"x": _prompt(11, PREFIX_MIN_TOKENS - 1) + [7], "y": _prompt(11, PREFIX_MIN_TOKENS - 1) + [8]}
    before = on.prefix_hit_tokens
    _run(on, short)  # a shared prefix shorter than PREFIX_MIN_TOKENS is not copied from a running slot
    assert on.prefix_hit_tokens == before
    # A sliding-window layer kept as a ring overwrites old positions: prefix caching is off, and says why.
    ring = load_engine(EngineSpec(str(checkpoints["gemma3_text"]), max_batch_size=2, max_model_len=256),
                       ParallelContext.single())
    assert "ring" in Scheduler.prefix_caching_supported(ring)
    assert not Scheduler(ring, 2, 2).prefix_caching
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(engine, 4, 4, max_num_batched_tokens=0)


@pytest.mark.skipif(not kernels.available(), reason="the native decode kernels are not built on this host")
def test_prompt_tokens_ride_in_the_decode_forward_only_where_that_is_exact(engine, hf, checkpoints):
    step = lambda prefill, decode=(), **kw: messages.Step(list(prefill), list(decode), **kw)  # noqa: E731
    assert fold_prefill(engine, step([(0, [5, 6, 7])], [(1, 9, 4)]))
    assert not fold_prefill(engine, step([], [(1, 9, 4)]))  # nothing to fold
    assert not fold_prefill(engine, step([(0, [5, 6, 7])], echo=[0]))  # every position's logits wanted
    assert not fold_prefill(engine, step([(0, list(range(3, 3 + NATIVE_MAX_ROWS[torch.float32])))], [(1, 9, 4)]))
    ring = load_engine(EngineSpec(str(checkpoints["gemma3_text"]), max_batch_size=2, max_model_len=256),
                       ParallelContext.single())
    assert not fold_prefill(ring, step([(0, [5, 6, 7])]))  # a sliding-window ring: later positions overwrite
    assert Scheduler(ring, 2, 2).step_budget(0) == MAX_NUM_BATCHED_TOKENS  # never folds: the whole budget
    # A step prefills what keeps it within the kernels' rows, unless that leaves too little room.
    rows = NATIVE_MAX_ROWS[torch.float32]
    folding = Scheduler(engine, 4, 4)
    assert folding.step_budget(0) == rows and folding.step_budget(3) == rows - 3
    assert folding.step_budget(rows - FOLD_MIN_TOKENS + 1) == MAX_NUM_BATCHED_TOKENS
    assert Scheduler(engine, 4, 4, max_num_batched_tokens=16).step_budget(3) == 16
    # Folded or not, a prompt arriving while others decode gets HF's tokens; one step per new token.
    prompts = {"a": _prompt(40, 9), "b": _prompt(41, 30), "c": _prompt(42, 4)}
    scheduler = Scheduler(engine, 4, 4, max_num_batched_tokens=64, prefix_caching=False)
    assert _run(scheduler, prompts) == {name: hf_greedy(hf, p, NEW)[0] for name, p in prompts.items()}
    assert scheduler.folded_steps >= 1
