"""Tensor-parallel plans: which module is sharded how.

A plan maps HF module names, with ``*`` standing for one name component (a layer index), to a
strategy. ``"auto"`` is the family's default (``tpinfer.models.<family>.FAMILY.auto_plan``). Modules a
user plan leaves out are replicated, as in HF transformers. A plan is resolved and validated for one
model and one TP size before any weight is read, from the family's declaration of its modules and
pairs; the model then asks the plan how to build each layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tpinfer.config import ConfigError, ModelConfig
from tpinfer.parallel.spec import (
    COLWISE,
    REPLICATE,
    ROWWISE,
    VOCAB,
    Embedding,
    Head,
    Linear,
    Module,
    Norm,
    size_failure,
)

if TYPE_CHECKING:
    from tpinfer.models.family import Family

LINEAR_STRATEGIES = (COLWISE, ROWWISE, REPLICATE)
# Embedding and LM head: split the vocabulary ("vocab"; HF's colwise/rowwise mean the same for them) or replicate.
VOCAB_ALIASES = {VOCAB: VOCAB, COLWISE: VOCAB, ROWWISE: VOCAB, "colwise_rep": VOCAB, "colwise_gather_output": VOCAB,
                 REPLICATE: REPLICATE}
NOT_YET = {"sequence_parallel": "sequence_parallel is not supported yet; norms are replicated ('replicate')"}
MAX_LISTED_SIZE = 4096


class PlanError(ConfigError):
    """A tp_plan that cannot be applied to this model at this TP size."""


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(name).replace(r"\*", r"[^.]+") + "$")


@dataclass(frozen=True)
class ResolvedPlan:
    """Strategy of every module for one model at one TP size."""

    strategies: dict[str, str]
    tp: int

    def strategy(self, module: str) -> str:
        return self.strategies[module]


def strategies_for(config: ModelConfig, plan: dict[str, str], modules: list[Module] | None = None) -> dict[str, str]:
    """Module name -> strategy under ``plan`` (unlisted modules replicated), checking every entry's strategy."""
    modules = modules if modules is not None else config.family.modules(config)
    by_name = {m.name: m for m in modules}
    strategies = {name: REPLICATE for name in by_name}
    claimed: dict[str, str] = {}
    for pattern, strategy in plan.items():
        if strategy in NOT_YET:
            raise PlanError(f"{pattern}: {NOT_YET[strategy]}")
        regex = _pattern(pattern)
        matched = [n for n in by_name if regex.match(n)]
        if not matched:
            raise PlanError(f"tp_plan entry {pattern!r} matches no module of this {config.model_type} model")
        for name in matched:
            normalized = _normalize(by_name[name], strategy, pattern)
            if name in claimed and strategies[name] != normalized:
                raise PlanError(
                    f"{name} is given two strategies: {strategies[name]!r} by {claimed[name]!r} "
                    f"and {normalized!r} by {pattern!r}"
                )
            strategies[name], claimed[name] = normalized, pattern
    return strategies


def resolve_plan(config: ModelConfig, tp: int, plan: str | dict[str, str] = "auto") -> ResolvedPlan:
    """Resolve ``plan`` for ``config`` and check it can run at ``tp``; raises PlanError naming the problem."""
    if tp < 1:
        raise PlanError(f"tensor-parallel size must be at least 1, got {tp}")
    family = config.family
    auto = plan == "auto"
    if auto:
        plan = family.auto_plan
    if not isinstance(plan, dict):
        raise PlanError(f"tp_plan must be 'auto' or a dict of module pattern -> strategy, got {plan!r}")
    modules = family.modules(config)
    resolved = ResolvedPlan(strategies_for(config, plan, modules), tp)
    _check_pairs(config, family, resolved)
    reason = tp_failure(modules, resolved.strategies, tp)
    if reason:
        sizes = ", ".join(map(str, valid_sizes(modules, resolved.strategies, config.num_attention_heads)))
        raise PlanError(f"{reason}; valid sizes for this model{'' if auto else ' and plan'}: {sizes}")
    return resolved


def _normalize(module: Module, strategy: str, pattern: str) -> str:
    leaf = module.name.rsplit(".", 1)[-1]
    if isinstance(module, Embedding | Head):
        if strategy not in VOCAB_ALIASES:
            raise PlanError(f"{pattern}: strategy {strategy!r} for {leaf}; choose one of vocab, replicate")
        return VOCAB_ALIASES[strategy]
    if isinstance(module, Norm):
        if strategy != REPLICATE:
            raise PlanError(f"{pattern}: {leaf} can only be 'replicate'")
        return REPLICATE
    if strategy not in LINEAR_STRATEGIES:
        raise PlanError(f"{pattern}: unknown strategy {strategy!r}; choose one of {', '.join(LINEAR_STRATEGIES)}")
    return strategy


def _check_pairs(config: ModelConfig, family: Family, plan: ResolvedPlan) -> None:
    """A colwise group must feed a rowwise layer; a replicated group a replicated one. Embedding and head that share
    a weight must share a strategy."""
    for i in range(config.num_hidden_layers):
        for inputs, output in family.layer_pairs(i):
            first = plan.strategy(inputs[0])
            for name in inputs:
                s = plan.strategy(name)
                if s == ROWWISE:
                    raise PlanError(f"{name} cannot be rowwise: its input is the full hidden state; use colwise")
                if s != first:
                    raise PlanError(f"{inputs[0]} is {first} but {name} is {s}: they must match")
            expected = ROWWISE if first == COLWISE else REPLICATE
            got = plan.strategy(output)
            if got != expected:
                short = "/".join(n.rsplit(".", 1)[-1] for n in inputs)
                raise PlanError(
                    f"{inputs[0]} is {first} but {output} is {got}: a {first} {short} "
                    f"must be followed by a {expected} {output.rsplit('.', 1)[-1]}"
                )
    if config.tie_word_embeddings and plan.strategy("model.embed_tokens") != plan.strategy("lm_head"):
        raise PlanError("tied embeddings need model.embed_tokens and lm_head to share a strategy (vocab or replicate)")


def _split_features(modules: list[Module], strategies: dict[str, str]) -> list[tuple[Linear, str]]:
    """One (module, strategy) per distinct split the plan asks for (layers repeat the same ones)."""
    seen: dict[tuple, tuple[Linear, str]] = {}
    for m in modules:
        if isinstance(m, Linear) and strategies[m.name] in (COLWISE, ROWWISE):
            features = m.out_features if strategies[m.name] == COLWISE else m.in_features
            seen.setdefault((features, strategies[m.name]), (m, strategies[m.name]))
    return list(seen.values())


def tp_failure(modules: list[Module], strategies: dict[str, str], tp: int) -> str | None:
    """Why ``tp`` cannot split these modules as ``strategies`` say, naming the numbers; None when it can."""
    if tp < 1:
        return f"tp={tp} must be at least 1"
    for module, strategy in _split_features(modules, strategies):
        reason = size_failure(module, strategy, tp)
        if reason:
            return reason
    return None


def valid_sizes(modules: list[Module], strategies: dict[str, str], default_limit: int) -> list[int]:
    """Every TP size the split modules allow, up to the largest unit count that is split (at most 4096)."""
    splits = _split_features(modules, strategies)
    counts = [p.count for m, s in splits for p in (m.out_features if s == COLWISE else m.in_features).parts]
    limit = min(max(counts, default=default_limit), MAX_LISTED_SIZE)
    return [t for t in range(1, limit + 1) if all(size_failure(m, s, t) is None for m, s in splits)]
