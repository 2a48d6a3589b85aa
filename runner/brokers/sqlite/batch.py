"""Group commit for the SQLite broker: many threads' fenced writes share one transaction.

Each ``ack``, ``retry``, ``dead`` and ``release`` is a statement or two fenced by (id, receipt).
Committing each in its own ``BEGIN IMMEDIATE`` transaction makes the commit, not the statement,
the cost per task, and makes worker threads queue for the one connection. Instead each call
queues its statement here and waits; whichever write transaction runs next (a claim, a put, or
the first waiting caller, which becomes the leader) runs every queued statement before its
``COMMIT``. A caller gets its own statement's answer only after that commit, so an ack is never
reported before it is durable, and a failed transaction fails every statement in it.

The statements are serialised in one transaction in queue order, so each sees the effect of
those before it: two calls on the same delivery answer exactly as they would one at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from runner.errors import BrokerError, BrokerUnavailable

#: One queued write: runs inside the open transaction and returns the caller's answer.
Statement = Callable[[Any], Any]


@dataclass(slots=True)
class Pending:
    """One queued write and, once its transaction ended, its answer or error. ``operation``
    is the broker method that queued it: its error names that, whoever led the transaction."""

    statement: Statement
    operation: str
    done: bool = False
    result: Any = None
    error: BaseException | None = None

    def outcome(self) -> Any:
        if self.error is None:
            return self.result
        err = self.error
        # A fresh exception per caller: one instance raised in several threads at once would
        # share (and garble) its traceback.
        if isinstance(err, BrokerError):
            raise type(err)(*err.args, backend=err.backend, operation=self.operation) from err
        raise BrokerUnavailable(
            f"the shared write transaction failed: {err!r}",
            backend="sqlite",
            operation=self.operation,
        ) from err


class GroupCommit:
    """The queue of writes waiting for a transaction, and who leads the next one."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: list[Pending] = []
        self._leading = False

    def run(self, statement: Statement, flush: Callable[[], None], operation: str) -> Any:
        """Queue ``statement``; return its answer once the transaction that ran it committed.

        ``flush`` opens a write transaction (which calls ``take`` and ``finish``); the caller
        runs it when no other caller is leading one. Raises the transaction's error, as a
        BrokerError naming ``operation`` (the caller's broker method).
        """
        mine = Pending(statement, operation)
        with self._cond:
            self._queue.append(mine)
        while True:
            with self._cond:
                while self._leading and not mine.done:
                    self._cond.wait()
                if mine.done:
                    return mine.outcome()
                self._leading = True
            try:
                flush()
            except BaseException as exc:
                # Nothing of the queue committed: fail all of it now rather than let each
                # caller wait out the same busy timeout in turn.
                self.finish(self.take(), error=exc)
            finally:
                with self._cond:
                    self._leading = False
                    self._cond.notify_all()

    def waiting(self) -> bool:
        with self._cond:
            return bool(self._queue)

    def take(self) -> list[Pending]:
        """Everything queued so far (the caller holds the connection, in a transaction)."""
        with self._cond:
            taken, self._queue = self._queue, []
        return taken

    def finish(
        self,
        taken: Sequence[Pending],
        results: Sequence[Any] = (),
        error: BaseException | None = None,
    ) -> None:
        """Hand each taken write its answer (after COMMIT) or the error (after ROLLBACK)."""
        if not taken:
            return
        with self._cond:
            for i, pending in enumerate(taken):
                if error is None:
                    pending.result = results[i]
                else:
                    pending.error = error
                pending.done = True
            self._cond.notify_all()
