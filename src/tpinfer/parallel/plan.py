"""Tensor-parallel plans: which module is sharded how.

A plan maps HF module names, with ``*`` standing for one name component (a layer index), to a
strategy. ``"auto"`` is the architecture's default. Modules a user plan leaves out are replicated,
as in HF transformers. A plan is resolved and validated for one model and one TP size before any
weight is read; the model then asks the plan how to build each layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tpinfer.config import ConfigError, ModelConfig
from tpinfer.parallel.shard import kv_head_range, tp_failure_reason, valid_tp_sizes

COLWISE, ROWWISE, REPLICATE, VOCAB = "colwise", "rowwise", "replicate", "vocab"
LINEAR_STRATEGIES = (COLWISE, ROWWISE, REPLICATE)
# Embedding and LM head: split the vocabulary ("vocab"; HF's colwise/rowwise mean the same for them) or replicate.
VOCAB_ALIASES = {VOCAB: VOCAB, COLWISE: VOCAB, ROWWISE: VOCAB, "colwise_rep": VOCAB, REPLICATE: REPLICATE}
NOT_YET = {"sequence_parallel": "sequence_parallel is not supported yet; norms are replicated ('replicate')"}

LLAMA_AUTO_PLAN: dict[str, str] = {
    "model.embed_tokens": VOCAB,
    "model.layers.*.self_attn.q_proj": COLWISE,
    "model.layers.*.self_attn.k_proj": COLWISE,
    "model.layers.*.self_attn.v_proj": COLWISE,
    "model.layers.*.self_attn.o_proj": ROWWISE,
    "model.layers.*.mlp.gate_proj": COLWISE,
    "model.layers.*.mlp.up_proj": COLWISE,
    "model.layers.*.mlp.down_proj": ROWWISE,
    "lm_head": VOCAB,
}
AUTO_PLANS = {"llama": LLAMA_AUTO_PLAN, "mistral": LLAMA_AUTO_PLAN, "qwen2": LLAMA_AUTO_PLAN}


class PlanError(ConfigError):
    """A tp_plan that cannot be applied to this model at this TP size."""


def module_names(config: ModelConfig) -> list[str]:
    """Every plannable module of a Llama-family model, by HF name."""
    names = ["model.embed_tokens"]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + f"self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [p + f"mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")]
        names += [p + "input_layernorm", p + "post_attention_layernorm"]
    return names + ["model.norm", "lm_head"]


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(name).replace(r"\*", r"[^.]+") + "$")


@dataclass(frozen=True)
class ResolvedPlan:
    """Strategy of every module for one model at one TP size."""

    strategies: dict[str, str]
    tp: int

    def strategy(self, module: str) -> str:
        return self.strategies[module]


def resolve_plan(config: ModelConfig, tp: int, plan: str | dict[str, str] = "auto") -> ResolvedPlan:
    """Resolve ``plan`` for ``config`` and check it can run at ``tp``; raises PlanError naming the problem."""
    if plan == "auto":
        if config.model_type not in AUTO_PLANS:
            raise PlanError(f"no auto plan for model_type {config.model_type!r}")
        plan = AUTO_PLANS[config.model_type]
        reason = tp_failure_reason(config, tp)
        if reason:
            raise PlanError(f"{reason}; valid sizes for this model: {', '.join(map(str, valid_tp_sizes(config)))}")
    if not isinstance(plan, dict):
        raise PlanError(f"tp_plan must be 'auto' or a dict of module pattern -> strategy, got {plan!r}")
    names = module_names(config)
    strategies = {name: REPLICATE for name in names}
    claimed: dict[str, str] = {}
    for pattern, strategy in plan.items():
        if strategy in NOT_YET:
            raise PlanError(f"{pattern}: {NOT_YET[strategy]}")
        regex = _pattern(pattern)
        matched = [n for n in names if regex.match(n)]
        if not matched:
            raise PlanError(f"tp_plan entry {pattern!r} matches no module of this {config.model_type} model")
        for name in matched:
            normalized = _normalize(name, strategy, pattern)
            if name in claimed and strategies[name] != normalized:
                raise PlanError(
                    f"{name} is given two strategies: {strategies[name]!r} by {claimed[name]!r} "
                    f"and {normalized!r} by {pattern!r}"
                )
            strategies[name], claimed[name] = normalized, pattern
    resolved = ResolvedPlan(strategies, tp)
    _check_pairs(config, resolved)
    _check_sizes(config, resolved)
    return resolved


def _normalize(name: str, strategy: str, pattern: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("embed_tokens", "lm_head"):
        if strategy not in VOCAB_ALIASES:
            raise PlanError(f"{pattern}: strategy {strategy!r} for {leaf}; choose one of vocab, replicate")
        return VOCAB_ALIASES[strategy]
    if leaf.endswith("norm"):
        if strategy != REPLICATE:
            raise PlanError(f"{pattern}: {leaf} can only be 'replicate'")
        return REPLICATE
    if strategy not in LINEAR_STRATEGIES:
        raise PlanError(f"{pattern}: unknown strategy {strategy!r}; choose one of {', '.join(LINEAR_STRATEGIES)}")
    return strategy


def _check_pairs(config: ModelConfig, plan: ResolvedPlan) -> None:
    """A colwise group must feed a rowwise layer; a replicated group a replicated one."""
    groups = (("self_attn", ("q_proj", "k_proj", "v_proj"), "o_proj"), ("mlp", ("gate_proj", "up_proj"), "down_proj"))
    for i in range(config.num_hidden_layers):
        for block, inputs, output in groups:
            p = f"model.layers.{i}.{block}."
            first = plan.strategy(p + inputs[0])
            for name in inputs:
                s = plan.strategy(p + name)
                if s == ROWWISE:
                    raise PlanError(f"{p + name} cannot be rowwise: its input is the full hidden state; use colwise")
                if s != first:
                    raise PlanError(f"{p + inputs[0]} is {first} but {p + name} is {s}: they must match")
            expected = ROWWISE if first == COLWISE else REPLICATE
            got = plan.strategy(p + output)
            if got != expected:
                raise PlanError(
                    f"{p + inputs[0]} is {first} but {p + output} is {got}: a {first} {'/'.join(inputs)} "
                    f"must be followed by a {expected} {output}"
                )


def _check_sizes(config: ModelConfig, plan: ResolvedPlan) -> None:
    tp = plan.tp
    if tp < 1:
        raise PlanError(f"tensor-parallel size must be at least 1, got {tp}")
    attn_sharded = any(plan.strategy(f"model.layers.{i}.self_attn.q_proj") == COLWISE for i in range(config.num_hidden_layers))
    mlp_sharded = any(plan.strategy(f"model.layers.{i}.mlp.gate_proj") == COLWISE for i in range(config.num_hidden_layers))

    def failure(t: int) -> str | None:
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        if attn_sharded and heads % t:
            return f"{heads} attention heads are not divisible by tp={t}"
        if attn_sharded and kv % t and t % kv:
            return f"{kv} KV heads are neither divisible by tp={t} nor a divisor of it"
        if mlp_sharded and config.intermediate_size % t:
            return f"intermediate_size {config.intermediate_size} is not divisible by tp={t}"
        return None

    reason = failure(tp)
    if reason:
        limit = config.num_attention_heads if attn_sharded else max(config.intermediate_size, 64)
        sizes = [t for t in range(1, min(limit, 4096) + 1) if failure(t) is None]
        raise PlanError(f"{reason}; valid sizes for this model and plan: {', '.join(map(str, sizes))}")


def kv_rows(config: ModelConfig, rank: int, tp: int) -> tuple[int, int]:
    """(start, length) in k_proj/v_proj output features held by ``rank``."""
    first, count = kv_head_range(config.num_key_value_heads, rank, tp)
    return first * config.head_dim, count * config.head_dim
