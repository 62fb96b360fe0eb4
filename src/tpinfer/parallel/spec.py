"""What a model family declares about its modules, and the shard arithmetic that follows from it.

A family (``tpinfer.models.<family>``) lists its modules once: each linear with the features it maps from and to,
counted in the units that must stay whole on a rank (attention heads of ``head_dim`` features, KV heads, single FFN
features), plus its norms, embedding and head. Everything that needs a shape reads it from here: the parallel
layers build at their per-rank size, the loader reads the slices, plan validation checks divisibility, and
``tpinfer info`` and the planner count bytes. A fused checkpoint tensor (Phi-3's ``qkv_proj``) is several unit
groups one after another; each rank holds its share of every group ("packed" sharding).
"""

from __future__ import annotations

from dataclasses import dataclass

from tpinfer.parallel.shard import kv_head_range, shard_range, vocab_range

COLWISE, ROWWISE, REPLICATE, VOCAB = "colwise", "rowwise", "replicate", "vocab"
# A mixture-of-experts expert's projection under expert parallelism: whole, on the one rank that owns the expert
# (``Linear.expert``: rank r owns experts shard_range(experts, r, tp)), absent on the others.
EXPERT = "expert"


@dataclass(frozen=True)
class Units:
    """``count`` units of ``size`` features that shard whole: heads of head_dim features, or single FFN features.

    ``name`` appears in messages ("8 attention heads are not divisible by tp=3"; single features read
    "intermediate_size 96 is not divisible by tp=5"). ``replicable`` units (KV heads) also allow a TP size that is
    a multiple of their count: each rank then holds the one unit its query heads use.
    """

    count: int
    size: int = 1
    name: str = "features"
    replicable: bool = False

    @property
    def features(self) -> int:
        return self.count * self.size

    def failure(self, tp: int) -> str | None:
        if self.count % tp == 0 or (self.replicable and tp % self.count == 0):
            return None
        if self.replicable:
            return f"{self.count} {self.name} are neither divisible by tp={tp} nor a divisor of it"
        if self.size > 1:
            return f"{self.count} {self.name} are not divisible by tp={tp}"
        return f"{self.name} {self.count} is not divisible by tp={tp}"

    def local(self, rank: int, tp: int) -> tuple[int, int]:
        """(first feature, features) of this group held by ``rank``."""
        first, count = kv_head_range(self.count, rank, tp) if self.replicable else shard_range(self.count, rank, tp)
        return first * self.size, count * self.size


@dataclass(frozen=True)
class Features:
    """A projection's input or output features: one or more unit groups stored one after another."""

    parts: tuple[Units, ...]

    @property
    def total(self) -> int:
        return sum(p.features for p in self.parts)

    def failure(self, tp: int) -> str | None:
        return next((reason for p in self.parts if (reason := p.failure(tp))), None)

    def ranges(self, rank: int, tp: int) -> tuple[tuple[int, int], ...]:
        """(start, length) in the full tensor of each group's share held by ``rank``, in storage order."""
        out, offset = [], 0
        for part in self.parts:
            start, length = part.local(rank, tp)
            out.append((offset + start, length))
            offset += part.features
        return tuple(out)

    def describe(self) -> str:
        if len(self.parts) == 1:
            return str(self.total)
        return " + ".join(f"{p.features} ({p.name})" for p in self.parts)


def units(count: int, size: int = 1, name: str = "features", replicable: bool = False) -> Features:
    return Features((Units(count, size, name, replicable),))


@dataclass(frozen=True)
class DecoderFeatures:
    """The feature groups a decoder layer's projections map between (``decoder_features(config)``)."""

    hidden: Features  # never split: the residual stream every rank holds whole
    heads: Features  # query heads (and o_proj's input)
    kv_heads: Features  # key/value heads, replicated when TP exceeds them
    ffn: Features  # the MLP's intermediate features


def decoder_features(config) -> DecoderFeatures:  # noqa: ANN001  (a ModelConfig)
    return DecoderFeatures(
        hidden=units(config.hidden_size),
        heads=units(config.num_attention_heads, config.head_dim, "attention heads"),
        kv_heads=units(config.num_key_value_heads, config.head_dim, "KV heads", replicable=True),
        ffn=units(config.intermediate_size, name="intermediate_size"),
    )


def packed(*groups: Features) -> Features:
    """Groups stored as one tensor, one after another (q, k, v in a fused qkv_proj)."""
    return Features(tuple(part for group in groups for part in group.parts))


