"""One fetch from the broker into room the books reserved: the dispatcher's and the threads' own.

A blocking fetch is a ``broker.get`` (the dispatcher's wait for an empty queue); any other is a
``broker.exchange`` that carries the settles of finished tasks along (one transaction or round
trip for both), whose answers go to the Settler to report. Whatever happens, the books get
the reservation back and hold what came. A broker error never kills the fetching thread: it is
logged and the fetch counts as failed (None). The books also hear whether a blocking fetch
waited for its tasks (the queue was empty when it asked: runner.engine.books, the leader).
"""

from __future__ import annotations

import logging
import time

from runner.brokers.base import Broker, Delivery, SettleIncomplete
from runner.engine.books import GET_TIMEOUT_S, Books, Fetch
from runner.engine.settle import Settler
from runner.errors import BrokerClosed, BrokerError

log = logging.getLogger("runner.worker")

#: A blocking get that took longer than this waited for a task: the process was idle.
WAITED_S = 0.0005


class Fetcher:
    """Makes the fetches the books ask for."""

    def __init__(self, broker: Broker, books: Books, settler: Settler) -> None:
        self._broker = broker
        self._books = books
        self._settler = settler

    def run(self, fetch: Fetch, by_dispatcher: bool) -> int | None:
        """Make ``fetch`` (no lock held). Returns how many came, None when the broker call
        failed (logged); raises BrokerClosed."""
        slots, room = fetch.reservation.slots, fetch.reservation.room
        deliveries: list[Delivery] = []
        call = "get" if fetch.block else "exchange"
        began = time.monotonic()
        try:
            if fetch.block:
                deliveries = self._broker.get(slots, room, GET_TIMEOUT_S)
                return len(deliveries)
            settles = [outcome.settle for outcome in fetch.carry]
            try:
                answers, deliveries = self._broker.exchange(settles, slots, room)
            except SettleIncomplete as exc:
                # Those that took effect are reported now (sent again later, one might no
                # longer be remembered as done); the Settler tries the others again.
                reported, answers = [], []
                for outcome, answer in zip(fetch.carry, exc.answers, strict=True):
                    if answer is None:
                        self._settler.submit(outcome)
                    else:
                        reported.append(outcome)
                        answers.append(answer)
                self._settler.report(reported, answers)
                raise
            except Exception:
                for outcome in fetch.carry:
                    self._settler.submit(outcome)  # tried again there (settles are fenced)
                raise
            self._settler.report(fetch.carry, answers)
            return len(deliveries)
        except BrokerClosed:
            raise
        except BrokerError as exc:
            log.warning("broker.%s failed: %s", call, exc)
            return None
        except Exception:
            # Not a broker error the broker knew to wrap (a bug, or a backend error it did
            # not expect): no fetching thread may die of it, or the worker stops consuming.
            log.exception("broker.%s failed; the worker continues", call)
            return None
        finally:
            lead = fetch.block and not by_dispatcher  # a worker thread's get: the leader's
            waited = fetch.block and time.monotonic() - began > WAITED_S
            self._books.fetched(fetch.reservation, deliveries, by_dispatcher, lead, waited)
