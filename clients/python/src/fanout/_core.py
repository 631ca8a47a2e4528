"""What the sync and async publishers share: validation, the envelope body, policies,
the script arguments, the error classification and the retry schedule.

Everything here mirrors crates/fanout-publisher (lib.rs) and crates/fanout-protocol
(channel.rs, layout.rs, envelope.rs)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import random
import secrets
import socket
import ssl
import string
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from types import ModuleType, TracebackType
from typing import Any, Final, Generic, Literal, Self, TypeVar

import redis.exceptions as rx

from ._errors import (
    DataNotSerializableError,
    FanoutError,
    GaveUpError,
    InvalidChannelError,
    InvalidIdempotencyKeyError,
    PublishError,
    UnexpectedReplyError,
)
from ._url import ParsedURL, parse_url

log = logging.getLogger("fanout")

MAX_CHANNEL_LEN: Final = 255
MAX_IDEMPOTENCY_KEY_LEN: Final = 128
DEDUP_WINDOW_SECS: Final = 300
DEDUP_MAX_KEYS: Final = 10_000
ENVELOPE_VERSION: Final = 1
TERMINAL_STATUSES: Final = ("succeeded", "failed", "cancelled")

JobStatus = Literal["succeeded", "failed", "cancelled"]

_CHANNEL_CHARS: Final = frozenset(string.ascii_letters + string.digits + "_-.:@=+/|")
_EPOCH_CHARS: Final = string.ascii_letters + string.digits


def _script(name: str) -> bytes:
    return resources.files("fanout").joinpath("scripts", name).read_bytes()


#: The publish script, crates/fanout-protocol/src/publish.lua, as shipped in the package.
PUBLISH_SCRIPT: Final[bytes] = _script("publish.lua")
#: The history script, crates/fanout-protocol/src/history.lua, as shipped in the package.
HISTORY_SCRIPT: Final[bytes] = _script("history.lua")
PUBLISH_SCRIPT_SHA: Final[str] = hashlib.sha1(PUBLISH_SCRIPT).hexdigest()
HISTORY_SCRIPT_SHA: Final[str] = hashlib.sha1(HISTORY_SCRIPT).hexdigest()


@dataclass(frozen=True)
class Position:
    """Where a publication landed in its channel's history."""

    offset: int
    epoch: str
    #: True when this idempotency key had already been applied: nothing was published
    #: now, and offset/epoch are where the first publish landed.
    duplicate: bool = False


@dataclass(frozen=True)
class RetryPolicy:
    """How a publish is resent after a transient failure (same defaults as Rust)."""

    #: Seconds a publish may take, attempts and backoff included; 0 = one attempt.
    deadline: float = 10.0
    #: Seconds one attempt may go unanswered before it is resent.
    attempt_timeout: float = 2.0
    #: The first backoff, doubled after each failed attempt (with +-25 % jitter).
    initial_backoff: float = 0.02
    #: The longest backoff.
    max_backoff: float = 1.0


@dataclass(frozen=True)
class DedupPolicy:
    """How long and how many idempotency keys a channel remembers."""

    window: float = DEDUP_WINDOW_SECS
    max_keys: int = DEDUP_MAX_KEYS


@dataclass(frozen=True)
class HistoryPolicy:
    """How much history a namespace keeps."""

    #: Messages kept; 0 keeps none (offsets and epoch are still assigned).
    size: int = 100
    #: Seconds history (and the offset/epoch) outlives the last publish.
    ttl: float = 3600
    #: For job_progress: seconds a finished job's history lives after its terminal
    #: message; None = ttl.
    finished_ttl: float | None = None


def builtin_history() -> dict[str, HistoryPolicy]:
    """The per-namespace defaults of the Rust publisher: job_progress keeps 100 messages
    for 24 h, 1 h after the job finished."""
    return {"job_progress": HistoryPolicy(size=100, ttl=24 * 3600, finished_ttl=3600)}


def validate_channel(channel: object) -> str:
    """Returns the channel's namespace; raises InvalidChannelError (the Rust crate's rules)."""
    if not isinstance(channel, str):
        raise InvalidChannelError(f"channel name must be a str, not {type(channel).__name__}")
    if channel == "":
        raise InvalidChannelError("invalid channel: channel name is empty")
    if len(channel.encode()) > MAX_CHANNEL_LEN:
        raise InvalidChannelError(
            f"invalid channel: channel name is longer than {MAX_CHANNEL_LEN} bytes"
        )
    for c in channel:
        if c not in _CHANNEL_CHARS:
            raise InvalidChannelError(
                f"invalid channel {channel!r}: character {c!r} is outside [A-Za-z0-9_.:@=+/|-]"
            )
    ns, sep, rest = channel.partition(":")
    if not sep or not ns or not rest:
        raise InvalidChannelError(f"invalid channel {channel!r}: must be `namespace:rest`")
    return ns


