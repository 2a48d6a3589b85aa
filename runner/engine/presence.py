"""A running process's presence in the broker: which task types it runs, for ``dq-run stats``.

Each process sharing a broker keeps one value, ``process:<host>:<pid>`` -> JSON (host, pid, the
types it runs, when it started), set with a ttl of ``TTL_S`` and refreshed every
``REFRESH_S`` from its own thread; it deletes it when it stops. A process that dies without
stopping drops out once the ttl runs out. Presence is for people, never for routing: nothing
decides anything by it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Sequence

from runner.brokers.base import Broker, SetValue
from runner.engine.periodic import Periodic
from runner.errors import BrokerError

log = logging.getLogger("runner.worker")

#: The prefix of a process's key among the broker's values.
PREFIX = "process:"
#: How long an entry lasts without a refresh (a process killed drops out after this).
TTL_S = 30.0
#: How often a running process refreshes its entry.
REFRESH_S = 10.0


class Presence:
    """Keeps this process's entry from its own thread (``start``/``stop``)."""

    def __init__(self, broker: Broker, types: Sequence[str]) -> None:
        host, pid = socket.gethostname(), os.getpid()
        self.key = f"{PREFIX}{host}:{pid}"
        self._value = json.dumps(
            {"host": host, "pid": pid, "types": sorted(types), "started_at": time.time()}
        )
        self._broker = broker
        self._loop = Periodic("dq-presence", REFRESH_S, self._refresh, "presence not refreshed")

    def start(self) -> None:
        self._refresh()
        self._loop.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop refreshing and delete the entry (best effort: the ttl ends it otherwise)."""
        if not self._loop.stop(timeout):
            return
        try:
            self._broker.delete_values([self.key])
        except BrokerError as exc:
            log.debug("presence not deleted: %s", exc)

    def _refresh(self) -> None:
        self._broker.set_values([SetValue(self.key, self._value, TTL_S)])


def processes(broker: Broker) -> list[dict[str, object]]:
    """The processes whose entry is live, oldest first: host, pid, types, started_at."""
    found = []
    for value in broker.scan_values(PREFIX).values():
        try:
            found.append(json.loads(value))
        except ValueError:
            continue  # not ours
    return sorted(found, key=lambda p: (float(p.get("started_at", 0)), str(p.get("host"))))
