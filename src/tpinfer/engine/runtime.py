"""One rank's engine: the loaded model, its forward (the model's, or a family's fast decode adapter), its
generator (a causal LM) or encoder (an encoder model: embeddings), and the loop workers run.

Rank 0 owns I/O. It sends each operation to the other ranks as one message (``tpinfer.engine.messages``), then
every rank runs the same operation. Workers loop on messages until ``Stop``.
"""

from __future__ import annotations

import functools
import gc
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tpinfer.config import ConfigError, ModelConfig
from tpinfer.engine import messages
from tpinfer.engine.encoder import Encoder
from tpinfer.engine.generator import GenerationOutput, Generator
from tpinfer.engine.sampling import SamplingParams
from tpinfer.generation import GenerationDefaults
from tpinfer.loading.checkpoint import expected_tensors, load_weights, open_checkpoint, resolve_dtype
from tpinfer.models import build_model
from tpinfer.models.family import CAUSAL_LM, ENCODER, LM_HEAD
from tpinfer.parallel.context import ParallelContext
from tpinfer.parallel.mesh import Mesh, split_layers
from tpinfer.parallel.plan import ResolvedPlan, resolve_plan
from tpinfer.parallel.shard import parameter_shapes, shape_notes
from tpinfer.pooling import PoolingConfig

log = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 2048


@dataclass
class EngineSpec:
    """Everything a rank needs to build its share of the engine; JSON-able so it crosses processes."""

    model: str
    tensor_parallel_size: int = 1
    # Pipeline stages (each holds a contiguous run of layers: tpinfer.parallel.mesh.split_layers) and data-parallel
    # replicas; the job has tensor x pipeline x data ranks.
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    dtype: str = "auto"
    tp_plan: str | dict[str, str] = "auto"
    # Quantize a float checkpoint's projections while loading: "int8", "int4", "int4-g128", "fp8", ... (None: as stored)
    quantization: str | None = None
    # The LM head quantized too, not float: True in the projections' scheme (a GGUF file's own head blocks), or a
    # scheme of its own ("int8", ...)
    quantize_lm_head: bool | str = False
    # Mixture-of-experts models: "tensor" (every expert split over the TP group) or "expert" (whole experts per rank)
    moe_parallel: str = "tensor"
    max_model_len: int | None = None
    # Sequences per batch: the KV cache's slots (a causal LM), or the rows of one forward (an encoder)
    max_batch_size: int = 8
    all_reduce: str = "auto"
    timeout_s: float = 120.0
    # Threads per rank; None = this host's cores divided by the ranks on it.
    threads: int | None = None
    # Run the family's fast adapter where it applies, decode steps or an encoder's forward (False: the model's plain
    # torch forward for everything).
    native_decode: bool = True
    # Internal, for tests of failure handling: {"rank": r, "step": s} makes rank r raise at decode step s.
    fault: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def mesh(self) -> Mesh:
        return Mesh(self.tensor_parallel_size, self.pipeline_parallel_size, self.data_parallel_size)

    def schemes(self, checkpoint=None):  # noqa: ANN001, ANN201  (Scheme | dict[str, Scheme] | None)
        """The projections' formats: a GGUF file's own, or the quantization asked for on the command line."""
        from tpinfer.quant.formats import parse

        stored = checkpoint.schemes() if hasattr(checkpoint, "schemes") else None

        if stored:
            if self.quantization is not None:
                raise ConfigError(f"--quantization {self.quantization}: {self.model} is already quantized (GGUF "
                                  "blocks or compressed-tensors); drop the option")
            if self.quantize_lm_head is True and LM_HEAD not in stored:
                raise ConfigError(f"--quantize-lm-head: {self.model} stores {LM_HEAD}.weight unquantized (or ties it "
                                  "to the embedding); name a scheme to quantize it while loading "
                                  "(--quantize-lm-head int8)")
            if not self.quantize_lm_head:
                stored = {name: scheme for name, scheme in stored.items() if name != LM_HEAD}
            return stored
        return None if self.quantization is None else parse(self.quantization)

    def head_scheme(self):  # noqa: ANN201  (bool | Scheme)
        """``quantize_lm_head`` as the plan takes it: False, True (the projections' scheme) or a parsed Scheme."""
        from tpinfer.quant.formats import parse

        return parse(self.quantize_lm_head) if isinstance(self.quantize_lm_head, str) else self.quantize_lm_head

    def check(self) -> tuple[ModelConfig, ResolvedPlan]:
        """Validate config, plan and TP size without touching weights (fast, before any process starts)."""
        config = ModelConfig.from_pretrained(self.model)
        mesh = self.mesh
        check_layout(config, mesh.pp, mesh.dp)
        split_layers(config.num_hidden_layers, mesh.pp)
        checkpoint = open_checkpoint(self.model, config)
        plan = resolve_plan(config, mesh.tp, self.tp_plan, float_experts(config, self.schemes(checkpoint)),
                            self.head_scheme(), self.moe_parallel)
        resolve_dtype(self.dtype, config.torch_dtype)
        if config.family.kind == ENCODER:
            encoder_max_len(config, PoolingConfig.from_pretrained(self.model), self.max_model_len)
        else:
            max_model_len(config, self.max_model_len)
        return config, plan


