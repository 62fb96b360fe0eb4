"""Control messages' wire form: what a worker parses is what rank 0 sent."""

import json

import pytest

from tpinfer.engine import messages


def _through_the_wire(message: messages.Message) -> messages.Message:
    return messages.decode(json.loads(json.dumps(messages.encode(message))))


def test_embed_message_carries_every_sequence_whole():
    sequences = [[101, 7592, 2088, 102], [101, 102], [0, 30521, 2**31 - 1], [5]]
    received = _through_the_wire(messages.Embed.of(sequences))
    assert received.lengths == [4, 2, 3, 1]
    assert received.ids.dtype.is_floating_point is False and received.ids.dtype.itemsize == 8
    split = received.ids.split(received.lengths)
    assert [part.tolist() for part in split] == sequences


def test_embed_message_without_sequences():
    received = _through_the_wire(messages.Embed.of([]))
    assert received.lengths == [] and received.ids.numel() == 0


@pytest.mark.parametrize("lengths", [[4, 2, 3], [4, 2, 3, 2], [4, 2, 0, 1]])
def test_embed_message_refuses_lengths_that_do_not_cover_its_ids(lengths):
    raw = messages.encode(messages.Embed.of([[1, 2, 3, 4], [5, 6], [7, 8, 9], [10]]))
    raw["lengths"] = lengths
    with pytest.raises(RuntimeError, match="embed message with 10 ids"):
        messages.decode(raw)
