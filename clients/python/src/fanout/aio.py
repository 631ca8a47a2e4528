"""The asyncio publisher: the same methods as :class:`fanout.Publisher`, as coroutines."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.exceptions as rx

from . import _core
from ._core import DedupPolicy, HistoryPolicy, Position, RetryPolicy
from ._errors import FanoutError, GaveUpError, PublishError
from ._url import ParsedURL, parse_url
from .publisher import History, _client_options, _parse_history, _settings

log = logging.getLogger("fanout")


class AsyncPublisher:
    """Publishes fanout envelopes from asyncio code, each exactly once through failovers
    (see :class:`fanout.Publisher`). One per event loop."""

    def __init__(self, client_factory: Any, *, where: str, settings: _core.Settings) -> None:
        self._factory = client_factory
        self._client: Any = None
        self._where = where
        self._settings = settings
        self._closed = False

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
    ) -> AsyncPublisher:
        """See :meth:`fanout.Publisher.from_url`; the URL forms are the same."""
        parsed = parse_url(url)
        rp = retry or RetryPolicy()
        opts = _client_options(rp, redis_options)
        settings = _settings(parsed.kind == "cluster", retry, dedup, default_history, history)
        return cls(_async_factory(parsed, opts), where=parsed.where(), settings=settings)

    @classmethod
    def from_client(
        cls, client: redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster, **policies: Any
    ) -> AsyncPublisher:
        sharded = isinstance(client, redis.asyncio.cluster.RedisCluster)
        return cls(lambda: client, where=repr(client), settings=_settings(sharded, **policies))

    def with_history(
        self,
        namespace: str,
        size: int = 100,
        ttl: float = 3600,
        finished_ttl: float | None = None,
    ) -> Self:
        self._settings.history[namespace] = HistoryPolicy(size, ttl, finished_ttl)
        return self

    def with_default_history(
        self, size: int = 100, ttl: float = 3600, finished_ttl: float | None = None
    ) -> Self:
        self._settings.default_history = HistoryPolicy(size, ttl, finished_ttl)
        return self

    def with_retry(self, retry: RetryPolicy) -> Self:
        self._settings.retry = retry
        return self

    def with_dedup(self, dedup: DedupPolicy) -> Self:
        self._settings.dedup = dedup
        return self

    def history_for(self, namespace: str) -> HistoryPolicy:
        return self._settings.history_for(namespace)

    @property
    def retry_policy(self) -> RetryPolicy:
        return self._settings.retry

    @property
    def sharded(self) -> bool:
        return self._settings.sharded

    def client(self) -> Any:
        if self._closed:
            raise FanoutError("the publisher is closed")
        if self._client is None:
            self._client = self._factory()
        return self._client

    async def publish(
        self,
        channel: str,
        data: Any,
        event: str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> Position:
        """See :meth:`fanout.Publisher.publish`."""
        prepared = self._settings.prepare(channel, data, event, idempotency_key)
        return await self._run(prepared)

    async def job_progress(
        self, job_id: object, pct: float | None = None, message: str | None = None, **extra: Any
    ) -> Position:
        return await self.publish(
            _core.job_channel(job_id), _core.progress_data(pct, message, extra), "progress"
        )

    async def job_completed(
        self, job_id: object, status: _core.JobStatus = "succeeded", result: Any = None
    ) -> Position:
        return await self.publish(
            _core.job_channel(job_id), _core.completion_data(status, result), "completed"
        )

    async def user_event(self, user: object, event: str, data: Any) -> Position:
        return await self.publish(_core.user_channel(user), data, event)

    async def read_history(self, channel: str, *, after: int = 0, limit: int = 10_000) -> History:
        _core.validate_channel(channel)
        keys = [_core.meta_key(channel), _core.history_key(channel)]
        reply = await self._eval(
            _core.HISTORY_SCRIPT, _core.HISTORY_SCRIPT_SHA, keys, ["after", after, limit]
        )
        return _parse_history(reply)

    def background(self, capacity: int = 1000) -> AsyncBackgroundPublisher:
        """A non-blocking handle drained by a task of the running loop."""
        return AsyncBackgroundPublisher(self, capacity)

    async def _eval(self, script: bytes, sha: str, keys: list[str], args: list[Any]) -> Any:
        client = self.client()
        try:
            return await client.evalsha(sha, len(keys), *keys, *args)
        except rx.NoScriptError:
            return await client.eval(script, len(keys), *keys, *args)

    async def _run(self, prepared: _core.Prepared) -> Position:
        backoff = _core.Backoff(self._settings.retry)
        while True:
            backoff.attempts += 1
            try:
                async with asyncio.timeout(backoff.attempt_limit()):
                    reply = await self._eval(
                        _core.PUBLISH_SCRIPT,
                        _core.PUBLISH_SCRIPT_SHA,
                        prepared.keys,
                        prepared.args,
                    )
                ack = _core.parse_ack(reply)
                if ack.duplicate:
                    log.info(
                        "publish to %s was already applied (same idempotency key); offset %d",
                        prepared.channel,
                        ack.offset,
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
                await asyncio.sleep(pause)

    async def close(self) -> None:
        """Closes the Redis connections. Idempotent."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.aclose()
            except Exception:  # pragma: no cover - best effort
                log.debug("closing the redis client failed", exc_info=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _async_factory(parsed: ParsedURL, opts: dict[str, Any]) -> Any:
    def single() -> Any:
        return redis.asyncio.Redis.from_url(parsed.url, **opts)

    def cluster() -> Any:
        nodes = [redis.asyncio.cluster.ClusterNode(h, p) for h, p in parsed.hosts]
        return redis.asyncio.cluster.RedisCluster(  # type: ignore[abstract]
            startup_nodes=nodes,
            username=parsed.username,
            password=parsed.password,
            ssl=parsed.tls,
            **opts,
        )

    def sentinel() -> Any:
        s = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            parsed.hosts,
            sentinel_kwargs={
                "socket_timeout": opts["socket_timeout"],
                "socket_connect_timeout": opts["socket_connect_timeout"],
                "ssl": parsed.tls,
            },
            **opts,
        )
        return s.master_for(
            parsed.service or "",
            username=parsed.username,
            password=parsed.password,
            db=parsed.db,
            ssl=parsed.tls,
        )

    return {"single": single, "cluster": cluster, "sentinel": sentinel}[parsed.kind]


