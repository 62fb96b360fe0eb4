"""A custom tp_plan: shard the attention and MLP projections, replicate the embedding and LM head.

    torchrun --nproc-per-node 2 examples/custom_plan.py

Patterns are HF module names with * for the layer index. Modules a plan leaves out are replicated
(every rank holds them whole). A plan that pairs layers inconsistently is refused before loading,
e.g. a colwise q_proj with a replicated o_proj.
"""

import argparse
import os

import torch

import tpinfer

TP_PLAN = {
    "model.layers.*.self_attn.q_proj": "colwise",
    "model.layers.*.self_attn.k_proj": "colwise",
    "model.layers.*.self_attn.v_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF checkpoint directory (default: the demo model)")
    parser.add_argument("--prompt", default="A dictionary maps")
    args = parser.parse_args()
    model_dir = args.model or tpinfer.assets.demo_model_path()

    model = tpinfer.from_pretrained(model_dir, dtype=torch.float32, tp_plan=TP_PLAN)
    tokenizer = tpinfer.AutoTokenizer.from_pretrained(model_dir)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    outputs = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    if int(os.environ.get("RANK", 0)) == 0:
        held = sum(p.numel() for p in model.engine.model.parameters())
        print(f"rank 0 holds {held:,} of {model.config.num_parameters:,} parameters (embedding and head replicated)")
        print(tokenizer.decode(outputs[0]))
    model.close()


if __name__ == "__main__":
    main()
