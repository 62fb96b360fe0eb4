"""Timed tensor-parallel generation under torchrun: warm-up, then tokens/s measured on rank 0.

    torchrun --nproc-per-node 2 examples/tp_inference_timed.py
    torchrun --nproc-per-node 4 examples/tp_inference_timed.py --model ./my-llama --max-new-tokens 100
"""

import argparse
import os
import time

import torch

import tpinfer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF checkpoint directory (default: the demo model)")
    parser.add_argument("--prompt", default="Write a short note about lists:")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    model_dir = args.model or tpinfer.assets.demo_model_path()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))

    if rank == 0:
        print(f"Loading {model_dir} with TP across {world_size} processes...")
    start = time.perf_counter()
    model = tpinfer.from_pretrained(model_dir, dtype=torch.float32, tp_plan="auto")
    if rank == 0:
        print(f"Model loaded in {time.perf_counter() - start:.2f}s")
    tokenizer = tpinfer.AutoTokenizer.from_pretrained(model_dir)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)

    model.generate(**inputs, max_new_tokens=8, ignore_eos=True)  # warm-up
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, ignore_eos=True)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start

    if rank == 0:
        generated = outputs.shape[1] - inputs["input_ids"].shape[1]
        print(f"\nPrompt: {args.prompt}")
        print(f"Response: {tokenizer.decode(outputs[0])}")
        print("\n--- Performance ---")
        print(f"Tokens generated: {generated}")
        print(f"Time: {elapsed:.2f}s")
        print(f"Throughput: {generated / elapsed:.1f} tokens/sec")
    model.close()


if __name__ == "__main__":
    main()
