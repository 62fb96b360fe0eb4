"""tpinfer against HF transformers on the same checkpoint and settings, in one invocation.

    pip install -e '.[compare]'     # transformers is needed by this script only
    python benchmarks/compare_hf.py --dtype float32            # writes /tmp/llama-250m-float32 first if missing
    python benchmarks/compare_hf.py --dtype bfloat16 --repeat 3

Configurations, each run as its own process(es) and repeated in alternation so drift on a shared machine
hits all of them alike (medians reported):
  hf-1p      HF transformers, one process, all cores
  hf-tp2     HF transformers, tp_plan="auto", torchrun --nproc-per-node 2 (gloo)
  tpi-tp1    tpinfer, TP=1, 1 thread          (one core: the TP-scaling baseline)
  tpi-tp2    tpinfer, TP=2, 1 thread per rank
Then prefill of a 512-token prompt (hf-1p vs tpi-tp2) and decode at batch 8 vs batch 1 (tpi-tp2).
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable


def _json_line(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def hf(model: str, dtype: str, tp: bool, batch: int, input_len: int, output_len: int) -> dict:
    script = [str(HERE / "hf_generate.py"), "--model", model, "--dtype", dtype, "--batch-size", str(batch),
              "--input-len", str(input_len), "--output-len", str(output_len), "--repeat", "1"]
    if tp:
        return _json_line([PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", *script, "--tp-plan"])
    return _json_line([PY, *script])


def tpinfer(model: str, dtype: str, tp: int, threads: int, batch: int, input_len: int, output_len: int) -> dict:
    return _json_line([PY, "-m", "tpinfer.cli.main", "bench", "--model", model, "--dtype", dtype,
                       "--tensor-parallel-size", str(tp), "--threads", str(threads), "--batch-size", str(batch),
                       "--input-len", str(input_len), "--output-len", str(output_len), "--repeat", "1", "--json"])


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint (default: /tmp/llama-250m-DTYPE, written if missing)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--skip-extra", action="store_true", help="only the batch-1 decode comparison")
    args = parser.parse_args()
    model = args.model or f"/tmp/llama-250m-{args.dtype}"
    if not (Path(model) / "config.json").exists():
        sys.path.insert(0, str(HERE))
        from make_checkpoint import write_checkpoint

        write_checkpoint(Path(model), "llama-250m", args.dtype)

    shape = (1, args.input_len, args.output_len)
    configs = {
        "hf-1p": lambda: hf(model, args.dtype, False, *shape),
        "hf-tp2": lambda: hf(model, args.dtype, True, *shape),
        "tpi-tp1": lambda: tpinfer(model, args.dtype, 1, 1, *shape),
        "tpi-tp2": lambda: tpinfer(model, args.dtype, 2, 1, *shape),
    }
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for rep in range(args.repeat):
        for name, fn in configs.items():
            runs[name].append(fn())
            print(f"rep {rep + 1}/{args.repeat} {name}: decode {runs[name][-1]['decode_tokens_per_s']:.2f} tok/s",
                  file=sys.stderr, flush=True)
    decode = {name: median_of(r, "decode_tokens_per_s") for name, r in runs.items()}
    tp2 = runs["tpi-tp2"]
    result = {
        "model": model, "dtype": args.dtype, "repeat": args.repeat,
        "decode_tokens_per_s": decode,
        "roofline_tokens_per_s_tp2": median_of(tp2, "roofline_tokens_per_s"),
        "all_reduce_latency_us": {k: statistics.median(r["all_reduce_latency_us"][k] for r in tp2)
                                  for k in tp2[0]["all_reduce_latency_us"]},
    }
    result["ratios"] = {
        "tpi-tp2 / hf-tp2": decode["tpi-tp2"] / decode["hf-tp2"],
        "tpi-tp2 / hf-1p": decode["tpi-tp2"] / decode["hf-1p"],
        "tpi-tp2 / roofline": decode["tpi-tp2"] / result["roofline_tokens_per_s_tp2"],
        "tpi-tp2 / tpi-tp1": decode["tpi-tp2"] / decode["tpi-tp1"],
        "gloo / shm all-reduce latency": result["all_reduce_latency_us"].get("gloo", 0)
        / max(1e-9, result["all_reduce_latency_us"].get("shm", 0)),
    }
    targets = {"tpi-tp2 / hf-tp2": 2.5, "tpi-tp2 / hf-1p": 1.3, "tpi-tp2 / roofline": 0.8, "tpi-tp2 / tpi-tp1": 1.6,
               "gloo / shm all-reduce latency": 5.0}
    if not args.skip_extra:
        prefill = {"hf-1p": [], "tpi-tp2": []}
        batch = {"b1": [], "b8": []}
        for _ in range(args.repeat):
            prefill["hf-1p"].append(hf(model, args.dtype, False, 1, 512, 2)["prefill_tokens_per_s"])
            prefill["tpi-tp2"].append(tpinfer(model, args.dtype, 2, 1, 1, 512, 2)["prefill_tokens_per_s"])
            batch["b1"].append(tpinfer(model, args.dtype, 2, 1, 1, args.input_len, 64)["decode_tokens_per_s"])
            batch["b8"].append(tpinfer(model, args.dtype, 2, 1, 8, args.input_len, 64)["decode_tokens_per_s"])
        result["prefill_512_tokens_per_s"] = {k: statistics.median(v) for k, v in prefill.items()}
        result["decode_tokens_per_s_tp2_by_batch"] = {k: statistics.median(v) for k, v in batch.items()}
        result["ratios"]["prefill512 tpi-tp2 / hf-1p"] = (result["prefill_512_tokens_per_s"]["tpi-tp2"]
                                                          / result["prefill_512_tokens_per_s"]["hf-1p"])
        result["ratios"]["tpi-tp2 batch 8 / batch 1"] = (result["decode_tokens_per_s_tp2_by_batch"]["b8"]
                                                         / result["decode_tokens_per_s_tp2_by_batch"]["b1"])
        targets.update({"prefill512 tpi-tp2 / hf-1p": 1.0, "tpi-tp2 batch 8 / batch 1": 5.0})

    print(f"\n{args.dtype}, batch 1, {args.input_len}-token prompt, {args.output_len} new tokens, "
          f"medians of {args.repeat}")
    for name, value in decode.items():
        print(f"  {name:8s} decode {value:7.2f} tokens/s")
    print(f"  roofline (tpinfer TP=2, measured bandwidth) {result['roofline_tokens_per_s_tp2']:.2f} tokens/s")
    print(f"\n  {'ratio':32s} {'measured':>9s} {'target':>7s}")
    for name, value in result["ratios"].items():
        target = targets[name]
        print(f"  {name:32s} {value:9.2f} {target:>7.2f}  {'ok' if value >= target else 'MISSED'}")
    result["targets"] = targets
    print(json.dumps(result))


if __name__ == "__main__":
    main()
