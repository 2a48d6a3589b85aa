"""The circuit watch: tells the logs and metrics when a circuit breaker's state changes.

Circuits live in the broker (runner.brokers.flow has their state machine) and change inside its
claims and settles, in whichever process makes them; so each process reads them every
``WATCH_S`` and reports the changes it sees as ``circuit.opened``, ``circuit.half_open`` and
``circuit.closed`` (every process logs each change it sees; a change undone within one
interval may go unseen). A state other than closed found at the first look is reported too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from runner.brokers.base import Broker, Circuit
from runner.engine.periodic import Periodic
from runner.errors import BrokerError
from runner.events import Event, EventBus, EventName

log = logging.getLogger("runner.worker")

#: How often the circuits are read.
WATCH_S = 1.0

_EVENTS = {
    "open": EventName.CIRCUIT_OPENED,
    "half_open": EventName.CIRCUIT_HALF_OPEN,
    "closed": EventName.CIRCUIT_CLOSED,
}


class CircuitWatch:
    """Reads the circuits of ``types`` from its own thread (``start``/``stop``), or once
    (``look``, for tests)."""

    def __init__(self, broker: Broker, types: Sequence[str], events: EventBus) -> None:
        self._broker = broker
        self._types = frozenset(types)
        self._events = events
        self._seen: dict[str, Circuit] = {}
        self._loop = Periodic("dq-circuits", WATCH_S, self.look, "circuits not read")

    def start(self) -> None:
        self._loop.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread, after a last look (a change since the last one is reported)."""
        if not self._loop.stop(timeout):
            return
        try:
            self.look()
        except BrokerError as exc:
            log.debug("circuits not read at stop: %s", exc)

    def look(self) -> None:
        """Read the circuits; report each one whose state differs from the last look."""
        for name, circuit in self._broker.circuits().items():
            if name not in self._types:
                continue
            before = self._seen.get(name)
            self._seen[name] = circuit
            if before is None and circuit.state == "closed":
                continue
            if before is None or before.state != circuit.state:
                detail = None
                if circuit.state == "open":
                    detail = f"{circuit.failures} of {circuit.calls} calls failed"
                self._events.emit(Event(_EVENTS[circuit.state], type=name, detail=detail))
