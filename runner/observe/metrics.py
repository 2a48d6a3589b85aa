"""Prometheus metrics on a private registry, served on ``/metrics``.

``MetricsListener`` is an events.Listener: counters and histograms move as events arrive.
Gauges (queue depth, in-flight, limits, dead letters) are read from a ``RuntimeState`` at scrape
time by a custom collector, so they can never drift from the broker and the executor.

Every counter starts at 0 for every configured type (and, for ``dq_tasks_dead_total``, every
reason in ``DEAD_REASONS``): a series that appears only when its first event does would leave
``rate()`` and the dashboard's ratios without data on a healthy pipeline.

A state read that raises (Redis down) skips the state gauges for that scrape only. It is counted
in ``dq_metrics_state_errors_total`` and logged once per spell: ``metrics.state_failed`` when reads
start failing, ``metrics.state_recovered`` when one succeeds again, not a line per scrape.

The registry is private to each listener (never prometheus_client's global one): two runtimes in
one process, as in tests, do not share or collide on metrics.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server

from runner.brokers.base import Bucket, Circuit, Depth
from runner.config.models import MetricsConfig
from runner.errors import RunnerError
from runner.events import Event, EventName
from runner.model import DeadReason
from runner.observe.logs import log_event

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

#: Every reason a task can be dead-lettered for (runner.model.DeadReason, but CORRUPT_RECORD: a
#: damaged stored record, never a task.dead event): each type's dq_tasks_dead_total starts at 0
#: for each, so a ratio over it has data on a pipeline where nothing has died yet.
DEAD_REASONS = tuple(r for r in DeadReason if r is not DeadReason.CORRUPT_RECORD)

# Seconds. Handlers range from milliseconds to minutes; queue waits can reach hours in a backlog.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
QUEUE_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


#: dq_circuit_state's value for each state of a circuit.
_CIRCUIT_STATES = {"closed": 0.0, "half_open": 1.0, "open": 2.0}


class RuntimeState(Protocol):
    """What the scrape-time gauges read from the running engine. Must be thread-safe."""

    def depth(self) -> dict[str, Depth]:
        """Tasks per type: ready, delayed (retry backoff), leased (handed out)."""
        ...

    def inflight(self) -> dict[str, int]:
        """Attempts running now, per type (overrunning ones included: they hold a slot)."""
        ...

    def limits(self) -> dict[str, int]:
        """Each type's concurrency limit in this process."""
        ...

    def dead_letter_count(self) -> int | None:
        """Records in the dead-letter queue, or None when the backend cannot count cheaply."""
        ...

    def overrunning(self) -> int:
        """Handler threads still running after their interrupt (stuck in a C call)."""
        ...

    def buckets(self) -> dict[str, Bucket]:
        """The rate-limited types' token buckets, read from the broker."""
        ...

    def circuits(self) -> dict[str, Circuit]:
        """The circuit-broken types' circuits, read from the broker."""
        ...


