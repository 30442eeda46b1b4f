"""Bounds of the serving path, without Ray: rate limits, overload sampling, bounded buffers and maps, lookups."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from driftloop.serving.limits import BoundedMap, Coalescer, Reservoir, TokenBuckets, trim_oldest


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_token_buckets_limit_each_client_on_its_own():
    clock = Clock()
    tb = TokenBuckets(rate=10, burst=20, clock=clock)
    assert sum(tb.allow("flood") for _ in range(100)) == 20  # the burst, then nothing
    assert tb.allow("other")  # another client is untouched
    clock.t += 0.5
    assert sum(tb.allow("flood") for _ in range(100)) == 5  # refilled at 10/s
    clock.t += 100
    assert sum(tb.allow("flood") for _ in range(100)) == 20  # never more than the burst


def test_token_buckets_remember_a_bounded_number_of_clients():
    tb = TokenBuckets(rate=1, burst=1, max_clients=100, clock=Clock())
    for i in range(10_000):
        tb.allow(f"10.0.{i // 256}.{i % 256}")
    assert len(tb.buckets) == 100


def test_reservoir_keeps_everything_below_capacity_in_order():
    r = Reservoir(10)
    r.offer([1, 2, 3])
    r.offer([4])
    assert r.drain() == ([1, 2, 3, 4], 0)
    assert len(r) == 0 and r.drain() == ([], 0)


def test_reservoir_samples_a_burst_uniformly_and_counts_the_rest():
    """Defect 5: the old hand-off kept the head of a burst and dropped its tail; every row must have the same chance."""
    r = Reservoir(1_000, random.Random(0))
    for start in range(0, 100_000, 100):  # requests of 100 rows
        r.offer(list(range(start, start + 100)))
    kept, dropped = r.drain()
    assert len(kept) == 1_000 and dropped == 99_000 and kept == sorted(kept)
    tenths = np.bincount(np.asarray(kept) // 10_000, minlength=10)
    assert tenths.min() >= 60 and tenths.max() <= 140, tenths  # ~100 from each tenth of the burst
    assert 40_000 < np.mean(kept) < 60_000


def test_trim_oldest_keeps_the_newest_rows_and_counts_the_dropped():
    chunks = [[0] * 10, [1] * 10, [2] * 10, [3] * 5]
    kept, dropped = trim_oldest(chunks, 20)
    assert kept == [[2] * 10, [3] * 5] and dropped == 20
    assert trim_oldest(chunks, 100) == (chunks, 0)
    assert trim_oldest([[9] * 50], 10) == ([[9] * 50], 0)  # the newest chunk is always kept


def test_bounded_map_forgets_the_oldest_and_tells():
    evicted = []
    m = BoundedMap(3, on_evict=lambda k, v: evicted.append((k, v)))
    for i in range(5):
        m[f"k{i}"] = i
    assert list(m) == ["k2", "k3", "k4"] and evicted == [("k0", 0), ("k1", 1)]
    assert m.get("k0") is None and m["k4"] == 4


def test_bounded_map_put_many_is_setting_each_in_turn():
    items = [("a", 1), ("b", 2), ("a", 3), ("c", 4), ("d", 5), ("b", 6)]
    one, many, ev_one, ev_many = BoundedMap(3), BoundedMap(3), [], []
    one.on_evict, many.on_evict = (lambda k, v: ev_one.append((k, v))), (lambda k, v: ev_many.append((k, v)))
    one["z"] = many["z"] = 0
    for k, v in items:
        one[k] = v
    many.put_many(items)
    assert list(many.items()) == list(one.items()) == [("c", 4), ("d", 5), ("b", 6)]
    # one trim at the end: the same keys go, oldest first (a key set again moved to the newest end)
    assert sorted(ev_many) == [("a", 3), ("z", 0)] and len(ev_one) == 3


def test_coalescer_serves_concurrent_lookups_with_one_call():
    calls = []

    def lookup(keys):
        calls.append(list(keys))
        return {k: k * 10 for k in keys if k % 2 == 0}

    async def main():
        c = Coalescer(lookup)
        first = await c.get(0)  # alone: one call
        many = await asyncio.gather(*(c.get(k) for k in [1, 2, 3, 4, 4]))
        return first, many

    first, many = asyncio.run(main())
    assert first == 0 and many == [None, 20, None, 40, 40]
    assert len(calls) == 2 and calls[1] == [1, 2, 3, 4]  # every waiting key in one call, each once


def test_coalescer_fails_every_waiter_when_the_lookup_fails():
    def broken(keys):
        raise OSError("storage down")

    async def main():
        c = Coalescer(broken)
        return await asyncio.gather(c.get(1), c.get(2), return_exceptions=True)

    assert all(isinstance(e, OSError) for e in asyncio.run(main()))


@pytest.mark.parametrize("capacity", [1, 7])
def test_reservoir_never_holds_more_than_capacity(capacity):
    r = Reservoir(capacity, random.Random(1))
    for n in [3, 0, 50, 1]:
        r.offer(list(range(n)))
        assert len(r) <= capacity
    kept, dropped = r.drain()
    assert len(kept) + dropped == 54
