"""The asyncio publisher: the same methods as :class:`fanout.Publisher`, as coroutines."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.exceptions as rx

from . import _core
from ._core import Position
from ._errors import FanoutError
from .publisher import History, _parse_history

log = logging.getLogger("fanout")


class AsyncPublisher(_core.PublisherBase, _core.AsyncClosing):
    """Publishes fanout envelopes from asyncio code, each exactly once through failovers
    (see :class:`fanout.Publisher`). One per event loop."""

    _redis_lib = redis.asyncio

    @classmethod
    def from_client(
        cls, client: redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster, **policies: Any
    ) -> AsyncPublisher:
        """Wraps an existing redis-py asyncio client (cluster clients publish with SPUBLISH)."""
        sharded = isinstance(client, redis.asyncio.cluster.RedisCluster)
        return cls(
            lambda: client, where=repr(client), settings=_core.make_settings(sharded, **policies)
        )

    def client(self) -> Any:
        self._check_open()
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
        return await self.publish(*_core.progress_message(job_id, pct, message, extra))

    async def job_completed(
        self, job_id: object, status: _core.JobStatus = "succeeded", result: Any = None
    ) -> Position:
        return await self.publish(*_core.completion_message(job_id, status, result))

    async def user_event(self, user: object, event: str, data: Any) -> Position:
        return await self.publish(_core.user_channel(user), data, event)

    async def read_history(self, channel: str, *, after: int = 0, limit: int = 10_000) -> History:
        """See :meth:`fanout.Publisher.read_history`."""
        return _parse_history(await self._eval(*_core.history_call(channel, after, limit)))

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
                    reply = await self._eval(*_core.publish_call(prepared))
                return _core.acknowledged(prepared, reply, backoff.attempts)
            except FanoutError:
                raise
            except Exception as e:
                await asyncio.sleep(_core.resend_pause(prepared, e, backoff, self._where))

    async def close(self) -> None:
        """Closes the Redis connections. Idempotent."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.aclose()
            except Exception:  # pragma: no cover - best effort
                log.debug("closing the redis client failed", exc_info=True)


class AsyncBackgroundPublisher(_core.BackgroundBase["AsyncPublisher"], _core.AsyncClosing):
    """The asyncio twin of :class:`fanout.BackgroundPublisher`: ``publish`` and the
    helpers are plain (non-async) methods that never block and never raise; a task of
    the running loop drains the queue. ``flush`` and ``close`` are coroutines."""

    def __init__(self, publisher: AsyncPublisher, capacity: int = 1000) -> None:
        super().__init__(publisher, capacity, contextlib.nullcontext())
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task = asyncio.get_running_loop().create_task(self._drain())

    def _enqueue(self, prepared: _core.Prepared) -> str | None:
        if self._closed or len(self._queue) >= self._capacity:
            return "closed" if self._closed else "queue full"
        self._queue.append(prepared)
        self._pending += 1
        self._idle.clear()
        self._wake.set()
        return None

    async def flush(self, timeout: float | None = None) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False

    async def close(self, timeout: float | None = 10.0) -> bool:
        """Stops accepting messages, drains the queue for up to ``timeout`` seconds and
        stops the task. Returns whether everything queued was handled. Does not close the
        publisher. If the caller is cancelled meanwhile, what is still queued is dropped
        (counted as failed), the task is stopped, and the cancellation propagates."""
        self._closed = True
        self._wake.set()
        drained = False
        try:
            drained = await self.flush(timeout)
        finally:
            # Also when the caller is cancelled: stop the task before propagating it.
            if not drained:
                self.failed += len(self._queue)
                self._pending -= len(self._queue)
                self._queue.clear()
                self._task.cancel()
            try:
                # asyncio.wait does not raise the task's own cancellation (ours, above),
                # only the caller's, which must propagate.
                await asyncio.wait([self._task])
            finally:
                if not drained:
                    # The message being published when the task was cancelled.
                    self.failed += self._pending
                    self._pending = 0
                self._idle.set()
        return drained

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
                self._failed(item, e)
            self._pending -= 1
            if self._pending == 0:
                self._idle.set()
