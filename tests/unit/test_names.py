"""Names and errors (issue 15): event names and dead-letter reasons are declared once, as enums
whose values are the wire strings; each error class carries its exit code; a BrokerError says
which backend and which operation raised it.

The AST scans read runner/ itself, so a name written as a string literal somewhere new fails
here rather than drifting from the enum.
"""

from __future__ import annotations

import ast
import io
import json
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

import runner
from runner import errors
from runner.brokers.base import DeadLetterFilter, Delivery
from runner.brokers.memory import MemoryBroker
from runner.brokers.redis.broker import RedisBroker
from runner.brokers.sqlite.batch import Pending
from runner.brokers.sqlite.broker import SqliteBroker
from runner.config.models import LoggingConfig
from runner.deadletter.memory import MemoryDeadLetters
from runner.engine.attempt import Attempts, TypeRuntime, default_task_logger
from runner.engine.handoff import Pipeline, Stage, on_dead
from runner.engine.retry import RetryPlan
from runner.engine.timeouts import Watchdog
from runner.errors import (
    BrokerClosed,
    BrokerError,
    BrokerUnavailable,
    ChildDied,
    ChildError,
    ConfigError,
    InputError,
    InvalidPayload,
    NotSupported,
    PermanentError,
    Problem,
    QueueFull,
    Retry,
    RunnerError,
    UsageError,
)
from runner.events import Event, EventBus, EventName
from runner.middleware.base import Middleware
from runner.model import DeadReason, Task, TaskContext
from runner.observe.logs import setup_logging
from runner.observe.metrics import DEAD_REASONS
from runner.observe.summary import KIND_OF, Summary
from runner.ops.cli import report

RUNNER = Path(runner.__file__).resolve().parent
DOCS = RUNNER.parent / "docs"
#: The pages that document what this file checks: the log events, the dead-letter reasons, and
#: the exit codes.
LOGS_PAGE = (DOCS / "operating" / "logs.md").read_text()
DEAD_LETTERS_PAGE = (DOCS / "operating" / "dead-letters.md").read_text()
CLI_PAGE = (DOCS / "reference" / "cli.md").read_text()

#: Files still being rewritten by the lead (issue 15): they may write event names as strings
#: until converted. A file here that no longer does must leave the list.
PENDING: set[str] = set()


def _sources() -> list[tuple[str, ast.AST]]:
    return [
        (path.relative_to(RUNNER).as_posix(), ast.parse(path.read_text()))
        for path in sorted(RUNNER.rglob("*.py"))
    ]


def _string_literals(tree: ast.AST, values: set[str]) -> list[tuple[int, str]]:
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in values
    ]


# -- event names ---------------------------------------------------------------------------------

#: The wire names: the ``event`` field of log lines that dashboards and log queries match on.
WIRE_EVENT_NAMES = {
    "task.published", "task.started", "task.succeeded", "task.retrying", "task.timeout",
    "task.dead", "task.lease_lost", "task.overrun", "task.interrupted",
    "worker.started", "worker.stopping", "worker.stopped", "broker.reconnecting",
    "middleware.failed",
    "schedule.fired", "schedule.missed", "schedule.full", "schedule.failed",
    "schedule.clock_skew", "schedule.removed", "rate_limit.set", "rate_limit.cleared",
    "circuit.opened", "circuit.half_open", "circuit.closed", "task.deduplicated",
}  # fmt: skip


def test_event_names_keep_their_wire_strings() -> None:
    assert {name.value for name in EventName} == WIRE_EVENT_NAMES
    for name in EventName:
        assert f"`{name.value}`" in LOGS_PAGE, f"docs/operating/logs.md does not name {name.value}"


def test_every_event_built_in_runner_names_a_declared_event() -> None:
    """The first argument of every ``Event(...)`` and ``Attempts._emit(...)``: an EventName
    member, a value typed EventName, or, only in a PENDING file, a declared name's string."""
    declared = {name.value for name in EventName}
    checked = 0
    for path, tree in _sources():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            func = node.func
            built = isinstance(func, ast.Name) and func.id == "Event"
            emitted = isinstance(func, ast.Attribute) and func.attr == "_emit"  # Attempts'
            if not (built or emitted):
                continue
            first = node.args[0]
            where = f"runner/{path}:{node.lineno}"
            checked += 1
            if isinstance(first, ast.Constant):
                assert path in PENDING, f"{where}: {first.value!r} written as a string"
                assert first.value in declared, f"{where}: {first.value!r} is not an EventName"
            elif isinstance(first, ast.Attribute) and ast.unparse(first.value) == "EventName":
                assert first.attr in EventName.__members__, where
            # else a variable or field (Outcome.event), typed EventName: mypy checks it
    assert checked >= 15  # the scan found the engine's and the app's events


