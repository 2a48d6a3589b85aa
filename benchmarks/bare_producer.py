"""A bare producer for the Redis per-call row: `bare_producer.py URL NAMESPACE TYPE N`.

Writes N no-op tasks the way the runner stores them (a stream entry with fields ``a`` and
``t``, the runner's own envelope, and the capacity count) with one round trip per task (a
MULTI of XADD and INCR), the floor cost of a producer that publishes one task per call. Prints
its start time (time.perf_counter, which is system-wide on Linux) before the first write, so the
parent measures from then to the last task finished.
"""

from __future__ import annotations

import sys
import time

import redis

from runner.brokers.redis.scripts import GROUP
from runner.codec import encode_task
from runner.model import Task


def main() -> None:
    url, namespace, type_name, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    prefix = "{" + namespace + "}:"
    stream, count = f"{prefix}q:{type_name}", f"{prefix}count"
    client = redis.Redis.from_url(url, protocol=2)
    client.sadd(f"{prefix}types", type_name)
    if not client.exists(stream):
        client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    print(time.perf_counter(), flush=True)
    for _ in range(n):
        envelope = encode_task(Task(type=type_name, payload=None, enqueued_at=time.time()))
        pipe = client.pipeline(transaction=True)
        pipe.xadd(stream, {"a": "0", "t": envelope})
        pipe.incr(count)
        pipe.execute()
    client.close()


if __name__ == "__main__":
    main()
