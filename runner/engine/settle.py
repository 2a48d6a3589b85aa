"""Settling finished attempts with the broker: inline, or in the background in batches.

A worker thread that finished a task has one broker call left (ack, retry, dead or release).
On SQLite and Redis it costs a transaction or a round trip, and a thread waiting for it is a
thread not running handlers. On the memory broker it costs a hold of the lock that the publisher
and the fetch take too: one per task from every thread made threads queue on it whenever the
interpreter switched a holder out, which halved the rate in some runs. So on every built-in
broker (``batch_settles``) the thread hands the call on and takes its next task at once:

- to the Worker's next fetch (a worker thread's own, or the dispatcher's when it is not blocked
  in one and the broker ``carry_settles``), which sends every settle handed on meanwhile along
  with it (``Broker.exchange``: one transaction / one round trip for both) and reports them
  through ``Settler.report``;
- otherwise to the Settler's own thread, which sends everything handed to it meanwhile in one
  ``broker.settle_many`` call (and retries when the broker is unavailable).

What does not change: the outcome event (task.succeeded / retrying / dead, or task.lease_lost
when the broker answered FENCED) is emitted only once the broker answered (DONE, or
ALREADY_DONE for a call sent again after its first reply was lost), and a task whose settle did
not go through stays leased, so it comes back once its lease expires (at-least-once). The
Worker keeps holding (and renewing the lease of) every delivery until its settle is answered,
and stops taking tasks while ``max_unsettled`` are waiting, so a slow broker slows the workers
down instead of piling up finished tasks.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

from runner.brokers.base import Answer, Broker, Settle, SettleIncomplete, settle_one
from runner.errors import BrokerClosed, BrokerError, BrokerUnavailable
from runner.events import EventName

log = logging.getLogger("runner.worker")

#: Pauses before trying a settle again after BrokerUnavailable (a SQLite file whose write lock a
#: frozen process holds past the busy timeout, a Redis reconnect). Giving up at once would leave
#: the task leased, to run a second time once the lease expires.
SETTLE_PAUSES_S = (0.05, 0.25, 1.0)

#: The most settles sent in one broker call.
MAX_BATCH = 256


class Outcome(NamedTuple):
    """How an attempt ended: the broker call to make, and the event to emit once it is made.

    ``event`` is None for a call with no event of its own (a task handed back at shutdown).
    """

    settle: Settle
    event: EventName | None
    fields: Mapping[str, Any] = MappingProxyType({})


#: Told about each outcome once the broker answered: DONE, ALREADY_DONE (an earlier call under
#: the same receipt took effect: its reply was lost), FENCED (refused: another delivery owns the
#: task) or None (no answer; the task comes back when its lease expires).
Report = Callable[[Outcome, "Answer | None"], None]


class Settler:
    """Makes the broker calls of finished attempts; see the module docstring."""

    def __init__(
        self,
        broker: Broker,
        report: Report,
        background: bool,
        batch_done: Callable[[Sequence[Outcome]], None] | None = None,
    ) -> None:
        """``report`` hears every outcome's answer; ``batch_done`` each background batch once
        all of it was reported."""
        self.broker = broker
        self.background = background
        self._report = report
        self._batch_done = batch_done
        self._queue: queue.SimpleQueue[Outcome | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="dq-settler", daemon=True)

    def start(self) -> None:
        if self.background:
            self._thread.start()

    def stop(self, timeout: float) -> None:
        """Settle everything handed over so far, then end the background thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    def submit(self, outcome: Outcome) -> None:
        """Hand ``outcome`` to the background thread (or settle it now when inline)."""
        if self.background:
            self._queue.put(outcome)
        else:
            self.settle_now(outcome)

    def settle_now(self, outcome: Outcome) -> None:
        """Settle one outcome in this thread with the broker's single call, and report it."""
        op = outcome.settle
        try:
            answer: Answer | None = settle_one(self.broker, op)
        except BrokerError as exc:
            answer = self._after_failure([op], exc)[0]
        except Exception:
            answer = self._unexpected([op])[0]
        self._report(outcome, answer)

    def settle(self, outcomes: Sequence[Outcome]) -> None:
        """Settle ``outcomes`` in one ``settle_many`` call, in this thread, and report them."""
        self.report(outcomes, self.call([o.settle for o in outcomes]))

    def report(self, outcomes: Sequence[Outcome], answers: Sequence[Answer | None]) -> None:
        """Report a batch the broker answered (here, or along with a fetch: Broker.exchange)."""
        try:
            for outcome, answer in zip(outcomes, answers, strict=True):
                self._report(outcome, answer)
        finally:
            if self._batch_done is not None:
                self._batch_done(outcomes)

    def call(self, ops: Sequence[Settle]) -> list[Answer | None]:
        """``broker.settle_many(ops)``: the answers, None for each op it could not answer."""
        try:
            return list(self.broker.settle_many(ops))
        except BrokerError as exc:
            return self._after_failure(ops, exc)
        except Exception:
            return self._unexpected(ops)

    def _unexpected(self, ops: Sequence[Settle]) -> list[Answer | None]:
        """No answers after an error the broker did not wrap (a bug, or a backend error it did
        not expect): the tasks stay leased and come back when their leases expire."""
        log.exception("broker settle of %d task(s) failed unexpectedly", len(ops))
        return [None] * len(ops)

    def _after_failure(self, ops: Sequence[Settle], exc: BrokerError) -> list[Answer | None]:
        """The answers to ``ops`` after ``settle_many`` raised ``exc``.

        BrokerUnavailable is tried again after each of SETTLE_PAUSES_S (settles are fenced by
        the receipt, so trying again is safe: an op whose first reply was lost answers
        ALREADY_DONE); after SettleIncomplete, only the ops that failed are. Any other broker
        error fails the ops one by one (so one bad op cannot sink the rest of its batch) and
        gives up on those that still fail.
        """
        answers: list[Answer | None] = [None] * len(ops)
        left = list(range(len(ops)))  # the ops without an answer yet, by index
        for pause in (*SETTLE_PAUSES_S, None):
            if isinstance(exc, SettleIncomplete):  # answered for the ops ``left`` held
                for i, answer in zip(left, exc.answers, strict=True):
                    answers[i] = answer
                left = [i for i in left if answers[i] is None]
            if pause is None or not isinstance(exc, BrokerUnavailable):
                break
            log.warning("broker settle of %d task(s) failed, trying again in %ss: %s",
                        len(left), pause, exc)  # fmt: skip
            time.sleep(pause)
            try:
                again = self.broker.settle_many([ops[i] for i in left])
            except BrokerError as error:
                exc = error
                continue
            for i, answer in zip(left, again, strict=True):
                answers[i] = answer
            return answers
        if len(left) > 1 and not isinstance(exc, BrokerUnavailable | BrokerClosed):
            for i in left:
                answers[i] = self.call([ops[i]])[0]
            return answers
        ids = ", ".join(ops[i].delivery.task.id for i in left)
        log.warning("broker settle failed for task %s, giving up: %s", ids, exc)
        return answers

    def _loop(self) -> None:
        stopping = False  # the stop marker was seen: end once the queue is empty
        while True:
            try:
                item = self._queue.get(block=not stopping)
            except queue.Empty:
                return
            batch: list[Outcome] = []
            while True:
                if item is None:
                    stopping = True
                else:
                    batch.append(item)
                if len(batch) >= MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                try:
                    self.settle(batch)
                except Exception:
                    log.exception("settler error; the tasks come back when their leases expire")
