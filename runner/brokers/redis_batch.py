"""Group commit for the Redis broker's settle calls (ack, retry, dead, release).

Several worker threads finishing at about the same time would each pay one Redis round trip.
``GroupCommit`` lets the first caller to arrive flush everything pending in one call (one
batched, fenced Lua script); callers arriving while that flush is under way queue up, and the
next of them to run flushes all of those together. No one waits on purpose: a lone caller
flushes at once, so a single-threaded worker pays exactly what it paid before.

Every caller still gets its own answer, and only after Redis gave it: the flush returns one
result per operation, in order. When the flush raises (Redis unreachable past the reconnect
timeout, broker closed), every caller in that batch raises the same error, exactly as each
would have had it called on its own; a lost reply may still mean the settle happened, which
the fencing makes safe to try again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

Op = TypeVar("Op")
R = TypeVar("R")


@dataclass(eq=False)
class _Slot(Generic[Op, R]):
    op: Op
    taken: bool = False  # in a batch under way
    done: bool = False
    result: R | None = None
    error: BaseException | None = None


@dataclass(eq=False)
class Batch(Generic[Op, R]):
    """Operations taken for one flush."""

    slots: list[_Slot[Op, R]]
    lead: bool  # the one flush of submit's own; a claimed batch may run beside it

    @property
    def ops(self) -> list[Op]:
        return [s.op for s in self.slots]


class GroupCommit(Generic[Op, R]):
    """Runs ``flush(ops) -> results`` for batches of concurrent ``submit(op)`` calls.

    ``flush`` must return exactly one result per op, in order. At most one ``submit``-led flush
    runs at a time, in the thread of one of the waiting callers, never in a background thread;
    a batch taken by ``claim`` may run beside it.
    """

    def __init__(self, flush: Callable[[Sequence[Op]], Sequence[R]]) -> None:
        self._flush = flush
        self._cond = threading.Condition(threading.Lock())
        self._pending: list[_Slot[Op, R]] = []
        self._flushing = False

    def submit(self, op: Op) -> R:
        """``op``'s own result from the flush that carried it; raises what that flush raised."""
        slot: _Slot[Op, R] = _Slot(op)
        with self._cond:
            self._pending.append(slot)
            # Wait for the batch that took this op, or for the flush under way to end.
            while not slot.done and (slot.taken or self._flushing):
                self._cond.wait()
            batch = None if slot.done else self._take()
        if batch is not None:
            try:
                results: Sequence[R] | BaseException = self._flush(batch.ops)
            except BaseException as exc:  # handed to every caller of the batch, re-raised there
                results = exc
            self.finish(batch, results)
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]  # set together with done

    def claim(self) -> Batch[Op, R] | None:
        """Everything pending, for a caller that carries it in a call of its own (the broker's
        get sends it along with its poll); None when nothing waits. It may run beside a flush
        under way: the operations are independent, each fenced on its own, and each batch runs
        atomically. The caller must hand the outcome to ``finish``, whatever happens."""
        with self._cond:
            if not self._pending:
                return None
            return self._batch(lead=False)

    def finish(self, batch: Batch[Op, R], results: Sequence[R] | BaseException) -> None:
        """Answer every caller of ``batch``: one result per op in order, or the error."""
        if not isinstance(results, BaseException) and len(results) != len(batch.slots):
            results = RuntimeError(f"{len(results)} results for {len(batch.slots)} operations")
        with self._cond:
            for i, s in enumerate(batch.slots):
                if isinstance(results, BaseException):
                    s.error = results
                else:
                    s.result = results[i]
                s.done = True
            if batch.lead:
                self._flushing = False
            self._cond.notify_all()

    def _take(self) -> Batch[Op, R]:
        # Lock held: become the one flush under way and take everything queued meanwhile.
        self._flushing = True
        return self._batch(lead=True)

    def _batch(self, lead: bool) -> Batch[Op, R]:
        for s in self._pending:
            s.taken = True
        batch, self._pending = Batch(self._pending, lead), []
        return batch
