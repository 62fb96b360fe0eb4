"""Tensor-parallel plans: which module is sharded how.

A plan maps HF module names, with ``*`` standing for one name component (a layer index), to a
strategy. ``"auto"`` is the family's default (``tpinfer.models.<family>.FAMILY.auto_plan``). Modules a
user plan leaves out are replicated, as in HF transformers. A plan is resolved and validated for one
model and one TP size before any weight is read, from the family's declaration of its modules and
pairs; the model then asks the plan how to build each layer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tpinfer.config import ConfigError, ModelConfig
from tpinfer.models.family import ENCODER
from tpinfer.parallel.spec import (
    COLWISE,
    EXPERT,
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
from tpinfer.quant.formats import Scheme

if TYPE_CHECKING:
    from tpinfer.models.family import Family

LINEAR_STRATEGIES = (COLWISE, ROWWISE, REPLICATE)
# Embedding and LM head: split the vocabulary ("vocab"; HF's colwise/rowwise mean the same for them) or replicate.
VOCAB_ALIASES = {VOCAB: VOCAB, COLWISE: VOCAB, ROWWISE: VOCAB, "colwise_rep": VOCAB, "colwise_gather_output": VOCAB,
                 REPLICATE: REPLICATE}
# A norm under sequence parallelism: it runs on this rank's chunk of the sequence (HF's strategy name). Every norm of
# the model must say it, or none (the residual stream between layers is either split along the sequence or not).
SEQUENCE = "sequence_parallel"
AUTO_SP = "auto-sp"  # the family's auto plan with every norm sequence_parallel
MOE_LAYOUTS = ("tensor", "expert")  # --moe-parallel: each expert split over the TP group, or whole experts per rank
MAX_LISTED_SIZE = 4096


class PlanError(ConfigError):
    """A tp_plan that cannot be applied to this model at this TP size."""


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(name).replace(r"\*", r"[^.]+") + "$")


@dataclass(frozen=True)
class ResolvedPlan:
    """Strategy of every module for one model at one TP size, and the quantized projections' schemes."""

    strategies: dict[str, str]
    tp: int
    schemes: dict[str, Scheme] = field(default_factory=dict)  # module name -> its weight format; absent: float

    @property
    def sequence_parallel(self) -> bool:
        """Prefill steps keep the residual stream split along the sequence between layers (Megatron's SP)."""
        return SEQUENCE in self.strategies.values()

    def strategy(self, module: str) -> str:
        return self.strategies[module]

    def scheme(self, module: str) -> Scheme | None:
        return self.schemes.get(module)


def strategies_for(config: ModelConfig, plan: dict[str, str], modules: list[Module] | None = None,
                   strict: bool = False) -> dict[str, str]:
    """Module name -> strategy under ``plan`` (unlisted modules replicated), checking every entry's strategy.

    ``strict``: an entry matching no module is an error (a user's plan); an auto plan covers every variant of its
    family (Qwen-MoE with or without dense layers), so its entries may match nothing."""
    modules = modules if modules is not None else config.family.modules(config)
    by_name = {m.name: m for m in modules}
    strategies = {name: REPLICATE for name in by_name}
    claimed: dict[str, str] = {}
    for pattern, strategy in plan.items():
        regex = _pattern(pattern)
        matched = [n for n in by_name if regex.match(n)]
        if not matched and strict:
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


def quantized_projections(config: ModelConfig, scheme: Scheme | dict[str, Scheme] | None,
                          lm_head: bool | Scheme = False) -> dict[str, Scheme]:
    """Module name -> scheme: one scheme for every projection of the decoder layers, or a map given module by module
    (a GGUF file's or a compressed-tensors checkpoint's, which may name ``lm_head``). ``lm_head``: the LM head
    quantized too, True in the projections' scheme or in a scheme of its own (the embedding stays float)."""
    if scheme is None:
        if lm_head:
            raise PlanError("--quantize-lm-head quantizes the head in the projections' scheme; give --quantization "
                            "(or a quantized checkpoint)")
        return {}
    modules = config.family.modules(config)
    linears = {m.name for m in modules if isinstance(m, Linear)}
    head = next(m.name for m in modules if isinstance(m, Head))
    if isinstance(scheme, Scheme):
        out = dict.fromkeys(sorted(linears), scheme)
        if lm_head:
            out[head] = lm_head if isinstance(lm_head, Scheme) else scheme
    else:
        unknown = sorted(set(scheme) - linears - {head})
        if unknown:
            raise PlanError(f"quantized tensors for modules this {config.model_type} model does not have: {unknown[:3]}")
        out = dict(scheme)
        if isinstance(lm_head, Scheme):
            if head in out:
                raise PlanError(f"--quantize-lm-head {lm_head.name}: the checkpoint's {head} is already quantized "
                                f"({out[head].name}) and keeps its format; give the option without a scheme")
            out[head] = lm_head
    if head in out:
        if config.tie_word_embeddings:
            raise PlanError("--quantize-lm-head: this model ties its LM head to the embedding (tie_word_embeddings), "
                            "which stays float; the head can only be quantized when it has its own weight")
        reason = out[head].failure(config.hidden_size)
        if reason:
            raise PlanError(f"{head}: {reason}")
    return out


