"""The middleware seam: hooks in a declared order around a real pipeline, and their failures."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.app import build_runtime
from runner.brokers.base import BrokerAdmin, DeadLetterFilter
from runner.config.load import load_config
from runner.errors import ConfigError, UsageError
from runner.events import Event, EventName
from runner.middleware.simulate import SIM_HEADER
from tests.unit import middleware_kit as kit

REPO = Path(__file__).resolve().parents[2]


class Named:
    """Listener: the detail of every middleware.failed event."""

    def __init__(self, into: list[str]) -> None:
        self.into = into

    def handle(self, event: Event) -> None:
        if event.name == EventName.MIDDLEWARE_FAILED:
            self.into.append(str(event.detail))


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    kit.CALLS.clear()
    kit.BUILT.clear()
    kit.SEEN.clear()
    yield


def _config(tmp_path: Path, middleware: str, retry: str = "{max_attempts: 2}") -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        "broker: {kind: memory}\n"
        "metrics: {enabled: false}\n"
        f"retry: {retry}\n"
        "task_types:\n"
        "  t: {handler: tests.unit.middleware_kit:record}\n"
        "  u: {handler: tests.unit.middleware_kit:record}\n"
        f"middleware:\n{middleware}"
    )
    return path


def recording(label: str, fail: str = "") -> str:
    """A ``middleware:`` entry of the Recording middleware."""
    options = f"{{label: {label}" + (f", fail: {fail}}}" if fail else "}")
    return f"  - {{use: tests.unit.middleware_kit:Recording, options: {options}}}\n"


TWO = (
    "  - {use: tests.unit.middleware_kit:Recording, options: {label: a}}\n"
    "  - {use: tests.unit.middleware_kit:Recording, options: {label: b}}\n"
)


def _run(path: Path, *items: tuple[str, object]) -> list[str]:
    runner = build_runtime(load_config(path), observe=False)
    with runner:
        ids = runner.publish_many(items)
        assert runner.run_until_empty(timeout=10)
    return ids


def test_hooks_run_in_the_declared_order_and_the_first_wraps_outermost(tmp_path: Path) -> None:
    (task_id,) = _run(_config(tmp_path, TWO), ("t", {"x": 1}))
    hooks = [(name, hook) for name, hook, _ in kit.CALLS]
    assert hooks == [
        ("a", "on_worker_start"), ("b", "on_worker_start"),
        ("a", "on_publish"), ("b", "on_publish"),
        ("a", "before_attempt"), ("b", "before_attempt"),
        ("a", "enter"), ("b", "enter"), ("b", "leave"), ("a", "leave"),
        ("a", "after_attempt"), ("b", "after_attempt"),
        ("a", "on_worker_stop"), ("b", "on_worker_stop"),
    ]  # fmt: skip
    # Headers set at publish travel with the task to the handler.
    assert kit.SEEN == [({"x": 1}, {"trail": ["a", "b"]}, 1)]
    assert ("a", "enter", task_id) in kit.CALLS


def test_each_middleware_is_built_once_for_every_type(tmp_path: Path) -> None:
    _run(_config(tmp_path, TWO), ("t", 1), ("u", 2))
    assert kit.BUILT == ["a", "b"]
    starts = [c for c in kit.CALLS if c[1] == "on_worker_start"]
    assert len(starts) == 2  # once per middleware, not per type


def test_a_hook_failing_inside_an_attempt_fails_the_attempt(tmp_path: Path) -> None:
    middleware = recording("a", "after_attempt")
    path = _config(tmp_path, middleware)
    runner = build_runtime(load_config(path), observe=False)
    broker = runner.broker
    assert isinstance(broker, BrokerAdmin)
    with runner:
        runner.publish("t", 1)
        assert runner.run_until_empty(timeout=10)
        (record,) = broker.dead_letters(DeadLetterFilter())
    # The handler succeeded both times, but the hook's failure failed each attempt.
    assert [attempt for _, _, attempt in kit.SEEN] == [1, 2]
    assert record.reason == "exhausted"
    assert record.error_type == "RuntimeError"
    assert "a refuses in after_attempt" in record.message


def test_a_failing_before_attempt_hook_fails_the_attempt_and_is_named(tmp_path: Path) -> None:
    middleware = recording("a", "before_attempt")
    path = _config(tmp_path, middleware, retry="{max_attempts: 1}")
    runner = build_runtime(load_config(path), observe=False)
    named: list[str] = []
    runner.events.subscribe(Named(named))
    with runner:
        runner.publish("t", 1)
        assert runner.run_until_empty(timeout=10)
    assert kit.SEEN == []  # the handler never ran
    assert named == ["Recording[a].before_attempt: RuntimeError: a refuses in before_attempt"]


def test_invalid_payload_from_a_hook_dead_letters_without_running(tmp_path: Path) -> None:
    path = _config(tmp_path, "  - {use: tests.unit.middleware_kit:RefusesPayloads}\n")
    runner = build_runtime(load_config(path), observe=False)
    broker = runner.broker
    assert isinstance(broker, BrokerAdmin)
    with runner:
        runner.publish("t", 1)
        assert runner.run_until_empty(timeout=10)
        (record,) = broker.dead_letters(DeadLetterFilter())
        started = runner.summary.to_dict()["totals"]
    assert record.reason == "invalid payload"
    assert record.attempts == 1
    assert kit.SEEN == []
    assert started["dead"] == 1


def test_a_hook_refusing_a_publish_puts_nothing_and_names_the_middleware(tmp_path: Path) -> None:
    middleware = TWO + recording("c", "on_publish")
    runner = build_runtime(load_config(_config(tmp_path, middleware)), observe=False)
    with runner:
        with pytest.raises(UsageError, match=r"middleware Recording\[c\] refused a 't' task"):
            runner.publish_many([("t", 1), ("t", 2)])
        assert sum(d.total for d in runner.broker.depth().values()) == 0


def test_the_dead_letter_hook_hears_each_dead_task_once(tmp_path: Path) -> None:
    middleware = recording("a", "before_attempt")
    _run(_config(tmp_path, middleware, retry="{max_attempts: 1}"), ("t", 1), ("u", 2))
    dead = [detail for _, hook, detail in kit.CALLS if hook == "on_dead_letter"]
    assert dead == ["exhausted", "exhausted"]


def test_worker_hooks_that_fail_are_logged_and_the_runner_lives_on(tmp_path: Path) -> None:
    middleware = recording("a", "on_worker_start") + recording("b", "on_worker_stop")
    runner = build_runtime(load_config(_config(tmp_path, middleware)), observe=False)
    named: list[str] = []
    runner.events.subscribe(Named(named))
    with runner:
        runner.publish("t", 1)
        assert runner.run_until_empty(timeout=10)
    assert len(kit.SEEN) == 1
    assert named == [
        "Recording[a].on_worker_start: RuntimeError: a refuses in on_worker_start",
        "Recording[b].on_worker_stop: RuntimeError: b refuses in on_worker_stop",
    ]


def test_simulated_faults_travel_in_headers_and_the_payload_stays_clean(tmp_path: Path) -> None:
    path = _config(tmp_path, recording("a"))
    runner = build_runtime(load_config(path), observe=False)
    plan = {"n": 7, "latency_s": 0.0, "fail_attempts": 1, "hang_attempt": 0, "poison": False}
    with runner:
        runner.publish_many([("t", {"n": 7}, {SIM_HEADER: plan})])
        assert runner.run_until_empty(timeout=10)
    # The first attempt failed as planned; the handler ran once, on the second, with the
    # payload as published (no plan in it).
    assert [({"n": 7}, {SIM_HEADER: plan, "trail": ["a"]}, 2)] == kit.SEEN


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("tests.unit.middleware_kit:Recordng", "did you mean 'Recording'"),
        ("tests.unit.middleware_kit:NotAMiddleware", "is not a runner.middleware.Middleware"),
        ("tests.unit.no_such_module:X", "cannot import module 'tests.unit.no_such_module'"),
    ],
)
def test_a_bad_middleware_is_a_located_config_error(
    tmp_path: Path, entry: str, message: str
) -> None:
    path = _config(tmp_path, f"  - {{use: {entry}}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.source == f"{path}:8:11"
    assert problem.path == "middleware[0].use"
    assert message in problem.message


def test_options_a_middleware_cannot_take_are_a_config_error(tmp_path: Path) -> None:
    entry = "  - {use: tests.unit.middleware_kit:Recording, options: {label: a, colour: red}}\n"
    path = _config(tmp_path, entry)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.path == "middleware[0].options"
    assert "unexpected keyword argument 'colour'" in problem.message


def test_dq_run_validate_reports_a_bad_middleware_with_exit_2(tmp_path: Path) -> None:
    path = _config(tmp_path, "  - {use: tests.unit.middleware_kit:Recordng}\n")
    result = subprocess.run(
        [sys.executable, "-m", "runner", "validate", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert f"{path}:8:11: middleware[0].use:" in result.stderr
    assert "Traceback" not in result.stderr


def _docs_example() -> tuple[str, str]:
    """The Python and YAML blocks of the middleware example in docs/extending/middleware.md."""
    text = (REPO / "docs" / "extending" / "middleware.md").read_text()
    after = text.split("<!-- example:middleware -->", 1)[1]
    blocks = re.findall(r"```(python|yaml)\n(.*?)```", after, flags=re.S)
    code = next(body for lang, body in blocks if lang == "python")
    yaml = next(body for lang, body in blocks if lang == "yaml")
    return code, yaml


def test_the_docs_middleware_example_runs(tmp_path: Path) -> None:
    code, middleware = _docs_example()
    assert code.startswith("# myapp/tracing.py\n")
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "tracing.py").write_text(code)
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        "broker: {kind: memory}\n"
        "metrics: {enabled: false}\n"
        "handler_paths: [.]\n"
        "task_types:\n"
        "  t: {handler: tests.unit.middleware_kit:record}\n" + middleware
    )
    try:
        _run(path, ("t", {"x": 1}), ("t", {"x": 2}))
    finally:
        sys.modules.pop("myapp.tracing", None)
        sys.modules.pop("myapp", None)
    traces = [headers["x-trace"] for _, headers, _ in kit.SEEN]
    assert len(traces) == 2 and len(set(traces)) == 2
    assert all(re.fullmatch(r"[0-9a-f]{32}", trace) for trace in traces)
