"""The worker loop: get -> run -> ack | retry | dead, on threads the runner owns.

One dispatcher thread asks the broker only for types with a free slot (so a saturated type
never stalls the others) and never for more tasks than there are idle threads; worker threads
run them; a lease keeper renews the lease of every held delivery every visibility_timeout / 3;
a watchdog enforces deadlines (runner.timeouts).

Every held delivery ends in exactly one broker call: ack, retry, dead or release. When the
broker refuses it (the lease moved on to another delivery), the task belongs to someone else
now: we log ``task.lease_lost`` and let go.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from runner.brokers.base import Broker, Delivery
from runner.errors import BrokerClosed, BrokerError, BrokerUnavailable, TaskInterrupted
from runner.events import Event, EventBus
from runner.retry import RetryPlan, error_name
from runner.task import AttemptRecord, DeadLetter, TaskContext
from runner.timeouts import Guard, Run, Watchdog

log = logging.getLogger("runner.worker")

#: How long the dispatcher blocks in one broker.get before it looks around again.
GET_TIMEOUT_S = 1.0
#: Pauses before trying an ack / retry / dead / release again after BrokerUnavailable (a SQLite
#: file whose write lock a frozen process holds past the busy timeout, a Redis reconnect).
#: Giving up at once would leave the task leased, to run a second time once the lease expires.
SETTLE_PAUSES_S = (0.05, 0.25, 1.0)

Handler = Callable[[Any, TaskContext], Any]
TaskLogger = Callable[[str, str, int], "logging.LoggerAdapter[logging.Logger]"]


@dataclass(frozen=True)
class TypeRuntime:
    """Everything the loop needs to run one task type, built from its config."""

    name: str
    handler: Handler
    limit: int
    timeout_s: float
    interrupt: bool  # timeout_action == "interrupt"
    plan: RetryPlan
    validate_payload: Callable[[Any], Any] | None = None  # raises on a bad payload


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _default_task_logger(
    task_id: str, type_name: str, attempt: int
) -> logging.LoggerAdapter[logging.Logger]:
    return logging.LoggerAdapter(
        logging.getLogger(f"runner.task.{type_name}"),
        {"task_id": task_id, "type": type_name, "attempt": attempt},
    )


class Worker:
    """Runs tasks from one broker on ``threads`` threads with per-type limits."""

    def __init__(
        self,
        broker: Broker,
        types: Mapping[str, TypeRuntime],
        threads: int,
        events: EventBus,
        visibility_timeout_s: float,
        task_logger: TaskLogger = _default_task_logger,
    ) -> None:
        self.broker = broker
        self.types = dict(types)
        self.threads = threads
        self.events = events
        self.identity = worker_identity()
        self._task_logger = task_logger
        self._renew_every_s = visibility_timeout_s / 3
        self._cond = threading.Condition()
        self._held: dict[str, Delivery] = {}  # receipt -> delivery (queued locally or running)
        self._held_by_type = dict.fromkeys(self.types, 0)
        self._asking: frozenset[str] = frozenset()  # types in the broker.get under way
        self._running: dict[Guard, tuple[Run, Delivery]] = {}
        self._local: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        # Set once shutdown's grace period is over and it expires every running handler.
        self._forcing = False
        self._watchdog = Watchdog()
        self._threads: list[threading.Thread] = []
        self._dispatcher = threading.Thread(
            target=self._dispatch, name="dq-dispatcher", daemon=True
        )
        self._lease_keeper = threading.Thread(
            target=self._keep_leases, name="dq-leases", daemon=True
        )
        self._order = list(self.types)
        self.interrupts = 0
        self.overruns = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._watchdog.start()
        for i in range(self.threads):
            t = threading.Thread(target=self._work, name=f"dq-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        self._dispatcher.start()
        self._lease_keeper.start()
        self.events.emit(Event("worker.started", detail=f"{self.identity} threads={self.threads}"))

    def stop(self, grace_s: float) -> int:
        """Stop taking tasks, release unstarted ones, give running handlers ``grace_s``.

        Handlers still running after the grace period are cancelled and interrupted; their
        tasks are released back to the broker. Returns how many had to be interrupted.
        """
        if self._stopping.is_set():
            return 0
        self.events.emit(Event("worker.stopping", detail=f"grace={grace_s}s"))
        deadline = time.monotonic() + grace_s
        self._stopping.set()
        self.broker.wake()
        with self._cond:
            self._cond.notify_all()
        # The dispatcher leaves within one broker.get; after that nothing new arrives locally
        # (only the dispatcher fetches).
        self._dispatcher.join(timeout=GET_TIMEOUT_S + 5)
        self._release_unstarted()
        with self._cond:
            while self._held and time.monotonic() < deadline:
                self._cond.wait(timeout=max(0.0, deadline - time.monotonic()))
            forced = len(self._running)
        if forced:
            self._forcing = True
            self._watchdog.expire_all()
            with self._cond:
                self._cond.wait_for(lambda: not self._held, timeout=2.0)
        for _ in range(self.threads):
            self._local.put(None)
        for t in (*self._threads, self._lease_keeper):
            t.join(timeout=2.0)
        self._watchdog.stop()
        self.events.emit(Event("worker.stopped", detail=f"forced={forced}"))
        return forced

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def inflight(self) -> dict[str, int]:
        with self._cond:
            return dict(self._held_by_type)

    def limits(self) -> dict[str, int]:
        return {name: rt.limit for name, rt in self.types.items()}

    def overrunning(self) -> int:
        """Handlers reported as overruns that still hold their thread."""
        with self._cond:
            return sum(1 for run, _ in self._running.values() if run.overrun_reported)

    def alive_threads(self) -> int:
        """Worker threads still alive (never fewer than ``threads`` while running)."""
        return sum(1 for t in self._threads if t.is_alive())

    def idle(self) -> bool:
        with self._cond:
            return not self._held

    # -- dispatcher ------------------------------------------------------------------------

    def _dispatch(self) -> None:
        while not self._stopping.is_set():
            try:
                fetched = self._fetch(GET_TIMEOUT_S)
            except BrokerClosed:
                return
            except BrokerError as exc:
                log.warning("broker.get failed: %s", exc)
                self._stopping.wait(0.5)
                continue
            if fetched is None:
                with self._cond:
                    if not self._free_slots()[0]:
                        self._cond.wait(timeout=GET_TIMEOUT_S)

    def _free_slots(self) -> tuple[dict[str, int], int]:
        """Per-type free slots, and how many tasks may be asked for in all (lock held)."""
        free = self.threads - len(self._held)
        if free <= 0:
            return {}, 0
        slots = {
            name: self.types[name].limit - self._held_by_type[name]
            for name in self._order
            if self._held_by_type[name] < self.types[name].limit
        }
        return slots, free

    def _fetch(self, timeout: float) -> int | None:
        """One broker.get for the free slots (dispatcher thread only).

        Returns how many deliveries were queued for the worker threads, or None when no slot
        was free. Raises what broker.get raises.
        """
        with self._cond:
            slots, free = self._free_slots()
            if not slots:
                return None
            self._asking = frozenset(slots)
            self._order.append(self._order.pop(0))  # rotate: fairness when free < slots
        try:
            deliveries = self.broker.get(slots, free, timeout)
        finally:
            self._asking = frozenset()
        if deliveries:
            with self._cond:
                for delivery in deliveries:
                    self._held[delivery.receipt] = delivery
                    self._held_by_type[delivery.task.type] += 1
            for delivery in deliveries:
                self._local.put(delivery)
        return len(deliveries)

    def _release_unstarted(self) -> None:
        while True:
            try:
                delivery = self._local.get_nowait()
            except queue.Empty:
                return
            if delivery is not None:
                self._finish(delivery, self._safe(self.broker.release, delivery))

    def _keep_leases(self) -> None:
        while not self._stopping.wait(self._renew_every_s):
            with self._cond:
                held = list(self._held.values())
            if not held:
                continue
            try:
                kept = self.broker.extend(held)
            except BrokerError as exc:
                log.warning("lease renewal failed: %s", exc)
                continue
            for delivery, ok in zip(held, kept, strict=True):
                if not ok:
                    self._emit("task.lease_lost", delivery, detail="extend refused")

    # -- worker threads --------------------------------------------------------------------

    def _work(self) -> None:
        guard = Guard()
        guard.bind()
        while True:
            delivery: Delivery | None = None
            try:
                delivery = self._local.get()
                if delivery is None:
                    return
                if self._stopping.is_set():
                    self._finish(delivery, self._safe(self.broker.release, delivery))
                    continue
                self._process(guard, delivery)
            except TaskInterrupted:
                # Guard.run absorbs late interrupts; this is the last line of defence, so that
                # a worker thread is never lost (Dramatiq #445).
                log.warning("interrupt landed outside a handler; worker thread continues")
            except Exception:
                log.exception("worker loop error; worker thread continues")
            finally:
                if delivery is not None:
                    # Frees the slot if _process failed before its broker call; the broker
                    # hands the task out again when its lease expires.
                    self._forget(delivery)

    def _process(self, guard: Guard, delivery: Delivery) -> None:
        task = delivery.task
        rt = self.types.get(task.type)
        started = time.time()
        if rt is None or delivery.decode_error is not None:
            why = delivery.decode_error or f"no handler for type {task.type!r} in this process"
            self._dead(delivery, started, "undecodable", "DecodeError", why, "", 0.0)
            return
        if task.attempt > rt.plan.max_attempts:
            last = task.history[-1].error_type if task.history else "none recorded"
            message = (
                f"handed out {task.attempt} times, max_attempts is {rt.plan.max_attempts}; "
                f"earlier workers died or froze mid-run (last recorded error: {last})"
            )
            self._dead(delivery, started, "max deliveries", "MaxDeliveries", message, "", 0.0)
            return
        payload = task.payload
        if rt.validate_payload is not None:
            try:
                payload = rt.validate_payload(payload)
            except Exception as exc:
                self._dead(delivery, started, "invalid payload", error_name(exc), str(exc), "", 0.0)
                return

        due = max(task.enqueued_at, task.not_before)
        self._emit("task.started", delivery, queue_wait_s=max(0.0, started - due) if due else None)
        cancelled = threading.Event()
        run = Run(
            deadline=time.monotonic() + rt.timeout_s,
            cancelled=cancelled,
            interrupt=rt.interrupt,
            on_timeout=lambda r: self._on_timeout(r, delivery),
            on_overrun=lambda r: self._on_overrun(delivery),
        )
        ctx = TaskContext(
            task_id=task.id,
            type=task.type,
            attempt=task.attempt,
            max_attempts=rt.plan.max_attempts,
            deadline=run.deadline,
            cancelled=cancelled,
            logger=self._task_logger(task.id, task.type, task.attempt),
        )
        with self._cond:
            self._running[guard] = (run, delivery)
        self._watchdog.watch(guard, run)
        t0 = time.perf_counter()
        error: BaseException | None = None
        try:
            guard.run(run, lambda: rt.handler(payload, ctx))
        except TaskInterrupted as exc:
            error = exc
        except Exception as exc:
            error = exc
        duration = time.perf_counter() - t0
        self._watchdog.unwatch(guard)
        with self._cond:
            self._running.pop(guard, None)
        if error is None and run.expired:
            # timeout_action: cancel, or an interrupt that landed after the handler returned.
            error = TimeoutError(f"ran past its timeout of {rt.timeout_s}s")
        if error is None:
            accepted = self._safe(self.broker.ack, delivery)
            self._finish(delivery, accepted, "ack", "task.succeeded", duration_s=duration)
            return
        self._failed(delivery, rt, error, started, duration, run)

    def _failed(
        self,
        delivery: Delivery,
        rt: TypeRuntime,
        error: BaseException,
        started: float,
        duration: float,
        run: Run,
    ) -> None:
        task = delivery.task
        kind = error_name(error)
        message = (
            f"ran past its timeout of {rt.timeout_s}s"
            if isinstance(error, TaskInterrupted)
            else str(error)
        )
        trace = "".join(traceback.format_exception(error))
        if self._forcing and run.expired:
            # Cut short by shutdown, not by its own timeout: hand it back untouched. Whatever
            # the handler raised (the interrupt, or its own error once it saw ctx.cancelled,
            # or nothing under timeout_action: cancel), the attempt is not its fault.
            self._finish(delivery, self._safe(self.broker.release, delivery), "release")
            return
        decision = rt.plan.decide(error, task.attempt)
        if not decision.retry:
            self._dead(delivery, started, decision.reason, kind, message, trace, duration)
            return
        failure = AttemptRecord(
            task.attempt, kind, message, trace, started, duration, self.identity
        )
        accepted = self._safe(self.broker.retry, delivery, decision.delay_s, failure)
        self._finish(
            delivery,
            accepted,
            "retry",
            "task.retrying",
            duration_s=duration,
            delay_s=decision.delay_s,
            error=f"{kind}: {message}",
            error_type=kind,
        )

    def _dead(
        self,
        delivery: Delivery,
        started: float,
        reason: str,
        kind: str,
        message: str,
        trace: str,
        duration: float,
    ) -> None:
        task = delivery.task
        if duration or trace:
            task = task.with_failure(
                AttemptRecord(task.attempt, kind, message, trace, started, duration, self.identity)
            )
        record = DeadLetter(
            task=task,
            reason=reason,
            error_type=kind,
            message=message,
            traceback=trace,
            attempts=task.attempt,
            first_attempt_at=task.history[0].started_at if task.history else started,
            last_attempt_at=started,
            dead_at=time.time(),
        )
        accepted = self._safe(self.broker.dead, delivery, record)
        self._finish(
            delivery,
            accepted,
            "dead",
            "task.dead",
            duration_s=duration or None,
            reason=reason,
            error=f"{kind}: {message}",
            error_type=kind,
        )

    def _on_timeout(self, run: Run, delivery: Delivery) -> None:
        if self._forcing:
            return  # cut short by shutdown, not a timeout of its own
        self._emit("task.timeout", delivery, detail="interrupt" if run.interrupt else "cancel")
        if run.interrupted:
            self.interrupts += 1
            self._emit("task.interrupted", delivery)

    def _on_overrun(self, delivery: Delivery) -> None:
        self.overruns += 1
        self._emit("task.overrun", delivery, detail="handler has not returned after its interrupt")

    # -- helpers ---------------------------------------------------------------------------

    def _safe(self, op: Callable[..., bool], *args: Any) -> bool | None:
        """``op(*args)``: the broker's answer, or None when it could not give one.

        BrokerUnavailable is tried again after each of SETTLE_PAUSES_S (calls are fenced by the
        receipt, so trying again is safe); any other broker error, or the last failure, gives
        up, and the task comes back when its lease expires.
        """
        name, task_id = op.__name__, args[0].task.id
        for pause in (*SETTLE_PAUSES_S, None):
            try:
                return op(*args)
            except BrokerError as exc:
                if pause is None or not isinstance(exc, BrokerUnavailable):
                    log.warning("broker %s failed for task %s, giving up: %s", name, task_id, exc)
                    return None
                log.warning("broker %s failed for task %s, trying again in %ss: %s",
                            name, task_id, pause, exc)  # fmt: skip
                time.sleep(pause)
        return None

    def _finish(
        self,
        delivery: Delivery,
        accepted: bool | None,
        op: str = "release",
        outcome_event: str | None = None,
        **fields: Any,
    ) -> None:
        """Record how the broker took the delivery's end, then free its slot.

        The outcome event (task.succeeded / retrying / dead) is emitted only once the broker
        has accepted it, so logs, metrics and the summary count each task once even when a
        stale worker finishes late. False: the broker refused (the lease moved on). None: it
        did not answer (already logged); the task comes back when its lease expires.
        """
        if accepted and outcome_event is not None:
            outcome = outcome_event.removeprefix("task.")
            self._emit(outcome_event, delivery, outcome=outcome, **fields)
        elif accepted is False and op != "release":
            self._emit(
                "task.lease_lost", delivery, detail=f"{op} refused: another delivery owns the task"
            )
        self._forget(delivery)

    def _forget(self, delivery: Delivery) -> None:
        """Free the delivery's slot (idempotent) and wake a get that could not use it."""
        with self._cond:
            if self._held.pop(delivery.receipt, None) is None:
                return
            self._held_by_type[delivery.task.type] -= 1
            self._cond.notify_all()
            wake = delivery.task.type not in self._asking and bool(self._asking)
        if wake:
            self.broker.wake()

    def _emit(self, name: str, delivery: Delivery, **fields: Any) -> None:
        task = delivery.task
        self.events.emit(
            Event(name, task_id=task.id, type=task.type, attempt=task.attempt, **fields)
        )