def resolve_plan(config: ModelConfig, tp: int, plan: str | dict[str, str] = "auto",
                 quantization: Scheme | dict[str, Scheme] | None = None,
                 lm_head: bool | Scheme = False, moe_parallel: str = "tensor") -> ResolvedPlan:
    """Resolve ``plan`` for ``config`` (and its quantized projections) and check it can run at ``tp``; raises
    PlanError naming the problem. ``moe_parallel`` picks a mixture-of-experts family's expert layout for the auto
    plan: "tensor" (every expert's gate/up colwise, down rowwise) or "expert" (whole experts per rank)."""
    if tp < 1:
        raise PlanError(f"tensor-parallel size must be at least 1, got {tp}")
    if moe_parallel not in MOE_LAYOUTS:
        raise PlanError(f"--moe-parallel must be one of {', '.join(MOE_LAYOUTS)}, got {moe_parallel!r}")
    family = config.family
    if family.kind == ENCODER and (quantization is not None or lm_head):
        raise PlanError(f"quantized weights for encoder models ({config.model_type}) are not supported yet; load the "
                        "float checkpoint without --quantization")
    if moe_parallel == "expert" and family.expert_plan is None:
        raise PlanError(f"--moe-parallel expert: {config.model_type} has no mixture-of-experts layers")
    auto = plan in ("auto", AUTO_SP)
    if auto:
        modules = family.modules(config)
        plan = {**family.auto_plan, **(family.expert_plan if moe_parallel == "expert" else {}),
                **({m.name: SEQUENCE for m in modules if isinstance(m, Norm)} if plan == AUTO_SP else {})}
    if not isinstance(plan, dict):
        raise PlanError(f"tp_plan must be 'auto' or a dict of module pattern -> strategy, got {plan!r}")
    modules = family.modules(config)
    resolved = ResolvedPlan(strategies_for(config, plan, modules, strict=not auto), tp,
                            quantized_projections(config, quantization, lm_head))
    _check_pairs(config, family, resolved)
    if family.kind == ENCODER and resolved.sequence_parallel:
        raise PlanError(f"{SEQUENCE}: sequence parallelism is not implemented for encoder models ({config.model_type})")
    _check_sequence_parallel(config, family, resolved)
    reason = tp_failure(modules, resolved.strategies, tp, resolved.schemes)
    if reason:
        sizes = ", ".join(map(str, valid_sizes(modules, resolved.strategies, config.num_attention_heads,
                                               resolved.schemes)))
        what = ("" if auto else " and plan") + (" and quantization" if resolved.schemes else "")
        raise PlanError(f"{reason}; valid sizes for this model{what}: {sizes or 'none'}")
    return resolved


def _normalize(module: Module, strategy: str, pattern: str) -> str:
    leaf = module.name.rsplit(".", 1)[-1]
    if isinstance(module, Embedding | Head):
        if strategy not in VOCAB_ALIASES:
            raise PlanError(f"{pattern}: strategy {strategy!r} for {leaf}; choose one of vocab, replicate")
        return VOCAB_ALIASES[strategy]
    if isinstance(module, Norm):
        if strategy not in (REPLICATE, SEQUENCE):
            raise PlanError(f"{pattern}: {leaf} can only be 'replicate' or '{SEQUENCE}'")
        return strategy
    if strategy == EXPERT and isinstance(module, Linear) and module.expert is not None:
        return strategy
    if strategy not in LINEAR_STRATEGIES:
        extra = f" ({EXPERT} for an expert's projections)" if isinstance(module, Linear) and module.expert else ""
        raise PlanError(f"{pattern}: unknown strategy {strategy!r}; choose one of {', '.join(LINEAR_STRATEGIES)}"
                        + extra)
    return strategy


def _check_pairs(config: ModelConfig, family: Family, plan: ResolvedPlan) -> None:
    """A colwise group must feed a rowwise layer; a replicated group a replicated one. Embedding and head that share
    a weight must share a strategy."""
    for i in range(config.num_hidden_layers):
        for inputs, output in family.layer_pairs(i, config):
            first = plan.strategy(inputs[0])
            for name in inputs:
                s = plan.strategy(name)
                if s == ROWWISE:
                    raise PlanError(f"{name} cannot be rowwise: its input is the full hidden state; use colwise")
                if s != first:
                    raise PlanError(f"{inputs[0]} is {first} but {name} is {s}: they must match")
            expected = {COLWISE: ROWWISE, EXPERT: EXPERT}.get(first, REPLICATE)
            got = plan.strategy(output)
            if got != expected:
                short = "/".join(n.rsplit(".", 1)[-1] for n in inputs)
                raise PlanError(
                    f"{inputs[0]} is {first} but {output} is {got}: a {first} {short} "
                    f"must be followed by a {expected} {output.rsplit('.', 1)[-1]}"
                )
    if config.tie_word_embeddings and plan.strategy("model.embed_tokens") != plan.strategy("lm_head"):
        raise PlanError("tied embeddings need model.embed_tokens and lm_head to share a strategy (vocab or replicate)")


