"""Control messages (``Communicator.broadcast_json``): rank 0's JSON reaches every rank whole, in one broadcast up to
CONTROL_BYTES and in two past it, at and around the boundary, unicode included."""

import json

import pytest

from helpers import run_ranks
from tpinfer.parallel.comm import CONTROL_BYTES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _sized(length: int) -> dict:
    """A message whose JSON is exactly ``length`` bytes."""
    message = {"k": ""}
    message["k"] = "x" * (length - len(json.dumps(message).encode()))
    assert len(json.dumps(message).encode()) == length
    return message


MESSAGES = [{}, {"op": "embed", "sequences": [[101, 7592, 102], []]}, {"text": "é 東京 🙂 \n\"quoted\""},
            *(_sized(CONTROL_BYTES - 8 + d) for d in (-1, 0, 1)),  # the head holds the length (8 bytes) and the rest
            {"ids": list(range(20_000)), "tail": "end"}]  # several times the head


def _on_rank(ctx) -> list:  # noqa: ANN001
    return [ctx.control.broadcast_json(message if ctx.rank == 0 else None) for message in MESSAGES]


@pytest.mark.parametrize("world", [2, 3])
def test_control_messages_arrive_whole(world):
    for got in run_ranks(world, _on_rank):
        assert got == MESSAGES
