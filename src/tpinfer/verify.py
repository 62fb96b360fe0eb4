"""Does this checkpoint give the same answers at every tensor-parallel size (and as HF transformers does)?

For each prompt, TP=1 generates a greedy continuation; that sequence (prompt + continuation) is the reference.
Every size then (a) generates greedily on its own, compared token by token with the reference continuation
(``greedy_agreement``: the share of positions that match), and (b) scores the reference sequence teacher-forced,
giving the logits of every continuation position, compared with TP=1's (``max_logit_diff``: the largest absolute
difference; ``kl``: the mean over positions of KL(p_ref || p) in nats). With ``reference="hf"`` HF's own model on
the same weights is scored and generated the same way, and every size is also compared with it.

Why sizes differ at all: a row-parallel layer sums partial products in another order, so float32 results differ in
the last bits and bfloat16 results by a rounding step; a near-tie between the two likeliest tokens can then flip a
greedy choice, after which the continuations part ways. So a size passes when its greedy tokens agree, or when every
place they first part is such a near-tie (the reference's logits of the two tokens within the logit tolerance;
``divergences`` and ``divergences_at_ties`` count them), and its logits and KL are within the tolerances, which
are per dtype (``TOLERANCES``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from tpinfer.api import LLM

DEFAULT_PROMPTS = (
    "Tensor parallelism splits every weight matrix across devices, so that",
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
)
# dtype -> (largest logit difference, largest mean KL in nats). float32: summation order moves logits by ~1e-5 to
# 1e-4 through a few dozen layers, so 2e-3 flags any real error (which moves them by 1e-1 or more). bfloat16 and
# float16 round every activation to 8 or 11 bits: differences of a few tenths are rounding, not error.
TOLERANCES = {"float32": (2e-3, 1e-6), "bfloat16": (0.75, 2e-2), "float16": (0.25, 5e-3)}


@dataclass
class Comparison:
    greedy_agreement: float
    max_logit_diff: float
    kl: float
    passed: bool
    divergences: int = 0  # prompts whose greedy continuations part somewhere
    ties: int = 0  # of those, parting at a near-tie: the reference's two tokens within the logit tolerance
    first_divergence: tuple[int, ...] = ()  # per prompt: tokens before the first difference (all of them: none)

    def to_json(self) -> dict[str, Any]:
        return {"greedy_agreement": self.greedy_agreement, "max_logit_diff": self.max_logit_diff, "kl": self.kl,
                "passed": self.passed, "divergences": self.divergences, "divergences_at_ties": self.ties}


@dataclass
class SizeResult:
    tp: int
    against_tp1: Comparison
    against_hf: Comparison | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"tp": self.tp, **self.against_tp1.to_json()}
        if self.against_hf is not None:
            out["hf"] = self.against_hf.to_json()
            out["passed"] = self.against_tp1.passed and self.against_hf.passed
        return out

    @property
    def passed(self) -> bool:
        return self.against_tp1.passed and (self.against_hf is None or self.against_hf.passed)


@dataclass
class Run:
    """One engine's (or HF's) greedy tokens per prompt and its logits on the reference sequences."""

    tokens: list[list[int]]
    logits: list[torch.Tensor] = field(default_factory=list)  # (continuation length, vocab) per prompt


def compare(run: Run, reference: Run, dtype: str, min_agreement: float = 1.0,
            max_logit_diff: float | None = None, max_kl: float | None = None) -> Comparison:
    logit_tol, kl_tol = tolerances(dtype, max_logit_diff, max_kl)
    same = total = divergences = ties = 0
    firsts = []
    for got, want, logits in zip(run.tokens, reference.tokens, reference.logits, strict=True):
        total += len(want)
        same += sum(1 for a, b in zip(got, want, strict=False) if a == b)
        first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
        firsts.append(len(want) if first is None else first)
        if first is not None:  # after the first difference the contexts differ: only that position says why
            divergences += 1
            ties += bool(logits[first, want[first]] - logits[first, got[first]] <= logit_tol)
    worst, kls = 0.0, []
    for got, want in zip(run.logits, reference.logits, strict=True):
        worst = max(worst, (got - want).abs().max().item())
        p_log, q_log = want.log_softmax(-1), got.log_softmax(-1)
        kls.append((p_log.exp() * (p_log - q_log)).sum(-1).clamp_min(0))
    kl = torch.cat(kls).mean().item() if kls else 0.0
    agreement = same / total if total else 1.0
    # Greedy tokens must agree, unless every place they part is a near-tie (rounding picks either token).
    greedy_ok = agreement >= min_agreement or divergences == ties
    passed = greedy_ok and worst <= logit_tol and kl <= kl_tol and math.isfinite(worst)
    return Comparison(agreement, worst, kl, passed, divergences, ties, tuple(firsts))


def engine_run(llm: LLM, prompts: list[list[int]], new_tokens: int, sequences: list[list[int]] | None) -> Run:
    from tpinfer.engine.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    tokens = [o.token_ids for o in llm.generate(prompts, params)]
    if sequences is None:
        sequences = [p + t for p, t in zip(prompts, tokens, strict=True)]
    logits = llm.score(sequences)
    return Run(tokens, [full[len(p) - 1 : -1] for full, p in zip(logits, prompts, strict=True)])


def hf_run(path: str, dtype: str, prompts: list[list[int]], new_tokens: int, sequences: list[list[int]]) -> Run:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch_dtype = getattr(torch, dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True).eval()
    tokens, logits = [], []
    with torch.no_grad():
        for prompt, sequence in zip(prompts, sequences, strict=True):
            # A fresh generation config: greedy, no penalties the checkpoint's own file may set.
            # eos_token_id=[]: no stop token at all (None would fall back to the checkpoint's).
            greedy = transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=[],
                                                   pad_token_id=0)
            out = model.generate(torch.tensor([prompt]), generation_config=greedy)
            tokens.append(out[0, len(prompt):].tolist())
            full = model(torch.tensor([sequence])).logits[0].float()
            logits.append(full[len(prompt) - 1 : -1])
    return Run(tokens, logits)


def verify(path: str, sizes: list[int], dtype: str = "float32", prompts: list[str] | None = None,
           new_tokens: int = 16, reference: str | None = None, min_agreement: float = 1.0,
           max_logit_diff: float | None = None, max_kl: float | None = None, progress=None,  # noqa: ANN001
           **engine: Any) -> list[SizeResult]:
    """Every size in ``sizes`` against TP=1 (and HF with ``reference="hf"``)."""
    from tpinfer.config import ModelConfig
    from tpinfer.parallel.plan import resolve_plan

    if dtype not in TOLERANCES:
        raise ValueError(f"dtype {dtype!r}: verify runs float32, bfloat16 or float16")
    config = ModelConfig.from_pretrained(path)
    for tp in sizes:  # every size checked before any process starts
        resolve_plan(config, tp)
    say = progress or (lambda message: None)
    sequences = ids = None
    runs: dict[int, Run] = {}
    for tp in [1, *(t for t in sizes if t != 1)]:
        say(f"tp={tp}: loading and running")
        with LLM(path, tensor_parallel_size=tp, dtype=dtype, progress=False, **engine) as llm:
            if ids is None:
                ids = [llm.encode(p) for p in (prompts or DEFAULT_PROMPTS)]
            runs[tp] = engine_run(llm, ids, new_tokens, sequences)
        if sequences is None:
            sequences = [p + t for p, t in zip(ids, runs[1].tokens, strict=True)]
    hf = None
    if reference == "hf":
        say("HF transformers: loading and running")
        hf = hf_run(path, dtype, ids, new_tokens, sequences)
    limits = {"min_agreement": min_agreement, "max_logit_diff": max_logit_diff, "max_kl": max_kl}
    return [SizeResult(tp, compare(runs[tp], runs[1], dtype, **limits),
                       compare(runs[tp], hf, dtype, **limits) if hf is not None else None) for tp in sizes]


def tolerances(dtype: str, max_logit_diff: float | None = None, max_kl: float | None = None) -> tuple[float, float]:
    logit_tol, kl_tol = TOLERANCES[dtype]
    return (logit_tol if max_logit_diff is None else max_logit_diff), (kl_tol if max_kl is None else max_kl)


def table(results: list[SizeResult], dtype: str, logit_tol: float, kl_tol: float) -> str:
    hf = any(r.against_hf is not None for r in results)
    header = f"{'tp':>3}  {'greedy':>7}  {'max |dlogit|':>12}  {'KL':>9}"
    if hf:
        header += f"  |  {'greedy vs HF':>12}  {'max |dlogit| vs HF':>18}  {'KL vs HF':>9}"
    lines = [header + "  result"]
    for r in results:
        a = r.against_tp1
        line = f"{r.tp:>3}  {a.greedy_agreement:>7.1%}  {a.max_logit_diff:>12.3g}  {a.kl:>9.2g}"
        if r.against_hf is not None:
            h = r.against_hf
            line += f"  |  {h.greedy_agreement:>12.1%}  {h.max_logit_diff:>18.3g}  {h.kl:>9.2g}"
        notes = [f"{c.ties} of {c.divergences} divergence(s) at a near-tie{' vs HF' if c is r.against_hf else ''}"
                 for c in (a, r.against_hf) if c is not None and c.divergences]
        lines.append(line + f"  {'pass' if r.passed else 'FAIL'}" + (f"  ({'; '.join(notes)})" if notes else ""))
    passed = all(r.passed for r in results)
    lines.append(f"{'PASS' if passed else 'FAIL'}: every size {'agrees' if passed else 'must agree'} with TP=1"
                 f"{' and HF' if hf else ''} ({dtype}: greedy tokens equal or parting only at near-ties, logits "
                 f"within {logit_tol:g}, mean KL within {kl_tol:g})")
    return "\n".join(lines)
