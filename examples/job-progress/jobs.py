"""The job queue the backend and the worker share: a Redis list, made reliable.

A worker moves a job from ``jobs:queue`` to ``jobs:processing`` as it takes it
(``BLMOVE``) and holds a lease on it (``job:<id>:lease``, renewed as it works). It
records the rows it finished in ``job:<id>:done`` and removes the job from
``jobs:processing`` only when it is complete. A worker that dies mid-job stops renewing
its lease; once the lease expires, any worker takes the job over and resumes it from the
row after the last one done. Two live workers never work on one job.
"""

from __future__ import annotations

import json
from typing import Any, TypedDict

import redis

QUEUE = "jobs:queue"
PROCESSING = "jobs:processing"
MAX_ROWS = 1000
#: How long a job stays with a worker that stopped renewing its lease.
LEASE_MS = 3000

# Renew a lease only if this worker still holds it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return false
"""


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


def _lease(job_id: str) -> str:
    return f"job:{job_id}:lease"


def take(r: redis.Redis, worker: str, timeout: int) -> tuple[str, Job] | None:
    """The next job, moved to the processing list and leased to ``worker``; ``None``
    after ``timeout`` seconds. The job comes with its entry as stored, for ``finish``."""
    raw: Any = r.blmove(QUEUE, PROCESSING, timeout, "RIGHT", "LEFT")
    if raw is None:
        return None
    job: Job = json.loads(raw)
    r.set(_lease(job["id"]), worker, px=LEASE_MS)
    return raw.decode(), job


def take_abandoned(r: redis.Redis, worker: str) -> list[tuple[str, Job]]:
    """Jobs whose worker died (their lease expired), now leased to ``worker``, oldest first."""
    raws: Any = r.lrange(PROCESSING, 0, -1)
    taken = []
    for raw in reversed(raws):
        job: Job = json.loads(raw)
        if r.set(_lease(job["id"]), worker, px=LEASE_MS, nx=True):
            taken.append((raw.decode(), job))
    return taken


def renew(r: redis.Redis, job_id: str, worker: str) -> bool:
    """Extends ``worker``'s lease on the job; ``False`` if it lost it (it must stop)."""
    return bool(r.eval(_RENEW, 1, _lease(job_id), worker, str(LEASE_MS)))


def done(r: redis.Redis, job_id: str) -> int:
    """How many rows of the job are finished."""
    value: Any = r.get(f"job:{job_id}:done")
    return int(value or 0)


def mark_done(r: redis.Redis, job_id: str, rows: int) -> None:
    r.set(f"job:{job_id}:done", rows, ex=86400)


def finish(r: redis.Redis, raw: str, job_id: str) -> None:
    r.lrem(PROCESSING, 1, raw)
    r.delete(_lease(job_id))
