"""The example's worker: enriches each row of a job's CSV and publishes its progress.

Progress goes straight into Redis with the ``fanout`` package (offsets, history: a
page that reconnects gets what it missed). Each row's progress is published under the
idempotency key ``<job>:<row>`` and the row is recorded as done after it: a worker
killed between the two and restarted publishes that row again, and the key makes the
second publish a duplicate that nobody receives. So the page sees every row once.

Settings (environment): FANOUT_REDIS_URL; EXAMPLE_ROW_SECONDS, the time one row takes
(default 0.05).
"""

from __future__ import annotations

import logging
import os
import signal
import time

import jobs
import redis
from fanout import Publisher

log = logging.getLogger("worker")


def run_job(r: redis.Redis, publisher: Publisher, job: jobs.Job, row_seconds: float) -> None:
    job_id, rows = job["id"], job["rows"]
    total = len(rows)
    start = jobs.done(r, job_id)
    if start:
        log.info("job %s: resuming after row %d of %d", job_id, start, total)
    for i in range(start + 1, total + 1):
        time.sleep(row_seconds)  # the "enrichment" of rows[i - 1]
        pct = round(i * 100 / total, 1)
        publisher.publish(
            f"job_progress:{job_id}",
            {"status": "running", "pct": pct, "row": i, "message": f"row {i} of {total}"},
            event="progress",
            idempotency_key=f"{job_id}:{i}",
        )
        jobs.mark_done(r, job_id, i)
    publisher.publish(
        f"job_progress:{job_id}",
        {"status": "succeeded", "result": {"rows": total}},
        event="completed",
        idempotency_key=f"{job_id}:completed",
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(message)s")
    url = os.environ.get("FANOUT_REDIS_URL", "redis://127.0.0.1:6379")
    row_seconds = float(os.environ.get("EXAMPLE_ROW_SECONDS", "0.05"))
    r = redis.Redis.from_url(url)
    publisher = Publisher.from_url(url)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for raw, job in jobs.unfinished(r):
        run_job(r, publisher, job, row_seconds)
        jobs.finish(r, raw)
    log.info("ready")
    while not stopping:
        taken = jobs.take(r, timeout=1)
        if taken is None:
            continue
        raw, job = taken
        log.info("job %s: %d rows for %s", job["id"], len(job["rows"]), job["user"])
        run_job(r, publisher, job, row_seconds)
        jobs.finish(r, raw)
        log.info("job %s: done", job["id"])
    publisher.close()


if __name__ == "__main__":
    main()
