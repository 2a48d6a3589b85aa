"""build_runtime(config): the only place a validated config becomes running objects (with
runner.backends, which builds the broker and dead-letter store the config names).

A Runner owns one broker, one Worker and the listeners (logs, metrics, summary). Library use::

    runner = build_runtime(load_config("configs/demo.yaml"))
    with runner:                       # start() ... stop()
        runner.publish("email", {"to": "a@example.com"})
        runner.run_until_empty()
    print(runner.summary.to_dict())

The Runner also sets the file's rate limits and circuit breakers in the broker at start, runs
the scheduler, the circuit watch, the cancel watch and the presence entry beside its workers
(one for the thread types, one for the async types, one per process type), and publishes unique
tasks through ``put_unique``. Size: about 810 lines, as the one place all of that is wired; the
next split is the publishing side (drafts, unique keys, results) into a module of its own.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from functools import partial
from types import TracebackType
from typing import Any

from runner.backends import create_broker
from runner.brokers.base import (
    RESULT_PREFIX,
    Broker,
    BrokerAdmin,
    Bucket,
    Circuit,
    CircuitBreaker,
    DeadLetterFilter,
    Depth,
    Pause,
    RateLimit,
)
from runner.brokers.flow import rate_text
from runner.config.models import KILL_GRACE_S, PipelineConfig
from runner.engine.aio import AsyncWorker
from runner.engine.attempt import ChildPolicy, TaskLogger, TypeRuntime, default_task_logger
from runner.engine.cancels import CancelWatch
from runner.engine.circuits import CircuitWatch
from runner.engine.handoff import (
    Pipeline,
    Stage,
    before_replay,
    not_replayable,
    stage_lines,
)
from runner.engine.handoff import cancel as cancel_pipeline
from runner.engine.presence import Presence
from runner.engine.processes import ProcessWorker, default_start_method
from runner.engine.retry import RetryPlan
from runner.engine.schedule import Schedule, Scheduler, tick_name
from runner.engine.worker import Worker
from runner.errors import BrokerError, InvalidPayload, UsageError
from runner.events import Event, EventBus, EventName, Listener, task_event
from runner.loader import load_class, load_handler, resolve_exception
from runner.middleware.base import Middleware, overriding, wrap_chain
from runner.middleware.payloads import PayloadValidation, check_payload, payload_model
from runner.middleware.simulate import Simulation
from runner.model import (
    NO_HEADERS,
    DeadReason,
    Task,
    expires_at_of,
    new_task_id,
    not_before_of,
    require_type,
    unique_key_of,
)
from runner.observe.logs import setup_logging, task_logger
from runner.observe.metrics import MetricsListener
from runner.observe.progress import Progress, progress_enabled
from runner.observe.summary import Summary

#: What publish_many takes: (type, payload) or (type, payload, headers).
PublishItem = tuple[str, Any] | tuple[str, Any, Mapping[str, Any]]

#: How often run_until_empty looks at the broker.
_POLL_S = 0.02


def build_types(config: PipelineConfig) -> dict[str, TypeRuntime]:
    """One TypeRuntime per configured task type: handler, limit, timeout, retry plan and its
    middleware chain.

    The chain (runner.middleware.base) is built here once: payload validation where the
    handler is annotated with a pydantic model (a payload that fails goes to the DLQ with reason
    ``invalid payload``), the simulator's fault plans, then the config's ``middleware:`` in order
    (each constructed once, shared by every type).
    """
    search_path = config.handler_paths
    own = _middlewares([(m.use, m.options) for m in config.middleware], search_path)
    simulation = Simulation()
    types: dict[str, TypeRuntime] = {}
    for name, spec in config.task_types.items():
        policy = config.retry_for(name)
        never_retry = tuple(
            resolve_exception(n, search_path=search_path) for n in policy.never_retry
        )
        handler = load_handler(spec.handler, search_path=search_path, execution=spec.execution)
        model = payload_model(handler.func)  # None unless annotated with a pydantic model
        validation = () if model is None else (PayloadValidation(model),)
        chain: tuple[Middleware, ...] = (*validation, simulation, *own)
        types[name] = TypeRuntime(
            name=name,
            handler=wrap_chain(chain, name, handler),
            limit=config.concurrency_for(name),
            timeout_s=spec.timeout,
            interrupt=spec.timeout_action == "interrupt",
            plan=RetryPlan(
                policy.max_attempts,
                initial=policy.backoff.initial,
                maximum=policy.backoff.max,
                multiplier=policy.backoff.multiplier,
                jitter=policy.backoff.jitter,
                never_retry=never_retry,
            ),
            middleware=chain,
            breaker=spec.circuit_breaker is not None,
            unique_ttl=spec.unique.ttl if spec.unique else 0.0,
            result_ttl=config.result_ttl_for(name),
            execution=spec.execution,
            children=_children(config, name) if spec.execution == "process" else None,
            pipeline=_pipeline(config, name),
        )
    return types


def _children(config: PipelineConfig, name: str) -> ChildPolicy:
    """How process type ``name``'s children start and end (runner.engine.processes), and
    what they need to build its handler (child_handlers)."""
    spec = config.task_types[name]
    built_by = {
        "factory": f"{__name__}:child_handlers",
        "types": {name: spec.handler},
        "search_path": list(config.handler_paths),
        "sys_path": list(sys.path),
        "middleware": [[m.use, m.options] for m in config.middleware],
    }
    return ChildPolicy(
        spec=json.dumps(built_by),
        start_method=spec.start_method or default_start_method(),
        kill_grace_s=KILL_GRACE_S if spec.kill_grace is None else spec.kill_grace,
        max_tasks=spec.max_tasks_per_child or 0,
        max_memory=spec.max_memory_per_child or 0,
    )


def _middlewares(
    specs: Sequence[tuple[str, Mapping[str, Any]]], search_path: Sequence[str]
) -> tuple[Middleware, ...]:
    """The config's ``middleware:`` (``use``, ``options`` pairs), each constructed once."""
    return tuple(
        load_class(use, key="middleware.use", search_path=search_path)(**options)
        for use, options in specs
    )