@dataclass(frozen=True)
class Linear:
    """Y = X W^T (+ b) with W of shape (out_features.total, in_features.total); ``name`` is the HF module name."""

    name: str
    in_features: Features
    out_features: Features
    bias: bool = False
    expert: tuple[int, int] | None = None  # (index, experts in the layer) for a mixture-of-experts expert's projection

    def owner(self, tp: int) -> int:
        """The rank that holds this expert whole under expert parallelism."""
        index, count = self.expert
        return next(r for r in range(tp) if shard_range(count, r, tp)[0] <= index < sum(shard_range(count, r, tp)))


@dataclass(frozen=True)
class Norm:
    name: str
    size: int
    bias: bool = False  # a LayerNorm's shift (BERT); RMSNorms have none


@dataclass(frozen=True)
class Embedding:
    name: str
    vocab_size: int
    hidden_size: int


@dataclass(frozen=True)
class Head:
    """The LM head; ``tied_to`` names the embedding whose weight it shares (then it has no parameter of its own)."""

    name: str
    vocab_size: int
    hidden_size: int
    tied_to: str | None = None


Module = Linear | Norm | Embedding | Head


@dataclass(frozen=True)
class Pair:
    """Projections that must be sharded together, relative to a decoder layer: column-parallel ``inputs`` feed a
    row-parallel ``output`` (the Megatron pair), or all of them are replicated."""

    inputs: tuple[str, ...]
    output: str


@dataclass(frozen=True)
class Slice:
    """Where a rank's parameter lives in the full checkpoint tensor: ``ranges`` (start, length) along ``dim``,
    concatenated in order. ``valid`` (<= the total length) is how many of those rows exist in the checkpoint; the
    rest is padding (only the last ranks of a padded vocabulary have any)."""

    dim: int
    ranges: tuple[tuple[int, int], ...]
    valid: int

    @property
    def length(self) -> int:
        return sum(length for _, length in self.ranges)


def vocab_slice(vocab_size: int, rank: int, tp: int) -> Slice:
    start, length = vocab_range(vocab_size, rank, tp)
    return Slice(0, ((start, length),), max(0, min(vocab_size - start, length)))


def parameters(module: Module, strategy: str, rank: int, tp: int,
               padded: bool = True) -> dict[str, tuple[tuple[int, ...], Slice | None]]:
    """Parameter name (``weight``, ``bias``) -> (shape on ``rank``, slice of the full tensor or None for all of it).

    With ``tp=1, padded=False`` the shapes are the checkpoint's."""
    if isinstance(module, Norm):
        norm = {"weight": ((module.size,), None)}
        if module.bias:
            norm["bias"] = ((module.size,), None)
        return norm
    if isinstance(module, Embedding | Head):
        if isinstance(module, Head) and module.tied_to is not None:
            return {}
        if strategy == VOCAB and tp > 1:
            piece = vocab_slice(module.vocab_size, rank, tp)
            rows = piece.length if padded else piece.valid
            return {"weight": ((rows, module.hidden_size), piece)}
        return {"weight": ((module.vocab_size, module.hidden_size), None)}
    full_in, full_out = module.in_features.total, module.out_features.total
    out: dict[str, tuple[tuple[int, ...], Slice | None]] = {}
    if strategy == EXPERT and tp > 1 and module.owner(tp) != rank:
        return out  # another rank's expert
    if strategy == COLWISE and tp > 1:
        ranges = module.out_features.ranges(rank, tp)
        piece = Slice(0, ranges, sum(length for _, length in ranges))
        out["weight"] = ((piece.length, full_in), piece)
        if module.bias:
            out["bias"] = ((piece.length,), piece)
    elif strategy == ROWWISE and tp > 1:
        ranges = module.in_features.ranges(rank, tp)
        piece = Slice(1, ranges, sum(length for _, length in ranges))
        out["weight"] = ((full_out, piece.length), piece)
        if module.bias:
            out["bias"] = ((full_out,), None)  # added once, after the all-reduce
    else:
        out["weight"] = ((full_out, full_in), None)
        if module.bias:
            out["bias"] = ((full_out,), None)
    return out


def size_failure(module: Module, strategy: str, tp: int) -> str | None:
    """Why ``module`` cannot be split ``strategy`` over ``tp`` ranks; None when it can (vocabularies are padded)."""
    if isinstance(module, Linear):
        if strategy == COLWISE:
            return module.out_features.failure(tp)
        if strategy == ROWWISE:
            return module.in_features.failure(tp)
        if strategy == EXPERT:
            count = module.expert[1]
            return None if count % tp == 0 else f"{count} experts are not divisible by tp={tp} (expert parallelism)"
    return None
