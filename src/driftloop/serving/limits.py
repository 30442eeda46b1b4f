"""Bounds for the serving path: per-client rate limits, uniform overload sampling, bounded buffers and maps,
and coalesced lookups. Plain classes, unit-tested without Ray."""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from typing import Any, Callable, Hashable, Iterable, Sequence


class TokenBuckets:
    """One token bucket per client: a flooding client gets 429s while every other client keeps its rate."""

    def __init__(self, rate: float, burst: float, max_clients: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.max_clients, self.clock = float(rate), float(burst), max_clients, clock
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    def allow(self, client: str, cost: float = 1.0) -> bool:
        """Take COST tokens (one per request by default) for CLIENT; False when its bucket holds fewer (the map
        forgets the least recent clients)."""
        now = self.clock()
        tokens, at = self.buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        ok = tokens >= cost
        self.buckets[client] = (tokens - cost if ok else tokens, now)
        while len(self.buckets) > self.max_clients:
            self.buckets.popitem(last=False)
        return ok


class Reservoir:
    """A uniform sample of at most `capacity` items of all offered since the last drain (Vitter's algorithm R):
    under overload every row of a burst has the same chance to reach the drift windows, not just its head."""

    def __init__(self, capacity: int, rng: random.Random | None = None):
        self.capacity = int(capacity)
        self.rng = rng or random.Random()
        self.items: list[tuple[int, Any]] = []  # (arrival number, item)
        self.seen = 0

    def __len__(self) -> int:
        return len(self.items)

    @property
    def dropped(self) -> int:
        """Items offered since the last drain that are not in the sample."""
        return self.seen - len(self.items)

    def offer(self, items: Sequence[Any]) -> None:
        """Add items; past capacity, each replaces a random kept one with probability capacity / seen."""
        n = len(items)
        if len(self.items) + n <= self.capacity:  # the common case: no overload, no randomness
            self.items.extend(zip(range(self.seen, self.seen + n), items))
            self.seen += n
            return
        for item in items:
            if len(self.items) < self.capacity:
                self.items.append((self.seen, item))
            else:
                j = self.rng.randrange(self.seen + 1)
                if j < self.capacity:
                    self.items[j] = (self.seen, item)
            self.seen += 1

    def drain(self) -> tuple[list[Any], int]:
        """The sample in arrival order and how many items were sampled out; starts a fresh sample."""
        items, dropped = self.items, self.dropped
        self.items, self.seen = [], 0
        items.sort(key=lambda t: t[0])
        return [it for _, it in items], dropped


def trim_oldest(chunks: list, max_rows: int, rows_of: Callable[[Any], int] = len) -> tuple[list, int]:
    """Drop the oldest chunks until at most MAX_ROWS rows remain (the newest chunk is always kept);
    returns the kept chunks and the number of rows dropped."""
    total = sum(rows_of(c) for c in chunks)
    start, dropped = 0, 0
    while total > max_rows and start < len(chunks) - 1:
        n = rows_of(chunks[start])
        total, dropped, start = total - n, dropped + n, start + 1
    return (chunks[start:] if start else chunks), dropped


class BoundedMap(OrderedDict):
    """A dict that forgets its oldest entries past `maxlen`; `on_evict(key, value)` hears about each one."""

    def __init__(self, maxlen: int, on_evict: Callable[[Any, Any], None] | None = None):
        super().__init__()
        self.maxlen, self.on_evict = int(maxlen), on_evict

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        self._trim()

    def put_many(self, items: Iterable[tuple[Any, Any]]) -> None:
        """Set many keys with one trim at the end: the entries kept are those `map[k] = v` for each in turn would keep
        (a key set twice is not evicted in between, so `on_evict` may hear of fewer)."""
        for key, value in items:
            if key in self:
                self.move_to_end(key)
            OrderedDict.__setitem__(self, key, value)
        self._trim()

    def _trim(self) -> None:
        while len(self) > self.maxlen:
            k, v = self.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(k, v)


class Coalescer:
    """Concurrent lookups share one call: `fn(keys) -> {key: value}` runs in a thread for every key waiting,
    so a burst of lookups costs one table scan, not one scan each."""

    def __init__(self, fn: Callable[[list], dict]):
        self.fn = fn
        self.pending: list[tuple[Hashable, asyncio.Future]] = []
        self.task: asyncio.Task | None = None

    async def get(self, key: Hashable) -> Any:
        """The value for KEY (None when absent); raises what the shared call raised."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.pending.append((key, fut))
        if self.task is None or self.task.done():
            self.task = loop.create_task(self._run())
        return await fut

    async def _run(self) -> None:
        while self.pending:
            batch, self.pending = self.pending, []
            try:
                found = await asyncio.to_thread(self.fn, _unique(k for k, _ in batch))
            except Exception as err:
                for _, f in batch:
                    if not f.done():
                        f.set_exception(err)
                continue
            for k, f in batch:
                if not f.done():
                    f.set_result(found.get(k))


def _unique(keys: Iterable[Hashable]) -> list:
    return list(dict.fromkeys(keys))