def test_no_event_name_is_written_as_a_string_outside_events_py() -> None:
    values = {name.value for name in EventName}
    found = {
        path: hits
        for path, tree in _sources()
        if path != "events.py" and (hits := _string_literals(tree, values))
    }
    stray = {path: hits for path, hits in found.items() if path not in PENDING}
    assert not stray, f"use EventName: {stray}"
    done = {path for path in PENDING if (RUNNER / path).exists() and path not in found}
    assert not done, f"converted: remove from PENDING: {sorted(done)}"


def test_names_read_as_their_values_everywhere() -> None:
    """A plain (str, Enum) member reads ``EventName.TASK_DEAD`` in str() and f-strings on
    Python 3.11 and later; ours read as the wire string."""
    for member in (EventName.TASK_DEAD, DeadReason.MAX_DELIVERIES):
        assert str(member) == member.value
        assert f"{member}" == member.value and f"{member:>20}" == f"{member.value:>20}"
        assert "%s" % member == member.value  # noqa: UP031  (what logging does with args)
        assert json.dumps({"k": member}) == json.dumps({"k": member.value})
        assert member == member.value and hash(member) == hash(member.value)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_log_lines_carry_the_wire_names(fmt: str) -> None:
    out = io.StringIO()
    logs = setup_logging(LoggingConfig(format=fmt, level="DEBUG"), stream=out)
    try:
        logs.handle(
            Event(EventName.TASK_DEAD, task_id="0" * 32, type="email", attempt=3,
                  outcome="dead", reason=DeadReason.MAX_DELIVERIES, error="MaxDeliveries: x")
        )  # fmt: skip
    finally:
        logs.close()
    line = out.getvalue()
    assert "EventName" not in line and "DeadReason" not in line
    if fmt == "json":
        fields = json.loads(line)
        assert fields["event"] == "task.dead" and fields["reason"] == "max deliveries"
        assert type(fields["event"]) is str
    else:
        assert " task.dead " in line and "reason=max deliveries" in line


def test_the_summary_counts_task_events_by_an_explicit_kind() -> None:
    """Every task event has its kind (no ``name[5:]``); a name it does not know is not counted
    under a kind made up from the name."""
    assert set(KIND_OF) == {name for name in EventName if name.value.startswith("task.")}
    summary = Summary()
    for name in EventName:
        summary.handle(Event(name, task_id="t", type="email", attempt=1))
    summary.handle(Event("task.surprise", task_id="t", type="email"))
    counts = summary.counts["email"]
    assert set(counts) == set(KIND_OF.values())
    assert all(count == 1 for count in counts.values())
    assert summary.to_dict()["totals"]["succeeded"] == 1


# -- dead-letter reasons -------------------------------------------------------------------------

#: What records on disk and in brokers hold: never to change (old records must still read).
WIRE_REASONS = {
    "exhausted", "never_retry", "permanent", "max deliveries", "invalid payload", "undecodable",
    "shutdown", "corrupt record", "expired", "cancelled", "upstream dead",
}  # fmt: skip


def test_dead_letter_reasons_keep_their_wire_strings() -> None:
    assert {reason.value for reason in DeadReason} == WIRE_REASONS
    for reason in DeadReason:
        assert f"| `{reason.value}` |" in DEAD_LETTERS_PAGE, (
            f"docs/operating/dead-letters.md's reasons table lacks {reason.value}"
        )


def test_no_reason_is_written_as_a_string_outside_model_py() -> None:
    """Config keys named like a reason (``never_retry`` in config/ and loader.py) are not
    reasons."""
    values = {reason.value for reason in DeadReason}
    stray = {
        path: hits
        for path, tree in _sources()
        if path != "model.py"
        and not path.startswith("config/")
        and path != "loader.py"
        and (hits := _string_literals(tree, values))
    }
    assert not stray, f"use DeadReason: {stray}"


def _attempts(*middleware: Middleware) -> Attempts:
    plan = RetryPlan(3, initial=0.01, maximum=0.1, multiplier=2, jitter=0)
    rt = TypeRuntime("email", lambda payload, ctx: None, 1, 1.0, True, plan, middleware=middleware)
    return Attempts({"email": rt}, EventBus(), Watchdog(), default_task_logger)


class _RefusesPayloads(Middleware):
    def before_attempt(self, ctx: TaskContext, payload: Any) -> Any:
        raise InvalidPayload("Email", [("to", "field required")])