def valid_idempotency_key(key: str) -> bool:
    """1 to 128 printable ASCII characters without spaces."""
    return (
        0 < len(key) <= MAX_IDEMPOTENCY_KEY_LEN
        and key.isascii()
        and all(33 <= ord(c) <= 126 for c in key)
    )


def check_idempotency_key(key: object) -> str:
    if not isinstance(key, str) or not valid_idempotency_key(key):
        raise InvalidIdempotencyKeyError(
            f"invalid idempotency key {key!r}: 1 to {MAX_IDEMPOTENCY_KEY_LEN} printable ASCII "
            "characters, no spaces"
        )
    return key


def new_idempotency_key() -> str:
    """A fresh idempotency key: 16 random bytes as 32 hex digits."""
    return secrets.token_hex(16)


def new_epoch() -> str:
    """12 random alphanumerics, used only if the channel has no epoch yet."""
    return "".join(secrets.choice(_EPOCH_CHARS) for _ in range(12))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def encode_data(data: Any) -> str:
    """The data as compact JSON; DataNotSerializableError before anything is sent."""
    try:
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise DataNotSerializableError(f"data does not serialize to JSON: {e}") from e


def encode_body(event: str | None, data_json: str, ts: int) -> str:
    """``{"fanout":1,"ts":…,"event":…,"data":…}``: the envelope without offset and epoch,
    which the script prepends (Envelope::encode_body)."""
    if event is not None and not isinstance(event, str):
        raise DataNotSerializableError(f"event must be a str, not {type(event).__name__}")
    ev = "" if not event else f'"event":{json.dumps(event, ensure_ascii=False)},'
    return f'{{"fanout":{ENVELOPE_VERSION},"ts":{ts},{ev}"data":{data_json}}}'


def is_terminal(data: Any) -> bool:
    return isinstance(data, Mapping) and data.get("status") in TERMINAL_STATUSES


def progress_data(
    pct: float | None, message: str | None, extra: Mapping[str, Any]
) -> dict[str, Any]:
    data: dict[str, Any] = {"status": "running"}
    if pct is not None:
        data["pct"] = float(pct)
    if message is not None:
        data["message"] = message
    data.update(extra)
    return data


def completion_data(status: str, result: Any) -> dict[str, Any]:
    if status not in TERMINAL_STATUSES:
        raise ValueError(
            f"job status must be one of {', '.join(TERMINAL_STATUSES)}, not {status!r}"
        )
    return {"status": status, "result": result}


def job_channel(job_id: object) -> str:
    return f"job_progress:{job_id}"


def progress_message(
    job_id: object, pct: float | None, message: str | None, extra: Mapping[str, Any]
) -> tuple[str, dict[str, Any], str]:
    """(channel, data, event) of a job_progress publish."""
    return job_channel(job_id), progress_data(pct, message, extra), "progress"


def completion_message(job_id: object, status: str, result: Any) -> tuple[str, dict[str, Any], str]:
    """(channel, data, event) of a job_completed publish; ValueError for a bad status."""
    return job_channel(job_id), completion_data(status, result), "completed"


def user_channel(user: object) -> str:
    return f"user:{user}"


def meta_key(channel: str) -> str:
    return f"fanout:{{{channel}}}:meta"


def history_key(channel: str) -> str:
    return f"fanout:{{{channel}}}:history"


def dedup_key(channel: str) -> str:
    return f"fanout:{{{channel}}}:dedup"


@dataclass
class Prepared:
    """One logical publish: made once, every resend carries the same body, epoch and key."""

    channel: str
    key: str
    keys: list[str]
    args: list[str | int]


