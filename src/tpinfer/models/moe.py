"""Mixture-of-experts decoders: mixtral, qwen2_moe, qwen3_moe.

Attention is the dense sibling's (Mixtral: Mistral's; Qwen2-MoE: Qwen2's, q/k/v biases; Qwen3-MoE: Qwen3's, q/k
norms). The MLP of a MoE layer is a router and ``num_experts`` SwiGLU experts, routed as HF does: softmax of the
router logits in float32, the top ``num_experts_per_tok``, renormalised to sum to 1 when ``norm_topk_prob`` (always
for Mixtral); Qwen2-MoE adds a shared expert scaled by sigmoid(shared_expert_gate(x)). Qwen's ``mlp_only_layers``
and ``decoder_sparse_step`` leave some layers dense.

Two expert layouts (``--moe-parallel``):

* ``tensor``: every expert's gate/up are column-parallel and its down row-parallel over the TP group, like a dense
  MLP; the router is replicated;
* ``expert``: rank r holds experts shard_range(E, r, tp) whole (strategy ``expert``) and loads only their tensors.

Every rank holds every token (the TP group's replicated hidden states), so neither layout needs to dispatch tokens:
each rank runs only the experts its tokens picked (only their weights are read), weights each expert's output by
its routing weight, and one all-reduce per MoE layer sums what the ranks computed (partial products of every expert
under ``tensor``; the outputs of its own experts under ``expert``), the shared expert's partial sum included.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tpinfer import kernels
from tpinfer.config import ConfigError, decoder_fields, read_rope
from tpinfer.models.decoder import CausalLM, DecoderModel, build_linear
from tpinfer.models.family import VOCAB_PLAN, Family, decoder_layer_name
from tpinfer.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP, _native_decode, qwen_sliding_layers
from tpinfer.models.llama import layer_modules as llama_layer_modules
from tpinfer.models.qwen3 import Qwen3Attention
from tpinfer.parallel.layers import NATIVE_MAX_ROWS, RMSNorm, linear
from tpinfer.parallel.spec import COLWISE, EXPERT, ROWWISE, Linear, Module, Norm, Pair, decoder_features, units
from tpinfer.quant.layers import QuantLinear

# Per model type: the MoE block's module name and its experts' gate, up and down projections (HF checkpoint names).
NAMES = {
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
    "qwen2_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
}


def read_config(raw: dict[str, Any]) -> dict[str, Any]:
    kind = raw["model_type"]
    fields = decoder_fields(raw)
    layers = fields["num_hidden_layers"]
    if kind == "mixtral":
        experts, window = int(raw.get("num_local_experts") or 0), raw.get("sliding_window")
        layer_types = ("sliding_attention",) * layers if window else ()
        moe_ffn, shared, norm = fields["intermediate_size"], 0, True
        moe_layers = tuple(range(layers))
    else:
        experts = int(raw.get("num_experts") or raw.get("num_local_experts") or 0)  # HF spells it both ways
        window, layer_types = qwen_sliding_layers(raw, layers)
        moe_ffn = int(raw.get("moe_intermediate_size") or 0)
        shared = int(raw.get("shared_expert_intermediate_size") or 0) if kind == "qwen2_moe" else 0
        norm = bool(raw.get("norm_topk_prob", False))
        step, dense = int(raw.get("decoder_sparse_step") or 1), set(raw.get("mlp_only_layers") or ())
        moe_layers = tuple(i for i in range(layers) if i not in dense and experts > 0 and (i + 1) % step == 0)
        if kind == "qwen2_moe":
            fields["attention_bias"] = True  # qwen2's q/k/v biases, none on o_proj
    top_k = int(raw.get("num_experts_per_tok") or 0)
    if experts < 1 or not 1 <= top_k <= experts:
        raise ConfigError(f"{kind}: num_experts_per_tok={top_k} must be between 1 and the {experts} experts")
    if moe_ffn < 1:
        raise ConfigError(f"{kind}: the experts' intermediate size must be positive, got {moe_ffn}")
    return {**fields, "layer_types": layer_types, "sliding_window": int(window) if window else None,
            "rope_parameters": read_rope(raw, layer_types, default_theta=1e6 if kind == "mixtral" else 10000.0),
            "num_experts": experts, "num_experts_per_tok": top_k, "moe_intermediate_size": moe_ffn,
            "shared_expert_intermediate_size": shared, "norm_topk_prob": norm, "moe_layers": moe_layers}


def moe_modules(config, layer: int) -> dict[str, Module]:  # noqa: ANN001
    """A MoE layer's router, experts and (Qwen2-MoE) shared expert, by short name."""
    block, gate, up, down = NAMES[config.model_type]
    name = lambda short: decoder_layer_name(layer, short)  # noqa: E731
    hidden = decoder_features(config).hidden
    ffn = units(config.moe_intermediate_size, name="moe_intermediate_size")
    out: dict[str, Module] = {f"{block}.gate": Linear(name(f"{block}.gate"), hidden,
                                                      units(config.num_experts, name="experts"))}
    for j in range(config.num_experts):
        which = (j, config.num_experts)
        for short, (inp, outp) in ((gate, (hidden, ffn)), (up, (hidden, ffn)), (down, (ffn, hidden))):
            key = f"{block}.experts.{j}.{short}"
            out[key] = Linear(name(key), inp, outp, expert=which)
    if config.shared_expert_intermediate_size:
        shared = units(config.shared_expert_intermediate_size, name="shared_expert_intermediate_size")
        for short, (inp, outp) in (("gate_proj", (hidden, shared)), ("up_proj", (hidden, shared)),
                                   ("down_proj", (shared, hidden))):
            key = f"mlp.shared_expert.{short}"
            out[key] = Linear(name(key), inp, outp)
        out["mlp.shared_expert_gate"] = Linear(name("mlp.shared_expert_gate"), hidden, units(1))
    return out


