"""One attempt of one delivery: checks, the handler under its deadline, and how it ends.

Every delivery ends in exactly one broker call: ack, retry, dead or release. ``Attempts.run``
decides which and returns it as an Outcome; the Worker's Settler makes the call
(runner.engine.settle).
The outcome event (task.succeeded / task.retrying / task.dead) is emitted by ``settled`` only
once the broker took that call (``Answer.DONE``, or ``ALREADY_DONE`` when it was sent again
after its reply was lost), so logs, metrics and the summary count each task once even when a
stale worker finishes late; a refusal (``FENCED``: the lease moved on to another delivery) is
logged as ``task.lease_lost``.

``run`` is ``begin`` (the checks before a handler runs, its context, before_attempt hooks),
the handler on this thread, ``end`` (after_attempt hooks, then the ack or the failure) and
``finish`` (what every outcome also carries); an async type's attempt (runner.engine.aio) is the
same three around an awaited coroutine.

What the broker step also does rides on it as settle effects, built by runner.engine.effects:
the outcome for the type's circuit breaker, the task's kept result, the pipeline's hand-offs and
trace line (runner.engine.handoff), a unique key let go. Size: about 580 lines, over our 400:
``begin`` / ``end`` / ``_failed`` / ``_dead`` are one decision (how an attempt ends) and read
best together; the events and hooks around them are what could move next.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, NamedTuple

from runner.brokers.base import (
    Answer,
    Delivery,
    Effects,
    Settle,
)
from runner.engine.effects import (
    acked,
    dead_handed_off,
    letting_key_go,
    result_value,
    with_circuit,
)
from runner.engine.handoff import Pipeline, root_of
from runner.engine.retry import RetryPlan, error_name
from runner.engine.settle import Outcome
from runner.engine.timeouts import Guard, Run, Watchdog
from runner.errors import ChildError, InvalidPayload, PermanentError, TaskInterrupted
from runner.events import Event, EventBus, EventName, task_event
from runner.middleware.base import Middleware, overriding
from runner.model import (
    AttemptRecord,
    Cancellation,
    DeadLetter,
    DeadReason,
    Task,
    TaskContext,
    replayable,
)

Handler = Callable[[Any, TaskContext], Any]
TaskLogger = Callable[[str, str, int], "logging.LoggerAdapter[logging.Logger]"]

#: The ``outcome`` field of each outcome event.
OUTCOME_OF = {
    EventName.TASK_SUCCEEDED: "succeeded",
    EventName.TASK_RETRYING: "retrying",
    EventName.TASK_DEAD: "dead",
}


@dataclass(frozen=True)
class TypeRuntime:
    """Everything an attempt needs to run one task type, built from its config."""

    name: str
    handler: Handler
    limit: int
    timeout_s: float
    interrupt: bool  # timeout_action == "interrupt"
    plan: RetryPlan
    #: The type's middleware chain, in order (``handler`` is already wrapped by it).
    middleware: tuple[Middleware, ...] = ()
    #: The type has a circuit breaker: its settles carry their outcome (Effects.circuit).
    breaker: bool = False
    #: How long a unique task's key stays held after it is done (its type's unique.ttl).
    unique_ttl: float = 0.0
    #: How long a task's result (its return value, or why it died) is kept; 0: not kept.
    result_ttl: float = 0.0
    #: Its place in pipelines (``then:``, ``on_dead``): hand-offs put with its settle.
    pipeline: Pipeline | None = None
    #: ``thread`` (a plain def on a worker thread), ``async`` (awaited on the event loop) or
    #: ``process`` (a plain def in a child process: runner.engine.processes).
    execution: str = "thread"
    #: A process type's children: how they start, are killed and replaced.
    children: ChildPolicy | None = None

    def __post_init__(self) -> None:
        # Only the middlewares that override a hook are called for it: none costs nothing.
        object.__setattr__(self, "before", overriding(self.middleware, "before_attempt"))
        object.__setattr__(self, "after", overriding(self.middleware, "after_attempt"))
        object.__setattr__(self, "on_dead", overriding(self.middleware, "on_dead_letter"))

    before: tuple[Middleware, ...] = field(default=(), init=False)
    after: tuple[Middleware, ...] = field(default=(), init=False)
    on_dead: tuple[Middleware, ...] = field(default=(), init=False)


def _with_lineage(
    make: Callable[[], logging.LoggerAdapter[logging.Logger]], root_id: Any, parent_id: Any
) -> logging.LoggerAdapter[logging.Logger]:
    """A pipeline task's ctx.logger: its lines carry root_id and parent_id too."""
    adapter = make()
    adapter.extra = {**(adapter.extra or {}), "root_id": root_id, "parent_id": parent_id}
    return adapter


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@functools.cache
def type_logger(type_name: str) -> logging.Logger:
    """Looked up once per type, outside handler code (getLogger takes logging's lock)."""
    return logging.getLogger(f"runner.task.{type_name}")


