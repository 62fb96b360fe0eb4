"""Test helpers: tiny HF checkpoints with random weights from a fixed seed, written in HF format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TPINFER = [sys.executable, "-m", "tpinfer.cli.main"]

CORPUS = (
    "Return the number of items in a container. The function returns a new list. "
    "Tensor parallelism splits every weight matrix across ranks; each rank holds a slice. "
    "A column parallel layer shards the output, a row parallel layer shards the input and sums. "
    "The quick brown fox jumps over the lazy dog. Hello world, hello tensor parallel world. "
) * 4

BASE = {
    "vocab_size": 251,  # prime: not divisible by any TP size, so vocabulary padding is exercised
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.15,  # peaked distributions: greedy choices with clear margins
    "bos_token_id": 1,
    "eos_token_id": 2,
}

VARIANTS = {
    # llama: GQA (8 heads, 2 KV heads), llama3 rope scaling, tied embeddings, explicit head_dim != hidden/heads
    "llama": {
        "model_type": "llama",
        "head_dim": 16,
        "tie_word_embeddings": True,
        "rope_theta": 50000.0,
        "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    },
    # mistral: GQA, untied head, linear rope scaling
    "mistral": {
        "model_type": "mistral",
        "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        "sliding_window": None,
    },
    # qwen2: q/k/v biases, 4 KV heads, untied
    "qwen2": {"model_type": "qwen2", "num_key_value_heads": 4, "tie_word_embeddings": False, "rope_theta": 1e6},
    # qwen3: q/k norms per head, explicit head_dim, sliding window (8) from layer 1 on: a ring cache
    "qwen3": {
        "model_type": "qwen3", "head_dim": 16, "tie_word_embeddings": False, "rope_theta": 1e6,
        "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1,
    },
    # gemma2: a single KV head (replicated at TP > 1), query_pre_attn_scalar != head_dim, score and logit caps,
    # alternating sliding (window 8) and global layers
    "gemma2": {
        "model_type": "gemma2", "num_key_value_heads": 1, "head_dim": 16, "query_pre_attn_scalar": 24,
        "sliding_window": 8, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
    },
    # gemma3_text: q/k norms, a local rope (theta 1e4) and a global one with linear scaling, sliding window 8
    "gemma3_text": {
        "model_type": "gemma3_text", "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16,
        "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}},
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
    },
    # phi3: fused qkv_proj and gate_up_proj, partial rotary (0.75 of head_dim 16), longrope whose original length
    # (24) the generation crosses, so both factor sets are used
    "phi3": {
        "model_type": "phi3", "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False,
        "partial_rotary_factor": 0.75, "original_max_position_embeddings": 24,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                         "long_factor": [1.5, 2.0, 3.0, 4.5, 6.0, 9.0]},
        "pad_token_id": 0,
    },
    # llama variants for the other rope types and a mistral whose window (8) is shorter than the context: a ring
    "llama-yarn": {"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                           "original_max_position_embeddings": 64}},
    "llama-dynamic": {"model_type": "llama", "max_position_embeddings": 24,
                      "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    "mistral-window": {"model_type": "mistral", "sliding_window": 8, "tie_word_embeddings": False},
    # Mixture of experts: 8 experts, top-2 (Mixtral renormalises; Qwen3-MoE with norm_topk_prob; Qwen2-MoE without,
    # with a shared expert, and a dense first layer through mlp_only_layers).
    "mixtral": {"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2, "rope_theta": 1e6,
                "tie_word_embeddings": False},
    "qwen2_moe": {"model_type": "qwen2_moe", "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                  "shared_expert_intermediate_size": 96, "norm_topk_prob": False, "mlp_only_layers": [0],
                  "num_hidden_layers": 3, "tie_word_embeddings": False},
    "qwen3_moe": {"model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                  "norm_topk_prob": True, "head_dim": 16, "tie_word_embeddings": False},
    # a window (24) too long for a ring at max_model_len 40: a full cache masked to the window
    "mistral-long-window": {"model_type": "mistral", "sliding_window": 24, "tie_word_embeddings": False},
}


def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=240, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([CORPUS], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                    "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512})
    )


def make_checkpoint(path: Path, variant: str = "llama", seed: int = 0, shards: int = 2,
                    dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Write a random tiny HF checkpoint of ``variant`` (split over ``shards`` files with an index)."""
    import transformers

    raw = {**BASE, **VARIANTS[variant], **overrides}
    config_cls = transformers.AutoConfig.for_model(raw["model_type"]).__class__
    config = config_cls(**{k: v for k, v in raw.items() if k != "model_type"})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():  # norms start at exactly 1 (or 0 for (1 + w) norms): make them matter
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    model = model.to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    max_shard = f"{max(1, total // shards // 1000 + 1)}KB" if shards > 1 else "10GB"
    model.save_pretrained(path, safe_serialization=True, max_shard_size=max_shard)
    write_tokenizer(path)
    return path


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")


