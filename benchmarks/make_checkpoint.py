"""Write a random-weight Llama checkpoint in HF format (config.json + sharded safetensors), for benchmarks.

    python benchmarks/make_checkpoint.py --preset llama-250m --dtype float32 --out /tmp/llama-250m
    python benchmarks/make_checkpoint.py --preset llama-1b --dtype bfloat16 --out /tmp/llama-1b
    python benchmarks/make_checkpoint.py --preset mixtral-500m --out /tmp/mixtral-500m

Weights are N(0, 0.02) from a fixed seed, written one tensor at a time so memory stays small.
The shapes come from tpinfer's own shard arithmetic at tp=1 (the checkpoint's full shapes).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from tpinfer.assets import DEMO_MODEL
from tpinfer.config import ModelConfig
from tpinfer.parallel.shard import numel, parameter_shapes

PRESETS = {
    # The issue-4 benchmark model: hidden 1024, 16 layers, 16 heads, 8 KV heads, FFN 2816, vocab 32000.
    "llama-250m": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 32000},
    # ~1.1B parameters (TinyLlama-like shapes) for the loading-memory measurement.
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                 "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000},
    # A ~540M-parameter Mixtral (8 experts of FFN 1792, top 2: ~170M active per token) and a dense Llama with the
    # same total (FFN 8 x 1792), for the mixture-of-experts decode benchmark.
    "mixtral-500m": {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 1024,
                     "intermediate_size": 1792, "num_hidden_layers": 10, "num_attention_heads": 16,
                     "num_key_value_heads": 8, "vocab_size": 32000, "num_local_experts": 8, "num_experts_per_tok": 2},
    "llama-500m-dense": {"hidden_size": 1024, "intermediate_size": 14336, "num_hidden_layers": 10,
                         "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 32000},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_checkpoint(out: Path, preset: str, dtype: str, shard_bytes: int = 512 << 20, seed: int = 0) -> Path:
    raw = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
           "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": dtype, **PRESETS[preset]}
    config = ModelConfig.from_dict(raw)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    generator = torch.Generator().manual_seed(seed)
    shapes = parameter_shapes(config, tp=1, rank=0, padded=False)
    element = torch.tensor([], dtype=DTYPES[dtype]).element_size()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in shapes.items():
        if size and size + numel(shape) * element > shard_bytes:
            shards.append({})
            size = 0
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape)
        else:
            tensor = torch.randn(shape, generator=generator) * 0.02
        shards[-1][name] = tensor.to(DTYPES[dtype])
        size += numel(shape) * element
    weight_map = {}
    for i, tensors in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    total = sum(numel(s) for s in shapes.values()) * element
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    # The demo model's tokenizer (4096 ids, all inside this vocabulary) so the server and the CLI take text;
    # with random weights the text that comes back is noise, which benchmarks do not read.
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEMO_MODEL / name, out / name)
    print(f"wrote {out}: {config.num_parameters:,} parameters, {total / 1e9:.2f} GB in {len(shards)} files")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-250m")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    write_checkpoint(args.out, args.preset, args.dtype)


if __name__ == "__main__":
    main()
