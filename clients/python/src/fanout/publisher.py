"""The blocking publisher and its non-blocking background handle."""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import redis
import redis.cluster
import redis.exceptions as rx
import redis.sentinel

from . import _core
from ._core import (
    DedupPolicy,
    HistoryPolicy,
    Position,
    RetryPolicy,
)
from ._errors import FanoutError, GaveUpError, PublishError
from ._url import ParsedURL, parse_url

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


def _client_options(retry: RetryPolicy, options: Mapping[str, Any]) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "socket_timeout": retry.attempt_timeout,
        "socket_connect_timeout": retry.attempt_timeout,
    }
    opts.update(options)
    return opts


def _settings(
    sharded: bool,
    retry: RetryPolicy | None = None,
    dedup: DedupPolicy | None = None,
    default_history: HistoryPolicy | None = None,
    history: Mapping[str, HistoryPolicy] | None = None,
) -> _core.Settings:
    s = _core.Settings(sharded=sharded)
    if retry is not None:
        s.retry = retry
    if dedup is not None:
        s.dedup = dedup
    if default_history is not None:
        s.default_history = default_history
    if history:
        s.history.update(history)
    return s


def _parse_history(reply: object) -> History:
    if not isinstance(reply, list) or len(reply) != 3:
        raise PublishError(f"unexpected reply from the history script: {reply!r}")
    epoch, top, entries = reply
    return History(
        epoch=epoch.decode() if isinstance(epoch, bytes) else str(epoch),
        offset=int(top),
        envelopes=[json.loads(e) for e in entries],
    )


