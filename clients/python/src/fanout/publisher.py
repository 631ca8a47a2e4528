"""The blocking publisher and its non-blocking background handle."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis
import redis.cluster
import redis.exceptions as rx
import redis.sentinel

from . import _core
from ._core import Position
from ._errors import FanoutError, PublishError

log = logging.getLogger("fanout")


@dataclass(frozen=True)
class History:
    """A channel's position and kept envelopes, read atomically by history.lua."""

    #: "" when the channel has no position (nothing published, or history expired).
    epoch: str
    #: The last offset given out.
    offset: int
    #: The envelopes (``{"offset","epoch","fanout","ts","event"?,"data"}``), oldest first.
    envelopes: list[dict[str, Any]]


def _parse_history(reply: object) -> History:
    if not isinstance(reply, list) or len(reply) != 3:
        raise PublishError(f"unexpected reply from the history script: {reply!r}")
    epoch, top, entries = reply
    return History(
        epoch=epoch.decode() if isinstance(epoch, bytes) else str(epoch),
        offset=int(top),
        envelopes=[json.loads(e) for e in entries],
    )


def _socket_timeout(client: object) -> tuple[bool, float | None]:
    """(whether it could be read, the client's socket_timeout): a Redis client's pool or a
    RedisCluster's nodes manager keeps the options every connection is made with."""
    for owner in ("connection_pool", "nodes_manager"):
        kwargs = getattr(getattr(client, owner, None), "connection_kwargs", None)
        if isinstance(kwargs, dict):
            timeout = kwargs.get("socket_timeout")
            return True, None if timeout is None else float(timeout)
    return False, None


