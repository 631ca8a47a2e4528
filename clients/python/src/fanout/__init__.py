"""fanout: publish events to fanout channels from Python workers, and mint the tokens
the fanout edge accepts.

    from fanout import Publisher, AsyncPublisher, tokens
    p = Publisher.from_url("redis://127.0.0.1:6379")
    pos = p.publish("user:42", {"text": "hi"}, event="notice")   # pos.offset, pos.epoch
"""

from . import tokens
from ._core import (
    DEDUP_MAX_KEYS,
    DEDUP_WINDOW_SECS,
    HISTORY_SCRIPT,
    PUBLISH_SCRIPT,
    DedupPolicy,
    HistoryPolicy,
    JobStatus,
    Position,
    RetryPolicy,
    new_idempotency_key,
    valid_idempotency_key,
)
from ._errors import (
    DataNotSerializableError,
    FanoutError,
    GaveUpError,
    InvalidChannelError,
    InvalidIdempotencyKeyError,
    InvalidURLError,
    PublishError,
    UnexpectedReplyError,
)
from .aio import AsyncBackgroundPublisher, AsyncPublisher
from .publisher import BackgroundPublisher, History, Publisher
from .tokens import TokenError

__version__ = "0.1.0"

__all__ = [
    "DEDUP_MAX_KEYS",
    "DEDUP_WINDOW_SECS",
    "HISTORY_SCRIPT",
    "PUBLISH_SCRIPT",
    "AsyncBackgroundPublisher",
    "AsyncPublisher",
    "BackgroundPublisher",
    "DataNotSerializableError",
    "DedupPolicy",
    "FanoutError",
    "GaveUpError",
    "History",
    "HistoryPolicy",
    "InvalidChannelError",
    "InvalidIdempotencyKeyError",
    "InvalidURLError",
    "JobStatus",
    "Position",
    "PublishError",
    "Publisher",
    "RetryPolicy",
    "TokenError",
    "UnexpectedReplyError",
    "__version__",
    "new_idempotency_key",
    "tokens",
    "valid_idempotency_key",
]
