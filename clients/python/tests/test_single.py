"""Sync publisher against one real redis-server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import fanout
from fanout import Publisher, RetryPolicy
from procs import RedisServer, free_port


def history_of(r: RedisServer, channel: str) -> list[dict[str, Any]]:
    """XRANGE per the documented layout: entry id <offset>-0, field e."""
    client = redis.Redis(port=r.port)
    out = []
    for entry_id, fields in client.xrange(f"fanout:{{{channel}}}:history"):
        env = json.loads(fields[b"e"])
        assert entry_id.decode() == f"{env['offset']}-0"
        out.append(env)
    client.close()
    return out


def test_offsets_epoch_and_history(redis_server: RedisServer) -> None:
    with Publisher.from_url(redis_server.url) as p:
        assert not p.sharded
        sent = [{"n": n, "text": f"héllo {n}"} for n in range(1, 8)]
        positions = [p.publish("user:42", d, event="notice") for d in sent]
        assert [x.offset for x in positions] == list(range(1, 8))
        assert len({x.epoch for x in positions}) == 1
        assert not any(x.duplicate for x in positions)
        epoch = positions[0].epoch
        assert len(epoch) == 12 and epoch.isalnum()

        envs = history_of(redis_server, "user:42")
        assert [e["data"] for e in envs] == sent
        assert [(e["offset"], e["epoch"], e["event"], e["fanout"]) for e in envs] == [
            (n, epoch, "notice", 1) for n in range(1, 8)
        ]
        assert all(abs(e["ts"] - time.time() * 1000) < 60_000 for e in envs)
        # The same through the project's history.lua.
        h = p.read_history("user:42", after=3)
        assert (h.epoch, h.offset) == (epoch, 7)
        assert h.envelopes == envs[3:]
        # A channel with no history: a pure read starts nothing.
        assert p.read_history("user:none") == fanout.History("", 0, [])
        assert redis_server.cli("EXISTS", "fanout:{user:none}:meta") == "0"


def test_history_policy_and_job_helpers(redis_server: RedisServer) -> None:
    with Publisher.from_url(redis_server.url).with_history("chat", size=3, ttl=50) as p:
        for n in range(5):
            p.publish("chat:a", n)
        assert [e["data"] for e in history_of(redis_server, "chat:a")] == [2, 3, 4]
        assert 0 < int(redis_server.cli("TTL", "fanout:{chat:a}:meta")) <= 50

        p.job_progress("7", pct=40, message="rows", stage="enrich")
        ttl_running = int(redis_server.cli("TTL", "fanout:{job_progress:7}:history"))
        assert ttl_running > 3600  # job_progress: 24 h
        p.job_completed("7", status="succeeded", result={"rows": 12})
        ttl_done = int(redis_server.cli("TTL", "fanout:{job_progress:7}:history"))
        assert 0 < ttl_done <= 3600  # finished_ttl: 1 h
        p.user_event(42, "export_ready", {"url": "/x"})
        envs = history_of(redis_server, "job_progress:7")
        assert [(e["event"], e["data"]) for e in envs] == [
            ("progress", {"status": "running", "pct": 40.0, "message": "rows", "stage": "enrich"}),
            ("completed", {"status": "succeeded", "result": {"rows": 12}}),
        ]
        assert [(e["event"], e["data"]) for e in history_of(redis_server, "user:42")] == [
            ("export_ready", {"url": "/x"})
        ]


def test_same_idempotency_key_is_applied_once(redis_server: RedisServer) -> None:
    with Publisher.from_url(redis_server.url) as p:
        first = p.publish("user:1", {"a": 1}, idempotency_key="order-17")
        again = p.publish("user:1", {"a": 1}, idempotency_key="order-17")
        assert (first.offset, first.duplicate) == (1, False)
        assert (again.offset, again.epoch, again.duplicate) == (1, first.epoch, True)
        other = p.publish("user:1", {"a": 2})
        assert (other.offset, other.duplicate) == (2, False)
        assert [e["data"] for e in history_of(redis_server, "user:1")] == [{"a": 1}, {"a": 2}]


class LoseFirstReply:
    """Wraps a redis client: the first publish that Redis applies has its reply 'lost'
    (a ConnectionError, as when the connection drops before the answer)."""

    def __init__(self, inner: redis.Redis) -> None:
        self.inner = inner
        self.lost = False
        self.keys: list[str] = []

    def _after(self, reply: Any) -> Any:
        if not self.lost:
            self.lost = True
            raise redis.exceptions.ConnectionError("Connection closed by server.")
        return reply

    def evalsha(self, sha: str, numkeys: int, *rest: Any) -> Any:
        self.keys.append(rest[numkeys + 7])
        return self._after(self.inner.evalsha(sha, numkeys, *rest))

    def eval(self, script: bytes, numkeys: int, *rest: Any) -> Any:
        return self._after(self.inner.eval(script, numkeys, *rest))

    def close(self) -> None:
        self.inner.close()


def test_a_resend_after_a_lost_reply_is_applied_once(redis_server: RedisServer) -> None:
    fake = LoseFirstReply(redis.Redis(port=redis_server.port))
    p = Publisher.from_client(fake)  # type: ignore[arg-type]
    pos = p.publish("user:5", {"n": 1})
    assert len(fake.keys) == 2 and fake.keys[0] == fake.keys[1] and len(fake.keys[0]) == 32
    assert (pos.offset, pos.duplicate) == (1, True)  # the first attempt's publish
    assert redis_server.cli("XLEN", "fanout:{user:5}:history") == "1"
    assert p.publish("user:5", {"n": 2}).offset == 2
    p.close()


def test_a_resend_after_an_unanswered_attempt_is_delivered_once(redis_server: RedisServer) -> None:
    client = redis.Redis(port=redis_server.port)
    pubsub = client.pubsub()
    pubsub.subscribe("user:2")
    pubsub.get_message(timeout=1)
    p = Publisher.from_url(redis_server.url, retry=RetryPolicy(attempt_timeout=0.3))
    p.publish("user:2", {"n": 1})  # loads the script
    # Redis holds every write for 1.5 s: the first attempt goes unanswered within 0.3 s
    # and is resent under the same key.
    redis_server.cli("CLIENT", "PAUSE", "1500", "WRITE")
    started = time.monotonic()
    pos = p.publish("user:2", {"n": 2})
    assert time.monotonic() - started >= 1.3
    assert pos.offset == 2
    got = []
    while (m := pubsub.get_message(timeout=0.5)) is not None:
        got.append(json.loads(m["data"])["data"]["n"])
    assert got == [1, 2], "the resent publish went out once"
    assert redis_server.cli("XLEN", "fanout:{user:2}:history") == "2"
    p.close()
    client.close()


def test_noscript_falls_back_to_eval(redis_server: RedisServer) -> None:
    with Publisher.from_url(redis_server.url) as p:
        assert p.publish("user:3", 1).offset == 1
        redis_server.cli("SCRIPT", "FLUSH")  # as on a new primary after a failover
        assert p.publish("user:3", 2).offset == 2


def test_publishes_go_through_a_redis_restart(redis_server: RedisServer) -> None:
    with Publisher.from_url(redis_server.url) as p:
        first = p.publish("user:9", 1)
        redis_server.kill()
        threading.Timer(1.0, redis_server.start).start()
        started = time.monotonic()
        after = p.publish("user:9", 2)  # retried until Redis is back
        assert 0.8 < time.monotonic() - started < 9
        # No persistence: the history is gone, a new epoch starts at 1.
        assert after.offset == 1 and after.epoch != first.epoch


def test_unreachable_server_fails_fast_and_names_it() -> None:
    port = free_port()
    p = Publisher.from_url(f"redis://127.0.0.1:{port}", retry=RetryPolicy(deadline=1.0))
    started = time.monotonic()
    with pytest.raises(fanout.GaveUpError) as e:
        p.publish("user:1", {"a": 1}, idempotency_key="k-1")
    elapsed = time.monotonic() - started
    assert 0.5 < elapsed < 2.5, elapsed
    msg = str(e.value)
    assert msg.startswith(f"publish to user:1 not acknowledged by Redis at 127.0.0.1:{port} after ")
    assert f"127.0.0.1:{port}" in msg and "Connection refused" in msg
    assert "idempotency_key='k-1'" in msg
    assert e.value.attempts > 1 and e.value.idempotency_key == "k-1"
    assert isinstance(e.value, fanout.PublishError)


def test_default_deadline_is_ten_seconds_not_a_hang() -> None:
    p = Publisher.from_url(f"redis://127.0.0.1:{free_port()}")
    assert p.retry_policy == RetryPolicy(10.0, 2.0, 0.02, 1.0)


def test_a_script_error_is_not_retried(redis_server: RedisServer) -> None:
    redis_server.cli("SET", "fanout:{user:8}:meta", "not a hash")
    with Publisher.from_url(redis_server.url) as p:
        started = time.monotonic()
        with pytest.raises(fanout.PublishError, match="WRONGTYPE") as e:
            p.publish("user:8", 1)
        assert not isinstance(e.value, fanout.GaveUpError)
        assert time.monotonic() - started < 1


def test_closed_publisher() -> None:
    p = Publisher.from_url("redis://127.0.0.1:1")
    p.close()
    with pytest.raises(fanout.FanoutError, match="closed"):
        p.publish("user:1", 1)


# ----- configuration errors fail at once (not retried until the deadline) -----


@pytest.fixture
def password_server() -> Iterator[RedisServer]:
    r = RedisServer(password="right-pw")
    yield r
    r.stop()


def _fails_fast(p: Publisher, match: str) -> fanout.PublishError:
    started = time.monotonic()
    with pytest.raises(fanout.PublishError, match=match) as e:
        p.publish("user:1", {"a": 1})
    elapsed = time.monotonic() - started
    p.close()
    assert not isinstance(e.value, fanout.GaveUpError), e.value
    assert elapsed < 1.5, f"{elapsed:.1f} s: retried instead of failing at once"
    return e.value


def test_a_cluster_url_at_a_plain_server_fails_fast(redis_server: RedisServer) -> None:
    url = f"redis-cluster://127.0.0.1:{redis_server.port}"
    e = _fails_fast(Publisher.from_url(url), "Cluster mode is not enabled")
    assert f"127.0.0.1:{redis_server.port}" in str(e) and "redis://" in str(e)


def test_a_wrong_password_fails_fast(password_server: RedisServer) -> None:
    port = password_server.port
    for url in (f"redis://:wrong@127.0.0.1:{port}", f"redis-cluster://:wrong@127.0.0.1:{port}"):
        e = _fails_fast(Publisher.from_url(url), "invalid username-password pair")
        assert "check the user and password" in str(e)
    # No password: the server refuses the first command (EVALSHA) unauthenticated.
    e = _fails_fast(Publisher.from_url(f"redis://127.0.0.1:{port}"), "unauthenticated|NOAUTH")
    assert "check the user and password" in str(e)


def test_caller_password_overrides_the_urls(password_server: RedisServer) -> None:
    url = f"redis://:wrong@127.0.0.1:{password_server.port}"
    with Publisher.from_url(url, password="right-pw") as p:
        assert p.publish("user:1", 1).offset == 1


def test_from_client_without_socket_timeout_warns(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="fanout"):
        Publisher.from_client(redis.Redis(port=redis_server.port, socket_timeout=1)).close()
        assert not caplog.records
        p = Publisher.from_client(redis.Redis(port=redis_server.port))
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "no socket_timeout" in caplog.records[0].getMessage()
    assert p.publish("user:1", 1).offset == 1  # a warning, not a refusal
    p.close()