def child_handlers(spec: Mapping[str, Any]) -> dict[str, tuple[Callable[..., Any], Any]]:
    """In a process type's child (runner.engine.child): its handlers wrapped as build_types
    wraps them, minus the hooks (they run in the parent): the simulator's and the config's
    middlewares' ``wrap``, with the payload model's check (None: none) to run first."""
    search_path = tuple(spec["search_path"])
    own = _middlewares(spec["middleware"], search_path)
    handlers: dict[str, tuple[Callable[..., Any], Any]] = {}
    for name, handler_spec in spec["types"].items():
        handler = load_handler(handler_spec, search_path=search_path, execution="process")
        model = payload_model(handler.func)
        check = partial(check_payload, model) if model is not None else None
        handlers[name] = (wrap_chain((Simulation(), *own), name, handler), check)
    return handlers


def _pipeline(config: PipelineConfig, name: str) -> Pipeline | None:
    """Type ``name``'s place in pipelines; None when its tasks start nothing."""
    spec = config.task_types[name]
    if not spec.then and spec.on_dead is None:
        return None
    target = spec.on_dead.type if spec.on_dead is not None else None
    return Pipeline(
        then=tuple(
            Stage(
                type=stage.type,
                each=stage.each,
                max_fanout=stage.max_fanout,
                expires_s=config.task_types[stage.type].expires,
                join=stage.join,
            )
            for stage in spec.then
        ),
        on_dead=target,
        on_dead_expires_s=config.task_types[target].expires if target else None,
    )


