"""A Python worker for the browser tests: publishes ``{"n": 1..count}`` as job progress.

    python publish_numbers.py REDIS_URL CHANNEL COUNT INTERVAL_SECONDS

Through the ``fanout`` package, straight into Redis (a Redis Cluster included: the
publisher follows failovers, resending under each publish's idempotency key). Prints
``<n> <offset>`` after each publish, for the test to act at a given number; exits 1 on
the first publish that fails.
"""

import sys
import time

from fanout import Publisher


def main() -> int:
    url, channel, count, interval = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    # A job channel keeps 100 messages by default. At this test's rate (about 250 a
    # second) that is 0.4 s: a page offline longer, or the edge's window between a
    # failover and its resubscription, needs more. A real high-rate stream sizes its
    # namespace's history the same way.
    publisher = Publisher.from_url(url).with_history(
        "job_progress", size=1000, ttl=600, finished_ttl=600
    )
    last = 0
    for n in range(1, count + 1):
        pos = publisher.publish(channel, {"status": "running", "n": n}, event="progress")
        if pos.offset <= last:
            print(f"offset went back: {n} at {pos.offset} after {last}", file=sys.stderr)
            return 1
        last = pos.offset
        print(n, pos.offset, flush=True)
        time.sleep(interval)
    publisher.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
