"""The sync background handle: bounded, never raises, flush delivers what was queued."""

from __future__ import annotations

import threading
import time

import fanout
from fanout import Publisher, RetryPolicy
from procs import RedisServer
from test_single import history_of


def test_bounded_queue_drops_and_counts(redis_server: RedisServer) -> None:
    with Publisher.from_url(redis_server.url) as p:
        gate = threading.Event()
        real_run = p._run

        def slow_run(item: object) -> fanout.Position:
            gate.wait(10)
            return real_run(item)  # type: ignore[arg-type]

        p._run = slow_run  # type: ignore[method-assign]
        bg = p.background(capacity=10)
        results = [bg.job_progress("5", pct=n, message=f"step {n}") for n in range(30)]
        # One item may already be taken by the worker: 10 or 11 queued.
        assert results[:10] == [True] * 10 and results[12:] == [False] * 18
        queued = results.count(True)
        assert bg.dropped == 30 - queued
        assert bg.publish("user:1", object()) is False  # not JSON: dropped, no raise
        assert bg.publish("bad channel", 1) is False
        assert bg.dropped == 32 - queued
        assert not bg.flush(0.05)
        gate.set()
        assert bg.flush(10)
        assert (bg.published, bg.failed, bg.pending) == (queued, 0, 0)
        envs = history_of(redis_server, "job_progress:5")
        assert [e["data"]["message"] for e in envs] == [f"step {n}" for n in range(queued)]
        assert [e["offset"] for e in envs] == list(range(1, queued + 1))
        assert bg.close()


def test_flush_delivers_everything_in_order(redis_server: RedisServer) -> None:
    with Publisher.from_url(redis_server.url) as p, p.background(capacity=1000) as bg:
        for n in range(500):
            assert bg.publish("user:7", {"n": n}, "tick")
        bg.user_event(7, "done", {})
        assert bg.job_completed("5", "cancelled", None)
        assert bg.flush(20)
        assert bg.published == 502
    envs = history_of(redis_server, "user:7")
    assert len(envs) == 100  # default history size
    assert [e["offset"] for e in envs] == list(range(402, 502))
    assert envs[-1]["event"] == "done"


def test_redis_down_never_fails_the_job_loop(redis_server: RedisServer) -> None:
    p = Publisher.from_url(redis_server.url, retry=RetryPolicy(deadline=0.3))
    bg = p.background(capacity=3)
    assert bg.publish("user:1", 1) and bg.flush(5) and bg.published == 1
    redis_server.kill()
    started = time.monotonic()
    outcomes = []
    for n in range(50):  # a job loop: never blocks, never raises
        outcomes.append(bg.job_progress("1", pct=n))
        time.sleep(0.01)
    assert time.monotonic() - started < 2
    assert outcomes.count(False) > 0
    assert bg.flush(10)
    assert bg.published == 1
    assert bg.failed == outcomes.count(True) and bg.dropped == outcomes.count(False)
    assert bg.close(1)
    assert bg.publish("user:1", 1) is False
    p.close()
