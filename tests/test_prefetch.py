"""Activations produced ahead in a background thread: same order, errors surface at their batch,
closing the consumer stops the producer."""

import threading

import pytest
import torch

from saetune.activations import prefetch


def _gen(n, fail_at=None, log=None):
    for i in range(n):
        if i == fail_at:
            raise ValueError(f"batch {i} broke")
        if log is not None:
            log.append(i)
        yield {"h": torch.full((2,), float(i))}


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_same_order_as_the_plain_stream(depth):
    assert [b["h"][0].item() for b in prefetch(_gen(7), depth)] == list(range(7))


def test_a_producer_error_surfaces_at_its_batch():
    got = []
    with pytest.raises(ValueError, match="batch 4 broke"):
        for b in prefetch(_gen(9, fail_at=4), 2):
            got.append(int(b["h"][0]))
    assert got == [0, 1, 2, 3]


def test_breaking_out_stops_the_producer():
    produced = []
    others = set(threading.enumerate())
    it = prefetch(_gen(1000, log=produced), 2)
    for i, _ in enumerate(it):
        if i == 3:
            producers = [t for t in threading.enumerate() if t.name == "saetune-prefetch" and t not in others]
            break
    assert len(producers) == 1 and producers[0].is_alive()
    it.close()
    # close() joins the producer before it returns (its hooks must not outlive the generator): no wait needed
    assert not producers[0].is_alive()
    assert len(produced) <= 3 + 1 + 2 + 1  # consumed + in flight + queue depth (+1 blocked on put)