def hf_model(path: Path, dtype: torch.dtype = torch.float32):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval()


def hf_greedy(model, prompt: list[int], new: int) -> tuple[list[int], float]:
    """HF's own greedy continuation (never stopping early: no end-of-sequence id) and the first token's logprob."""
    import transformers

    config = transformers.GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=[], pad_token_id=0)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), generation_config=config)
        tokens = out[0, len(prompt):].tolist()
        first = model(torch.tensor([prompt])).logits[0, -1].float().log_softmax(-1)[tokens[0]].item()
    return tokens, first


def prompt_of(tokenizer, tokens: int) -> str:
    """Corpus text of about ``tokens`` tokens (at least that many) under ``tokenizer`` (HF's)."""
    words = (CORPUS * 4).split()
    for count in range(1, len(words) + 1):
        text = " ".join(words[:count])
        if len(tokenizer(text).input_ids) >= tokens:
            return text
    raise ValueError(f"the corpus has fewer than {tokens} tokens")


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["HF_HUB_OFFLINE"] = "1"
    out["PYTHONPATH"] = str(REPO / "src") + os.pathsep + out.get("PYTHONPATH", "")
    out.setdefault("OMP_NUM_THREADS", "1")
    return out


def run_cli(*args: str, timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*TPINFER, *args], capture_output=True, text=True, timeout=timeout, env=env())
    if check and proc.returncode != 0:
        raise AssertionError(f"tpinfer {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def fill_slices(model: torch.nn.Module, full) -> None:  # noqa: ANN001
    """Each parallel module's slice of whole weights, as the loader would read it: ``full(module_name, param_name)``
    is the whole tensor."""
    from tpinfer.parallel.layers import ParallelModule

    for name, module in model.named_modules():
        if not isinstance(module, ParallelModule):
            continue
        for param_name, piece in module.shards.items():
            param = getattr(module, param_name)
            if param is None:
                continue
            tensor = full(name, param_name)
            if piece is not None:
                rows = torch.cat([torch.arange(s, s + n) for s, n in piece.ranges])[: piece.valid]
                param.data.narrow(piece.dim, 0, piece.valid).copy_(tensor.index_select(piece.dim, rows))
            else:
                param.data.copy_(tensor)


def run_ranks(world: int, fn, *args, timeout: float = 120.0) -> list:
    """Run ``fn(ctx, *args)`` on ``world`` real processes joined by a gloo group; return each rank's result.

    ``fn`` must be a module-level function (spawned processes import it). Any rank's exception fails
    the call with that rank's traceback; nothing waits longer than ``timeout``.
    """
    import multiprocessing as mp
    import queue
    import time

    from tpinfer.engine.launcher import free_port

    context = mp.get_context("spawn")
    results = context.Queue()
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [context.Process(target=_rank_entry, args=(rank, world, init, fn, args, results), daemon=True)
             for rank in range(world)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world:
            try:
                rank, ok, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty as exc:
                raise TimeoutError(f"ranks {sorted(set(range(world)) - set(out))} did not finish in {timeout}s") from exc
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world)]


