"""HF transformers' own generation timed the way `tpinfer bench` times tpinfer (used by compare_hf.py).

    python benchmarks/hf_generate.py --model DIR --threads 2                       # one process
    torchrun --nproc-per-node 2 benchmarks/hf_generate.py --model DIR --tp-plan    # HF's tensor parallelism

Prints one JSON line on rank 0: prefill_tokens_per_s, decode_tokens_per_s (medians of --repeat runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tp-plan", action="store_true", help='load with tp_plan="auto" (run under torchrun)')
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    world = int(os.environ.get("WORLD_SIZE", 1))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    kwargs = {"dtype": getattr(torch, args.dtype)}
    if args.tp_plan:
        kwargs["tp_plan"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (args.batch_size, args.input_len), generator=generator)

    def generate(new: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
        return time.perf_counter() - start

    generate(4)
    prefill, decode = [], []
    for _ in range(args.repeat):
        first = generate(1)
        total = generate(args.output_len)
        prefill.append(first)
        decode.append(total - first)
    if int(os.environ.get("RANK", 0)) == 0:
        p, d = statistics.median(prefill), statistics.median(decode)
        print(json.dumps({"prefill_tokens_per_s": args.batch_size * args.input_len / p,
                          "decode_tokens_per_s": args.batch_size * (args.output_len - 1) / d,
                          "threads": torch.get_num_threads(), "world_size": world}))


if __name__ == "__main__":
    main()