def _check_sequence_parallel(config: ModelConfig, family: Family, plan: ResolvedPlan) -> None:
    """Sequence parallelism is all or nothing, and needs every layer's pairs split (colwise then rowwise): a
    replicated projection would see only this rank's chunk of the sequence."""
    # The norms on the residual stream (q/k norms inside attention run on the gathered sequence either way).
    norms = [m.name for m in family.modules(config) if isinstance(m, Norm) and ".self_attn." not in m.name]
    split = [name for name in norms if plan.strategy(name) == SEQUENCE]
    if not split:
        return
    if len(split) != len(norms):
        rest = [n for n in norms if n not in split]
        raise PlanError(f"{SEQUENCE} splits the residual stream between layers along the sequence, so every norm "
                        f"must be {SEQUENCE}: {len(split)} of {len(norms)} are (not {rest[0]})")
    for i in range(config.num_hidden_layers):
        for inputs, _ in family.layer_pairs(i, config):
            if plan.strategy(inputs[0]) not in (COLWISE, EXPERT):
                raise PlanError(f"{SEQUENCE} needs {inputs[0]} colwise (its input is all-gathered along the "
                                f"sequence first); it is {plan.strategy(inputs[0])}")


def _split_features(modules: list[Module], strategies: dict[str, str],
                    schemes: dict[str, Scheme]) -> list[tuple[Linear, str, Scheme | None]]:
    """One (module, strategy, scheme) per distinct split the plan asks for (layers repeat the same ones)."""
    seen: dict[tuple, tuple[Linear, str, Scheme | None]] = {}
    for m in modules:
        scheme = schemes.get(m.name)
        if isinstance(m, Linear) and (strategies[m.name] in (COLWISE, ROWWISE, EXPERT) or scheme is not None):
            key = (m.in_features, m.out_features, strategies[m.name], scheme, scheme.unit if scheme else None,
                   m.expert[1] if m.expert and strategies[m.name] == EXPERT else None)
            seen.setdefault(key, (m, strategies[m.name], scheme))
    return list(seen.values())


def _failure(module: Linear, strategy: str, scheme: Scheme | None, tp: int) -> str | None:
    reason = size_failure(module, strategy, tp)
    if reason or scheme is None:
        return reason
    name = module.name.split(".", 3)[-1] if module.name.startswith("model.layers.") else module.name
    if strategy == ROWWISE:  # every rank's input columns must hold whole groups
        for rank in range(tp):
            reason = scheme.failure(module.in_features.total, module.in_features.ranges(rank, tp))
            if reason:
                return f"{name}: {reason} at tp={tp}"
        return None
    reason = scheme.failure(module.in_features.total)
    return f"{name}: {reason}" if reason else None


def tp_failure(modules: list[Module], strategies: dict[str, str], tp: int,
               schemes: dict[str, Scheme] | None = None) -> str | None:
    """Why ``tp`` cannot split these modules as ``strategies`` say (with their quantization groups), naming the
    numbers; None when it can."""
    return tp_failures(modules, strategies, (tp,), schemes)[tp]


def tp_failures(modules: list[Module], strategies: dict[str, str], sizes: Iterable[int],
                schemes: dict[str, Scheme] | None = None) -> dict[int, str | None]:
    """``tp_failure`` at each of ``sizes``, reading the modules once (a MoE model has thousands)."""
    splits = _split_features(modules, strategies, schemes or {})
    out: dict[int, str | None] = {}
    for tp in sizes:
        if tp < 1:
            out[tp] = f"tp={tp} must be at least 1"
        else:
            out[tp] = next((reason for m, s, q in splits if (reason := _failure(m, s, q, tp))), None)
    return out


def valid_sizes(modules: list[Module], strategies: dict[str, str], default_limit: int,
                schemes: dict[str, Scheme] | None = None) -> list[int]:
    """Every TP size the split modules allow, up to the largest unit count that is split (at most 4096)."""
    splits = _split_features(modules, strategies, schemes or {})
    counts = [p.count for m, s, _ in splits if s in (COLWISE, ROWWISE)
              for p in (m.out_features if s == COLWISE else m.in_features).parts]
    counts += [m.expert[1] for m, s, _ in splits if s == EXPERT]
    limit = min(max(counts, default=default_limit), MAX_LISTED_SIZE)
    return [t for t in range(1, limit + 1) if all(_failure(m, s, q, t) is None for m, s, q in splits)]
