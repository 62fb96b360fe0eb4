"""tpinfer's quantized decode against llama.cpp on the same weights, in one invocation.

Set up llama.cpp once (its own directory, outside the repo; about 20 minutes on 2 cores):

    pip download --no-deps --no-binary :all: llama-cpp-python -d /work/peers && cd /work/peers
    tar xf llama_cpp_python-*.tar.gz && cd llama_cpp_python-*/vendor/llama.cpp
    cmake -B build -DGGML_NATIVE=ON -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
    cmake --build build -j 2 --target llama-bench llama-quantize

Then, with the benchmark checkpoint (python benchmarks/make_checkpoint.py --preset llama-1b --out /work/ckpt/llama-1b):

    python benchmarks/compare_llama_cpp.py --model /work/ckpt/llama-1b \\
        --llama-cpp /work/peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin --work /work/ckpt/gguf

The checkpoint is written as a float16 GGUF by this script (the gguf package's writer, llama.cpp's tensor
names, q/k rows permuted as llama.cpp's rope expects), then quantized by llama-quantize to Q8_0 and Q4_K_M
(both kept in --work and reused). Configurations, each a fresh process, repeated in alternation so that drift
on a shared machine hits all of them alike (medians and per-round ratios reported):

  llama.cpp Q8_0 / Q4_K_M    llama-bench -t THREADS -p 0 -n OUTPUT_LEN (batch 1)
  tpinfer int8 / int4        tpinfer bench --tp 2 --threads 1 --dtype bfloat16 -q SCHEME --quantize-lm-head HEAD,
                             batch 1 and batch 8, quantizing the bfloat16 checkpoint while loading (the LM head
                             in int8 by default, as llama.cpp keeps its own at 8 or 6 bits; int8-a8 beside an -a8
                             scheme, so that batch 8 does not widen the head's weights to float for every row)

Each tpinfer run reports its roofline: this machine's bandwidth measured in the same processes, over the bytes
one decode step reads at that format (bytes_per_weight). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def write_f16_gguf(model: Path, out: Path) -> None:
    """A Llama HF checkpoint as a float16 GGUF llama.cpp loads (norms float32, tokenizer as a GPT-2 style BPE)."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    cfg = json.loads((model / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise SystemExit(f"{model}: this script writes Llama checkpoints only, not {cfg.get('model_type')!r}")
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    vocab = cfg["vocab_size"]
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    tok = json.loads((model / "tokenizer.json").read_text())
    tokens = [f"[PAD{i}]" for i in range(vocab)]
    for text, i in tok["model"]["vocab"].items():
        if i < vocab:
            tokens[i] = text
    for added in tok.get("added_tokens", []):
        if added["id"] < vocab:
            tokens[added["id"]] = added["content"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * vocab)
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"].get("merges", [])])
    writer.add_bos_token_id(cfg.get("bos_token_id", 1))
    writer.add_eos_token_id(cfg.get("eos_token_id", 2))

    def rope_rows(a: np.ndarray, n: int) -> np.ndarray:  # HF's half-split rotary pairs to llama.cpp's interleaved
        return a.reshape(n, 2, a.shape[0] // n // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    for file in sorted(model.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118  (safe_open has keys(), not iteration)
                t = handle.get_tensor(name).float().numpy()
                if name in TOP_NAMES:
                    target = TOP_NAMES[name]
                else:
                    _, _, layer, rest = name.split(".", 3)
                    target = f"blk.{layer}.{LAYER_NAMES[rest]}"
                if "q_proj" in name:
                    t = rope_rows(t, heads)
                elif "k_proj" in name:
                    t = rope_rows(t, kv)
                writer.add_tensor(target, np.ascontiguousarray(t.astype(np.float32 if t.ndim == 1 else np.float16)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()


def prepare(model: Path, bin_dir: Path, work: Path) -> dict[str, Path]:
    work.mkdir(parents=True, exist_ok=True)
    f16 = work / f"{model.name}-f16.gguf"
    if not f16.exists():
        print(f"writing {f16}", file=sys.stderr, flush=True)
        write_f16_gguf(model, f16.with_suffix(".tmp"))
        f16.with_suffix(".tmp").rename(f16)
    files = {}
    for kind in ("Q8_0", "Q4_K_M"):
        path = work / f"{model.name}-{kind}.gguf"
        if not path.exists():
            print(f"llama-quantize {kind} -> {path}", file=sys.stderr, flush=True)
            subprocess.run([str(bin_dir / "llama-quantize"), str(f16), str(path.with_suffix(".tmp")), kind],
                           check=True, capture_output=True, timeout=3600)
            path.with_suffix(".tmp").rename(path)
        files[kind] = path
    return files


def llama_bench(bin_dir: Path, gguf_file: Path, threads: int, output_len: int) -> dict:
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf_file), "-t", str(threads), "-p", "0", "-n",
           str(output_len), "-r", "1", "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    (row,) = [r for r in json.loads(proc.stdout) if r["n_gen"] > 0]
    return {"decode_tokens_per_s": row["avg_ts"], "file_bytes": gguf_file.stat().st_size}


def tpinfer_bench(model: Path, scheme: str, tp: int, batch: int, output_len: int, head: str) -> dict:
    cmd = [PY, "-m", "tpinfer.cli.main", "bench", "--model", str(model), "--dtype", "bfloat16", "-q", scheme,
           "--tensor-parallel-size", str(tp), "--threads", "1", "--batch-size", str(batch), "--input-len", "32",
           "--output-len", str(output_len), "--repeat", "1", "--json"]
    if head == "auto":
        head = "int8-a8" if scheme.endswith("-a8") else "int8"
    if head != "float":
        cmd += ["--quantize-lm-head", head]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="Llama HF checkpoint (bfloat16 or float32)")
    parser.add_argument("--llama-cpp", type=Path, required=True, metavar="BIN",
                        help="llama.cpp's build/bin (llama-bench, llama-quantize)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tpinfer-gguf"), help="where the GGUF files go")
    parser.add_argument("--int8", default="int8", help="tpinfer's 8-bit scheme (default int8: per channel)")
    parser.add_argument("--int4", default="int4", help="tpinfer's 4-bit scheme (default int4: groups of 32)")
    parser.add_argument("--lm-head", default="auto", metavar="SCHEME|float|auto",
                        help="tpinfer's LM head format (default auto: int8, or int8-a8 beside an -a8 scheme, as "
                        "llama.cpp keeps its head at 6-8 bits: Q8_0 in a Q8_0 file, Q6_K in Q4_K_M); float keeps it "
                        "bfloat16")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2)")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every configuration (default 3)")
    parser.add_argument("--batch", type=int, default=8, help="the larger tpinfer batch (default 8)")
    args = parser.parse_args()

    for tool in ("llama-bench", "llama-quantize"):
        if not (args.llama_cpp / tool).exists():
            raise SystemExit(f"{args.llama_cpp / tool} is missing: build llama.cpp first (see this script's help)")
    files = prepare(args.model, args.llama_cpp, args.work)
    pairs = {"int8": (args.int8, "Q8_0"), "int4": (args.int4, "Q4_K_M")}
    runs: dict[str, list[dict]] = {}
    started = time.time()
    for round_ in range(args.repeat):
        for bits, (scheme, kind) in pairs.items():
            for name, fn in ((f"llama.cpp {kind}", lambda k=kind: llama_bench(args.llama_cpp, files[k], args.threads,
                                                                               args.output_len)),
                             (f"tpinfer {bits} b1", lambda s=scheme: tpinfer_bench(args.model, s, args.tp, 1,
                                                                                   args.output_len, args.lm_head)),
                             (f"tpinfer {bits} b{args.batch}", lambda s=scheme: tpinfer_bench(
                                 args.model, s, args.tp, args.batch, args.output_len, args.lm_head))):
                result = fn()
                runs.setdefault(name, []).append(result)
                print(f"round {round_ + 1}/{args.repeat}  {name:<22} {result['decode_tokens_per_s']:7.1f} tok/s"
                      f"  ({time.time() - started:.0f}s)", file=sys.stderr, flush=True)

    def tps(name: str) -> list[float]:
        return [r["decode_tokens_per_s"] for r in runs[name]]

    summary: dict[str, dict] = {}
    print(f"\n{'':<8}{'llama.cpp':>11}{'tpinfer b1':>12}{'ratio':>7}{'of roof':>9}{'b/weight':>10}"
          f"{'tpinfer b' + str(args.batch):>13}{'b' + str(args.batch) + '/b1':>8}")
    for bits, (_, kind) in pairs.items():
        ours, theirs = tps(f"tpinfer {bits} b1"), tps(f"llama.cpp {kind}")
        big = tps(f"tpinfer {bits} b{args.batch}")
        roof = [r["decode_tokens_per_s"] / r["roofline_tokens_per_s"] for r in runs[f"tpinfer {bits} b1"]]
        first = runs[f"tpinfer {bits} b1"][0]
        entry = {
            "scheme": first["quantization"], "lm_head": first["lm_head"], "llama_cpp_type": kind, "tp": args.tp,
            "llama_cpp_tokens_per_s": statistics.median(theirs), "tpinfer_tokens_per_s": statistics.median(ours),
            "ratio_per_round": [a / b for a, b in zip(ours, theirs, strict=True)],
            "ratio": statistics.median(a / b for a, b in zip(ours, theirs, strict=True)),
            "of_roofline": statistics.median(roof), "of_roofline_per_round": roof,
            "roofline_tokens_per_s": statistics.median(r["roofline_tokens_per_s"] for r in runs[f"tpinfer {bits} b1"]),
            "bytes_per_weight": first["bytes_per_weight"], "weight_bytes_per_rank": first["param_bytes"],
            "weight_bytes_per_step": first["weight_bytes_per_step"],
            "llama_cpp_file_bytes": runs[f"llama.cpp {kind}"][0]["file_bytes"],
            f"tpinfer_b{args.batch}_tokens_per_s": statistics.median(big),
            f"b{args.batch}_over_b1": statistics.median(a / b for a, b in zip(big, ours, strict=True)),
        }
        summary[bits] = entry
        print(f"{bits:<8}{entry['llama_cpp_tokens_per_s']:>11.1f}{entry['tpinfer_tokens_per_s']:>12.1f}"
              f"{entry['ratio']:>7.2f}{entry['of_roofline']:>9.2f}{entry['bytes_per_weight']:>10.3f}"
              f"{entry[f'tpinfer_b{args.batch}_tokens_per_s']:>13.1f}{entry[f'b{args.batch}_over_b1']:>8.2f}")
    print(json.dumps({"model": str(args.model), "output_len": args.output_len, "rounds": args.repeat,
                      "llama_cpp_threads": args.threads, "results": summary, "runs": runs}))


if __name__ == "__main__":
    main()
