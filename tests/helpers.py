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
    "max_position_embeddings": 256,
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
                    "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 256})
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


def hf_model(path: Path, dtype: torch.dtype = torch.float32):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype)
    return model.eval()


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