class AsyncBackgroundPublisher:
    """The asyncio twin of :class:`fanout.BackgroundPublisher`: ``publish`` and the
    helpers are plain (non-async) methods that never block and never raise; a task of
    the running loop drains the queue. ``flush`` and ``close`` are coroutines."""

    def __init__(self, publisher: AsyncPublisher, capacity: int = 1000) -> None:
        self._publisher = publisher
        self._capacity = max(1, capacity)
        self._queue: collections.deque[_core.Prepared] = collections.deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._pending = 0
        self._closed = False
        self.published = 0
        self.dropped = 0
        self.failed = 0
        self._task = asyncio.get_running_loop().create_task(self._drain())

    def publish(
        self,
        channel: str,
        data: Any,
        event: str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> bool:
        try:
            prepared = self._publisher._settings.prepare(channel, data, event, idempotency_key)
        except Exception as e:
            self._drop(f"{type(e).__name__}: {e}", channel)
            return False
        if self._closed or len(self._queue) >= self._capacity:
            self._drop("closed" if self._closed else "queue full", channel)
            return False
        self._queue.append(prepared)
        self._pending += 1
        self._idle.clear()
        self._wake.set()
        return True

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
        return self._pending

    async def flush(self, timeout: float | None = None) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False

    async def close(self, timeout: float | None = 10.0) -> bool:
        self._closed = True
        self._wake.set()
        drained = await self.flush(timeout)
        if not drained:
            self.failed += len(self._queue)
            self._pending -= len(self._queue)
            self._queue.clear()
            self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            if not drained:
                self.failed += self._pending
                self._pending = 0
        self._idle.set()
        return drained

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _drop(self, reason: str, channel: str) -> None:
        self.dropped += 1
        if self.dropped % 1000 == 1:
            log.warning(
                "background publish to %s dropped (%s); dropped so far: %d",
                channel,
                reason,
                self.dropped,
            )

    async def _drain(self) -> None:
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            item = self._queue.popleft()
            try:
                await self._publisher._run(item)
                self.published += 1
            except Exception as e:
                self.failed += 1
                if self.failed % 1000 == 1:
                    log.warning(
                        "background publish to %s failed; message dropped: %s; failed so far: %d",
                        item.channel,
                        e,
                        self.failed,
                    )
            self._pending -= 1
            if self._pending == 0:
                self._idle.set()