def freeze_startup_heap() -> None:
    """Move every object this process holds now (modules, the model and its plans: what lives as long as the
    process) out of the garbage collector's reach, so that a full collection scans only what requests allocate. For
    the processes tpinfer owns (workers, the server), once loaded: a worker's full collection of its startup heap
    stalled it, and every rank with it, 70 ms every few seconds (all-MiniLM-L6-v2 at TP=2, a 230 ms batch)."""
    gc.collect()
    gc.freeze()


@dataclass
class RankEngine:
    spec: EngineSpec
    ctx: ParallelContext
    config: ModelConfig
    model: torch.nn.Module
    # model(batch, cache), or the family's fast decode adapter around it (same contract, see kernels.decode_adapter)
    forward: Callable[..., torch.Tensor]
    generator: Generator | None  # a causal LM's; None for an encoder
    load_s: float
    load_stats: dict[str, int] = field(default_factory=dict)
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    encoder: Encoder | None = None  # an encoder model's; None for a causal LM

    @property
    def kind(self) -> str:
        """The model's kind (``tpinfer.models.family``): CAUSAL_LM or ENCODER."""
        return self.config.family.kind

    def require(self, kind: str, what: str) -> None:
        """Refuse ``what`` (an operation) on a model of another kind, naming both."""
        if self.kind == kind:
            return
        name = f"{Path(self.spec.model).name} ({self.config.model_type})"
        if kind == ENCODER:
            raise ValueError(f"{what} needs an encoder model (bert); {name} is a causal LM: generate with it instead")
        raise ValueError(f"{what} needs a causal LM; {name} is an encoder, which has no LM head: embed with it "
                         "(tpinfer embed, LLM.embed)")

    @functools.cached_property
    def fold_rows(self) -> int:
        """The most rows (decodes and prompt tokens) a step may have for its prompt tokens to ride in the decode
        forward (``tpinfer.engine.scheduler.fold_prefill``); 0 where they never do (no native decode kernels,
        pipeline stages, length-dependent rope tables, a sliding-window ring). Fixed once the model is loaded."""
        max_rows = getattr(self.forward, "max_rows", None)
        if max_rows is None or self.ctx.pp_size > 1 or not self.model.packable:
            return 0
        if any(ring is not None for ring in self.generator.cache.ring):
            return 0
        return max_rows()

    @property
    def native_decode(self) -> bool:
        """Whether decode steps (or an encoder's forwards) run a fast adapter rather than the model's plain forward."""
        return self.forward is not self.model

    @property
    def param_bytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        return total

    @property
    def param_count(self) -> int:
        """Parameters this rank holds, a quantized projection counted as the weights it stands for."""
        from tpinfer.quant.layers import QuantLinear

        seen: dict[int, int] = {}
        for module in self.model.modules():
            if isinstance(module, QuantLinear):
                seen[id(module)] = module.out_features * module.in_features + (
                    module.bias.numel() if module.bias is not None else 0)
                continue
            for p in module.parameters(recurse=False):
                seen.setdefault(id(p), p.numel())
        return sum(seen.values())

    def to_first(self, logits: torch.Tensor | None, rows: int, positions: int | None = None) -> torch.Tensor | None:
        """Full logits from the pipeline's last stage to rank 0 (the scheduler); as they are without stages."""
        pipe = self.ctx.pipe
        if pipe is None:
            return logits
        shape = (rows, self.config.vocab_size) if positions is None else (rows, positions, self.config.vocab_size)
        return pipe.to_first(logits, shape)

    def check_prompts(self, prompts: list[list[int]], params: SamplingParams) -> None:
        """Rank 0, before anything crosses ranks: every prompt has tokens of this vocabulary and fits the context."""
        limit, vocab = self.model.max_seq_len, self.config.vocab_size
        if not prompts:
            raise ValueError("no prompts")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty")
            if min(prompt) < 0 or max(prompt) >= vocab:
                raise ValueError(f"prompt {i}: token ids must be in [0, {vocab})")
            if len(prompt) + params.max_new_tokens > limit:
                raise ValueError(f"prompt {i} has {len(prompt)} tokens; with max_new_tokens {params.max_new_tokens} "
                                 f"that is {len(prompt) + params.max_new_tokens}, beyond the maximum sequence length "
                                 f"{limit} (--max-model-len)")

    def run(self, prompts: list[list[int]], params: SamplingParams) -> list[GenerationOutput]:
        """Rank 0: send the request to every rank, then generate alongside them."""
        self.require(CAUSAL_LM, "generation")
        self.check_prompts(prompts, params)
        messages.send(self.ctx, messages.Generate(prompts, params))
        return self.generator.generate(prompts, params)

    def score(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Rank 0: teacher-forced full logits (len, vocab) float32 of each sequence, computed by every rank."""
        from tpinfer.engine.scoring import run_score

        self.require(CAUSAL_LM, "scoring")
        return run_score(self, messages.send(self.ctx, messages.Score(sequences)))

    def check_sequences(self, sequences: list[list[int]]) -> None:
        """Rank 0, before anything crosses ranks: an encoder's inputs are non-empty, of this vocabulary, and fit."""
        limit, vocab = self.model.max_seq_len, self.config.vocab_size
        if not sequences:
            raise ValueError("no inputs to embed")
        for i, sequence in enumerate(sequences):
            if not sequence:
                raise ValueError(f"input {i} is empty")
            if min(sequence) < 0 or max(sequence) >= vocab:
                raise ValueError(f"input {i}: token ids must be in [0, {vocab}), got "
                                 f"{min(sequence)}..{max(sequence)}")
            if len(sequence) > limit:
                raise ValueError(f"input {i} has {len(sequence)} tokens, more than the limit of {limit} "
                                 "(sentence_bert_config.json's max_seq_length, or --max-model-len); ask for "
                                 "truncation (--truncate, truncate=True) to cut it")

    def embed(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Rank 0: pooled float32 embeddings of token sequences, the encoder run by every rank."""
        self.require(ENCODER, "embedding")
        self.check_sequences(sequences)
        message = messages.send(self.ctx, messages.Embed.of(sequences))
        return self.encoder.embed(message.ids, message.lengths)

    def stop_workers(self) -> None:
        for replica in range(self.ctx.dp_size):
            messages.send(self.ctx, messages.Stop(), replica)

    def serve_forever(self) -> None:
        """Workers: run what rank 0 sends until it says stop."""
        freeze_startup_heap()
        while True:
            message = messages.receive(self.ctx)
            if isinstance(message, messages.Stop):
                return
            if isinstance(message, messages.Generate):
                self.generator.generate(message.prompts, message.params)
            elif isinstance(message, messages.Bench):  # measurements for tpinfer bench (tpinfer.engine.bench)
                from tpinfer.engine.bench import run_op

                run_op(self, message)
            elif isinstance(message, messages.Step):  # the server's continuous batching (tpinfer.engine.scheduler)
                from tpinfer.engine.scheduler import run_step

                run_step(self, message)
            elif isinstance(message, messages.Score):  # tpinfer verify (tpinfer.engine.scoring)
                from tpinfer.engine.scoring import run_score

                run_score(self, message)
            elif isinstance(message, messages.Embed):  # an encoder's embeddings (tpinfer.engine.encoder)
                self.encoder.embed(message.ids, message.lengths)


def max_model_len(config: ModelConfig, requested: int | None) -> int:
    """The longest prompt + generation a sequence may have: ``requested``, or min(2048, the model's context).

    Past ``max_position_embeddings`` only a dynamic (NTK) rope is meant to run; anything else is refused."""
    context = config.max_position_embeddings
    if requested is None:
        return min(DEFAULT_MAX_MODEL_LEN, context)
    if requested < 1:
        raise ConfigError(f"max_model_len must be at least 1, got {requested}")
    dynamic = any(p["rope_type"] == "dynamic" for p in config.rope_parameters.values())
    if requested > context and not dynamic:
        raise ConfigError(f"max_model_len {requested} exceeds the model's context of {context} tokens "
                          "(max_position_embeddings in config.json)")
    return requested


def encoder_max_len(config: ModelConfig, pooling: PoolingConfig, requested: int | None) -> int:
    """The longest input an encoder takes: ``requested`` (--max-model-len), else sentence_bert_config.json's
    max_seq_length, else all its positions; never more than its position embeddings hold (RoBERTa's start at
    ``position_offset``)."""
    positions = config.max_position_embeddings - config.position_offset
    limit = requested or pooling.max_seq_length or positions
    if limit < 1 or limit > positions:
        raise ConfigError(f"max_model_len {limit} must be 1 to {positions}: the model's max_position_embeddings "
                          f"{config.max_position_embeddings}, from position {config.position_offset}")
    return limit


def check_layout(config: ModelConfig, pp: int, dp: int) -> None:
    """An encoder runs on one TP group: no pipeline stages, no replicas (yet)."""
    if config.family.kind == ENCODER and (pp > 1 or dp > 1):
        raise ConfigError(f"{config.model_type} is an encoder: it runs tensor parallelism only, without pipeline "
                          f"stages or data-parallel replicas (got pp={pp}, dp={dp})")


def float_experts(config: ModelConfig, schemes):  # noqa: ANN001, ANN201
    """``schemes``, refused for a mixture-of-experts model (the planner counts quantized MoE; the engine does not
    run it yet)."""
    if schemes and config.family.expert_plan is not None:
        raise ConfigError(f"quantized weights for mixture-of-experts models ({config.model_type}) are not supported "
                          "yet; load the float checkpoint without --quantization")
    return schemes


def layout_label(ctx: ParallelContext) -> str:
    """"tp=2", or "tp=2 x pp=2 x dp=1" for a mesh."""
    if ctx.pp_size == 1 and ctx.dp_size == 1:
        return f"tp={ctx.tp_size}"
    return f"tp={ctx.tp_size} x pp={ctx.pp_size} x dp={ctx.dp_size}"


def load_engine(spec: EngineSpec, ctx: ParallelContext, progress: bool = False) -> RankEngine:
    """Build this rank's model at its per-rank sizes and read its slices of the checkpoint."""
    start = time.perf_counter()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    config = ModelConfig.from_pretrained(spec.model)
    family = config.family
    check_layout(config, ctx.pp_size, ctx.dp_size)
    checkpoint = open_checkpoint(spec.model, config)
    plan = resolve_plan(config, ctx.tp_size, spec.tp_plan, float_experts(config, spec.schemes(checkpoint)),
                        spec.head_scheme(), spec.moe_parallel)
    dtype = resolve_dtype(spec.dtype, config.torch_dtype)
    if family.kind == ENCODER:  # sentence-transformers' pooling, whose max_seq_length bounds the input
        pooling = PoolingConfig.from_pretrained(spec.model)
        max_len = encoder_max_len(config, pooling, spec.max_model_len)
    else:
        pooling, max_len = None, max_model_len(config, spec.max_model_len)
    model = build_model(config, ctx, plan, dtype, max_len)
    full_shapes = parameter_shapes(config, 1, 0, padded=False)
    ignore = ("lm_head.weight",) if config.tie_word_embeddings else ()
    # Tensors the family declares that this rank does not hold: other pipeline stages' layers, other ranks' experts.
    held = expected_tensors(model)
    ignore += tuple(name for name in full_shapes if name not in held)
    # Tensors the checkpoint carries that the family never loads (an encoder's pooler, position-id buffers).
    if family.unused_tensors:
        ignore += tuple(name for name in checkpoint.files if name.startswith(family.unused_tensors))
    stats = load_weights(model, checkpoint, full_shapes, progress and ctx.is_first, ignore, shape_notes(config))
    model.eval()
    if pooling is not None:
        load_s = time.perf_counter() - start
        _log_loaded(spec, ctx, dtype, stats, load_s, progress)
        adapter = family.encode_adapter
        forward = (adapter(model) if adapter is not None and spec.native_decode else None) or model
        return RankEngine(spec, ctx, config, model, forward, None, load_s, stats,
                          encoder=Encoder(model, pooling, spec.max_batch_size, forward))
    adapter = config.family.decode_adapter
    forward = (adapter(model) if adapter is not None and spec.native_decode else None) or model
    defaults = GenerationDefaults.from_pretrained(spec.model, config.eos_token_id)
    generator = Generator(model, defaults.eos_token_ids, spec.max_batch_size, forward)
    if spec.fault and spec.fault.get("rank") == ctx.rank:
        generator.fault_step = int(spec.fault.get("step", 0))
    load_s = time.perf_counter() - start
    _log_loaded(spec, ctx, dtype, stats, load_s, progress)
    return RankEngine(spec, ctx, config, model, forward, generator, load_s, stats, defaults)


def _log_loaded(spec: EngineSpec, ctx: ParallelContext, dtype: torch.dtype, stats: dict[str, int], load_s: float,
                progress: bool) -> None:
    if ctx.is_first and progress:
        print(f"tpinfer: loaded {Path(spec.model).name} at {layout_label(ctx)} ({str(dtype).removeprefix('torch.')}, "
              f"{stats['bytes'] / 2**20:.1f} MiB read by rank 0) in {load_s:.2f}s", file=sys.stderr, flush=True)
