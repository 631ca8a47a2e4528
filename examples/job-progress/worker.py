"""The example's worker: enriches each row of a job's CSV and publishes its progress.

Progress goes straight into Redis with the ``fanout`` package (offsets, history: a
page that reconnects gets what it missed). Each row's progress is published under the
idempotency key ``<job>:<row>`` and the row is recorded as done after it: a worker that
dies between the two publishes that row again when the job is resumed, and within the
key's window (5 minutes) that second publish is a duplicate that nobody receives. So the
page sees every row once, unless the job is resumed more than 5 minutes later.

Settings (environment): FANOUT_REDIS_URL; EXAMPLE_ROW_SECONDS, the time one row takes
(default 0.05); EXAMPLE_DIE_AFTER_ROW, for tests: exit right after publishing that row,
before recording it (the worst moment to die).
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import time

import jobs
import redis
from fanout import Publisher

log = logging.getLogger("worker")


def run_job(
    r: redis.Redis, publisher: Publisher, worker: str, job: jobs.Job, row_seconds: float
) -> bool:
    """Works the job to its end; ``False`` if its lease was lost on the way."""
    job_id, rows = job["id"], job["rows"]
    total = len(rows)
    die_after = int(os.environ.get("EXAMPLE_DIE_AFTER_ROW", "0"))
    start = jobs.done(r, job_id)
    if start:
        log.info("job %s: resuming after row %d of %d", job_id, start, total)
    for i in range(start + 1, total + 1):
        time.sleep(row_seconds)  # the "enrichment" of rows[i - 1]
        if not jobs.renew(r, job_id, worker):
            log.warning("job %s: lease lost at row %d; leaving it", job_id, i)
            return False
        pct = round(i * 100 / total, 1)
        publisher.publish(
            f"job_progress:{job_id}",
            {"status": "running", "pct": pct, "row": i, "message": f"row {i} of {total}"},
            event="progress",
            idempotency_key=f"{job_id}:{i}",
        )
        if i == die_after:
            log.warning("job %s: dying after publishing row %d (EXAMPLE_DIE_AFTER_ROW)", job_id, i)
            os._exit(3)
        jobs.mark_done(r, job_id, i)
    publisher.publish(
        f"job_progress:{job_id}",
        {"status": "succeeded", "result": {"rows": total}},
        event="completed",
        idempotency_key=f"{job_id}:completed",
    )
    return True


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(message)s")
    url = os.environ.get("FANOUT_REDIS_URL", "redis://127.0.0.1:6379")
    row_seconds = float(os.environ.get("EXAMPLE_ROW_SECONDS", "0.05"))
    worker = f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(4)}"
    r = redis.Redis.from_url(url)
    publisher = Publisher.from_url(url)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("ready")
    while not stopping:
        # Jobs of workers that died first, then new ones.
        work = jobs.take_abandoned(r, worker)
        if not work:
            taken = jobs.take(r, worker, timeout=1)
            work = [] if taken is None else [taken]
        for raw, job in work:
            log.info("job %s: %d rows for %s", job["id"], len(job["rows"]), job["user"])
            if run_job(r, publisher, worker, job, row_seconds):
                jobs.finish(r, raw, job["id"])
                log.info("job %s: done", job["id"])
    publisher.close()


if __name__ == "__main__":
    main()
