"""What quantization costs: a quantized model against its float source at the same TP size.

``tpinfer verify --quantization SCHEME`` runs both engines on the same prompts and reports greedy-token agreement
over 128 tokens (share of positions equal to the float model's, free-running: after a first difference the two
continue from different contexts, so the position of that first difference is reported too), top-1 agreement and
the mean KL divergence per token of the quantized model's distribution from the float one's, both teacher-forced on
the float continuation, and the perplexity of each
on a real English text: the Python Language Reference as CPython ships it (``pydoc_data/topics.py``, the help
topics of every installation), its first ``REFERENCE_TOKENS`` tokens or more, scored in windows of ``window``
tokens (each window's first token predicted from nothing is not counted).

A scheme passes when its perplexity stays within its budget of the float model's (``BUDGETS``: int8 and fp8 keep
8 or more bits of every weight, int4 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from tpinfer.api import LLM
from tpinfer.verify import DEFAULT_PROMPTS, Run, compare, engine_run

REFERENCE_TOKENS = 20_000
BUDGETS = {"int8": 0.01, "fp8": 0.02, "int4": 0.10}  # largest relative perplexity increase that passes


def reference_text() -> str:
    """The Python Language Reference's help topics, as CPython ships them, in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def reference_ids(llm: LLM, tokens: int = REFERENCE_TOKENS) -> list[int]:
    """At least ``tokens`` token ids of the reference text (the text is about 110,000 tokens long)."""
    text = reference_text()
    for chars in (tokens * 6, tokens * 12, len(text)):
        ids = llm.encode(text[:chars])
        if len(ids) >= tokens or chars >= len(text):
            return ids
    return ids


def perplexity(llm: LLM, ids: list[int], window: int) -> float:
    """exp(mean negative log-likelihood) of ``ids``, scored in consecutive windows of ``window`` tokens."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            break
        logits = llm.score([chunk])[0]
        logp = logits[:-1].log_softmax(-1)
        total -= logp.gather(1, torch.tensor(chunk[1:])[:, None]).sum().item()
        count += len(chunk) - 1
    return math.exp(total / count)


@dataclass
class QuantResult:
    tp: int
    scheme: str
    greedy_agreement: float
    kl: float
    max_logit_diff: float
    perplexity_float: float
    perplexity_quantized: float
    tokens_scored: int
    budget: float
    top1_agreement: float = 1.0  # teacher-forced: the quantized argmax on the float model's own context
    first_divergence: tuple[int, ...] = ()  # per prompt: free-running tokens before the first difference

    @property
    def perplexity_increase(self) -> float:
        return self.perplexity_quantized / self.perplexity_float - 1

    @property
    def passed(self) -> bool:
        return self.perplexity_increase <= self.budget

    def to_json(self) -> dict[str, Any]:
        return {"tp": self.tp, "quantization": self.scheme, "greedy_agreement": self.greedy_agreement,
                "top1_agreement": self.top1_agreement, "first_divergence": list(self.first_divergence), "kl": self.kl,
                "max_logit_diff": self.max_logit_diff,
                "perplexity": {"float": self.perplexity_float, "quantized": self.perplexity_quantized,
                               "increase": self.perplexity_increase, "tokens": self.tokens_scored},
                "budget": self.budget, "passed": self.passed}


def compare_quantized(path: str, sizes: list[int], quantization: str, dtype: str = "float32",
                      prompts: list[str] | None = None, new_tokens: int = 128, window: int = 512,
                      tokens: int = REFERENCE_TOKENS, progress=None, **engine: Any) -> list[QuantResult]:  # noqa: ANN001
    from tpinfer.config import ModelConfig
    from tpinfer.loading.checkpoint import resolve_dtype
    from tpinfer.quant.formats import parse

    scheme = parse(quantization)
    dtype = str(resolve_dtype(dtype, ModelConfig.from_pretrained(path).torch_dtype)).removeprefix("torch.")
    say = progress or (lambda message: None)
    results = []
    for tp in sizes:
        runs: dict[str, Run] = {}
        ppl: dict[str, float] = {}
        sequences = None
        for name, quant in (("float", None), ("quantized", quantization)):
            say(f"tp={tp}: {name} model")
            with LLM(path, tensor_parallel_size=tp, dtype=dtype, quantization=quant, progress=False, **engine) as llm:
                ids = [llm.encode(p) for p in (prompts or DEFAULT_PROMPTS)]
                runs[name] = engine_run(llm, ids, new_tokens, sequences)
                if sequences is None:
                    sequences = [p + t for p, t in zip(ids, runs[name].tokens, strict=True)]
                text = reference_ids(llm, tokens)
                ppl[name] = perplexity(llm, text, min(window, llm.max_model_len))
        c = compare(runs["quantized"], runs["float"], dtype)
        quant, ref = runs["quantized"], runs["float"]
        picked = [(logits.argmax(-1) == torch.tensor(want)).tolist() for logits, want in zip(quant.logits, ref.tokens,
                                                                                            strict=True)]
        top1 = sum(map(sum, picked)) / sum(map(len, picked))
        results.append(QuantResult(tp, scheme.name, c.greedy_agreement, c.kl, c.max_logit_diff, ppl["float"],
                                   ppl["quantized"], len(text), BUDGETS[scheme.kind], top1, c.first_divergence))
    return results


def table(results: list[QuantResult]) -> str:
    lines = [f"{'tp':>3}  {'scheme':<16} {'greedy':>7}  {'top-1':>6}  {'mean KL':>9}  {'ppl float':>10}  {'ppl quant':>10}  "
             f"{'increase':>8}  result"]
    for r in results:
        lines.append(f"{r.tp:>3}  {r.scheme:<16} {r.greedy_agreement:>7.1%}  {r.top1_agreement:>6.1%}  {r.kl:>9.3g}  {r.perplexity_float:>10.4g}"
                     f"  {r.perplexity_quantized:>10.4g}  {r.perplexity_increase:>+8.2%}  "
                     f"{'pass' if r.passed else 'FAIL'} (budget {r.budget:.0%})")
    lines.append(f"perplexity on {results[0].tokens_scored:,} tokens of the Python Language Reference "
                 "(pydoc_data/topics.py); greedy: free-running tokens equal to the float model's, position by position "
                 f"(first difference after {', '.join(map(str, results[0].first_divergence))} tokens at tp="
                 f"{results[0].tp}); top-1 and KL: on the float model's own continuation")
    return "\n".join(lines)