def _rank_entry(rank, world, init, fn, args, results) -> None:
    import traceback

    from tpinfer.parallel.context import ParallelContext

    try:
        ctx = ParallelContext.initialize(rank, world, rank, world, init, timeout_s=60.0)
        value = fn(ctx, *args)
        ctx.close()
        results.put((rank, True, value))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def write_gguf(checkpoint: Path, file: Path, quantize: tuple[str, ...] | dict[str, str] = ()) -> Path:
    """``checkpoint`` (a llama written by ``make_checkpoint``) as a GGUF file laid out as llama.cpp's converter lays
    it out: its tensor names, q/k rows permuted for its rope, the tokenizer in ``tokenizer.ggml.*``. ``quantize``
    maps parts of GGUF names to a block type the gguf package writes (Q8_0, Q4_0, Q4_1); a tuple means Q8_0."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    config = json.loads((checkpoint / "config.json").read_text())
    tok = json.loads((checkpoint / "tokenizer.json").read_text())
    writer = gguf.GGUFWriter(str(file), "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    ids = [*tok["model"]["vocab"].values(), *(a["id"] for a in tok["added_tokens"])]
    tokens = [""] * (max(ids) + 1)
    for text, i in tok["model"]["vocab"].items():
        tokens[i] = text
    for added in tok["added_tokens"]:
        tokens[added["id"]] = added["content"]
    special = {a["content"] for a in tok["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    writer.add_bos_token_id(1)
    writer.add_add_bos_token(True)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    layer = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
             "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
             "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight"}
    weights = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        weights.update(load_file(str(path)))
    for name, tensor in weights.items():
        if name in top:
            target = top[name]
        else:
            _, _, index, rest = name.split(".", 3)
            target = f"blk.{index}.{layer[rest]}"
        array = tensor.float().numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's order: rope pairs interleaved per head
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            array = array.reshape(heads, 2, array.shape[0] // heads // 2, *array.shape[1:]).swapaxes(1, 2)
            array = array.reshape(tensor.shape)
        array = np.ascontiguousarray(array)
        types = dict.fromkeys(quantize, "Q8_0") if isinstance(quantize, tuple) else quantize
        kind = next((getattr(gguf.GGMLQuantizationType, t) for part, t in types.items() if part in target), None)
        if kind is not None:
            writer.add_tensor(target, gguf.quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(target, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return file


PROJECTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_compressed(source: Path, out: Path, fmt: str, num_bits: int, strategy: str, group_size: int | None = None,
                     symmetric: bool = True, kind: str = "int") -> dict[str, torch.Tensor]:
    """``source`` as a compressed-tensors checkpoint quantized by the compressed-tensors library itself (its
    qparams, quantize and int32 packing): every decoder projection, the LM head ignored. Returns each projection's
    weight as the library dequantizes it (the reference)."""
    import shutil

    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import load_file, save_file

    args = QuantizationArgs(num_bits=num_bits, type=kind, strategy=strategy, group_size=group_size,
                            symmetric=symmetric)
    shutil.copytree(source, out)
    references = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors = load_file(str(file))
        for name in list(tensors):
            module = name.removesuffix(".weight")
            if not name.endswith(".weight") or module.rsplit(".", 1)[-1] not in PROJECTION_NAMES:
                continue
            w = tensors.pop(name).float()
            if strategy == "tensor":
                low, high = w.amin().reshape(1), w.amax().reshape(1)
            elif strategy == "channel":
                low, high = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
            else:
                grouped = w.reshape(w.shape[0], -1, group_size)
                low, high = grouped.amin(dim=2), grouped.amax(dim=2)
            scale, zero = calculate_qparams(low, high, args)
            scale = scale.to(torch.bfloat16).float()  # stored in bfloat16: the values every reader gets
            q = quantize(w, scale, zero, args)
            references[module] = dequantize(q, scale, zero, args, dtype=torch.float32)
            if kind == "float":
                tensors[name] = q.to(torch.float8_e4m3fn)
            elif fmt == "pack-quantized":
                tensors[f"{module}.weight_packed"] = pack_to_int32(q.to(torch.int8), num_bits)
                tensors[f"{module}.weight_shape"] = torch.tensor(list(w.shape))
                if not symmetric:
                    tensors[f"{module}.weight_zero_point"] = pack_to_int32(zero.to(torch.int8), num_bits, packed_dim=0)
            else:
                tensors[name] = q.to(torch.int8)
                if not symmetric:
                    tensors[f"{module}.weight_zero_point"] = zero.to(torch.int8)
            tensors[f"{module}.weight_scale"] = scale.to(torch.bfloat16)
        save_file(tensors, str(file), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    weights = {"num_bits": num_bits, "type": kind, "strategy": strategy, "group_size": group_size,
               "symmetric": symmetric}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}},
    }
    index = out / "model.safetensors.index.json"
    if index.is_file():  # the index names every stored tensor's file
        weight_map = {}
        for file in sorted(out.glob("*.safetensors")):
            weight_map.update(dict.fromkeys(load_file(str(file)), file.name))
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config))
    return references