class Publisher(_core.PublisherBase, _core.Closing):
    """Publishes fanout envelopes to Redis, each exactly once through failovers.

    Every publish runs crates/fanout-protocol/src/publish.lua under one idempotency key
    (32 hex digits, or the caller's), resent with the same key after a transient failure
    (connection refused or lost, timeout, MOVED/ASK/TRYAGAIN/CLUSTERDOWN/LOADING/
    MASTERDOWN/READONLY/BUSY) with backoff until the retry deadline: applied at most once.
    Thread-safe; one per process is enough.
    """

    _redis_lib = redis

    def __init__(self, client_factory: Any, *, where: str, settings: _core.Settings) -> None:
        super().__init__(client_factory, where=where, settings=settings)
        self._lock = threading.Lock()

    @classmethod
    def from_client(
        cls, client: redis.Redis | redis.cluster.RedisCluster, **policies: Any
    ) -> Publisher:
        """Wraps an existing redis-py client (cluster clients publish with SPUBLISH).

        The client must have a ``socket_timeout`` (e.g. the retry policy's
        ``attempt_timeout``, 2 s by default): redis-py's blocking client has no per-call
        timeout, so without one an attempt to a Redis that stopped answering blocks
        indefinitely, past the retry deadline. (``from_url`` sets it; a warning is logged
        when the client has none.)"""
        sharded = isinstance(client, redis.cluster.RedisCluster)
        settings = _core.make_settings(sharded, **policies)
        known, timeout = _socket_timeout(client)
        if known and timeout is None:
            log.warning(
                "Publisher.from_client: the redis client has no socket_timeout, so a publish "
                "to a Redis that stops answering can block past the retry deadline (%g s); "
                "create the client with socket_timeout=%g (the attempt timeout)",
                settings.retry.deadline,
                settings.retry.attempt_timeout,
            )
        return cls(lambda: client, where=repr(client), settings=settings)

    def client(self) -> Any:
        """The redis-py client (made on first use)."""
        with self._lock:
            self._check_open()
            if self._client is None:
                self._client = self._factory()
            return self._client

    # ----- publishing -----

    def publish(
        self,
        channel: str,
        data: Any,
        event: str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> Position:
        """Publishes ``data`` (anything ``json.dumps`` takes) as ``event`` on ``channel``.

        Raises InvalidChannelError, InvalidIdempotencyKeyError or
        DataNotSerializableError before anything is sent; GaveUpError when Redis did not
        acknowledge within the retry deadline; PublishError for a non-transient error.
        """
        prepared = self._settings.prepare(channel, data, event, idempotency_key)
        return self._run(prepared)

    def job_progress(
        self,
        job_id: object,
        pct: float | None = None,
        message: str | None = None,
        **extra: Any,
    ) -> Position:
        """``{"status":"running","pct":…,"message":…}`` (plus ``extra``) as event
        ``progress`` on ``job_progress:<job_id>``."""
        return self.publish(*_core.progress_message(job_id, pct, message, extra))

    def job_completed(
        self, job_id: object, status: _core.JobStatus = "succeeded", result: Any = None
    ) -> Position:
        """``{"status":…,"result":…}`` as event ``completed`` on ``job_progress:<job_id>``;
        the status (succeeded, failed, cancelled) ends the job for its subscribers."""
        return self.publish(*_core.completion_message(job_id, status, result))

    def user_event(self, user: object, event: str, data: Any) -> Position:
        """``data`` as ``event`` on ``user:<user>``."""
        return self.publish(_core.user_channel(user), data, event)

    def read_history(self, channel: str, *, after: int = 0, limit: int = 10_000) -> History:
        """The channel's epoch, last offset and kept envelopes after ``after`` (oldest
        first), read atomically with history.lua (a pure read: starts no epoch)."""
        return _parse_history(self._eval(*_core.history_call(channel, after, limit)))

    def background(self, capacity: int = 1000) -> BackgroundPublisher:
        """A non-blocking handle for job loops (see BackgroundPublisher)."""
        return BackgroundPublisher(self, capacity)

    def _eval(self, script: bytes, sha: str, keys: list[str], args: list[Any]) -> Any:
        client = self.client()
        try:
            return client.evalsha(sha, len(keys), *keys, *args)
        except rx.NoScriptError:
            # A new primary (after a failover) may not have the script yet.
            return client.eval(script, len(keys), *keys, *args)

    def _run(self, prepared: _core.Prepared) -> Position:
        backoff = _core.Backoff(self._settings.retry)
        while True:
            backoff.attempts += 1
            try:
                reply = self._eval(*_core.publish_call(prepared))
                return _core.acknowledged(prepared, reply, backoff.attempts)
            except FanoutError:
                raise
            except Exception as e:
                time.sleep(_core.resend_pause(prepared, e, backoff, self._where))

    # ----- lifecycle -----

    def close(self) -> None:
        """Closes the Redis connections. Idempotent."""
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # pragma: no cover - best effort
                log.debug("closing the redis client failed", exc_info=True)


class BackgroundPublisher(_core.BackgroundBase["Publisher"], _core.Closing):
    """A bounded queue drained, in order, by a daemon thread that publishes each message
    with the publisher's retries (one idempotency key each). ``publish`` and the helpers
    never block and never raise: they return False when the message is dropped.

    Counters: ``published``; ``dropped`` (refused when enqueued: queue full, closed, data
    that is not JSON, a bad channel); ``failed`` (queued but not acknowledged: Redis away
    past the retry deadline, or a non-transient error)."""

    def __init__(self, publisher: Publisher, capacity: int = 1000) -> None:
        self._cond = threading.Condition()
        super().__init__(publisher, capacity, self._cond)
        self._thread = threading.Thread(target=self._drain, name="fanout-background", daemon=True)
        self._thread.start()

    def _enqueue(self, prepared: _core.Prepared) -> str | None:
        with self._cond:
            if self._closed or len(self._queue) >= self._capacity:
                return "closed" if self._closed else "queue full"
            self._queue.append(prepared)
            self._pending += 1
            self._cond.notify_all()
            return None

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until everything enqueued so far was handled (published or failed), or
        ``timeout`` seconds passed. Returns whether the queue drained."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float | None = 10.0) -> bool:
        """Stops accepting messages, drains the queue for up to ``timeout`` seconds and
        stops the thread. Returns whether everything queued was handled. Does not close
        the publisher."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        drained = self.flush(timeout)
        with self._cond:
            # What is still queued past the timeout is not published: counted as failed.
            self.failed += len(self._queue)
            self._pending -= len(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join(1.0 if drained else 0.1)
        return drained

    def _drain(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue) or self._closed)
                if not self._queue:
                    if self._closed:
                        return
                    continue
                item = self._queue.popleft()
            ok = False
            try:
                self._publisher._run(item)
                ok = True
            except Exception as e:
                self._failed(item, e)
            with self._cond:
                if ok:
                    self.published += 1
                self._pending -= 1
                self._cond.notify_all()
