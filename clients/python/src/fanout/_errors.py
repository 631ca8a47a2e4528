"""The exceptions of the fanout package: everything it raises is a :class:`FanoutError`."""

from __future__ import annotations


class FanoutError(Exception):
    """Base class of every error raised by the fanout package."""


class InvalidURLError(FanoutError, ValueError):
    """A Redis URL that is not one of the accepted forms (the message says which are)."""


class InvalidChannelError(FanoutError, ValueError):
    """A channel name that is not ``namespace:rest`` of at most 255 bytes of
    ``[A-Za-z0-9_.:@=+/|-]``."""


class InvalidIdempotencyKeyError(FanoutError, ValueError):
    """An idempotency key that is not 1 to 128 printable ASCII characters without spaces."""


class DataNotSerializableError(FanoutError, TypeError):
    """Data (or an event name) that does not encode to JSON; raised before anything is sent."""


class PublishError(FanoutError):
    """Redis refused the publish with an error that is not transient (a script error,
    authentication, a wrong type...). Not retried."""


class UnexpectedReplyError(PublishError):
    """The publish script answered something that is not ``{offset, epoch[, duplicate]}``."""


class GaveUpError(PublishError):
    """Transient failures (connection refused or lost, timeouts, failover and cluster
    redirections) until the retry deadline. The publish may or may not have been applied:
    resending it with the same ``idempotency_key`` (within the dedup window, 5 minutes)
    applies it at most once."""

    def __init__(
        self,
        channel: str,
        attempts: int,
        elapsed: float,
        last: BaseException,
        idempotency_key: str,
        where: str,
    ) -> None:
        self.channel = channel
        self.attempts = attempts
        self.elapsed = elapsed
        self.last = last
        self.idempotency_key = idempotency_key
        self.where = where
        super().__init__(
            f"publish to {channel} not acknowledged by Redis at {where} after {attempts} "
            f"attempt{'s' if attempts != 1 else ''} in {elapsed:.1f} s (retry deadline); it may "
            f"or may not have been applied (resend it with idempotency_key={idempotency_key!r} "
            f"to apply it at most once); last error: {type(last).__name__}: {last}"
        )
