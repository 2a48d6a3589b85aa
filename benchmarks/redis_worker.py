"""One benchmark worker process on a shared Redis: `redis_worker.py URL NAMESPACE THREADS`.

Prints "ready" once its workers run, then runs until stdin closes (the parent's signal to stop).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_cases import make_config

from runner.app import build_runtime


def main() -> None:
    url, namespace, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    config = make_config("redis", threads, url=url, namespace=namespace)
    runner = build_runtime(config, observe=False).start()
    print("ready", flush=True)
    sys.stdin.read()
    runner.worker.stop(1.0)
    runner.broker.close()


if __name__ == "__main__":
    main()
