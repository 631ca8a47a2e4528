"""AsyncPublisher and its background handle against a real redis-server."""

from __future__ import annotations

import asyncio
import time

import pytest

import fanout
from fanout import AsyncPublisher, RetryPolicy
from procs import RedisServer, free_port
from test_single import history_of


async def test_offsets_history_and_helpers(redis_server: RedisServer) -> None:
    async with AsyncPublisher.from_url(redis_server.url) as p:
        positions = [await p.publish("user:42", {"n": n}, event="notice") for n in range(1, 6)]
        assert [x.offset for x in positions] == [1, 2, 3, 4, 5]
        assert len({x.epoch for x in positions}) == 1
        h = await p.read_history("user:42")
        assert h.envelopes == history_of(redis_server, "user:42")
        assert [e["data"]["n"] for e in h.envelopes] == [1, 2, 3, 4, 5]
        await p.job_progress(3, pct=10)
        done = await p.job_completed(3, status="failed", result="boom")
        assert done.offset == 2
        assert await p.user_event("42", "bye", None) == fanout.Position(6, positions[0].epoch)
        assert [e["data"] for e in history_of(redis_server, "job_progress:3")] == [
            {"status": "running", "pct": 10.0},
            {"status": "failed", "result": "boom"},
        ]


async def test_idempotency_and_noscript(redis_server: RedisServer) -> None:
    async with AsyncPublisher.from_url(redis_server.url) as p:
        a = await p.publish("user:1", 1, idempotency_key="k")
        redis_server.cli("SCRIPT", "FLUSH")
        b = await p.publish("user:1", 1, idempotency_key="k")
        assert (a.offset, a.duplicate, b.offset, b.duplicate) == (1, False, 1, True)
        assert redis_server.cli("XLEN", "fanout:{user:1}:history") == "1"


async def test_unanswered_attempt_is_resent_once(redis_server: RedisServer) -> None:
    p = AsyncPublisher.from_url(redis_server.url, retry=RetryPolicy(attempt_timeout=0.3))
    await p.publish("user:2", 1)
    redis_server.cli("CLIENT", "PAUSE", "1200", "WRITE")
    pos = await p.publish("user:2", 2)
    assert pos.offset == 2
    assert redis_server.cli("XLEN", "fanout:{user:2}:history") == "2"
    await p.close()


async def test_errors(redis_server: RedisServer) -> None:
    port = free_port()
    p = AsyncPublisher.from_url(f"redis://127.0.0.1:{port}", retry=RetryPolicy(deadline=0.8))
    with pytest.raises(fanout.DataNotSerializableError):
        await p.publish("user:1", {1, 2})
    with pytest.raises(fanout.InvalidChannelError):
        await p.publish("user", 1)
    started = time.monotonic()
    with pytest.raises(fanout.GaveUpError, match=f"127.0.0.1:{port}"):
        await p.publish("user:1", 1)
    assert time.monotonic() - started < 2
    await p.close()


async def test_async_background(redis_server: RedisServer) -> None:
    p = AsyncPublisher.from_url(redis_server.url)
    bg = p.background(capacity=5)
    results = [bg.job_progress("9", pct=n) for n in range(8)]  # nothing drained yet
    assert results == [True] * 5 + [False] * 3
    assert bg.publish("user:1", {1}) is False
    assert bg.dropped == 4
    assert await bg.flush(5)
    assert (bg.published, bg.failed, bg.pending) == (5, 0, 0)
    assert [e["data"]["pct"] for e in history_of(redis_server, "job_progress:9")] == [
        0.0,
        1.0,
        2.0,
        3.0,
        4.0,
    ]
    redis_server.kill()
    p.with_retry(RetryPolicy(deadline=0.3))
    for n in range(20):
        bg.job_progress("9", pct=n)
        await asyncio.sleep(0.01)
    assert await bg.flush(10)
    assert bg.published == 5 and bg.failed + bg.dropped - 4 == 20
    assert await bg.close(1)
    assert bg.publish("user:1", 1) is False
    await p.close()


async def test_configuration_errors_fail_fast(redis_server: RedisServer) -> None:
    secured = RedisServer(password="right-pw")
    try:
        for url, match in (
            (f"redis-cluster://127.0.0.1:{redis_server.port}", "Cluster mode is not enabled"),
            (f"redis://:wrong@127.0.0.1:{secured.port}", "invalid username-password pair"),
            (f"redis-cluster://:wrong@127.0.0.1:{secured.port}", "invalid username-password"),
        ):
            p = AsyncPublisher.from_url(url)
            started = time.monotonic()
            with pytest.raises(fanout.PublishError, match=match) as e:
                await p.publish("user:1", 1)
            assert not isinstance(e.value, fanout.GaveUpError), e.value
            assert time.monotonic() - started < 1.5, url
            await p.close()
    finally:
        secured.stop()


async def test_background_close_propagates_the_callers_cancellation() -> None:
    p = AsyncPublisher.from_url("redis://127.0.0.1:1")
    bg = p.background()
    cancelled_run = asyncio.Event()

    async def slow_run(item: object) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled_run.set()
            await asyncio.sleep(0.5)  # a publish that takes a while to stop
            raise

    p._run = slow_run  # type: ignore[method-assign,assignment]
    assert bg.publish("user:1", 1)
    await asyncio.sleep(0.05)
    closing = asyncio.get_running_loop().create_task(bg.close(timeout=0.1))
    await cancelled_run.wait()  # close timed out, cancelled the task and awaits it
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert closing.cancelled()
    assert (bg.failed, bg.pending, bg.published) == (1, 0, 0)
    await p.close()