def layer_modules(config, layer: int) -> dict[str, Module]:  # noqa: ANN001
    """Attention and norms as the dense sibling; the MLP a MoE block in ``moe_layers``, else Llama's."""
    dense = llama_layer_modules(config, layer)
    if config.model_type == "qwen3_moe":
        dense["self_attn.q_norm"] = Norm(decoder_layer_name(layer, "self_attn.q_norm"), config.head_dim)
        dense["self_attn.k_norm"] = Norm(decoder_layer_name(layer, "self_attn.k_norm"), config.head_dim)
    if layer not in config.moe_layers:
        return dense
    return {k: v for k, v in dense.items() if not k.startswith("mlp.")} | moe_modules(config, layer)


def layer_pairs(config, layer: int) -> tuple[Pair, ...]:  # noqa: ANN001
    pairs = [Pair(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj")]
    if layer not in config.moe_layers:
        return (*pairs, Pair(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"))
    block, gate, up, down = NAMES[config.model_type]
    pairs += [Pair((f"{block}.experts.{j}.{gate}", f"{block}.experts.{j}.{up}"), f"{block}.experts.{j}.{down}")
              for j in range(config.num_experts)]
    if config.shared_expert_intermediate_size:
        pairs.append(Pair(("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"), "mlp.shared_expert.down_proj"))
    return tuple(pairs)


def _plans(block: str, gate: str, up: str, down: str) -> tuple[dict[str, str], dict[str, str]]:
    experts = f"model.layers.*.{block}.experts.*."
    tensor = {
        **VOCAB_PLAN,
        "model.layers.*.self_attn.q_proj": COLWISE,
        "model.layers.*.self_attn.k_proj": COLWISE,
        "model.layers.*.self_attn.v_proj": COLWISE,
        "model.layers.*.self_attn.o_proj": ROWWISE,
        experts + gate: COLWISE,
        experts + up: COLWISE,
        experts + down: ROWWISE,
    }
    return tensor, {experts + gate: EXPERT, experts + up: EXPERT, experts + down: EXPERT}


def _auto_plans(kind: str) -> tuple[dict[str, str], dict[str, str]]:
    tensor, expert = _plans(*NAMES[kind])
    if kind != "mixtral":  # Qwen's dense layers, and Qwen2-MoE's shared expert, split as a dense MLP
        tensor |= {"model.layers.*.mlp.gate_proj": COLWISE, "model.layers.*.mlp.up_proj": COLWISE,
                   "model.layers.*.mlp.down_proj": ROWWISE}
    if kind == "qwen2_moe":
        tensor |= {"model.layers.*.mlp.shared_expert.gate_proj": COLWISE,
                   "model.layers.*.mlp.shared_expert.up_proj": COLWISE,
                   "model.layers.*.mlp.shared_expert.down_proj": ROWWISE}
    return tensor, expert


def partial(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x W^T of this rank's slice of ``layer``, before any all-reduce (and without a bias: experts have none); the
    native GEMV for a few rows, as every linear layer."""
    if isinstance(layer, QuantLinear):
        return layer.matmul(x)
    return linear(x, layer.weight)


def expert_output(expert: nn.ModuleDict, names: tuple[str, str, str], h: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(h)) * up(h)) of this rank's slice of one expert, before the all-reduce; gate and up in one
    native call when the kernels take them (a few rows, float weights)."""
    gate, up, down = (expert[n] for n in names)
    rows = h.numel() // h.shape[-1]
    if (not isinstance(gate, QuantLinear) and kernels.usable(h, gate.weight)
            and 0 < rows <= NATIVE_MAX_ROWS.get(h.dtype, 0) and gate.bias is None and up.bias is None):
        return partial(down, kernels.gated_linear(h, gate.weight, up.weight))
    return partial(down, F.silu(gate(h)) * up(h))


class MoEBlock(nn.Module):
    """Router + experts (+ shared expert): sum_e w_e(x) * down_e(silu(gate_e(x)) * up_e(x)), one all-reduce."""

    def __init__(self, config, modules: dict[str, Module], ctx, plan, dtype):  # noqa: ANN001
        super().__init__()
        block, gate, up, down = NAMES[config.model_type]
        self.top_k, self.num_experts, self.norm_topk_prob = (config.num_experts_per_tok, config.num_experts,
                                                             config.norm_topk_prob)
        self.router_dtype_weights = config.model_type != "mixtral"  # Qwen casts the weights to the model dtype
        self.comm = ctx.comm
        self.gate = build_linear(modules[f"{block}.gate"], plan, ctx, dtype)
        self.experts = nn.ModuleDict()
        for j in range(config.num_experts):
            names = [f"{block}.experts.{j}.{short}" for short in (gate, up, down)]
            specs = [modules[n] for n in names]
            if plan.strategy(specs[0].name) == EXPERT and ctx.tp_size > 1 and specs[0].owner(ctx.tp_size) != ctx.tp_rank:
                continue  # another rank's expert
            self.experts[str(j)] = nn.ModuleDict({short: build_linear(spec, plan, ctx, dtype)
                                                  for short, spec in zip((gate, up, down), specs, strict=True)})
        self.names = (gate, up, down)
        self.shared_expert = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = nn.ModuleDict({short: build_linear(modules[f"mlp.shared_expert.{short}"], plan, ctx,
                                                                    dtype)
                                                for short in ("gate_proj", "up_proj", "down_proj")})
            self.shared_expert_gate = build_linear(modules["mlp.shared_expert_gate"], plan, ctx, dtype)
        self.tokens_per_expert = torch.zeros(config.num_experts, dtype=torch.long)  # load balance, this rank's view

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, experts) of every token's top-k, as HF computes them."""
        probs = F.softmax(self.gate(x).float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.router_dtype_weights:
            weights = weights.to(x.dtype)
        return weights, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.comm.gather_sequence(x)  # under sequence parallelism, the whole sequence (the router needs it)
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen = self.route(x)
        self.tokens_per_expert += torch.bincount(chosen.flatten().cpu(), minlength=self.num_experts)
        out = torch.zeros_like(x)
        if x.shape[0] == 1:  # one token (batch-1 decode): its k experts in ascending order, no gathering of rows
            for j, slot in sorted((j, slot) for slot, j in enumerate(chosen[0].tolist())):
                expert = self.experts[str(j)] if str(j) in self.experts else None
                if expert is not None:
                    y = expert_output(expert, self.names, x)
                    out += (y * weights[:, slot, None]).to(out.dtype)
        for j in torch.unique(chosen).tolist() if x.shape[0] > 1 else ():  # only the experts some token picked
            expert = self.experts[str(j)] if str(j) in self.experts else None
            if expert is None:
                continue  # another rank's expert (expert parallelism): its owner adds it in the all-reduce
            tokens, slot = torch.where(chosen == j)
            y = expert_output(expert, self.names, x[tokens])
            out.index_add_(0, tokens, (y * weights[tokens, slot, None]).to(out.dtype))
        if self.shared_expert is not None:
            s = self.shared_expert
            shared = partial(s["down_proj"], F.silu(s["gate_proj"](x)) * s["up_proj"](x))
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * shared  # a scale per token: sums commute
        return self.comm.sum_partials(out.view(shape))


def _attention(config) -> type:  # noqa: ANN001
    return Qwen3Attention if config.model_type == "qwen3_moe" else LlamaAttention


class MoEDecoderLayer(nn.Module):
    """The pre-norm layer of the dense sibling with a MoE block under its HF name (Mixtral: ``block_sparse_moe``)."""

    def __init__(self, config, layer: int, ctx, plan, dtype):  # noqa: ANN001
        super().__init__()
        modules = layer_modules(config, layer)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, ctx.device)
        self.self_attn = _attention(config)(config, modules, layer, ctx, plan, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, ctx.device)
        self.block = NAMES[config.model_type][0]
        self.add_module(self.block, MoEBlock(config, modules, ctx, plan, dtype))

    @property
    def moe(self) -> MoEBlock:
        return getattr(self, self.block)

    def forward(self, x: torch.Tensor, rope, batch, cache) -> torch.Tensor:  # noqa: ANN001
        h = x + self.self_attn(self.input_layernorm(x), rope, batch, cache)
        return h + self.moe(self.post_attention_layernorm(h))


class MoEForCausalLM(CausalLM):
    def __init__(self, config, ctx, plan, dtype: torch.dtype, max_seq_len: int):  # noqa: ANN001
        def make_layer(i: int) -> nn.Module:
            if i in config.moe_layers:
                return MoEDecoderLayer(config, i, ctx, plan, dtype)
            return LlamaDecoderLayer(config, i, ctx, plan, dtype, attention=_attention(config), mlp=LlamaMLP,
                                     modules=layer_modules(config, i))

        model = DecoderModel(config, ctx, plan, dtype, max_seq_len, make_layer,
                             lambda size: RMSNorm(size, config.rms_norm_eps, dtype, ctx.device))
        super().__init__(config, ctx, plan, dtype, max_seq_len, model)

    def reset_expert_load(self) -> None:
        for layer in self.model.layers:
            if isinstance(layer, MoEDecoderLayer):
                layer.moe.tokens_per_expert.zero_()

    def expert_load(self) -> dict[int, list[int]]:
        """Tokens routed to each expert so far, per MoE layer (every rank of a TP group sees the same routing)."""
        return {layer.self_attn.layer: layer.moe.tokens_per_expert.tolist() for layer in self.model.layers
                if isinstance(layer, MoEDecoderLayer)}


def _family(kind: str) -> Family:
    tensor, expert = _auto_plans(kind)
    return Family(name=kind, model_types=(kind,), read_config=read_config, layer=layer_modules, auto_plan=tensor,
                  pairs=layer_pairs, model=MoEForCausalLM, decode_adapter=_native_decode, expert_plan=expert)


MIXTRAL, QWEN2_MOE, QWEN3_MOE = _family("mixtral"), _family("qwen2_moe"), _family("qwen3_moe")
FAMILIES = {f.name: f for f in (MIXTRAL, QWEN2_MOE, QWEN3_MOE)}