class _StateCollector:
    """Builds the gauges from ``RuntimeState`` at each scrape."""

    def __init__(self, state: RuntimeState, up: threading.Event) -> None:
        self._state = state
        self._up = up
        self._log = logging.getLogger("runner.metrics")
        self._lock = threading.Lock()  # two scrapes may run at once (one thread per request)
        self.errors = 0  # scrapes whose state read raised, ever (dq_metrics_state_errors_total)
        self._failing = False  # inside a spell of failed reads: logged once, at its start

    def describe(self) -> list[Metric]:
        # Registering must not call the broker; these names cannot collide with the counters.
        # Without describe(), an auto-describing registry would call collect() at registration.
        return []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("dq_worker_up", "1 while this worker runs, 0 once it stops")
        up.add_metric([], 1.0 if self._up.is_set() else 0.0)
        yield up
        # A broker that cannot answer (Redis down) must not fail the whole scrape: the
        # counters and dq_worker_up are still worth having, so the state gauges are skipped.
        # A spell of failures (Redis down for an hour of 15 s scrapes) logs one line when it
        # starts and one when it ends; the counter tells how many scrapes it cost.
        try:
            depth = self._state.depth()
            inflight = self._state.inflight()
            limits = self._state.limits()
            dead = self._state.dead_letter_count()
            overrunning = self._state.overrunning()
            buckets = self._state.buckets()
            circuits = self._state.circuits()
        except Exception as exc:
            with self._lock:
                self.errors += 1
                first, self._failing = not self._failing, True
            if first:
                log_event(self._log, logging.WARNING, "metrics.state_failed", error=repr(exc))
            yield self._errors_metric()
            return
        with self._lock:
            recovered, self._failing = self._failing, False
        if recovered:
            log_event(self._log, logging.INFO, "metrics.state_recovered")
        yield self._errors_metric()
        queue = GaugeMetricFamily(
            "dq_queue_depth", "Tasks in the broker by type and state", labels=["type", "state"]
        )
        for type_, d in sorted(depth.items()):
            queue.add_metric([type_, "ready"], d.ready)
            queue.add_metric([type_, "delayed"], d.delayed)
            queue.add_metric([type_, "leased"], d.leased)
        yield queue
        running = GaugeMetricFamily(
            "dq_tasks_in_flight", "Attempts running in this process", labels=["type"]
        )
        for type_ in sorted(set(limits) | set(inflight)):
            running.add_metric([type_], inflight.get(type_, 0))
        yield running
        limit = GaugeMetricFamily(
            "dq_task_concurrency_limit",
            "Concurrency limit per type in this process",
            labels=["type"],
        )
        for type_, value in sorted(limits.items()):
            limit.add_metric([type_], value)
        yield limit
        if dead is not None:
            yield GaugeMetricFamily(
                "dq_dead_letters", "Records in the dead-letter queue", value=dead
            )
        yield GaugeMetricFamily(
            "dq_handlers_overrunning",
            "Handler threads past their timeout that have not returned (blocked in a C call)",
            value=overrunning,
        )
        if buckets:
            limited = CounterMetricFamily(
                "dq_rate_limited_seconds",
                "Seconds the type's rate limit held its tasks back (its token bucket was empty), "
                "for all processes together",
                labels=["type"],
            )
            tokens = GaugeMetricFamily(
                "dq_rate_limit_tokens", "Tokens in the type's bucket now", labels=["type"]
            )
            for type_, bucket in sorted(buckets.items()):
                limited.add_metric([type_], bucket.limited_s)
                tokens.add_metric([type_], bucket.tokens)
            yield limited
            yield tokens
        if circuits:
            state = GaugeMetricFamily(
                "dq_circuit_state",
                "The type's circuit breaker: 0 closed, 1 half-open, 2 open (from the broker)",
                labels=["type"],
            )
            for type_, circuit in sorted(circuits.items()):
                state.add_metric([type_], _CIRCUIT_STATES[circuit.state])
            yield state

    def _errors_metric(self) -> Metric:
        return CounterMetricFamily(
            "dq_metrics_state_errors",
            "Scrapes whose queue-depth and in-flight gauges were skipped: the state read failed",
            value=self.errors,
        )