def default_task_logger(
    task_id: str, type_name: str, attempt: int
) -> logging.LoggerAdapter[logging.Logger]:
    """ctx.logger when the runner does not set up logging itself (library use)."""
    return logging.LoggerAdapter(
        type_logger(type_name), {"task_id": task_id, "type": type_name, "attempt": attempt}
    )


class ChildPolicy(NamedTuple):
    """How a process type's children start, are killed past a timeout and are replaced."""

    spec: str  # JSON for runner.engine.child.main: the handler, its paths, the middlewares
    start_method: str  # forkserver or spawn
    kill_grace_s: float  # between SIGTERM (or ctx.cancelled) and SIGKILL
    max_tasks: int = 0  # replaced after this many tasks (0: never)
    max_memory: int = 0  # replaced when its RSS is above this after a task (0: never)


class Begun(NamedTuple):
    """An attempt whose handler is about to run (``Attempts.begin``)."""

    rt: TypeRuntime
    run: Run
    ctx: TaskContext
    payload: Any
    started: float  # epoch seconds


class Attempts:
    """Runs attempts for a Worker; shared by its threads (state here is counters only)."""

    def __init__(
        self,
        types: dict[str, TypeRuntime],
        events: EventBus,
        watchdog: Watchdog,
        task_logger: TaskLogger,
        hand_back: bool = False,
    ) -> None:
        self.types = types
        # The types that hand off (then:, on_dead): their tasks' settles carry effects.
        self._piped = frozenset(name for name, rt in types.items() if rt.pipeline is not None)
        # Whether Retry(count=False) can give its attempt back: an ack that puts the task
        # again, in one step, needs a broker with settle effects. Without, it is counted.
        self.hand_back = hand_back
        self.events = events
        self.watchdog = watchdog
        self.identity = worker_identity()
        self.task_logger = task_logger
        self.forcing = False  # set when shutdown's grace period is over
        # The runs in progress, by their worker thread's guard (or an async attempt's receipt);
        # item assignment is atomic: no lock needed.
        self.running: dict[Guard | str, Run] = {}
        # The cancelled pipelines, as the cancel watch last read them (runner.engine.cancels).
        self.cancelled_roots: frozenset[str] = frozenset()
        self.interrupts = 0
        self.overruns = 0

    def run(
        self, guard: Guard, delivery: Delivery, call: Callable[[Begun], Any] | None = None
    ) -> Outcome:
        """Run one delivery on this thread; how it ends, for the Settler (which calls
        ``settled``). ``call`` runs the handler elsewhere (a process type's child: it keeps
        the deadline itself); by default it runs here, under ``guard``."""
        begun = self.begin(delivery)
        if isinstance(begun, Begun):
            self.running[guard] = begun.run
            t0 = time.perf_counter()
            error: BaseException | None = None
            value: Any = None
            try:
                if call is None:
                    value = guard.run(
                        begun.run, partial(begun.rt.handler, begun.payload, begun.ctx)
                    )
                else:
                    value = call(begun)
            except BaseException as exc:
                # SystemExit, KeyboardInterrupt or a handler's own BaseException is a failed
                # attempt like any other (the signals that stop the runner reach only the main
                # thread); so is the runner's own interrupt (TaskInterrupted).
                error = exc
            duration = time.perf_counter() - t0
            self.running.pop(guard, None)
            begun = self.end(delivery, begun, value, error, duration)
        return self.finish(delivery, begun)

    def finish(self, delivery: Delivery, outcome: Outcome) -> Outcome:
        """What every outcome also carries: a unique task's key let go, a pipeline task's
        dead-letter its hand-offs and trace line (an ack has them already: effects.acked)."""
        task = delivery.task
        if task.unique_key:
            outcome = letting_key_go(outcome, task, self.types.get(task.type))
        if outcome.settle.kind == "dead" and self.hand_back and self._in_pipeline(task):
            outcome = dead_handed_off(outcome, task, self.types.get(task.type))
        return outcome

    def _logger_of(self, task: Task) -> Callable[[], logging.LoggerAdapter[logging.Logger]]:
        """What makes ``ctx.logger`` (lazily): a pipeline task's lines carry its lineage."""
        make = partial(self.task_logger, task.id, task.type, task.attempt)
        headers = task.headers
        if "root_id" in headers:
            return partial(_with_lineage, make, headers["root_id"], headers.get("parent_id"))
        return make

    def _in_pipeline(self, task: Task) -> bool:
        """Whether ``task``'s settle hands off or keeps a trace line (its type hands off, or
        another task started it)."""
        return task.type in self._piped or "root_id" in task.headers

    def begin(self, delivery: Delivery) -> Outcome | Begun:
        """The checks before a handler runs (its Outcome when one ends the task unrun), then
        its context and payload (before_attempt hooks), and ``task.started``."""
        task = delivery.task
        rt = self.types.get(task.type)
        started = time.time()
        if rt is None or delivery.decode_error is not None:
            why = delivery.decode_error or f"no handler for type {task.type!r} in this process"
            return self._dead(
                delivery, started, DeadReason.UNDECODABLE, "DecodeError", why, "", 0.0
            )
        if task.attempt > rt.plan.max_attempts:
            last = task.history[-1].error_type if task.history else "none recorded"
            message = (
                f"handed out {task.attempt} times, max_attempts is {rt.plan.max_attempts}; "
                f"earlier workers died or froze mid-run (last recorded error: {last})"
            )
            return self._dead(
                delivery, started, DeadReason.MAX_DELIVERIES, "MaxDeliveries", message, "", 0.0
            )
        if task.expires_at and started > task.expires_at:
            at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(task.expires_at))
            message = f"not started before it expired at {at}; its handler was not run"
            return self._dead(delivery, started, DeadReason.EXPIRED, "Expired", message, "", 0.0)
        if self.cancelled_roots and root_of(task) in self.cancelled_roots:
            message = f"pipeline {root_of(task)} cancelled before this task started"
            return self._dead(
                delivery, started, DeadReason.CANCELLED, "Cancelled", message, "", 0.0
            )
        cancelled = Cancellation()
        # deadline, cancelled, interrupt, on_timeout, on_overrun: positionally, as the hot
        # objects below (a class called with keywords gathers them in a dict first).
        run = Run(
            time.monotonic() + rt.timeout_s,
            cancelled,
            rt.interrupt,
            partial(self._on_timeout, delivery),
            partial(self._on_overrun, delivery),
        )
        if self.hand_back and self._in_pipeline(task):
            run.root = root_of(task)
        headers = task.headers
        ctx = TaskContext(
            task.id,
            task.type,
            task.attempt,
            rt.plan.max_attempts,
            run.deadline,
            cancelled,
            self._logger_of(task),
            headers,
        )
        payload = task.payload
        for middleware in rt.before:
            try:
                payload = middleware.before_attempt(ctx, payload)
            except InvalidPayload as exc:
                why = str(exc)
                return self._dead(
                    delivery, started, DeadReason.INVALID_PAYLOAD, error_name(exc), why, "", 0.0
                )
            except Exception as exc:
                self._hook_failed(middleware, "before_attempt", delivery, exc)
                return self._failed(delivery, rt, exc, started, 0.0, run)

        due = max(task.enqueued_at, task.not_before)
        queue_wait = max(0.0, started - due) if due else None
        if headers and task.attempt == 1 and not delivery.redelivered and "joins" in headers:
            # A join's task is put by the broker with its last part, unseen by any process:
            # it counts as published when it first starts.
            self.events.emit(Event(EventName.TASK_PUBLISHED, task_id=task.id, type=task.type,
                                   attempt=0))  # fmt: skip
        # A redelivered task may be what killed the last process: its start is written out
        # before its handler runs (flush), so the log names it if it kills this one too.
        started_event = task_event(
            EventName.TASK_STARTED, task.id, task.type, task.attempt, queue_wait_s=queue_wait
        )
        started_event.flush = delivery.redelivered
        self._send(started_event, task)
        return Begun(rt, run, ctx, payload, started)

    def end(
        self,
        delivery: Delivery,
        begun: Begun,
        value: Any,
        error: BaseException | None,
        duration: float,
    ) -> Outcome:
        """How an attempt whose handler returned ``value`` or raised ``error`` ends: the
        after_attempt hooks, then its ack (with its result and hand-offs) or its failure."""
        task = delivery.task
        rt, run, ctx, _, started = begun
        for middleware in rt.after:
            try:
                middleware.after_attempt(ctx, error)
            except Exception as exc:
                self._hook_failed(middleware, "after_attempt", delivery, exc)
                error = error or exc
        if error is None and run.expired:
            # timeout_action: cancel, or an interrupt that landed after the handler returned.
            error = TimeoutError(f"ran past its timeout of {rt.timeout_s}s")
        effects: Effects | None = None
        if error is None:
            try:
                effects = acked(task, rt, run.root, value, duration)
            except PermanentError as exc:  # a result it cannot keep, or start its stages with
                error = exc
        if error is None:
            ack = Settle(delivery, "ack", 0.0, None, None, effects)  # positionally: as Run
            return Outcome(ack, EventName.TASK_SUCCEEDED, {"duration_s": duration})
        return self._failed(delivery, rt, error, started, duration, run)

    def runs(self) -> list[Run]:
        """The attempts running now."""
        return list(self.running.values())

    def overrunning(self) -> int:
        return sum(1 for run in list(self.running.values()) if run.overrun_reported)

    # -- outcomes --------------------------------------------------------------------------

    def _failed(
        self,
        delivery: Delivery,
        rt: TypeRuntime,
        error: BaseException,
        started: float,
        duration: float,
        run: Run,
    ) -> Outcome:
        task = delivery.task
        kind = error_name(error)
        message = (
            f"ran past its timeout of {rt.timeout_s}s"
            if isinstance(error, TaskInterrupted)
            else str(error)
        )
        if self.forcing and run.expired:
            # Cut short by shutdown, not by its own timeout: hand it back untouched. Whatever
            # the handler raised (the interrupt, or its own error once it saw ctx.cancelled,
            # or nothing under timeout_action: cancel), the attempt is not its fault.
            return Outcome(Settle(delivery, "release"), None)
        trace = (
            error.remote_traceback
            if isinstance(error, ChildError)
            else "".join(traceback.format_exception(error))
        )
        decision = rt.plan.decide(error, task.attempt)
        if not decision.retry:
            assert decision.reason is not None  # decide() names why for every task it ends
            outcome = self._dead(delivery, started, decision.reason, kind, message, trace, duration)
        elif not decision.counted and self.hand_back:
            outcome = self._handed_back(delivery, decision.delay_s, kind, message, duration)
        else:
            failure = AttemptRecord(
                task.attempt, kind, message, trace, started, duration, self.identity
            )
            outcome = Outcome(
                Settle(delivery, "retry", decision.delay_s, failure),
                EventName.TASK_RETRYING,
                {
                    "duration_s": duration,
                    "delay_s": decision.delay_s,
                    "error": f"{kind}: {message}",
                    "error_type": kind,
                    "traceback": trace,
                },
            )
        # A circuit counts what says something about the downstream: exceptions and timeouts,
        # not never_retry names or PermanentError (the task's own fault).
        if rt.breaker and (decision.retry or decision.reason is DeadReason.EXHAUSTED):
            outcome = with_circuit(outcome, succeeded=False)
        return outcome

    def _handed_back(
        self, delivery: Delivery, delay_s: float, kind: str, message: str, duration: float
    ) -> Outcome:
        """Retry(count=False): the ack puts the task back, in the same step, with its attempt
        given back (the next hand-out has this attempt's number) and nothing in its history."""
        task = delivery.task
        again = replace(task, attempt=task.attempt - 1, not_before=time.time() + delay_s)
        return Outcome(
            Settle(delivery, "ack", effects=Effects(puts=(again,))),
            EventName.TASK_RETRYING,
            {
                "duration_s": duration,
                "delay_s": delay_s,
                "error": f"{kind}: {message}",
                "error_type": kind,
                "detail": "attempt not counted: Retry(count=False)",
            },
        )

    def _dead(
        self,
        delivery: Delivery,
        started: float,
        reason: DeadReason,
        kind: str,
        message: str,
        trace: str,
        duration: float,
    ) -> Outcome:
        task = delivery.task
        if duration or trace:
            task = task.with_failure(
                AttemptRecord(task.attempt, kind, message, trace, started, duration, self.identity)
            )
        record = DeadLetter(
            task=replayable(task),
            reason=reason,
            error_type=kind,
            message=message,
            traceback=trace,
            attempts=task.attempt,
            first_attempt_at=task.history[0].started_at if task.history else started,
            last_attempt_at=started,
            dead_at=time.time(),
        )
        op = Settle(delivery, "dead", record=record)
        rt = self.types.get(task.type)
        if rt is not None and rt.result_ttl:  # its result says why it died
            died = {"state": "dead", "reason": str(reason), "error": f"{kind}: {message}"}
            op = op._replace(effects=Effects(sets=(result_value(task.id, died, rt.result_ttl),)))
        return Outcome(
            op,
            EventName.TASK_DEAD,
            {
                "duration_s": duration or None,
                "reason": reason,
                "error": f"{kind}: {message}",
                "error_type": kind,
                "traceback": trace or None,
            },
        )

    def settled(self, outcome: Outcome, answer: Answer | None) -> None:
        """Emit the outcome once the broker took it: DONE, or ALREADY_DONE (an earlier call
        under this receipt took effect; its reply was lost). FENCED: the broker refused (the
        lease moved on). None: it did not answer (already logged); the task comes back when
        its lease expires."""
        if outcome.event is None:
            return
        delivery = outcome.settle.delivery
        if answer is Answer.DONE or answer is Answer.ALREADY_DONE:
            result = OUTCOME_OF[outcome.event]
            task, fields = delivery.task, outcome.fields
            if outcome.event is EventName.TASK_SUCCEEDED:  # every task that succeeds (_send)
                succeeded = task_event(outcome.event, task.id, task.type, task.attempt,
                                       duration_s=fields["duration_s"], outcome=result)  # fmt: skip
                self._send(succeeded, task)
            else:
                self._emit(outcome.event, delivery, outcome=result, **fields)
            effects = outcome.settle.effects
            if effects is not None and effects.puts:
                # Hand-offs (not a task put back: same id). ALREADY_DONE: an earlier call of
                # this ack put them, and its reply was lost.
                for started in effects.puts:
                    if started.id != delivery.task.id:
                        self.events.emit(
                            task_event(EventName.TASK_PUBLISHED, started.id, started.type, 0)
                        )
            record = outcome.settle.record
            rt = self.types.get(delivery.task.type) if record is not None else None
            if rt is not None and record is not None:
                for middleware in rt.on_dead:
                    try:
                        middleware.on_dead_letter(record)
                    except Exception as exc:
                        self._hook_failed(middleware, "on_dead_letter", delivery, exc)
        elif answer is Answer.FENCED:
            op = outcome.settle.kind
            self._emit(
                EventName.TASK_LEASE_LOST,
                delivery,
                detail=f"{op} refused: another delivery owns the task",
            )

    def _hook_failed(
        self, middleware: Middleware, hook: str, delivery: Delivery, exc: Exception
    ) -> None:
        task = delivery.task
        detail = f"{middleware.name}.{hook}: {type(exc).__name__}: {exc}"
        self.events.emit(
            Event(EventName.MIDDLEWARE_FAILED, task_id=task.id, type=task.type,
                  attempt=task.attempt, detail=detail)
        )  # fmt: skip

    def _on_timeout(self, delivery: Delivery, run: Run) -> None:
        if self.forcing:
            return  # cut short by shutdown, not a timeout of its own
        detail = "interrupt" if run.interrupt else "cancel"
        self._emit(EventName.TASK_TIMEOUT, delivery, detail=detail)
        if run.interrupted:
            self.interrupts += 1
            self._emit(EventName.TASK_INTERRUPTED, delivery)

    def loop_blocked(self, delivery: Delivery | None, seconds: float) -> None:
        """An async worker's event loop has not turned for ``seconds``: ``delivery``'s
        handler (when known) blocks it, and every coroutine on it waits."""
        detail = f"blocked the event loop for {seconds:.1f}s (blocking code in an async handler)"
        if delivery is None:
            self.events.emit(Event(EventName.TASK_OVERRUN, detail=detail))
        else:
            self._emit(EventName.TASK_OVERRUN, delivery, detail=detail)

    def _on_overrun(self, delivery: Delivery, run: Run) -> None:
        self.overruns += 1
        detail = "handler has not returned after its interrupt"
        self._emit(EventName.TASK_OVERRUN, delivery, detail=detail)

    # -- helpers ---------------------------------------------------------------------------

    def _emit(self, name: EventName, delivery: Delivery, **fields: Any) -> None:
        task = delivery.task
        self._send(
            Event(name, task_id=task.id, type=task.type, attempt=task.attempt, **fields), task
        )

    def _send(self, event: Event, task: Task) -> None:
        """Emit ``event`` about ``task``; a pipeline's task's carries its lineage.

        The two events every task has, ``task.started`` and ``task.succeeded``, are built by
        their callers with ``task_event``: a ``**fields`` dict built and unpacked per event
        (as ``_emit`` does for the rarer ones) cost about 2% of a no-op task's instructions
        on the memory broker, and the keywords to the class about as much again."""
        headers = task.headers
        if "root_id" in headers:
            event.root_id = headers["root_id"]
            event.parent_id = headers.get("parent_id")
        self.events.emit(event)