@dataclass
class Settings:
    sharded: bool
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    dedup: DedupPolicy = field(default_factory=DedupPolicy)
    default_history: HistoryPolicy = field(default_factory=HistoryPolicy)
    history: dict[str, HistoryPolicy] = field(default_factory=builtin_history)

    def history_for(self, namespace: str) -> HistoryPolicy:
        return self.history.get(namespace, self.default_history)

    def prepare(
        self,
        channel: str,
        data: Any,
        event: str | None,
        idempotency_key: str | None,
        *,
        data_json: str | None = None,
        ts: int | None = None,
    ) -> Prepared:
        namespace = validate_channel(channel)
        key = new_idempotency_key() if idempotency_key is None else idempotency_key
        check_idempotency_key(key)
        if data_json is None:
            data_json = encode_data(data)
        body = encode_body(event, data_json, now_ms() if ts is None else ts)
        policy = self.history_for(namespace)
        finished = 0
        if (
            policy.finished_ttl is not None
            and channel.startswith("job_progress:")
            and is_terminal(data)
        ):
            finished = max(1, math.ceil(policy.finished_ttl))
        args: list[str | int] = [
            channel,
            body,
            int(policy.size),
            max(1, int(policy.ttl)),
            new_epoch(),
            "1" if self.sharded else "0",
            finished,
            key,
            max(1, int(self.dedup.window)),
            max(1, int(self.dedup.max_keys)),
        ]
        return Prepared(
            channel, key, [meta_key(channel), history_key(channel), dedup_key(channel)], args
        )


def make_settings(
    sharded: bool,
    retry: RetryPolicy | None = None,
    dedup: DedupPolicy | None = None,
    default_history: HistoryPolicy | None = None,
    history: Mapping[str, HistoryPolicy] | None = None,
) -> Settings:
    s = Settings(sharded=sharded)
    if retry is not None:
        s.retry = retry
    if dedup is not None:
        s.dedup = dedup
    if default_history is not None:
        s.default_history = default_history
    if history:
        s.history.update(history)
    return s


def default_options(retry: RetryPolicy) -> dict[str, Any]:
    """The socket timeouts every client made from a URL gets unless the URL's query or
    the caller sets them."""
    return {
        "socket_timeout": retry.attempt_timeout,
        "socket_connect_timeout": retry.attempt_timeout,
    }


def _merged(defaults: Mapping[str, Any], *layers: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(defaults)
    for layer in layers:
        out.update(layer)
    return out


def client_factory(
    parsed: ParsedURL, defaults: Mapping[str, Any], options: Mapping[str, Any], lib: ModuleType
) -> Any:
    """A function making the redis-py client for ``parsed``. ``lib`` is ``redis`` or
    ``redis.asyncio`` (with its cluster and sentinel submodules imported): both expose
    the same constructors, so only the module differs between sync and async.

    Precedence, lowest first: ``defaults`` (the socket timeouts), what the URL says
    (host, port, db, user, password, TLS, query options), the caller's ``options``: a
    caller's ``password=`` or ``ssl=`` replaces the URL's, it never collides with it."""
    caller = dict(options)

    def single() -> Any:
        # What Redis.from_url would take from the URL (host, port, db, credentials, query
        # options), as constructor arguments so that the caller's can replace them:
        # from_url lets the URL win, and does not turn ``ssl=True`` into TLS.
        url_kwargs: dict[str, Any] = dict(lib.connection.parse_url(parsed.url))
        url_kwargs.pop("connection_class", None)  # SSLConnection for rediss://
        url_kwargs["ssl"] = parsed.tls
        return lib.Redis(**_merged(defaults, url_kwargs, caller))

    def cluster() -> Any:
        url_kwargs = {
            "startup_nodes": [lib.cluster.ClusterNode(h, p) for h, p in parsed.hosts],
            "username": parsed.username,
            "password": parsed.password,
            "ssl": parsed.tls,
        }
        return lib.cluster.RedisCluster(**_merged(defaults, url_kwargs, caller))

    def sentinel() -> Any:
        kwargs = _merged(
            defaults,
            {
                "username": parsed.username,
                "password": parsed.password,
                "db": parsed.db,
                "ssl": parsed.tls,
            },
            caller,
        )
        # The sentinels: the same timeouts and TLS settings as the data nodes, and the
        # URL's credentials when it has some (as the Rust publisher, whose client uses
        # one set of credentials for both); the caller's sentinel_kwargs= wins.
        to_sentinels = {
            k: v
            for k, v in kwargs.items()
            if k in ("socket_timeout", "socket_connect_timeout", "ssl") or k.startswith("ssl_")
        }
        if parsed.password is not None:
            to_sentinels["username"] = parsed.username
            to_sentinels["password"] = parsed.password
        to_sentinels.update(kwargs.pop("sentinel_kwargs", None) or {})
        s = lib.sentinel.Sentinel(parsed.hosts, sentinel_kwargs=to_sentinels, **kwargs)
        return s.master_for(parsed.service or "")

    return {"single": single, "cluster": cluster, "sentinel": sentinel}[parsed.kind]


def _text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def parse_ack(reply: object) -> Position:
    """``{offset, epoch}`` or, with an idempotency key, ``{offset, epoch, duplicate}``."""
    if not isinstance(reply, list | tuple) or len(reply) not in (2, 3):
        raise UnexpectedReplyError(f"unexpected reply from the publish script: {reply!r}")
    offset, epoch = reply[0], reply[1]
    if not isinstance(offset, int) or not isinstance(epoch, str | bytes):
        raise UnexpectedReplyError(f"unexpected reply from the publish script: {reply!r}")
    duplicate = len(reply) == 3 and reply[2] == 1
    return Position(offset=offset, epoch=_text(epoch), duplicate=duplicate)


_TRANSIENT_PREFIXES: Final = (
    "MOVED",
    "ASK",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "LOADING",
    "MASTERDOWN",
    "READONLY",
    "BUSY",
)

#: Redis error codes that no resend fixes (credentials, ACL).
_PERMANENT_PREFIXES: Final = ("NOAUTH", "WRONGPASS", "NOPERM")

#: RedisClusterException messages of redis-py that are configuration or usage errors,
#: not a cluster in transition ("Redis Cluster cannot be connected", "All slots are not
#: covered", "could not agree on a valid slots cache"... are transitions: retried).
_PERMANENT_CLUSTER_MESSAGES: Final = (
    "cluster mode is not enabled",
    "not possible to use in cluster mode",
    "can only be 0 in cluster mode",
    "unix domain socket",
    "requires at least one node",
    "invalid args in command",
    "no way to dispatch this command",
    "all keys must map to the same key slot",
    "is not implemented",
)

#: OSErrors of a network that may come back (refused, reset, unreachable, DNS...).
_TRANSIENT_ERRNOS: Final = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNREFUSED",
        "ECONNRESET",
        "ECONNABORTED",
        "EPIPE",
        "ETIMEDOUT",
        "ENETUNREACH",
        "ENETDOWN",
        "ENETRESET",
        "EHOSTUNREACH",
        "EHOSTDOWN",
        "EADDRNOTAVAIL",
        "EAGAIN",
        "EINTR",
    )
    if hasattr(errno, name)
)