class MetricsListener:
    """Counts engine events into Prometheus metrics and serves them (an events.Listener)."""

    def __init__(
        self, config: MetricsConfig, state: RuntimeState, schedules: Sequence[str] = ()
    ) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.port: int | None = None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._up = threading.Event()
        self._up.set()
        self._log = logging.getLogger("runner.metrics")

        def counter(name: str, doc: str, labels: tuple[str, ...] = ("type",)) -> Counter:
            return Counter(name, doc, labels, registry=self.registry)

        self.published = counter("dq_tasks_published_total", "Tasks put into the broker")
        self.started = counter("dq_tasks_started_total", "Attempts started")
        self.succeeded = counter("dq_tasks_succeeded_total", "Attempts that succeeded")
        self.retried = counter("dq_tasks_retried_total", "Failed attempts scheduled to run again")
        self.dead = counter("dq_tasks_dead_total", "Tasks dead-lettered", ("type", "reason"))
        self.timed_out = counter("dq_tasks_timed_out_total", "Attempts past their timeout")
        self.expired = counter("dq_tasks_expired_total", "Tasks not run: past their expiry")
        self.lease_lost = counter("dq_lease_lost_total", "Acks refused: the lease had moved on")
        self.interrupts = counter("dq_interrupts_total", "Asynchronous interrupts raised")
        self.overruns = counter("dq_overruns_total", "Interrupted handlers that did not return")
        self.reconnects = counter("dq_broker_reconnects_total", "Broker reconnect attempts", ())
        self.unique_hits = counter(
            "dq_unique_hits_total", "Publishes of a unique task whose key was held: not put"
        )
        self.duration = Histogram(
            "dq_task_duration_seconds",
            "Handler run time per finished attempt",
            ["type"],
            registry=self.registry,
            buckets=DURATION_BUCKETS,
        )
        self.queue_wait = Histogram(
            "dq_task_queue_wait_seconds",
            "Time from published (or due, for retries) to started",
            ["type"],
            registry=self.registry,
            buckets=QUEUE_WAIT_BUCKETS,
        )
        self.schedule_fires = counter(
            "dq_schedule_fires_total", "Ticks a schedule fired (tasks it published)", ("schedule",)
        )
        self.schedule_lag = Gauge(
            "dq_schedule_lag_seconds",
            "How late the schedule's last fired tick was published (broker's clock)",
            ["schedule"],
            registry=self.registry,
        )
        for schedule in schedules:
            self.schedule_fires.labels(schedule=schedule)
        # Known types get zero-valued series at once, so rate() and dashboards see them.
        for type_ in state.limits():
            for family in (self.published, self.started, self.succeeded, self.retried,
                           self.timed_out, self.expired, self.lease_lost, self.interrupts,
                           self.overruns, self.unique_hits, self.duration,
                           self.queue_wait):  # fmt: skip
                family.labels(type=type_)
            for reason in DEAD_REASONS:
                self.dead.labels(type=type_, reason=reason)
        self.registry.register(_StateCollector(state, self._up))

    def handle(self, event: Event) -> None:
        type_ = event.type or "unknown"
        match event.name:
            case EventName.TASK_PUBLISHED:
                self.published.labels(type_).inc()
            case EventName.TASK_STARTED:
                self.started.labels(type_).inc()
                if event.queue_wait_s is not None:
                    self.queue_wait.labels(type_).observe(max(event.queue_wait_s, 0.0))
            case EventName.TASK_SUCCEEDED:
                self.succeeded.labels(type_).inc()
                self._observe_duration(type_, event)
            case EventName.TASK_RETRYING:
                self.retried.labels(type_).inc()
                self._observe_duration(type_, event)
            case EventName.TASK_DEAD:
                self.dead.labels(type_, event.reason or "unknown").inc()
                if event.reason == DeadReason.EXPIRED:
                    self.expired.labels(type_).inc()
                self._observe_duration(type_, event)
            case EventName.TASK_TIMEOUT:
                self.timed_out.labels(type_).inc()
            case EventName.TASK_LEASE_LOST:
                self.lease_lost.labels(type_).inc()
            case EventName.TASK_INTERRUPTED:
                self.interrupts.labels(type_).inc()
            case EventName.TASK_OVERRUN:
                self.overruns.labels(type_).inc()
            case EventName.BROKER_RECONNECTING:
                self.reconnects.inc()
            case EventName.TASK_DEDUPLICATED:
                self.unique_hits.labels(type_).inc()
            case EventName.SCHEDULE_FIRED:
                schedule = event.schedule or "unknown"
                self.schedule_fires.labels(schedule).inc()
                self.schedule_lag.labels(schedule).set(event.lag_s or 0.0)
            case EventName.WORKER_STOPPING | EventName.WORKER_STOPPED:
                self._up.clear()
            case EventName.WORKER_STARTED:
                self._up.set()
            case _:
                pass

    def _observe_duration(self, type_: str, event: Event) -> None:
        # One observation per finished attempt; a task dead-lettered without running has none.
        if event.duration_s is not None:
            self.duration.labels(type_).observe(event.duration_s)

    def exposition(self) -> bytes:
        """The text a scrape would return now."""
        return generate_latest(self.registry)

    def start(self) -> None:
        """Serve /metrics on config.host:config.port when enabled; port 0 picks a free port."""
        if not self.config.enabled or self._server is not None:
            return
        try:
            server, thread = start_http_server(
                self.config.port, addr=self.config.host, registry=self.registry
            )
        except OSError as exc:
            where = f"{self.config.host}:{self.config.port}"
            raise RunnerError(f"metrics: cannot listen on {where}: {exc}") from exc
        self._server, self._thread = server, thread
        self.port = server.server_port
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        url = f"http://{host}:{self.port}/metrics"
        log_event(self._log, logging.INFO, "metrics.serving", f"metrics at {url}", url=url)

    def close(self) -> None:
        """Stop serving (the registry stays readable). Safe to call twice."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)
