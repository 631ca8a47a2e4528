"""The job queue the backend and the worker share: a Redis list, made reliable.

A worker moves a job from ``jobs:queue`` to ``jobs:processing`` as it takes it
(``BLMOVE``), records the rows it finished in ``job:<id>:done``, and removes the job
from ``jobs:processing`` only when it is complete. A worker that dies mid-job leaves
the job there; the next one to start resumes it from the row after the last one done.
"""

from __future__ import annotations

import json
from typing import Any, TypedDict

import redis

QUEUE = "jobs:queue"
PROCESSING = "jobs:processing"
MAX_ROWS = 1000


class Job(TypedDict):
    id: str
    user: str
    rows: list[str]


def rows_of(csv_text: str) -> list[str]:
    """The data rows of a CSV (the first line is its header), at most ``MAX_ROWS``."""
    lines = [line for line in csv_text.splitlines() if line.strip()]
    return lines[1 : MAX_ROWS + 1]


def enqueue(r: redis.Redis, job: Job) -> None:
    r.lpush(QUEUE, json.dumps(job))


def take(r: redis.Redis, timeout: int) -> tuple[str, Job] | None:
    """The next job, moved to the processing list; ``None`` after ``timeout`` seconds.

    The job comes with its entry as stored, which ``finish`` removes.
    """
    raw: Any = r.blmove(QUEUE, PROCESSING, timeout, "RIGHT", "LEFT")
    return None if raw is None else (raw.decode(), json.loads(raw))


def unfinished(r: redis.Redis) -> list[tuple[str, Job]]:
    """Jobs a worker took and did not finish (it died), oldest first."""
    raws: Any = r.lrange(PROCESSING, 0, -1)
    return [(raw.decode(), json.loads(raw)) for raw in reversed(raws)]


def done(r: redis.Redis, job_id: str) -> int:
    """How many rows of the job are finished."""
    value: Any = r.get(f"job:{job_id}:done")
    return int(value or 0)


def mark_done(r: redis.Redis, job_id: str, rows: int) -> None:
    r.set(f"job:{job_id}:done", rows, ex=86400)


def finish(r: redis.Redis, raw: str) -> None:
    r.lrem(PROCESSING, 1, raw)
