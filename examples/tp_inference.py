"""Tensor-parallel inference in a script every rank runs, launched by torchrun.

    torchrun --nproc-per-node 2 examples/tp_inference.py                 # the bundled demo model
    torchrun --nproc-per-node 4 examples/tp_inference.py --model ./my-llama "Explain tensor parallelism:"
    torchrun --nproc-per-node 4 examples/tp_inference.py --pipeline-parallel-size 2     # TP=2 x 2 stages

Each process loads only its slices of the weights (tp_plan="auto": q/k/v and gate/up column-parallel,
o and down row-parallel, embedding and LM head split by vocabulary). Every rank runs generate with
the same inputs and gets the same tokens; only rank 0 prints.
"""

import argparse
import json
import os

import torch

import tpinfer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="The function returns")
    parser.add_argument("--model", default=None, help="HF checkpoint directory (default: the demo model)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--json", action="store_true", help="print the token ids as JSON (for scripts)")
    parser.add_argument("--pipeline-parallel-size", type=int, default=1,
                        help="pipeline stages; TP = the world size / stages (default 1)")
    args = parser.parse_args()
    model_dir = args.model or tpinfer.assets.demo_model_path()

    model = tpinfer.from_pretrained(model_dir, dtype=torch.float32, tp_plan="auto",
                                    pipeline_parallel_size=args.pipeline_parallel_size)
    tokenizer = tpinfer.AutoTokenizer.from_pretrained(model_dir)
    rank = int(os.environ.get("RANK", 0))

    inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    outputs = model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy,
        temperature=0.7,
        top_p=0.9,
        seed=0,
    )
    if rank == 0:
        new_tokens = outputs[0, inputs["input_ids"].shape[1] :]
        if args.json:
            print(json.dumps({"world_size": model.world_size, "tp": model.ctx.tp_size, "pp": model.ctx.pp_size,
                              "token_ids": new_tokens.tolist()}))
        else:
            print(f"Prompt: {args.prompt}")
            print(f"Response: {tokenizer.decode(outputs[0])}")
    model.close()


if __name__ == "__main__":
    main()
