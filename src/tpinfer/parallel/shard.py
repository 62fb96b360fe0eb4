"""Shard arithmetic: pure functions of (size, rank, world), and the shapes they give a model.

This module and the family declarations it reads (``tpinfer.parallel.spec``, ``tpinfer.models``) are the one
source of truth for how tpinfer splits a model. The parallel layers take their per-rank sizes from here, the
loader takes its slices from here, and ``tpinfer info`` and the planner count bytes from here, so the three
cannot disagree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tpinfer.config import ModelConfig


def shard_range(size: int, rank: int, world: int) -> tuple[int, int]:
    """(start, length) of rank's equal share of ``size`` items; ``size`` must divide by ``world``."""
    if size % world:
        raise ValueError(f"{size} is not divisible by {world}")
    length = size // world
    return rank * length, length


def padded_vocab_size(vocab_size: int, world: int) -> int:
    """The vocabulary rounded up to a multiple of ``world`` so every rank holds the same rows."""
    return -(-vocab_size // world) * world


def vocab_range(vocab_size: int, rank: int, world: int) -> tuple[int, int]:
    """(start, length) of rank's rows of the padded vocabulary; rows >= vocab_size are padding."""
    return shard_range(padded_vocab_size(vocab_size, world), rank, world)


def kv_head_range(num_kv_heads: int, rank: int, world: int) -> tuple[int, int]:
    """(first KV head, count) held by ``rank``.

    When world <= num_kv_heads the KV heads are split evenly. When world is a multiple of
    num_kv_heads each rank holds one KV head, replicated over world // num_kv_heads ranks: the
    one its query heads (rank * heads/world ...) are grouped with.
    """
    if world <= num_kv_heads:
        return shard_range(num_kv_heads, rank, world)
    return rank // (world // num_kv_heads), 1


def tp_failure_reason(config, tp: int) -> str | None:  # noqa: ANN001
    """Why ``tp`` cannot shard ``config`` under its family's "auto" plan, naming the numbers; None when it can.

    A model the engine does not run (the planner's catalogue-only architectures) is held to the Megatron rule
    every family shares: attention heads, KV heads (or a multiple of them) and the FFN divisible by ``tp``.
    """
    if tp < 1:
        return f"tp={tp} must be at least 1"
    if _is_engine_config(config):
        from tpinfer.parallel.plan import strategies_for, tp_failure

        family = config.family
        modules = family.modules(config)
        return tp_failure(modules, strategies_for(config, family.auto_plan, modules), tp)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % tp:
        return f"{heads} attention heads are not divisible by tp={tp}"
    if kv_heads % tp and tp % kv_heads:
        return f"{kv_heads} KV heads are neither divisible by tp={tp} nor a divisor of it"
    if config.intermediate_size % tp:
        return f"intermediate_size {config.intermediate_size} is not divisible by tp={tp}"
    return None


def valid_tp_sizes(config) -> list[int]:  # noqa: ANN001
    if _is_engine_config(config):
        from tpinfer.parallel.plan import strategies_for, valid_sizes

        family = config.family
        modules = family.modules(config)
        return valid_sizes(modules, strategies_for(config, family.auto_plan, modules), config.num_attention_heads)
    return [tp for tp in range(1, config.num_attention_heads + 1) if tp_failure_reason(config, tp) is None]


def _is_engine_config(config) -> bool:  # noqa: ANN001
    from tpinfer.config import ModelConfig

    return isinstance(config, ModelConfig)


def parameter_shapes(config: ModelConfig, tp: int, rank: int, padded: bool = True,
                     strategies: dict[str, str] | None = None) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape held by ``rank`` at ``tp``, under ``strategies`` (default: the "auto" plan).

    Read from the family's declaration of its modules. With ``tp=1, padded=False`` these are the checkpoint's
    full shapes.
    """
    from tpinfer.parallel.plan import strategies_for
    from tpinfer.parallel.spec import parameters

    family = config.family
    modules = family.modules(config)
    if strategies is None:
        strategies = strategies_for(config, family.auto_plan, modules)
    shapes: dict[str, tuple[int, ...]] = {}
    for module in modules:
        for name, (shape, _) in parameters(module, strategies[module.name], rank, tp, padded).items():
            shapes[f"{module.name}.{name}"] = shape
    return shapes


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def parameter_bytes(config: ModelConfig, tp: int, rank: int, bytes_per_element: int,
                    schemes: dict | None = None, strategies: dict[str, str] | None = None) -> dict[str, int]:
    """Module name -> bytes of the parameters ``rank`` allocates for it at ``tp`` (vocabulary padding included):
    float parameters at ``bytes_per_element``, a quantized projection's or LM head's stored tensors (``schemes``:
    module name -> ``tpinfer.quant.formats.Scheme``) at theirs. ``strategies``: a resolved plan's (default: the
    "auto" plan; ``resolve_plan(..., moe_parallel="expert").strategies`` for whole experts per rank)."""
    from tpinfer.parallel.plan import strategies_for
    from tpinfer.parallel.spec import Head, Linear, parameters

    family = config.family
    modules = family.modules(config)
    if strategies is None:
        strategies = strategies_for(config, family.auto_plan, modules)
    out: dict[str, int] = {}
    for module in modules:
        params = parameters(module, strategies[module.name], rank, tp)
        scheme = (schemes or {}).get(module.name)
        total = 0
        for name, (shape, _) in params.items():
            if scheme is not None and isinstance(module, Linear | Head) and name == "weight":
                total += scheme.stored_bytes(*shape)
            else:
                total += numel(shape) * bytes_per_element
        out[module.name] = total
    return out


def rank_parameter_bytes(config: ModelConfig, tp: int, rank: int, bytes_per_element: int,
                         schemes: dict | None = None, strategies: dict[str, str] | None = None) -> int:
    """Bytes of parameters ``rank`` allocates at ``tp`` (vocabulary padding included)."""
    return sum(parameter_bytes(config, tp, rank, bytes_per_element, schemes, strategies).values())


def active_parameters(config: ModelConfig) -> int:
    """Parameters one token's forward pass uses: every declared parameter (embedding and LM head whole, as
    ``num_parameters`` counts them) except, in each mixture-of-experts layer, the experts its router leaves out. The
    router picks ``num_experts_per_tok`` of ``num_experts`` experts of one shape, so a token uses that share of
    the layer's expert parameters; a dense model's count is ``num_parameters``."""
    from tpinfer.parallel.spec import REPLICATE, Linear, parameters

    always = experts = 0
    for module in config.family.modules(config):
        n = sum(numel(shape) for shape, _ in parameters(module, REPLICATE, 0, 1, padded=False).values())
        if isinstance(module, Linear) and module.expert is not None:
            experts += n
        else:
            always += n
    return always + (experts * config.num_experts_per_tok // config.num_experts if experts else 0)


def kv_cache_bytes_per_token(config: ModelConfig, tp: int, rank: int, bytes_per_element: int) -> int:
    """KV-cache bytes one token costs on ``rank``: K and V for its local KV heads in every layer (sliding-window
    layers stop growing at their window: ``kv_cache_bytes`` counts them exactly)."""
    local_kv = kv_head_range(config.num_key_value_heads, rank, tp)[1]
    return 2 * config.num_hidden_layers * local_kv * config.head_dim * bytes_per_element


def kv_cache_lengths(config: ModelConfig, max_seq_len: int) -> list[int]:
    """Cache positions each layer keeps for a sequence of up to ``max_seq_len`` tokens: all of them, or for a
    sliding-window layer whose window is at most half of that, only the window (a ring: position p lives at p mod
    window). A window longer than that saves too little to pay for the ring; such a layer keeps every position and
    masks to its window instead."""
    lengths = []
    for layer in range(config.num_hidden_layers):
        window = config.window(layer)
        lengths.append(window if window is not None and 2 * window <= max_seq_len else max_seq_len)
    return lengths


def kv_cache_bytes(config: ModelConfig, tp: int, rank: int, max_seqs: int, max_seq_len: int,
                   bytes_per_element: int) -> int:
    """Bytes of the KV cache ``rank`` allocates for ``max_seqs`` sequences of ``max_seq_len`` tokens."""
    local_kv = kv_head_range(config.num_key_value_heads, rank, tp)[1]
    return 2 * max_seqs * sum(kv_cache_lengths(config, max_seq_len)) * local_kv * config.head_dim * bytes_per_element



def shape_notes(config: ModelConfig) -> dict[str, str]:
    """For fused checkpoint tensors, how their declared shape is made up ("rows: 64 (attention heads) + ...")."""
    from tpinfer.parallel.spec import Linear

    notes = {}
    for module in config.family.modules(config):
        if isinstance(module, Linear) and len(module.out_features.parts) > 1:
            notes[f"{module.name}.weight"] = f"rows: {module.out_features.describe()}"
    return notes
