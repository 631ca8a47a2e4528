"""Redis Cluster (3 primaries + 3 replicas): sharded pub/sub, and the must-show test:
1000 progress events through a CLUSTER FAILOVER of the channel's shard, each received
exactly once and in order by a WebSocket client of a real edge."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from fanout import AsyncPublisher, Position, Publisher, tokens
from procs import JWT_SECRET, Edge, RedisCluster, RetryCounter, WsClient


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    c = RedisCluster(3, 1)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def cluster_edge(cluster: RedisCluster) -> Iterator[Edge]:
    e = Edge(cluster.url)
    yield e
    e.stop()


async def test_publish_through_redis_cluster_url(cluster: RedisCluster, cluster_edge: Edge) -> None:
    c = await WsClient.connect(cluster_edge, tokens.connection_token(JWT_SECRET, user="61"))
    assert (await c.subscribe("user:61"))["type"] == "subscribed"
    with Publisher.from_url(cluster.url) as p:
        assert p.sharded
        sent = [p.publish("user:61", {"n": n}, "e") for n in range(1, 4)]
    ap = AsyncPublisher.from_url(cluster.url)
    assert ap.sharded
    sent.append(await ap.publish("user:61", {"n": 4}, "e", idempotency_key="same"))
    dup = await ap.publish("user:61", {"n": 4}, "e", idempotency_key="same")
    assert dup.duplicate and dup.offset == 4
    await ap.close()
    got = await c.messages("user:61", 4)
    assert [(m["offset"], m["epoch"], m["data"]["n"]) for m in got] == [
        (s.offset, s.epoch, n) for n, s in enumerate(sent, 1)
    ]
    # All keys of the channel are in its slot, on its owner.
    owner = cluster.nodes[cluster.owner_of_slot(cluster.keyslot("user:61"))]
    assert owner.cli("XLEN", "fanout:{user:61}:history") == "4"
    assert owner.cli("EXISTS", "fanout:{user:61}:meta", "fanout:{user:61}:dedup") == "2"
    await c.close()


def test_caller_options_that_the_url_also_sets(cluster: RedisCluster) -> None:
    # username/password/ssl come from the URL too: the caller's replace them (this raised
    # "got multiple values for keyword argument" before).
    with Publisher.from_url(cluster.url, username=None, password=None, ssl=False) as p:
        assert p.publish("user:62", 1).offset == 1
        kw = p.client().nodes_manager.connection_kwargs
        assert (kw["password"], kw["socket_timeout"]) == (None, 2.0)


async def test_1000_progress_events_through_a_cluster_failover_exactly_once(
    cluster: RedisCluster, cluster_edge: Edge
) -> None:
    total = 1000
    job = uuid.uuid4().hex[:8]
    channel = f"job_progress:{job}"
    slot = cluster.keyslot(channel)
    old_owner = cluster.owner_of_slot(slot)

    c = await WsClient.connect(
        cluster_edge, tokens.connection_token(JWT_SECRET, user="62", channels=["job_progress:*"])
    )
    sub = await c.subscribe(channel)
    assert (sub["type"], sub["offset"]) == ("subscribed", 0), sub

    publisher = Publisher.from_url(cluster.url).with_history(
        "job_progress", size=2000, ttl=600, finished_ttl=600
    )
    acks: list[tuple[int, Position, float]] = []
    failover: dict[str, Any] = {}

    def do_failover() -> None:
        started = time.monotonic()
        failover["new"] = cluster.failover(old_owner)
        failover["secs"] = time.monotonic() - started

    def worker() -> None:
        t = None
        for n in range(1, total + 1):
            if n == total // 3:
                t = threading.Thread(target=do_failover)
                t.start()
            began = time.monotonic()
            pos = publisher.job_progress(job, pct=n / 10, n=n)
            acks.append((n, pos, time.monotonic() - began))
            time.sleep(0.003)
        assert t is not None
        t.join()

    received: list[dict[str, Any]] = []
    resets: list[dict[str, Any]] = []

    async def reader() -> None:
        while not received or received[-1]["data"]["n"] < total:
            f = await c.recv(timeout=30)
            if f["type"] == "message" and f["channel"] == channel:
                received.append(f)
            elif f["type"] == "subscribed":  # an unsolicited position reset
                resets.append(f)

    read = asyncio.create_task(reader())
    with RetryCounter() as retries:
        await asyncio.to_thread(worker)
    await asyncio.wait_for(read, 60)
    await c.close()
    publisher.close()

    numbers = [m["data"]["n"] for m in received]
    offsets = [m["offset"] for m in received]
    lost = sorted(set(range(1, total + 1)) - set(numbers))
    duplicates = len(numbers) - len(set(numbers))
    slowest = max(a[2] for a in acks)
    print(
        f"\ncluster failover: published {len(acks)}, received {len(received)}, lost {len(lost)}, "
        f"duplicates {duplicates}, resets {len(resets)}; failover {old_owner} -> "
        f"{failover.get('new')} took {failover.get('secs', 0):.2f} s; slowest publish "
        f"{slowest * 1000:.0f} ms; resends {retries.count} {sorted(set(retries.errors))[:3]}"
    )
    assert failover["new"] != old_owner
    assert cluster.owner_of_slot(slot) == failover["new"], "the channel's shard failed over"
    assert len(acks) == total and not any(a[1].duplicate for a in acks)
    assert [a[1].offset for a in acks] == list(range(1, total + 1))
    assert len({a[1].epoch for a in acks} | {sub["epoch"]}) == 1
    assert lost == [], f"lost: {lost[:20]}"
    assert duplicates == 0
    assert numbers == list(range(1, total + 1)), "each once, in order"
    assert all(b > a for a, b in itertools.pairwise(offsets)), "strictly increasing"
    assert offsets == list(range(1, total + 1))
    assert resets == []
    new_primary = cluster.nodes[failover["new"]]
    assert new_primary.cli("XLEN", f"fanout:{{{channel}}}:history") == str(total)
