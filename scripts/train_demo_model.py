#!/usr/bin/env python
"""Train the tiny demo Llama model shipped in ``src/tpinfer/assets/demo-llama/``.

The model is a toy: a few million parameters trained for ~20 minutes on two CPU cores.  It exists so that the
engine, its tests and its examples have a real (English-speaking, loosely) Hugging Face Llama checkpoint without
any network access.  Steps:

1. Corpus.  Docstrings of the Python standard library of the running interpreter
   (``sysconfig.get_paths()["stdlib"]``), extracted with :mod:`ast`.  Test suites, ``idlelib``, ``lib2to3``,
   ``encodings``, ``site-packages`` and files that are not UTF-8 Python are skipped; doctest blocks are removed;
   only prose-like docstrings are kept; exact duplicates are dropped.  The text is licensed under the Python
   Software Foundation License (PSF-2.0), like the rest of CPython.
2. Tokenizer.  A byte-level BPE (``tokenizers``; ByteLevel pre-tokenizer and decoder, so spaces and newlines
   round-trip exactly) with special tokens ``<unk>`` ``<s>`` ``</s>`` ``<pad>``; ``<s>`` is prepended on encode,
   as Llama tokenizers do.  Saved as ``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``.
3. Model.  ``transformers.LlamaForCausalLM`` with grouped-query attention and tied embeddings, sized so that
   tensor-parallel degrees 1, 2 and 4 all divide the heads, KV heads and MLP width.  Trained with AdamW and a
   warmup + cosine learning-rate schedule on packed sequences, in a fixed data order (seeded shuffles), for a
   fixed number of steps (``--steps``).  ``--minutes`` instead derives the step count from a measured step time,
   which makes the result depend on the machine.
4. Output.  ``save_pretrained`` (safetensors; float32 when the weights fit in 20 MB, else bfloat16), tokenizer
   files and ``MODEL_CARD.md`` with the losses, the wall time and sample generations.

Usage (from the repository root; needs ``transformers``, i.e. ``pip install -e '.[train]'``)::

    python scripts/train_demo_model.py                       # reproduces the shipped model
    python scripts/train_demo_model.py --out /tmp/demo --steps 200
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import random
import re
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "src" / "tpinfer" / "assets" / "demo-llama"
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "encodings", "__pycache__", "pydoc_data"}
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3
UNK, BOS, EOS, PAD = SPECIAL_TOKENS
FP32_LIMIT_BYTES = 20 * 1000 * 1000
OUTPUT_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "MODEL_CARD.md",
}
SAMPLE_PROMPTS = ["The function returns", "A list is", "Return the"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters.  The defaults produce the shipped model."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 1000
    peak_lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 60
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    val_fraction: float = 0.04
    seed: int = 1234
    log_every: int = 25
    eval_every: int = 100


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------- corpus


def stdlib_python_files(stdlib: Path) -> list[Path]:
    """All ``.py`` files of the standard library except tests, IDLE, lib2to3, codecs and third-party packages."""
    files = []
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).parts
        if any(p in SKIP_DIRS or p.startswith("config-") for p in parts[:-1]):
            continue
        files.append(path)
    return files


def strip_doctests(text: str) -> str:
    """Remove interactive examples: a ``>>>`` line, its continuation lines and its output up to a blank line."""
    out: list[str] = []
    in_example = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(">>>"):
            in_example = True
        elif in_example and not stripped:
            in_example = False
        if not in_example:
            out.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def is_prose(text: str) -> bool:
    """Heuristic: English sentences rather than code, tables, ASCII art or non-English text."""
    words = re.findall(r"[A-Za-z]{2,}", text)
    if len(words) < 3 or len(text) < 20:
        return False
    if sum(not c.isascii() for c in text) > 0.01 * len(text):
        return False
    prose_chars = sum(c.isalpha() or c in " \n.,;:'\"()-" for c in text)
    if prose_chars < 0.8 * len(text):
        return False
    common = {"the", "a", "an", "is", "of", "to", "and", "or", "in", "for", "if", "return", "returns", "be", "this"}
    return any(w.lower() in common for w in words)


def extract_docstrings(source: str) -> list[str]:
    """Docstrings of the module and of every class and function in ``source`` (cleaned by ``inspect``)."""
    tree = ast.parse(source)
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                docs.append(doc)
    return docs


def build_corpus() -> list[str]:
    """Deduplicated, prose-like stdlib docstrings in a deterministic order (sorted files, then source order)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    corpus: list[str] = []
    n_files = 0
    for path in stdlib_python_files(stdlib):
        try:
            docs = extract_docstrings(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        n_files += 1
        for doc in docs:
            doc = strip_doctests(doc)
            key = " ".join(doc.split())
            if key in seen or not is_prose(doc):
                continue
            seen.add(key)
            corpus.append(doc)
    log(f"corpus: {len(corpus)} docstrings from {n_files} files under {stdlib}")
    return corpus


def split_corpus(corpus: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded document-level train/validation split."""
    docs = list(corpus)
    random.Random(seed).shuffle(docs)
    n_val = max(1, int(len(docs) * val_fraction))
    return docs[n_val:], docs[:n_val]


# ------------------------------------------------------------------------------------------------ tokenizer


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE; ``<s>`` is added in front of every encoded sequence."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def save_tokenizer(tok: Tokenizer, out: Path, model_max_length: int) -> None:
    """Files readable by ``tokenizers.Tokenizer.from_file`` and ``transformers.AutoTokenizer.from_pretrained``."""
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def pack_tokens(tok: Tokenizer, docs: list[str]) -> list[list[int]]:
    """Encode each document as ``<s> doc </s>`` (the post-processor adds ``<s>``)."""
    eos_id = tok.token_to_id(EOS)
    return [enc.ids + [eos_id] for enc in tok.encode_batch(docs)]


def make_blocks(encoded: list[list[int]], seq_len: int, rng: random.Random | None) -> torch.Tensor:
    """Concatenate the documents (shuffled when ``rng`` is given) and cut into ``seq_len`` blocks."""
    order = list(range(len(encoded)))
    if rng is not None:
        rng.shuffle(order)
    stream = [t for i in order for t in encoded[i]]
    n_blocks = len(stream) // seq_len
    return torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def batches(encoded: list[list[int]], cfg: TrainConfig):
    """Endless deterministic stream of training batches: a fresh seeded document shuffle every epoch."""
    epoch = 0
    while True:
        blocks = make_blocks(encoded, cfg.seq_len, random.Random(cfg.seed * 1000 + epoch))
        for i in range(0, len(blocks) - cfg.batch_size + 1, cfg.batch_size):
            yield epoch, blocks[i : i + cfg.batch_size]
        epoch += 1


# ---------------------------------------------------------------------------------------------------- model


def build_model(cfg: TrainConfig, tok: Tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD),
    )
    for tp in (1, 2, 4):
        assert cfg.num_heads % tp == 0 and cfg.num_kv_heads % tp == 0 and cfg.intermediate_size % tp == 0
    return LlamaForCausalLM(config)


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * peak_lr``."""
    if step < cfg.warmup_steps:
        return cfg.peak_lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.peak_lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms (1-D parameters)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.peak_lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean token loss over all validation blocks."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i : i + batch_size]
        n = batch.numel() - batch.shape[0]  # predicted positions
        total += model(input_ids=batch, labels=batch).loss.item() * n
        count += n
    model.train()
    return total / count


def measure_steps_for_budget(cfg: TrainConfig, tok: Tokenizer, encoded: list[list[int]], minutes: float) -> int:
    """Time a few throwaway steps and return how many steps fit in ``minutes`` (machine-dependent!)."""
    model = build_model(cfg, tok)
    opt = make_optimizer(model, cfg)
    stream = batches(encoded, cfg)
    times = []
    for _ in range(6):
        _, batch = next(stream)
        start = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    step_time = sorted(times[2:])[len(times[2:]) // 2]
    steps = int(minutes * 60 / (step_time * 1.05))  # ~5 % for evaluation and logging
    log(f"measured {step_time:.3f} s/step -> {steps} steps for {minutes} minutes")
    return steps


def train(model, cfg: TrainConfig, total_steps: int, encoded: list[list[int]], val_blocks: torch.Tensor) -> dict:
    """The training loop; returns final losses and timing."""
    opt = make_optimizer(model, cfg)
    model.train()
    stream = batches(encoded, cfg)
    blocks_per_epoch = sum(map(len, encoded)) // cfg.seq_len
    start = last_log = time.perf_counter()
    window: list[float] = []
    train_loss, fastest_step = float("nan"), float("inf")
    for step in range(total_steps):
        lr = lr_at(step, cfg, total_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        epoch, batch = next(stream)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        window.append(loss.item())
        done = step + 1
        if done % cfg.log_every == 0 or done == total_steps:
            now = time.perf_counter()
            fastest_step = min(fastest_step, (now - last_log) / len(window))
            train_loss = sum(window) / len(window)
            tok_s = done * cfg.batch_size * cfg.seq_len / (now - start)
            log(
                f"step {done:5d}/{total_steps} epoch {epoch} loss {train_loss:.4f} "
                f"lr {lr:.2e} {tok_s:,.0f} tok/s {(now - start) / 60:.1f} min"
            )
            window, last_log = [], now
        if done % cfg.eval_every == 0 and done != total_steps:
            log(f"step {done:5d} val loss {evaluate(model, val_blocks, cfg.batch_size):.4f}")
            last_log = time.perf_counter()
    train_seconds = time.perf_counter() - start
    return {
        "train_loss": train_loss,
        "val_loss": evaluate(model, val_blocks, cfg.batch_size),
        "epochs": total_steps * cfg.batch_size / blocks_per_epoch,
        "train_seconds": train_seconds,
        "fastest_step_seconds": fastest_step,
    }


# --------------------------------------------------------------------------------------------------- output


def save_model(model, out: Path, cfg: TrainConfig) -> str:
    """Save with safetensors: float32 if it fits in 20 MB, else bfloat16.  Returns the dtype name."""
    n_bytes_fp32 = sum(p.numel() for p in model.parameters()) * 4
    dtype = torch.float32 if n_bytes_fp32 <= FP32_LIMIT_BYTES else torch.bfloat16
    model = model.to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    # Older readers look for ``torch_dtype`` and a top-level ``rope_theta`` (transformers 5 writes ``dtype`` and
    # ``rope_parameters``); write both spellings so every version of every loader finds them.
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    dtype_name = str(dtype).removeprefix("torch.")
    config["torch_dtype"] = dtype_name
    config["rope_theta"] = cfg.rope_theta
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "model.safetensors").chmod(0o644)
    return dtype_name


def generate_samples(out: Path, seed: int) -> list[tuple[str, str, str]]:
    """Reload the saved checkpoint with transformers and generate from the sample prompts.

    Returns ``(prompt, greedy text, temperature-0.7 text)`` triples.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    samples = []
    for prompt in SAMPLE_PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        common = {"max_new_tokens": 40, "pad_token_id": tokenizer.pad_token_id}
        greedy = model.generate(**inputs, do_sample=False, **common)
        torch.manual_seed(seed)
        sampled = model.generate(**inputs, do_sample=True, temperature=0.7, top_k=0, top_p=1.0, **common)
        samples.append(
            (
                prompt,
                tokenizer.decode(greedy[0], skip_special_tokens=True),
                tokenizer.decode(sampled[0], skip_special_tokens=True),
            )
        )
    return samples


def write_model_card(out: Path, info: dict) -> None:
    cfg: TrainConfig = info["cfg"]
    sample_lines = []
    for prompt, greedy, sampled in info["samples"]:
        sample_lines += [f"Prompt `{prompt}`, greedy:", "", "```", greedy, "```", ""]
        sample_lines += ["Temperature 0.7 (seeded):", "", "```", sampled, "```", ""]
    n_params, fastest = info["n_params"], info["fastest_step_seconds"]
    card = f"""# demo-llama

A **toy** Llama-architecture causal language model with {n_params:,} parameters ({n_params / 1e6:.1f} M),
shipped with tpinfer so that the engine, its tests and its examples have a real Hugging Face checkpoint that needs
no download.  It writes English-like fragments of Python documentation and is **not useful for anything but demos
and tests**: it knows no facts, follows no instructions and has no chat template.

## Data

Docstrings of the Python {info["python_version"]} standard library, extracted with `ast` from the `.py` files under
`sysconfig.get_paths()["stdlib"]`.  Test suites, `idlelib`, `lib2to3`, `encodings`, `pydoc_data` and
`site-packages` are skipped, doctest examples removed, only prose-like docstrings kept and exact duplicates dropped:
{info["n_docs"]:,} docstrings, {info["n_chars"]:,} characters, {info["n_tokens"]:,} tokens (sha256 of the corpus
text `{info["corpus_sha"][:16]}...`; other Python versions give a slightly different corpus).  A seeded
{cfg.val_fraction:.0%} of the docstrings is held out for validation.

The text is part of CPython and is licensed under the **Python Software Foundation License (PSF-2.0)**.

## Tokenizer

Byte-level BPE trained with `tokenizers` on the training split: vocabulary {info["vocab_size"]:,}, ByteLevel
pre-tokenizer and decoder (spaces and newlines round-trip), special tokens `<unk>`=0, `<s>`=1, `</s>`=2, `<pad>`=3.
`<s>` is prepended on encode (as Llama tokenizers do); every training document ended with `</s>`.  Loads with
`tokenizers.Tokenizer.from_file("tokenizer.json")` and `transformers.AutoTokenizer.from_pretrained(dir)`.

## Architecture

`LlamaForCausalLM` (`model_type` `llama`): hidden size {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads}
attention heads (head dim {cfg.hidden_size // cfg.num_heads}), {cfg.num_kv_heads} key/value heads (grouped-query
attention), SwiGLU MLP of intermediate size {cfg.intermediate_size}, RMSNorm eps 1e-5, RoPE theta
{cfg.rope_theta:g}, max position embeddings {cfg.max_position_embeddings}, tied input/output embeddings.  Heads,
KV heads and intermediate size are divisible by 4, so tensor-parallel sizes 1, 2 and 4 are all valid.  Weights are
stored in {info["dtype"]} (`model.safetensors`, {info["weights_bytes"] / 1e6:.1f} MB).

## Training

```
{info["command"]}
```

AdamW (betas 0.9/0.95, weight decay {cfg.weight_decay} on matrices), peak learning rate {cfg.peak_lr:g} with
{cfg.warmup_steps} warmup steps and cosine decay to {cfg.min_lr_ratio:g}x, gradient clipping {cfg.grad_clip}.
{info["steps"]} steps of {cfg.batch_size} packed sequences of {cfg.seq_len} tokens ({info["epochs"]:.1f} epochs over
the training split, document order reshuffled with a fixed seed every epoch), seed {cfg.seed},
`torch.set_num_threads(2)`, float32 on CPU.  The run is deterministic: the same command on the same software
gives the same weights.

| | |
|---|---|
| final train loss (mean of the last {cfg.log_every} steps) | {info["train_loss"]:.3f} |
| validation loss | {info["val_loss"]:.3f} (perplexity {math.exp(info["val_loss"]):.1f}) |
| training time | {info["train_seconds"] / 60:.1f} min ({info["steps"]} steps; fastest step {fastest:.2f} s) |
| total script wall time | {info["wall_seconds"] / 60:.1f} min, 2 CPU threads |
| software | Python {info["python_version"]}, torch {torch.__version__}, transformers {info["transformers_version"]} |

Wall time depends on what else the machine runs: at the fastest step time above the {info["steps"]} steps take
{info["steps"] * fastest / 60:.0f} min.

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("src/tpinfer/assets/demo-llama")
model = AutoModelForCausalLM.from_pretrained("src/tpinfer/assets/demo-llama")
ids = model.generate(**tokenizer("Return the", return_tensors="pt"), max_new_tokens=40, do_sample=False)
print(tokenizer.decode(ids[0], skip_special_tokens=True))
```

## Samples

Generated by `transformers` from the saved checkpoint, at most 40 new tokens.

{chr(10).join(sample_lines).rstrip()}
"""
    (out / "MODEL_CARD.md").write_text(card)


def prepare_output_dir(out: Path) -> None:
    """Create ``out``, or empty it of a previous run's files; refuse to touch a directory holding anything else."""
    out.mkdir(parents=True, exist_ok=True)
    foreign = [p.name for p in out.iterdir() if p.name not in OUTPUT_FILES or not p.is_file()]
    if foreign:
        raise SystemExit(f"{out} holds files this script did not write ({', '.join(sorted(foreign))}); not touching it")
    for path in out.iterdir():
        path.unlink()


# ----------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (replaced)")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps, help="training steps (reproducible)")
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="derive the step count from a measured step time instead of --steps (not reproducible across machines)",
    )
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    wall_start = time.perf_counter()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    random.seed(args.seed)
    cfg = TrainConfig(seed=args.seed, steps=args.steps)
    prepare_output_dir(args.out)  # fail early, before training, if the directory is not ours

    corpus = build_corpus()
    corpus_text = "\n\n".join(corpus)
    print(f"corpus: {len(corpus):,} docstrings, {len(corpus_text):,} characters ({len(corpus_text.encode()):,} bytes)")
    train_docs, val_docs = split_corpus(corpus, cfg.val_fraction, cfg.seed)

    tok = train_tokenizer(train_docs, cfg.vocab_size)
    train_encoded = pack_tokens(tok, train_docs)
    val_blocks = make_blocks(pack_tokens(tok, val_docs), cfg.seq_len, rng=None)
    n_train_tokens = sum(map(len, train_encoded))
    print(
        f"tokenizer: vocab {tok.get_vocab_size()}; {n_train_tokens:,} train tokens, {val_blocks.numel():,} val tokens"
    )

    steps = measure_steps_for_budget(cfg, tok, train_encoded, args.minutes) if args.minutes else cfg.steps
    model = build_model(cfg, tok)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters; training {steps} steps")
    result = train(model, cfg, steps, train_encoded, val_blocks)
    print(f"final train loss {result['train_loss']:.4f}  validation loss {result['val_loss']:.4f}")

    dtype = save_model(model, args.out, cfg)
    save_tokenizer(tok, args.out, cfg.max_position_embeddings)
    samples = generate_samples(args.out, cfg.seed)
    for prompt, greedy, sampled in samples:
        print(f"[{prompt}] greedy: {greedy!r}\n[{prompt}] t=0.7: {sampled!r}")

    import transformers

    command = " ".join(["python scripts/train_demo_model.py", *(sys.argv[1:] if argv is None else argv)])
    info = {
        **result,
        "cfg": cfg,
        "steps": steps,
        "n_params": n_params,
        "dtype": dtype,
        "samples": samples,
        "command": command,
        "python_version": sys.version.split()[0],
        "n_docs": len(corpus),
        "n_chars": len(corpus_text),
        "n_tokens": n_train_tokens + sum(map(len, pack_tokens(tok, val_docs))),
        "corpus_sha": hashlib.sha256(corpus_text.encode()).hexdigest(),
        "vocab_size": tok.get_vocab_size(),
        "weights_bytes": (args.out / "model.safetensors").stat().st_size,
        "transformers_version": transformers.__version__,
        "wall_seconds": time.perf_counter() - wall_start,
    }
    write_model_card(args.out, info)
    total = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out} ({total / 1e6:.1f} MB): {', '.join(sorted(f.name for f in args.out.iterdir()))}")
    print(f"wall time {info['wall_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
