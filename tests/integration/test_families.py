"""Every family through the JSON CLI at TP 1, 2 and 4, against HF transformers on the same (random) weights:
prompt ids equal HF's tokenizer's for prompts of 5 to 300 tokens, greedy tokens equal HF's, and the first token's
log-probability within 1e-3.

The checkpoints come from a seed no other test uses. Each family's variant (tests/helpers.py) exercises what
sets it apart: GQA and tied embeddings (llama), a sliding window shorter than the longest prompt (qwen3, gemma2,
gemma3_text: ring caches, and a 300-token prefill across them), a single KV head replicated at TP 2 and 4
(gemma2), soft-capping (gemma2), per-layer-type rope (gemma3_text), fused qkv/gate_up read as packed shards
with partial rotary and longrope past its original length (phi3).
"""

import json

import pytest

from helpers import FAMILIES, hf_greedy, hf_model, make_checkpoint, prompt_of, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NEW = 8
LENGTHS = (5, 60, 300)


@pytest.fixture(scope="module")
def unseen(tmp_path_factory):
    root = tmp_path_factory.mktemp("unseen")
    return {family: make_checkpoint(root / family, family, seed=1234) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_matches_hf_at_tp_1_2_4(unseen, family):
    import transformers

    path = unseen[family]
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    prompts = [prompt_of(tokenizer, n) for n in LENGTHS]
    expected_ids = [tokenizer(p).input_ids for p in prompts]
    assert len(expected_ids[0]) >= 5 and len(expected_ids[-1]) >= 300
    hf = hf_model(path)
    references = [hf_greedy(hf, ids, NEW) for ids in expected_ids]
    for tp in (1, 2, 4):
        proc = run_cli("generate", "--model", str(path), "--tensor-parallel-size", str(tp), "--dtype", "float32",
                       "--max-new-tokens", str(NEW), "--temperature", "0", "--ignore-eos", "--json", *prompts)
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        assert len(lines) == len(prompts)
        for line, ids, (tokens, first) in zip(lines, expected_ids, references, strict=True):
            assert line["prompt_token_ids"] == ids, (family, tp)
            assert line["token_ids"] == tokens, (family, tp, len(ids))
            # float32 with the same operations in another order (and, at TP > 1, partial sums): rounding-level
            # differences, ~1e-6; 1e-3 catches any real error (a wrong norm, mask or rope moves it by >1e-2).
            assert abs(line["logprobs"][0] - first) < 1e-3, (family, tp, line["logprobs"][0], first)
        assert f"tp={tp}, {family}, 2 layers" in proc.stderr  # the layout block names what ran