#: TLS errors that are a connection lost mid-handshake, not a handshake refused.
_TRANSIENT_SSL_ERRORS: Final = (
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
    ssl.SSLSyscallError,
    ssl.SSLWantReadError,
    ssl.SSLWantWriteError,
)


def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and the exceptions it was raised from or while handling (redis-py wraps
    socket, TLS and authentication errors: the cause is down the chain)."""
    out: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and all(cur is not seen for seen in out):
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _transient_reply(e: BaseException) -> bool:
    """An error reply of a server in transition (redis-py strips the code of those it
    maps to a class, so both are checked)."""
    if isinstance(
        e,
        rx.BusyLoadingError
        | rx.ClusterDownError
        | rx.TryAgainError
        | rx.ReadOnlyError
        | rx.AskError,
    ):
        return True
    return isinstance(e, rx.ResponseError) and str(e).split(" ", 1)[0] in _TRANSIENT_PREFIXES


def _auth_error(e: BaseException) -> bool:
    """Missing or wrong credentials, or an ACL refusal."""
    if isinstance(e, rx.AuthenticationError | rx.AuthorizationError | rx.NoPermissionError):
        return True
    text = str(e)
    return isinstance(e, rx.ResponseError) and (
        text.split(" ", 1)[0] in _PERMANENT_PREFIXES
        # What a server with a password answers a large first command sent without one.
        or text.startswith("Protocol error: unauthenticated")
    )


def _permanent(e: BaseException) -> bool:
    """Whether ``e`` itself (not its chain) is an error that no resend can fix."""
    if _auth_error(e):
        return True
    if isinstance(e, ssl.SSLError):
        # A certificate that does not verify, TLS spoken to a plain server...
        return not isinstance(e, _TRANSIENT_SSL_ERRORS)
    if isinstance(e, rx.RedisClusterException):
        message = str(e).lower()
        if "cluster mode is not enabled" in message:
            # redis-py says so for any error reply to CLUSTER SLOTS, LOADING included.
            reply = e.__cause__ or e.__context__
            return reply is None or not _transient_reply(reply)
        return any(m in message for m in _PERMANENT_CLUSTER_MESSAGES)
    if isinstance(e, OSError) and not isinstance(
        e, ConnectionError | TimeoutError | socket.gaierror | socket.herror
    ):
        # A missing or unreadable certificate file, an address the host cannot use...
        return e.errno is not None and e.errno not in _TRANSIENT_ERRNOS
    return False


def permanent_cause(e: BaseException) -> BaseException | None:
    """The error in ``e``'s chain that makes resending pointless (authentication, TLS,
    a node that is not in cluster mode...), or None."""
    for x in _chain(e):
        if _permanent(x):
            return x
    return None


def is_transient(e: BaseException) -> bool:
    """Whether resending the same publish may succeed: connection refused or lost,
    timeouts, cluster redirections and transitions, a replica or loading server
    (is_transient in Rust). Script errors, authentication, TLS and configuration errors
    (e.g. a ``redis-cluster://`` URL naming a server that is not in cluster mode) are not,
    even when redis-py reports them wrapped in a connection or cluster error."""
    if permanent_cause(e) is not None:
        return False
    if isinstance(
        e,
        rx.ConnectionError
        | rx.TimeoutError
        | rx.ClusterError
        | rx.ClusterDownError
        | rx.TryAgainError
        | rx.MasterDownError
        | rx.ReadOnlyError
        | rx.MovedError
        | rx.AskError
        | rx.SlotNotCoveredError
        | rx.BusyLoadingError
        | rx.RedisClusterException
        | TimeoutError
        | ConnectionError
        | EOFError
        | OSError,
    ):
        # OSErrors that _permanent did not single out: network errors.
        return True
    return _transient_reply(e)


def describe_failure(e: BaseException) -> str:
    """``e`` for a PublishError message, with its permanent cause when redis-py wrapped
    it, and a hint for the common configuration mistakes."""
    text = f"{type(e).__name__}: {e}"
    cause = permanent_cause(e)
    if cause is None:
        return text
    if cause is not e and str(cause) not in str(e):
        text += f" (caused by {type(cause).__name__}: {cause})"
    elif cause is not e:
        text += f" (caused by {type(cause).__name__})"
    if _auth_error(cause):
        text += "; check the user and password (URL or password=/username= options)"
    elif isinstance(cause, rx.RedisClusterException) and "cluster mode is not enabled" in (
        str(cause).lower()
    ):
        text += (
            "; a redis-cluster:// URL needs Redis Cluster nodes (cluster-enabled yes): "
            "use redis:// for a single server"
        )
    elif isinstance(cause, ssl.SSLError):
        text += "; check the TLS settings (rediss:// vs redis://, ssl_* options)"
    return text


def jitter(d: float) -> float:
    """d +-25 %, so that publishers that failed together do not resend in lockstep."""
    return d * random.uniform(0.75, 1.25)


class Backoff:
    """The retry schedule of one publish."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.started = time.monotonic()
        self.deadline = self.started + policy.deadline
        self.next = policy.initial_backoff
        self.attempts = 0

    def attempt_limit(self) -> float:
        left = self.deadline - time.monotonic()
        return min(self.policy.attempt_timeout, max(left, 0.001))

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def sleep_for(self) -> float | None:
        """The next backoff, or None when the deadline would pass first (give up)."""
        if self.policy.deadline <= 0 or time.monotonic() + self.next >= self.deadline:
            return None
        d = jitter(self.next)
        self.next = min(self.next * 2, self.policy.max_backoff)
        return d


# ----- what the sync and async publishers share around their I/O -----


def acknowledged(prepared: Prepared, reply: object, attempts: int) -> Position:
    """The Position in the publish script's reply, logged if it was not a plain first ack."""
    ack = parse_ack(reply)
    if ack.duplicate:
        log.info(
            "publish to %s was already applied (same idempotency key); offset %d",
            prepared.channel,
            ack.offset,
        )
    elif attempts > 1:
        log.info("publish to %s acknowledged after %d attempts", prepared.channel, attempts)
    return ack


def resend_pause(prepared: Prepared, e: Exception, backoff: Backoff, where: str) -> float:
    """Seconds to wait before resending after ``e``; raises PublishError when ``e`` is not
    transient, GaveUpError when the deadline would pass first."""
    if not is_transient(e):
        raise PublishError(
            f"publish to {prepared.channel} failed at {where}, not retried (the error is not "
            f"transient): {describe_failure(e)}"
        ) from e
    pause = backoff.sleep_for()
    if pause is None:
        raise GaveUpError(
            prepared.channel, backoff.attempts, backoff.elapsed(), e, prepared.key, where
        ) from e
    log.debug(
        "publish to %s failed transiently (%s); resending with the same key",
        prepared.channel,
        e,
    )
    return pause


class Closing:
    """``with x:`` closes ``x``."""

    def close(self) -> object:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClosing:
    """``async with x:`` closes ``x``."""

    async def close(self) -> object:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class PublisherBase:
    """Construction and configuration of Publisher and AsyncPublisher; they add the I/O."""

    #: The redis-py module their clients come from (``redis`` or ``redis.asyncio``).
    _redis_lib: ModuleType

    def __init__(self, client_factory: Any, *, where: str, settings: Settings) -> None:
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
    ) -> Self:
        """Publishes through ``redis://``, ``rediss://``, ``redis-cluster://h1:p1,h2:p2``
        (sharded pub/sub) or ``redis-sentinel://s1:p1,s2:p2/<service>[/db]``. Nothing is
        connected until the first publish (a worker may start before Redis). Extra
        keyword options go to the redis-py client (e.g. ``ssl_ca_certs``)."""
        parsed = parse_url(url)
        defaults = default_options(retry or RetryPolicy())
        settings = make_settings(parsed.kind == "cluster", retry, dedup, default_history, history)
        factory = client_factory(parsed, defaults, redis_options, cls._redis_lib)
        return cls(factory, where=parsed.where(), settings=settings)

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

    def _check_open(self) -> None:
        if self._closed:
            raise FanoutError("the publisher is closed")