class Publisher:
    """Publishes fanout envelopes to Redis, each exactly once through failovers.

    Every publish runs crates/fanout-protocol/src/publish.lua under one idempotency key
    (32 hex digits, or the caller's), resent with the same key after a transient failure
    (connection refused or lost, timeout, MOVED/ASK/TRYAGAIN/CLUSTERDOWN/LOADING/
    MASTERDOWN/READONLY/BUSY) with backoff until the retry deadline: applied at most once.
    Thread-safe; one per process is enough.
    """

    def __init__(self, client_factory: Any, *, where: str, settings: _core.Settings) -> None:
        self._factory = client_factory
        self._client: Any = None
        self._lock = threading.Lock()
        self._where = where
        self._settings = settings
        self._closed = False

    # ----- construction -----

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        retry: RetryPolicy | None = None,
        dedup: DedupPolicy | None = None,
        default_history: HistoryPolicy | None = None,
        history: Mapping[str, HistoryPolicy] | None = None,
        **redis_options: Any,
    ) -> Publisher:
        """Publishes through ``redis://``, ``rediss://``, ``redis-cluster://h1:p1,h2:p2``
        (sharded pub/sub) or ``redis-sentinel://s1:p1,s2:p2/<service>[/db]``. Nothing is
        connected until the first publish (a worker may start before Redis). Extra
        keyword options go to the redis-py client (e.g. ``ssl_ca_certs``)."""
        parsed = parse_url(url)
        rp = retry or RetryPolicy()
        opts = _client_options(rp, redis_options)
        settings = _settings(parsed.kind == "cluster", retry, dedup, default_history, history)
        return cls(_sync_factory(parsed, opts), where=parsed.where(), settings=settings)

    @classmethod
    def from_client(
        cls, client: redis.Redis | redis.cluster.RedisCluster, **policies: Any
    ) -> Publisher:
        """Wraps an existing redis-py client (cluster clients publish with SPUBLISH)."""
        sharded = isinstance(client, redis.cluster.RedisCluster)
        settings = _settings(sharded, **policies)
        p = cls(lambda: client, where=repr(client), settings=settings)
        return p

    def with_history(
        self,
        namespace: str,
        size: int = 100,
        ttl: float = 3600,
        finished_ttl: float | None = None,
    ) -> Self:
        """Sets the history kept for channels of ``namespace`` (returns self)."""
        self._settings.history[namespace] = HistoryPolicy(size, ttl, finished_ttl)
        return self

    def with_default_history(
        self, size: int = 100, ttl: float = 3600, finished_ttl: float | None = None
    ) -> Self:
        """Sets the history of namespaces with no policy of their own (returns self)."""
        self._settings.default_history = HistoryPolicy(size, ttl, finished_ttl)
        return self

    def with_retry(self, retry: RetryPolicy) -> Self:
        """Sets how publishes are retried (returns self)."""
        self._settings.retry = retry
        return self

    def with_dedup(self, dedup: DedupPolicy) -> Self:
        """Sets how long / how many idempotency keys a channel remembers (returns self)."""
        self._settings.dedup = dedup
        return self

    def history_for(self, namespace: str) -> HistoryPolicy:
        return self._settings.history_for(namespace)

    @property
    def retry_policy(self) -> RetryPolicy:
        return self._settings.retry

    @property
    def sharded(self) -> bool:
        """Whether publishes use SPUBLISH (Redis Cluster)."""
        return self._settings.sharded

    def client(self) -> Any:
        """The redis-py client (made on first use)."""
        with self._lock:
            if self._closed:
                raise FanoutError("the publisher is closed")
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
        return self.publish(
            _core.job_channel(job_id), _core.progress_data(pct, message, extra), "progress"
        )

    def job_completed(
        self, job_id: object, status: _core.JobStatus = "succeeded", result: Any = None
    ) -> Position:
        """``{"status":…,"result":…}`` as event ``completed`` on ``job_progress:<job_id>``;
        the status (succeeded, failed, cancelled) ends the job for its subscribers."""
        return self.publish(
            _core.job_channel(job_id), _core.completion_data(status, result), "completed"
        )

    def user_event(self, user: object, event: str, data: Any) -> Position:
        """``data`` as ``event`` on ``user:<user>``."""
        return self.publish(_core.user_channel(user), data, event)

    def read_history(self, channel: str, *, after: int = 0, limit: int = 10_000) -> History:
        """The channel's epoch, last offset and kept envelopes after ``after`` (oldest
        first), read atomically with history.lua (a pure read: starts no epoch)."""
        _core.validate_channel(channel)
        keys = [_core.meta_key(channel), _core.history_key(channel)]
        reply = self._eval(
            _core.HISTORY_SCRIPT, _core.HISTORY_SCRIPT_SHA, keys, ["after", after, limit]
        )
        return _parse_history(reply)

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
                reply = self._eval(
                    _core.PUBLISH_SCRIPT, _core.PUBLISH_SCRIPT_SHA, prepared.keys, prepared.args
                )
                ack = _core.parse_ack(reply)
                if ack.duplicate:
                    log.info(
                        "publish to %s was already applied (same idempotency key); offset %d",
                        prepared.channel,
                        ack.offset,
                    )
                elif backoff.attempts > 1:
                    log.info(
                        "publish to %s acknowledged after %d attempts",
                        prepared.channel,
                        backoff.attempts,
                    )
                return ack
            except FanoutError:
                raise
            except Exception as e:
                if not _core.is_transient(e):
                    raise PublishError(
                        f"redis refused the publish to {prepared.channel}: {e}"
                    ) from e
                pause = backoff.sleep_for()
                if pause is None:
                    raise GaveUpError(
                        prepared.channel,
                        backoff.attempts,
                        backoff.elapsed(),
                        e,
                        prepared.key,
                        self._where,
                    ) from e
                log.debug(
                    "publish to %s failed transiently (%s); resending with the same key",
                    prepared.channel,
                    e,
                )
                time.sleep(pause)

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

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _sync_factory(parsed: ParsedURL, opts: dict[str, Any]) -> Any:
    def single() -> Any:
        return redis.Redis.from_url(parsed.url, **opts)

    def cluster() -> Any:
        nodes = [redis.cluster.ClusterNode(h, p) for h, p in parsed.hosts]  # type: ignore[no-untyped-call]
        return redis.cluster.RedisCluster(  # type: ignore[abstract]
            startup_nodes=nodes,
            username=parsed.username,
            password=parsed.password,
            ssl=parsed.tls,
            **opts,
        )

    def sentinel() -> Any:
        s = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            parsed.hosts,
            sentinel_kwargs={
                "socket_timeout": opts["socket_timeout"],
                "socket_connect_timeout": opts["socket_connect_timeout"],
                "ssl": parsed.tls,
            },
            **opts,
        )
        return s.master_for(  # type: ignore[no-untyped-call]
            parsed.service or "",
            username=parsed.username,
            password=parsed.password,
            db=parsed.db,
            ssl=parsed.tls,
        )

    return {"single": single, "cluster": cluster, "sentinel": sentinel}[parsed.kind]


