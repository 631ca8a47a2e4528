"""Redis Sentinel: publishes go on through a SENTINEL FAILOVER, each applied once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fanout import AsyncPublisher, Position, Publisher
from procs import RedisSentinel, RetryCounter


@pytest.fixture(scope="module")
def sentinel() -> Iterator[RedisSentinel]:
    s = RedisSentinel()
    yield s
    s.stop()


async def test_async_publish_through_sentinel(sentinel: RedisSentinel) -> None:
    async with AsyncPublisher.from_url(sentinel.url) as p:
        a = await p.publish("user:81", {"n": 1})
        b = await p.publish("user:81", {"n": 2})
        assert (a.offset, b.offset, a.epoch) == (1, 2, b.epoch)


def test_publishes_through_a_sentinel_failover_exactly_once(sentinel: RedisSentinel) -> None:
    channel = "room:sentinel"
    p = Publisher.from_url(sentinel.url).with_history("room", size=10_000, ttl=600)
    before = sentinel.primary_port()
    acks: list[tuple[int, Position, float]] = []
    failover: dict[str, Any] = {}

    def do_failover() -> None:
        started = time.monotonic()
        failover["new"] = sentinel.failover()
        failover["secs"] = time.monotonic() - started

    t = threading.Thread(target=do_failover)
    retries = RetryCounter().__enter__()
    n = 0
    while n < 300 or "new" not in failover or n < failover.get("at", 0) + 100:
        n += 1
        if n == 100:
            t.start()
        if "new" in failover and "at" not in failover:
            failover["at"] = n
        began = time.monotonic()
        acks.append((n, p.publish(channel, {"n": n}), time.monotonic() - began))
        time.sleep(0.005)
        assert n < 5000, "the failover did not finish"
    t.join()
    retries.__exit__()

    history = p.read_history(channel)  # through the sentinel: the new primary
    p.close()
    numbers = [e["data"]["n"] for e in history.envelopes]
    lost = sorted(set(range(1, n + 1)) - set(numbers))
    duplicates = len(numbers) - len(set(numbers))
    print(
        f"\nsentinel failover: published {n}, in history {len(numbers)}, lost {len(lost)}, "
        f"duplicates {duplicates}; failover {before} -> {failover['new']} took "
        f"{failover['secs']:.2f} s (at publish {failover['at']}); slowest publish "
        f"{max(a[2] for a in acks) * 1000:.0f} ms; resends {retries.count} "
        f"{sorted(set(retries.errors))[:3]}"
    )
    assert failover["new"] != before
    assert [a[1].offset for a in acks] == list(range(1, n + 1))
    assert not any(a[1].duplicate for a in acks)
    assert lost == [] and duplicates == 0
    assert numbers == list(range(1, n + 1))
    assert [e["offset"] for e in history.envelopes] == list(range(1, n + 1))
    assert history.offset == n
