"""The runner's own producer in a process of its own, for the Redis per-call rows:
`runner_producer.py URL NAMESPACE N`.

Publishes N no-op tasks of the benchmarks' type with one ``Runner.publish()`` per task (as a web
application's process enqueues, with no worker of its own), on the config the worker process
uses (engine_cases.make_config). Prints its start time (time.perf_counter, which is
system-wide on Linux) before the first publish, so the parent measures from then to the last
task finished, as it does for bare_producer.py.
"""

from __future__ import annotations

import sys
import time

import engine_cases as ec


def main() -> None:
    url, namespace, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    runner, _ = ec._runner(ec.make_config("redis", 1, url=url, namespace=namespace))
    publish = runner.publish
    print(time.perf_counter(), flush=True)
    for _ in range(n):
        publish(ec.TYPE, None)
    runner.broker.close()


if __name__ == "__main__":
    main()