def history_call(channel: str, after: int, limit: int) -> tuple[bytes, str, list[str], list[Any]]:
    """The (script, sha, keys, args) of a history read."""
    validate_channel(channel)
    keys = [meta_key(channel), history_key(channel)]
    return HISTORY_SCRIPT, HISTORY_SCRIPT_SHA, keys, ["after", after, limit]


def publish_call(prepared: Prepared) -> tuple[bytes, str, list[str], list[Any]]:
    """The (script, sha, keys, args) of a publish."""
    return PUBLISH_SCRIPT, PUBLISH_SCRIPT_SHA, prepared.keys, prepared.args


P = TypeVar("P", bound=PublisherBase)


class BackgroundBase(Generic[P]):
    """The queue, counters and non-blocking helpers of BackgroundPublisher and
    AsyncBackgroundPublisher; they add the draining (a thread or a task)."""

    def __init__(
        self, publisher: P, capacity: int, guard: contextlib.AbstractContextManager[Any]
    ) -> None:
        self._publisher = publisher
        self._capacity = max(1, capacity)
        # The lock of the counters and queue: the thread's condition; none for a task.
        self._guard = guard
        self._queue: deque[Prepared] = deque()
        self._pending = 0
        self._closed = False
        self.published = 0
        self.dropped = 0
        self.failed = 0

    def _enqueue(self, prepared: Prepared) -> str | None:
        """Queues ``prepared``, or returns why it was not (closed, queue full)."""
        raise NotImplementedError

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
        reason = self._enqueue(prepared)
        if reason is not None:
            self._drop(reason, channel)
            return False
        return True

    def job_progress(
        self, job_id: object, pct: float | None = None, message: str | None = None, **extra: Any
    ) -> bool:
        return self.publish(*progress_message(job_id, pct, message, extra))

    def job_completed(
        self, job_id: object, status: JobStatus = "succeeded", result: Any = None
    ) -> bool:
        try:
            msg = completion_message(job_id, status, result)
        except Exception as e:
            self._drop(str(e), job_channel(job_id))
            return False
        return self.publish(*msg)

    def user_event(self, user: object, event: str, data: Any) -> bool:
        return self.publish(user_channel(user), data, event)

    @property
    def pending(self) -> int:
        """Messages queued or being published."""
        with self._guard:
            return self._pending

    def _drop(self, reason: str, channel: str) -> None:
        with self._guard:
            self.dropped += 1
            n = self.dropped
        if n % 1000 == 1:
            log.warning(
                "background publish to %s dropped (%s); dropped so far: %d", channel, reason, n
            )

    def _failed(self, item: Prepared, e: Exception) -> None:
        with self._guard:
            self.failed += 1
            n = self.failed
        if n % 1000 == 1:
            log.warning(
                "background publish to %s failed; message dropped: %s; failed so far: %d",
                item.channel,
                e,
                n,
            )
