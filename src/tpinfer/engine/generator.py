"""Prefill then decode, on every rank in lockstep.

Every rank calls ``generate`` with the same prompts and parameters (the launcher broadcasts them,
or the user's torchrun script gives each rank the same inputs). Logits are gathered to every rank,
so each rank can pick the same token; sampled tokens are broadcast from rank 0 so all ranks act on
rank 0's choice even where floating point could differ across hosts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tpinfer.engine.kv_cache import Batch, KVCache
from tpinfer.engine.sampling import (
    SamplingParams,
    local_candidates,
    make_generator,
    merge_candidates,
    sample,
    sample_candidates,
    token_logprobs,
    uses_candidates,
)


@dataclass
class GenerationOutput:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"


@dataclass
class GenerationStats:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0


class Generator:
    """Runs batches of prompts through one rank's model with a preallocated KV cache."""

    def __init__(self, model, eos_token_ids: tuple[int, ...], max_batch_size: int = 8, forward=None) -> None:
        self.model = model
        self.forward = forward or model  # the model's forward, or a fast decode adapter around it
        self.ctx = model.ctx
        self.eos_token_ids = tuple(eos_token_ids)
        self.cache: KVCache = model.new_cache(max_batch_size)
        self.stats = GenerationStats()
        self.fault_step: int | None = None  # tests: raise at this decode step (see EngineSpec.fault)

    def _ensure_cache(self, batch_size: int) -> None:
        if batch_size > self.cache.max_seqs:
            self.cache = self.model.new_cache(batch_size)

    def _choose(self, local_logits: torch.Tensor | None, params: SamplingParams, generator,
                rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next token of every row and its log-probability; the same on every rank (a pipeline's last stage
        chooses, and its choice reaches every stage: the first feeds it in next)."""
        if local_logits is not None:
            tokens, logprobs = self._choose_here(local_logits, params, generator)
        pipe = self.ctx.pipe
        if pipe is None or self.ctx.pp_size == 1:
            return tokens, logprobs
        packed = torch.empty((2, rows), dtype=torch.float64, device=self.ctx.device)
        if local_logits is not None:
            packed[0], packed[1] = tokens, logprobs
        pipe.broadcast_from_sampler(packed)
        return packed[0].long(), packed[1].float()

    def _choose_here(self, local_logits: torch.Tensor, params: SamplingParams,
                     generator) -> tuple[torch.Tensor, torch.Tensor]:
        if uses_candidates(params):
            head = self.model.lm_head
            k = 1 if params.greedy else params.top_k
            packed = local_candidates(local_logits, head.start, min(head.length, head.vocab_size - head.start), k)
            # Each rank's k best tokens and log-sum-exp: a few floats per row instead of its vocabulary shard.
            gathered = self.ctx.comm.all_gather(packed, dim=0).chunk(self.ctx.tp_size, dim=0) if (
                self.ctx.tp_size > 1 and head.length < head.vocab_size) else [packed]
            values, ids, lse = merge_candidates(list(gathered), k)
            tokens, pos = sample_candidates(values, ids, params, generator)
            logprobs = values.gather(-1, pos[:, None]).squeeze(-1) - lse
        else:
            logits = self.model.gather_logits(local_logits)
            tokens = sample(logits, params, generator)
            logprobs = token_logprobs(logits, tokens)
        if not params.greedy and self.ctx.tp_size > 1:
            # Rank 0's draw is the one every rank uses.
            self.ctx.comm.broadcast(tokens, src=0)
        return tokens, logprobs

    def _decode(self, outputs: list[GenerationOutput], slots: list[int], params: SamplingParams,
                generator) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        """The next token of each sequence: one decode forward, except that a sequence reaching the model's
        ``recompute_length`` is run again whole from position 0 (its cache is recomputed, as HF does for Phi-3's
        switch to long rope factors)."""
        device = self.ctx.device
        lengths = [len(o.prompt_token_ids) + len(o.token_ids) for o in outputs]
        again = [i for i, n in enumerate(lengths) if n == self.model.recompute_length]
        if not again:
            batch = Batch.build([[o.token_ids[-1]] for o in outputs], [n - 1 for n in lengths], slots, device)
            return self._choose(self.forward(batch, self.cache), params, generator, len(outputs))
        tokens = torch.empty(len(outputs), dtype=torch.long, device=device)
        logprobs = torch.empty(len(outputs), dtype=torch.float32, device=device)
        rest = [i for i in range(len(outputs)) if i not in again]
        batch = Batch.build([outputs[i].prompt_token_ids + outputs[i].token_ids for i in again], [0] * len(again),
                            [slots[i] for i in again], device)
        tokens[again], logprobs[again] = self._choose(self.forward(batch, self.cache), params, generator, len(again))
        if rest:
            batch = Batch.build([[outputs[i].token_ids[-1]] for i in rest], [lengths[i] - 1 for i in rest],
                                [slots[i] for i in rest], device)
            tokens[rest], logprobs[rest] = self._choose(self.forward(batch, self.cache), params, generator, len(rest))
        return tokens, logprobs

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[GenerationOutput]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts) + params.max_new_tokens
        if longest > self.model.max_seq_len:
            raise ValueError(
                f"prompt of {max(len(p) for p in prompts)} tokens + max_new_tokens {params.max_new_tokens} = "
                f"{longest} exceeds the maximum sequence length {self.model.max_seq_len}"
            )
        self._ensure_cache(len(prompts))
        device = self.ctx.device
        generator = make_generator(params.seed, device)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        outputs = [GenerationOutput(list(p)) for p in prompts]

        start = time.perf_counter()
        batch = Batch.build(prompts, [0] * len(prompts), list(range(len(prompts))), device)
        tokens, logprobs = self._choose(self.forward(batch, self.cache), params, generator, len(prompts))
        self.stats.prefill_s += time.perf_counter() - start
        self.stats.prompt_tokens += sum(len(p) for p in prompts)

        active = list(range(len(prompts)))
        start = time.perf_counter()
        while True:
            still = []
            for row, b in enumerate(active):
                token = int(tokens[row])
                outputs[b].token_ids.append(token)
                outputs[b].logprobs.append(float(logprobs[row]))
                if token in stop_ids:
                    outputs[b].finish_reason = "stop"
                elif len(outputs[b].token_ids) < params.max_new_tokens:
                    still.append(b)
            self.stats.generated_tokens += len(active)
            if not still:
                break
            active = still
            if self.fault_step is not None and self.stats.decode_steps >= self.fault_step:
                raise RuntimeError(f"rank {self.ctx.rank}: injected fault at decode step {self.stats.decode_steps}")
            tokens, logprobs = self._decode([outputs[b] for b in active], active, params, generator)
            self.stats.decode_steps += 1
        self.stats.decode_s += time.perf_counter() - start
        return outputs