class BackgroundPublisher:
    """A bounded queue drained, in order, by a daemon thread that publishes each message
    with the publisher's retries (one idempotency key each). ``publish`` and the helpers
    never block and never raise: they return False when the message is dropped.

    Counters: ``published``; ``dropped`` (refused when enqueued: queue full, closed, data
    that is not JSON, a bad channel); ``failed`` (queued but not acknowledged: Redis away
    past the retry deadline, or a non-transient error)."""

    def __init__(self, publisher: Publisher, capacity: int = 1000) -> None:
        self._publisher = publisher
        self._capacity = max(1, capacity)
        self._queue: collections.deque[_core.Prepared] = collections.deque()
        self._cond = threading.Condition()
        self._pending = 0
        self._closed = False
        self.published = 0
        self.dropped = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._drain, name="fanout-background", daemon=True)
        self._thread.start()

    def publish(
        self,
        channel: str,
        data: Any,
        event: str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> bool:
        """Enqueues a publish; False if it was dropped. Never raises, never blocks."""
        try:
            prepared = self._publisher._settings.prepare(channel, data, event, idempotency_key)
        except Exception as e:
            self._drop(f"{type(e).__name__}: {e}", channel)
            return False
        with self._cond:
            if self._closed or len(self._queue) >= self._capacity:
                reason = "closed" if self._closed else "queue full"
            else:
                self._queue.append(prepared)
                self._pending += 1
                self._cond.notify_all()
                return True
        self._drop(reason, channel)
        return False

    def job_progress(
        self, job_id: object, pct: float | None = None, message: str | None = None, **extra: Any
    ) -> bool:
        return self.publish(
            _core.job_channel(job_id), _core.progress_data(pct, message, extra), "progress"
        )

    def job_completed(
        self, job_id: object, status: _core.JobStatus = "succeeded", result: Any = None
    ) -> bool:
        try:
            data = _core.completion_data(status, result)
        except Exception as e:
            self._drop(str(e), _core.job_channel(job_id))
            return False
        return self.publish(_core.job_channel(job_id), data, "completed")

    def user_event(self, user: object, event: str, data: Any) -> bool:
        return self.publish(_core.user_channel(user), data, event)

    @property
    def pending(self) -> int:
        """Messages queued or being published."""
        with self._cond:
            return self._pending

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

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _drop(self, reason: str, channel: str) -> None:
        with self._cond:
            self.dropped += 1
            n = self.dropped
        if n % 1000 == 1:
            log.warning(
                "background publish to %s dropped (%s); dropped so far: %d", channel, reason, n
            )

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
                with self._cond:
                    self.failed += 1
                    n = self.failed
                if n % 1000 == 1:
                    log.warning(
                        "background publish to %s failed; message dropped: %s; failed so far: %d",
                        item.channel,
                        e,
                        n,
                    )
            with self._cond:
                if ok:
                    self.published += 1
                self._pending -= 1
                self._cond.notify_all()