def wait_for_result(broker: Broker, task_id: str, timeout: float) -> dict[str, Any] | None:
    """A task's kept result from ``broker``, polled until ``timeout`` (Runner.result)."""
    if not broker.settle_effects:
        raise UsageError(f"{type(broker).__name__} cannot keep results (no settle effects)")
    key = RESULT_PREFIX + task_id
    deadline = time.monotonic() + timeout
    while True:
        found = broker.read_values([key]).get(key)
        if found is not None:
            result: dict[str, Any] = json.loads(found)
            return result
        if time.monotonic() >= deadline:
            return None
        time.sleep(_POLL_S)


def schedules_of(config: PipelineConfig) -> list[Schedule]:
    """The config's schedules, as the scheduler takes them."""
    return [
        Schedule(
            name=name,
            type=spec.type,
            payload=spec.payload,
            every=spec.every,
            cron=spec.cron,
            timezone=spec.timezone or "UTC",
            jitter=spec.jitter,
            missed=spec.missed,
        )
        for name, spec in config.schedules.items()
    ]


class Runner:
    """A running pipeline: publish tasks, let the workers run them, stop cleanly."""

    def __init__(
        self,
        config: PipelineConfig,
        broker: Broker,
        listeners: Sequence[Listener] = (),
        task_logger: TaskLogger | None = None,
        events: EventBus | None = None,
        run_schedules: bool = True,
    ) -> None:
        self.config = config
        self.broker = broker
        self.summary = Summary()
        self.events = events or EventBus()
        for listener in (self.summary, *listeners):
            self.events.subscribe(listener)
        types = build_types(config)
        self.summary.stages = stage_lines({n: rt.pipeline for n, rt in types.items()})
        # The types this process runs (`types:`, --types, DQ_TYPES); it publishes any of them.
        served = {n: rt for n, rt in types.items() if not config.types or n in config.types}
        # Thread types run on the worker's threads; async types on an event loop of their own
        # (runner.engine.aio), with their own books: they take none of the threads.
        common: dict[str, Any] = {
            "events": self.events,
            "visibility_timeout_s": config.broker.visibility_timeout,
            "task_logger": task_logger or default_task_logger,
            "prefetch": config.effective_prefetch(),
            "settle_in_background": broker.batch_settles,
        }
        on_threads = {n: rt for n, rt in served.items() if rt.execution == "thread"}
        on_loop = {n: rt for n, rt in served.items() if rt.execution == "async"}
        in_children = {n: rt for n, rt in served.items() if rt.execution == "process"}
        self.workers: list[Worker] = []
        if on_threads or not (on_loop or in_children):
            self.workers.append(Worker(broker, on_threads, config.workers, **common))
        if on_loop:
            self.workers.append(AsyncWorker(broker, on_loop, **common))
        # Each process type has its own pool of children (runner.engine.processes).
        for name, rt in in_children.items():
            self.workers.append(ProcessWorker(broker, {name: rt}, **common))
        self.worker = self.workers[0]
        self._on_publish = {n: overriding(rt.middleware, "on_publish") for n, rt in types.items()}
        # Each middleware instance once (the config's own are shared by every type).
        chains = (rt.middleware for rt in types.values())
        self._middleware = list({id(m): m for chain in chains for m in chain}.values())
        # Per type, its unique key template, for the unique types.
        self._unique_keys = {n: s.unique.key for n, s in config.task_types.items() if s.unique}
        # Per type, its configured expires (seconds), for the types that have one.
        self._expires = {n: s.expires for n, s in config.task_types.items() if s.expires}
        self._closers: list[Callable[[], None]] = []
        self._closing = threading.Lock()
        self.scheduler: Scheduler | None = None
        if run_schedules and config.schedules:
            if not broker.settle_effects:
                raise UsageError(
                    f"{type(broker).__name__} cannot run schedules: it has no put_if "
                    "(settle_effects is False)"
                )
            schedules = schedules_of(config)
            for schedule in schedules:  # a payload its type refuses fails now, not every tick
                try:
                    self._scheduled(schedule, 0.0, 0.0)
                except UsageError as exc:
                    raise UsageError(f"schedule {schedule.name!r}: {exc}") from exc
            self.scheduler = Scheduler(broker, schedules, self._scheduled, self.events)
        # Per type, its rate limit (in the broker, for every process together).
        self._rate_limits = {
            name: RateLimit(spec.rate_limit.rate, spec.rate_limit.effective_burst())
            for name, spec in config.task_types.items()
            if spec.rate_limit is not None
        }
        # Per type, its circuit breaker (in the broker too).
        self._breakers = {
            name: CircuitBreaker(
                failure_rate=b.failure_rate,
                min_calls=b.min_calls,
                window_s=b.window,
                open_for_s=b.open_for,
                half_open_calls=b.half_open_calls,
            )
            for name, spec in config.task_types.items()
            if (b := spec.circuit_breaker) is not None
        }
        if self._rate_limits and not broker.gates_in_get:
            raise UsageError(
                f"{type(broker).__name__} cannot enforce rate_limit: it has no gates "
                "(gates_in_get is False)"
            )
        if self._breakers and not (broker.gates_in_get and broker.settle_effects):
            raise UsageError(
                f"{type(broker).__name__} cannot run circuit_breaker: it needs gates and "
                "settle effects (gates_in_get, settle_effects)"
            )
        self.circuit_watch = (
            CircuitWatch(broker, list(self._breakers), self.events) if self._breakers else None
        )
        # Other processes can see this one (dq-run stats) where they share the broker.
        shared = broker.shared and broker.settle_effects
        self.presence = Presence(broker, list(served)) if shared else None
        # Running tasks of a cancelled pipeline see ctx.cancelled.
        pipelines = any(rt.pipeline is not None for rt in types.values())
        self.cancel_watch = (
            CancelWatch(broker, [w.attempts for w in self.workers])
            if pipelines and broker.settle_effects
            else None
        )
        self._started = False
        self._stopped = False
        # Held by the stop's drain until its records are counted (drain_now waits for it).
        self._drain_lock = threading.Lock()

    def attach(self, listener: Listener, close: Callable[[], None] | None = None) -> None:
        """Add a listener; ``close`` runs at stop, in reverse order of attachment."""
        self.events.subscribe(listener)
        if close is not None:
            self._closers.append(close)

    # -- producing -------------------------------------------------------------------------

    async def apublish(self, type_name: str, payload: Any = None, **options: Any) -> str:
        """``publish`` for asyncio applications (the same options): the broker call runs in the
        event loop's default executor, so the loop never waits on it (a full broker included)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            None, functools.partial(self.publish, type_name, payload, **options)
        )

    def publish(
        self,
        type_name: str,
        payload: Any = None,
        *,
        delay_s: float = 0.0,
        at: datetime | None = None,
        expires: float | None = None,
        headers: Mapping[str, Any] | None = None,
        unique_key: str | None = None,
    ) -> str:
        """Put one task; returns its id. Blocks while the broker is full (see QueueFull).

        ``delay_s`` or ``at`` (an aware datetime; one in the past runs now) hold it back;
        ``expires`` (seconds from now) overrides its type's ``expires``: a task not started by
        then is dead-lettered as expired instead of run. ``unique_key`` (or the type's
        ``unique.key``) makes it a unique task: when a task of the type holds that key, nothing
        is put and the holder's id is returned."""
        if self._unique_keys or unique_key is not None:
            item: PublishItem = (
                (type_name, payload) if headers is None else (type_name, payload, headers)
            )
            return self.publish_many(
                [item], delay_s=delay_s, at=at, expires=expires, unique_key=unique_key
            )[0]
        # publish_many's steps for one task, without its lists: a task published to an idle
        # worker waits for this code to run (publish -> start latency).
        now = time.time()
        task = self._draft(
            type_name, payload, headers, now, not_before_of(now, delay_s, at), expires
        )
        self._put((task,))
        return task.id

    def publish_many(
        self,
        items: Iterable[PublishItem],
        *,
        delay_s: float = 0.0,
        at: datetime | None = None,
        expires: float | None = None,
        unique_key: str | None = None,
    ) -> list[str]:
        """Put several tasks at once, all or nothing: each item is (type, payload) or (type,
        payload, headers). ``delay_s``, ``at``, ``expires`` and ``unique_key`` as for
        ``publish`` (a unique task whose key is held answers the holder's id)."""
        now = time.time()
        not_before = not_before_of(now, delay_s, at)
        tasks = [
            self._draft(
                item[0], item[1], item[2] if len(item) > 2 else None, now, not_before, expires
            )
            for item in items
        ]
        if self._unique_keys or unique_key is not None:
            return self._put_unique(tasks, unique_key)
        self._put(tasks)
        return [task.id for task in tasks]

    def _put(self, tasks: Sequence[Task]) -> None:
        """Put drafted ``tasks`` (all or none) and say each was published."""
        self.broker.put_many(tasks)
        published = EventName.TASK_PUBLISHED  # read once: a member lookup costs 0.1 us on 3.11
        for task in tasks:
            self.events.emit(task_event(published, task.id, task.type, 0))

    def _put_unique(self, tasks: list[Task], given: str | None) -> list[str]:
        """Put ``tasks`` with their unique keys: ``given`` or their types' templates."""
        keyed = [
            replace(t, unique_key=key)
            if (key := unique_key_of(t.type, t.payload, self._unique_keys.get(t.type), given))
            else t
            for t in tasks
        ]
        if not any(t.unique_key for t in keyed):
            self.broker.put_many(keyed)
            answers = [t.id for t in keyed]
        else:
            if not self.broker.settle_effects:
                raise UsageError(f"{type(self.broker).__name__} cannot hold unique keys")
            answers = self.broker.put_unique(keyed)
        for task, answer in zip(keyed, answers, strict=True):
            if answer == task.id:
                self.events.emit(
                    Event(EventName.TASK_PUBLISHED, task_id=task.id, type=task.type, attempt=0)
                )
            else:
                detail = f"unique key {task.unique_key!r} is held by {answer}"
                self.events.emit(
                    Event(
                        EventName.TASK_DEDUPLICATED, task_id=answer, type=task.type, detail=detail
                    )
                )
        return answers

    def _draft(
        self,
        type_name: str,
        payload: Any,
        given: Mapping[str, Any] | None,
        now: float,
        not_before: float,
        expires: float | None,
    ) -> Task:
        """The task a publish of ``payload`` puts: checked, and through the type's on_publish
        hooks (UsageError when a check or hook refuses it)."""
        hooks = self._on_publish.get(type_name, ())
        # A dict only where there are headers or hooks that may add some.
        headers: dict[str, Any] | None = dict(given or {}) if given or hooks else None
        require_type(type_name, self.config.task_types)
        if payload is not None and not isinstance(payload, str | int | bool):
            try:
                # NaN and Infinity are not JSON (and the codec would write them as null).
                json.dumps(payload, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise UsageError(f"payload of a {type_name!r} task is not JSON: {exc}") from exc
        for middleware in hooks:
            assert headers is not None
            try:
                middleware.on_publish(type_name, payload, headers)
            except InvalidPayload as exc:
                raise UsageError(f"payload of a {type_name!r} task is invalid: {exc}") from exc
            except Exception as exc:
                raise UsageError(
                    f"middleware {middleware.name} refused a {type_name!r} task: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        expires_at = expires_at_of(now, expires, self._expires.get(type_name))
        # Positionally, in field order (test_quick_init pins it): a class called with keywords
        # gathers them in a dict first, on every publish.
        return Task(
            type_name, payload, new_task_id(), 0, now, not_before, (), headers or NO_HEADERS,
            expires_at,
        )  # fmt: skip

    def _scheduled(self, schedule: Schedule, tick: float, not_before: float) -> Task:
        """The task a schedule's tick publishes; its headers name the schedule and the tick."""
        headers = {"schedule": schedule.name, "tick": tick_name(tick)}
        return self._draft(schedule.type, schedule.payload, headers, time.time(), not_before, None)

    def replay_dead_letters(self) -> int:
        """Put every dead letter back in the queue (attempts reset); returns how many.

        Blocks while the broker is full, like publish. For a memory pipeline with a file DLQ
        this is the way back for tasks dead-lettered at an earlier shutdown.
        """
        if not isinstance(self.broker, BrokerAdmin):
            return 0
        records = self.broker.dead_letters(DeadLetterFilter())
        joins = not_replayable(records)  # a join waits for its dead part instead
        records = [r for r in records if r.id not in joins]
        before_replay(self.broker, records)
        replayed = self.broker.replay([r.id for r in records])
        for record in records[:replayed]:
            self.events.emit(
                Event(EventName.TASK_PUBLISHED, task_id=record.id, type=record.task.type, attempt=0)
            )
        return replayed

    # -- running ---------------------------------------------------------------------------

    def start(self) -> Runner:
        if not self._started:
            self._started = True
            self._tell_middleware("on_worker_start")
            self._apply_gates()
            for worker in self.workers:
                worker.start()
            if self.circuit_watch is not None:
                self.circuit_watch.start()
            if self.presence is not None:
                self.presence.start()
            if self.cancel_watch is not None:
                self.cancel_watch.start()
            if self.scheduler is not None:
                self.scheduler.start()
        return self

    def _apply_gates(self) -> None:
        """Set each type's rate limit and circuit breaker in the broker, and clear those the
        file no longer gives a type (the file is the truth: the process started last wins)."""
        if not self.broker.gates_in_get:
            return
        for name in self.config.task_types:
            limit = self._rate_limits.get(name)
            if limit is not None:
                self.broker.set_gate(name, limit)
                detail = f"{rate_text(limit.rate)}, burst {limit.burst:g}"
                self.events.emit(Event(EventName.RATE_LIMIT_SET, type=name, detail=detail))
            elif self.broker.clear_gate(name, RateLimit):
                self.events.emit(Event(EventName.RATE_LIMIT_CLEARED, type=name))
            breaker = self._breakers.get(name)
            if breaker is not None:
                self.broker.set_gate(name, breaker)  # its circuit keeps its state
            elif self.broker.settle_effects:
                self.broker.clear_gate(name, CircuitBreaker)

    def result(self, task_id: str, timeout: float = 0.0) -> dict[str, Any] | None:
        """The task's kept result, waiting up to ``timeout`` seconds for it: ``{"state":
        "succeeded", "value": ...}`` or ``{"state": "dead", "reason", "error"}`` (with
        ``finished_at``); None while it runs, or when its id is unknown or its result expired
        (its type keeps none without ``results``)."""
        return wait_for_result(self.broker, task_id, timeout)

    def cancel(self, root_id: str) -> list[str]:
        """Cancel the pipeline whose first task is ``root_id`` (``dq-run cancel``): none of
        its settles starts anything from now on, its queued tasks are dead-lettered (reason
        ``cancelled``; replay resumes it) and its running ones see ``ctx.cancelled``. Answers
        the ids dead-lettered."""
        if not self.broker.settle_effects:
            raise UsageError(f"{type(self.broker).__name__} cannot cancel (no settle effects)")
        ids = cancel_pipeline(self.broker, root_id)
        if self.cancel_watch is not None:
            self.cancel_watch.look()  # this process's own tasks of it learn at once
        return ids

    def circuits(self) -> dict[str, Circuit]:
        """The circuit-broken types' circuits, from the broker (empty without breakers)."""
        if not self._breakers:
            return {}
        return {n: c for n, c in self.broker.circuits().items() if n in self._breakers}

    def buckets(self) -> dict[str, Bucket]:
        """The rate-limited types' token buckets, from the broker (empty without limits)."""
        if not self._rate_limits:
            return {}
        return {n: b for n, b in self.broker.buckets().items() if n in self._rate_limits}

    def _tell_middleware(self, hook: str) -> None:
        """Call ``hook`` on each middleware that has it; one that raises is logged and the
        runner goes on."""
        for middleware in overriding(tuple(self._middleware), hook):
            try:
                getattr(middleware, hook)()
            except Exception as exc:
                detail = f"{middleware.name}.{hook}: {type(exc).__name__}: {exc}"
                self.events.emit(Event(EventName.MIDDLEWARE_FAILED, detail=detail))

    def run_until_empty(self, timeout: float | None = None) -> bool:
        """Block until nothing of the types this process runs is ready, delayed or running;
        False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.worker.stopping:
            depth = self.broker.depth()
            served = [t for w in self.workers for t in w.types]
            if (
                all(w.idle() for w in self.workers)
                and sum(depth[t].total for t in served if t in depth) == 0
            ):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_S)
        return False

    join = run_until_empty

    def stop(self, grace_s: float | None = None) -> dict[str, Any]:
        """Stop taking tasks, let running ones finish within the grace period, close the broker.

        On the memory broker every task still queued or in backoff becomes a dead letter with
        reason ``shutdown`` (nothing vanishes silently). Returns the summary as JSON data.
        """
        if not self._stopped:
            self._stopped = True
            grace = self.config.shutdown.grace if grace_s is None else grace_s
            if self.scheduler is not None:
                self.scheduler.stop()
            if self.circuit_watch is not None:
                self.circuit_watch.stop()
            if self.cancel_watch is not None:
                self.cancel_watch.stop()
            if self.presence is not None and self._started:
                self.presence.stop()
            if self._started:
                # The worker threads (an async- or process-only process has none).
                threaded = [w for w in self.workers if w.mode == "thread"]
                self.summary.threads = (
                    sum(w.threads for w in threaded),
                    sum(w.alive_threads() for w in threaded),
                )
                self.summary.interrupts = sum(w.interrupts for w in self.workers)
                _stop_all(self.workers, grace)
                self._tell_middleware("on_worker_stop")
            # Closed before the drain (which works after close): a publish blocked on a full
            # queue raises BrokerClosed instead of filling the room the drain makes, after it.
            self.broker.close()
            drain = getattr(self.broker, "drain_to_dead_letters", None)
            failed: BrokerError | None = None
            if drain is not None:
                with self._drain_lock:
                    # include_leased: a handler stuck past the grace period still holds its
                    # task; on an in-process broker it would vanish with the process otherwise.
                    try:
                        drained = drain(reason=DeadReason.SHUTDOWN, include_leased=True)
                    except BrokerError as exc:  # a dead-letter file that cannot be written
                        drained, failed = [], exc
                    for record in drained:
                        error = ": ".join(filter(None, (record.error_type, record.message)))
                        self.events.emit(
                            Event(
                                EventName.TASK_DEAD,
                                task_id=record.id,
                                type=record.task.type,
                                attempt=record.attempts,
                                outcome="dead",
                                reason=DeadReason.SHUTDOWN,
                                error=error,
                                error_type=record.error_type,
                            )
                        )
            self.summary.finish()
            self.close_observers()
            if failed is not None:  # raised once the rest of the stop is done
                lost = f"{failed}; the broker keeps nothing after exit: those tasks are lost"
                raise type(failed)(
                    lost, backend=failed.backend, operation=failed.operation
                ) from failed
        return self.summary.to_dict()

    def drain_now(self) -> int:
        """A forced exit's last word on a broker that is not durable (memory): dead-letter
        every task it still holds, queued or leased (reason ``shutdown``), once the stop's own
        drain, if one is under way, has written and counted its records. Returns how many
        tasks were dead-lettered at shutdown, by the stop and now; raises what the broker's
        drain raises (BrokerError, AttributeError on a broker that cannot drain)."""
        with self._drain_lock:
            drain = self.broker.drain_to_dead_letters  # type: ignore[attr-defined]
            records = drain(reason=DeadReason.SHUTDOWN, include_leased=True)
            return len(records) + len(self.summary.drained())

    def close_observers(self) -> None:
        """Stop the progress view and metrics server, flush the logs (reverse of attachment).
        A second caller (a forced exit's, beside the stop's) returns once all are closed."""
        with self._closing:
            while self._closers:
                self._closers.pop()()

    def __enter__(self) -> Runner:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- operating -------------------------------------------------------------------------

    def pause(self, type_name: str, for_s: float | None = None) -> None:
        """Hand out no ``type_name`` task (to any process sharing the broker) for ``for_s``
        seconds of the broker's clock, or until ``resume``; tasks running now finish."""
        require_type(type_name, self.config.task_types)
        until = None if for_s is None else self.broker.now() + for_s
        self.broker.set_gate(type_name, Pause(until=until))

    def resume(self, type_name: str) -> bool:
        """Hand ``type_name``'s tasks out again; False when it was not paused."""
        require_type(type_name, self.config.task_types)
        return self.broker.clear_gate(type_name, Pause)

    # -- state for metrics and progress ----------------------------------------------------

    def depth(self) -> dict[str, Depth]:
        return self.broker.depth()

    def inflight(self) -> dict[str, int]:
        return {name: n for w in self.workers for name, n in w.inflight().items()}

    def limits(self) -> dict[str, int]:
        return {name: n for w in self.workers for name, n in w.limits().items()}

    def overrunning(self) -> int:
        return sum(w.overrunning() for w in self.workers)

    def dead_letter_count(self) -> int | None:
        if isinstance(self.broker, BrokerAdmin):
            return self.broker.dead_letter_count()
        return None


def _stop_all(workers: Sequence[Worker], grace_s: float) -> None:
    """Stop every worker at once (each stops taking tasks now; one grace period for all)."""
    others = [
        threading.Thread(target=w.stop, args=(grace_s,), name="dq-stop", daemon=True)
        for w in workers[1:]
    ]
    for thread in others:
        thread.start()
    workers[0].stop(grace_s)
    for thread in others:
        thread.join()


def build_runtime(
    config: PipelineConfig,
    *,
    broker: Broker | None = None,
    listeners: Sequence[Listener] = (),
    observe: bool = True,
    progress_total: int | None = None,
) -> Runner:
    """Build a Runner (not started) from a validated config.

    With ``observe`` (the default) it also sets up what the config asks to see: JSON or text
    logs, the Prometheus endpoint (started here, so its port is known), and the live progress
    view when stderr is a terminal. Library users who manage logging themselves pass False.
    """
    events = EventBus()

    def on_reconnect(attempt: int, error: BaseException | None) -> None:
        events.emit(Event(EventName.BROKER_RECONNECTING, attempt=attempt, error=str(error)))

    if not observe:
        return Runner(
            config, broker or create_broker(config, on_reconnect), listeners, events=events
        )
    log_listener = setup_logging(config.logging)
    try:
        broker = broker or create_broker(config, on_reconnect)
        runner = Runner(config, broker, listeners, task_logger, events)
    except BaseException:
        log_listener.close()
        raise
    runner.attach(log_listener, log_listener.close)
    if config.metrics.enabled:
        metrics = MetricsListener(config.metrics, runner, schedules=list(config.schedules))
        runner.attach(metrics, metrics.close)
        metrics.start()
    if progress_enabled(config.logging):
        progress = Progress(
            progress_total,
            runner.limits(),
            runner,
            shared=runner.broker.shared,
            flush_logs=log_listener.flush,
        )
        runner.attach(progress, progress.stop)
        progress.start()
    return runner
