"""`tpinfer verify`'s comparison: what passes, what fails, and why (pure, on made-up logits)."""

import torch

from tpinfer.verify import Run, compare


def _run(tokens, rows):
    return Run([tokens], [torch.tensor(rows, dtype=torch.float32)])


REFERENCE = _run([0, 1, 2], [[5.0, 1.0, 0.0], [0.0, 3.0, 2.9995], [0.0, 0.0, 4.0]])


def test_identical_runs_pass_with_zero_differences():
    c = compare(REFERENCE, REFERENCE, "float32")
    assert (c.greedy_agreement, c.max_logit_diff, c.kl, c.passed, c.divergences) == (1.0, 0.0, 0.0, True, 0)


def test_parting_at_a_near_tie_passes_and_is_counted():
    # At the second position the reference's tokens 1 and 2 are 5e-4 apart: rounding may pick either.
    other = _run([0, 2, 2], [[5.0, 1.0, 0.0], [0.0, 3.0001, 2.9996], [0.0, 0.0, 4.0]])
    c = compare(other, REFERENCE, "float32")
    assert c.greedy_agreement == 2 / 3 and (c.divergences, c.ties) == (1, 1) and c.passed


def test_parting_without_a_tie_or_logits_too_far_fail():
    decided = _run([1, 1, 2], REFERENCE.logits[0].tolist())  # token 0 led by 4 logits, yet 1 was chosen
    assert not compare(decided, REFERENCE, "float32").passed
    shifted = _run([0, 1, 2], (REFERENCE.logits[0] + torch.tensor([0.0, 0.01, 0.0])).tolist())
    c = compare(shifted, REFERENCE, "float32")
    assert c.greedy_agreement == 1.0 and c.max_logit_diff > 2e-3 and not c.passed
    assert compare(shifted, REFERENCE, "bfloat16").passed  # a bfloat16 rounding step is that large