def _reasons_the_engine_gives() -> list[object]:
    """A reason from every place that ends a task: the retry plan, the checks before a run,
    and the memory broker's shutdown drain."""
    plan = RetryPlan(2, initial=0.01, maximum=0.1, multiplier=2, jitter=0, never_retry=(KeyError,))
    given: list[object] = [
        plan.decide(PermanentError("no"), 1).reason,
        plan.decide(KeyError("no"), 1).reason,
        plan.decide(OSError("no"), 2).reason,
    ]
    ran = [
        (_attempts(), Delivery(Task("email", {}, attempt=1), "r", decode_error="garbled")),
        (_attempts(), Delivery(Task("sms", {}, attempt=1), "r")),  # no handler here
        (_attempts(), Delivery(Task("email", {}, attempt=4), "r", redelivered=True)),
        (_attempts(_RefusesPayloads()), Delivery(Task("email", {}, attempt=1), "r")),
        (_attempts(), Delivery(Task("email", {}, attempt=1, expires_at=1.0), "r")),  # long gone
    ]
    cancelled = _attempts()
    cancelled.cancelled_roots = frozenset({"root"})  # its pipeline was cancelled
    ran.append(
        (cancelled, Delivery(Task("email", {}, attempt=1, headers={"root_id": "root"}), "r"))
    )
    for attempts, delivery in ran:
        outcome = attempts.run(None, delivery)  # each ends before a run: no guard needed
        assert outcome.event is EventName.TASK_DEAD and outcome.settle.record is not None
        given += [outcome.fields["reason"], outcome.settle.record.reason]
    # A fan-out member that dies dead-letters its join.
    member = Task("email", {}, attempt=1, headers={"fanout": ["g.0", 0, 2]})
    record = outcome.settle.record
    joined = on_dead(member, record, Pipeline((Stage("report", join=True),)), 0.0)
    given += [r.reason for r in joined.dead_letters]
    broker = MemoryBroker(10, 1.0, "block", 30.0, dead_letters=MemoryDeadLetters())
    broker.put_many([Task("email", {})])
    given += [record.reason for record in broker.drain_to_dead_letters()]
    return given


def test_every_reason_the_engine_gives_is_declared_and_counted() -> None:
    given = _reasons_the_engine_gives()
    assert all(isinstance(reason, DeadReason) for reason in given), given
    assert set(given) == set(DEAD_REASONS)  # every one, and metrics starts each at 0


# -- exit codes ----------------------------------------------------------------------------------

#: docs/reference/cli.md: 0 ok, 1 failure, 2 config or usage error (also what the broker cannot do),
#: 3 broker unreachable.
EXIT_CODES: dict[type[RunnerError], int] = {
    RunnerError: 1,
    ConfigError: 2,
    UsageError: 2,
    InputError: 2,
    InvalidPayload: 2,
    BrokerError: 1,
    QueueFull: 1,
    BrokerClosed: 1,
    BrokerUnavailable: 3,
    NotSupported: 2,
    PermanentError: 1,
    Retry: 1,
    ChildDied: 1,
    ChildError: 1,
}


def test_every_error_class_carries_its_documented_exit_code() -> None:
    declared = {
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, RunnerError)
    }
    assert declared == set(EXIT_CODES)
    for cls, code in EXIT_CODES.items():
        assert cls.exit_code == code, cls.__name__
    assert "2 for a config or usage error" in CLI_PAGE and "3 when the broker cannot be" in CLI_PAGE


def test_the_docstring_tree_shows_each_class_and_its_exit_code() -> None:
    doc = errors.__doc__ or ""
    rows = {}
    for line in doc.splitlines():
        words = line.replace("├──", "").replace("└──", "").replace("│", "").split()
        if len(words) >= 2 and words[0] in errors.__dict__ and words[1].isdigit():
            rows[words[0]] = int(words[1])
    assert rows == {cls.__name__: code for cls, code in EXIT_CODES.items()}


def _instance(cls: type[RunnerError]) -> RunnerError:
    if cls in (ConfigError, InputError):
        return cls([Problem("f.yaml:1:1", "workers", "bad")])
    if cls is InvalidPayload:
        return InvalidPayload("Email", [("to", "field required")])
    if cls is Retry:
        return Retry(delay=1)
    if cls is ChildError:
        return ChildError("ValueError", "it failed", "Traceback ...", ValueError)
    return cls("it failed")


def test_the_cli_exits_with_the_class_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    for cls, code in EXIT_CODES.items():
        assert report(_instance(cls)) == code, cls.__name__

    class Throttled(BrokerUnavailable):  # inherits 3 from its parent
        pass

    class Custom(BrokerError):  # a class of its own: the CLI asks it, not a ladder
        exit_code = 4

    assert report(Throttled("slow down")) == 3
    assert report(Custom("odd")) == 4
    err = capsys.readouterr().err
    assert "error: odd" in err and "f.yaml:1:1: workers: bad" in err


# -- where a broker error comes from -------------------------------------------------------------


def test_broker_errors_name_backend_and_operation_without_changing_the_message() -> None:
    plain = BrokerError("it failed")
    assert (plain.backend, plain.operation, str(plain)) == ("", "", "it failed")
    placed = QueueFull("queue full", backend="memory", operation="put")
    assert (placed.backend, placed.operation, str(placed)) == ("memory", "put", "queue full")
    assert placed.args == ("queue full",)


def test_the_sqlite_broker_names_backend_and_operation(tmp_path: Path) -> None:
    not_a_db = tmp_path / "queue.db"
    not_a_db.write_bytes(b"this is not a database, " * 100)
    with pytest.raises(BrokerUnavailable) as opened:
        SqliteBroker(str(not_a_db), 10, 0.1, "reject", 30.0)
    assert (opened.value.backend, opened.value.operation) == ("sqlite", "open")
    assert str(opened.value).startswith(f"sqlite broker {not_a_db}: ")

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(BrokerUnavailable) as no_dir:
        SqliteBroker(str(blocked / "queue.db"), 10, 0.1, "reject", 30.0)
    assert (no_dir.value.backend, no_dir.value.operation) == ("sqlite", "open")

    broker = SqliteBroker(str(tmp_path / "ok.db"), 1, 0.1, "reject", 30.0)
    with pytest.raises(QueueFull) as full:
        broker.put_many([Task("email", {}), Task("email", {})])
    assert (full.value.backend, full.value.operation) == ("sqlite", "put")
    broker.close()
    for call, operation in [
        (lambda: broker.put_many([Task("email", {})]), "put"),
        (lambda: broker.get({"email": 1}, 1, 0), "get"),
        (lambda: broker.settle_many([]), "settle"),
        (lambda: broker.extend([]), "extend"),
        (broker.depth, "depth"),
        (lambda: broker.purge(DeadLetterFilter()), "purge"),
    ]:
        with pytest.raises(BrokerClosed) as closed:
            call()
        assert (closed.value.backend, closed.value.operation) == ("sqlite", operation)


def test_a_failed_group_commit_names_each_waiters_own_operation() -> None:
    """The transaction is led by one caller, but each waiter's error names its own call."""
    led = BrokerUnavailable("sqlite broker q.db: disk I/O error", backend="sqlite", operation="x")
    pending = Pending(lambda conn: None, "settle", done=True, error=led)
    with pytest.raises(BrokerUnavailable) as raised:
        pending.outcome()
    assert (raised.value.backend, raised.value.operation) == ("sqlite", "settle")
    assert str(raised.value) == str(led) and raised.value is not led
    pending = Pending(lambda conn: None, "get", done=True, error=RuntimeError("boom"))
    with pytest.raises(BrokerUnavailable) as wrapped:
        pending.outcome()
    assert (wrapped.value.backend, wrapped.value.operation) == ("sqlite", "get")


def test_the_memory_broker_names_backend_and_operation() -> None:
    broker = MemoryBroker(1, 0.0, "reject", 30.0, dead_letters=MemoryDeadLetters())
    with pytest.raises(QueueFull) as full:
        broker.put_many([Task("email", {}), Task("email", {})])
    assert (full.value.backend, full.value.operation) == ("memory", "put")
    broker.close()
    with pytest.raises(BrokerClosed) as closed:
        broker.get({"email": 1}, 1, 0)
    assert (closed.value.backend, closed.value.operation) == ("memory", "get")


def test_the_redis_broker_names_backend_and_operation() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(BrokerUnavailable) as opened:
        RedisBroker(f"redis://127.0.0.1:{port}/0", "dq", 10, 0.1, "reject", 30.0)
    assert (opened.value.backend, opened.value.operation) == ("redis", "open")
    assert str(opened.value).startswith(f"cannot reach redis at redis://127.0.0.1:{port}/0: ")


def test_a_redis_url_that_names_another_service_is_broker_unavailable() -> None:
    """A port where something else answers (RabbitMQ and NATS greet first, and not as Redis
    does): BrokerUnavailable at open, saying so, not redis-py's InvalidResponse (which `dq-run`
    printed as a traceback)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def greet() -> None:
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                with conn:
                    conn.sendall(b'INFO {"server_id":"x"}\r\n')  # as NATS opens
                    conn.recv(1024)

        threading.Thread(target=greet, daemon=True).start()
        with pytest.raises(BrokerUnavailable) as opened:
            RedisBroker(f"redis://127.0.0.1:{port}/0", "dq", 10, 0.5, "reject", 30.0)
    assert (opened.value.backend, opened.value.operation) == ("redis", "open")
    assert "did not answer as Redis does" in str(opened.value)
