"""Property tests: generated valid configs load as written; `dq-run config` output loads back."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from runner.config.load import load_config, render_config
from tests.unit.config_kit import as_run

HANDLERS = [
    "handlers.demo:send_email",
    "handlers.demo:resize_image",
    "handlers.demo:generate_report",
]
type_names = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)


@st.composite
def durations(draw: st.DrawFn, low_ms: int, high_ms: int) -> tuple[Any, float]:
    """A duration as written in YAML, and its value in seconds."""
    ms = draw(st.integers(low_ms, high_ms))
    form = draw(st.sampled_from(["ms", "s", "number"]))
    if form == "ms":
        return f"{ms}ms", ms / 1000
    if form == "s":
        return f"{ms / 1000}s", ms / 1000
    return ms / 1000, ms / 1000


@st.composite
def configs(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """(YAML data, expected values) for a valid config."""
    names = draw(st.lists(type_names, min_size=1, max_size=4, unique=True))
    workers = draw(st.integers(1, 64))
    visibility, visibility_s = draw(durations(5_000, 60_000))
    task_types: dict[str, Any] = {}
    expected: dict[str, Any] = {"workers": workers, "timeouts": {}}
    for name in names:
        timeout, timeout_s = draw(durations(1, 4_999))
        entry: dict[str, Any] = {"handler": draw(st.sampled_from(HANDLERS)), "timeout": timeout}
        if draw(st.booleans()):
            entry["concurrency"] = draw(st.integers(1, workers))
        if draw(st.booleans()):
            entry["retry"] = {"max_attempts": draw(st.integers(1, 9))}
        task_types[name] = entry
        expected["timeouts"][name] = timeout_s
    kind = draw(st.sampled_from(["memory", "sqlite", "redis"]))
    broker: dict[str, Any] = {"kind": kind, "visibility_timeout": visibility}
    broker["capacity"] = draw(st.integers(1, 10**6))
    if kind == "sqlite":
        broker["path"] = "var/q.db"
    if kind == "redis":
        broker["url"] = "redis://127.0.0.1:6379/0"
    data: dict[str, Any] = {
        "version": 1,
        "broker": broker,
        "workers": workers,
        "retry": {
            "max_attempts": draw(st.integers(1, 10)),
            "backoff": {"initial": "10ms", "max": "2s", "jitter": draw(st.floats(0, 1))},
            "never_retry": draw(st.lists(st.sampled_from(["ValueError", "KeyError"]))),
        },
        "task_types": task_types,
    }
    if kind == "memory" and draw(st.booleans()):
        weights = {name: draw(st.integers(1, 5)) for name in names}
        data["simulate"] = {"tasks": draw(st.integers(0, 100)), "mix": weights}
    expected["visibility_s"] = visibility_s
    return data, expected


@settings(max_examples=40, deadline=None)
@given(configs())
def test_generated_configs_load_and_round_trip(case: tuple[dict[str, Any], dict[str, Any]]) -> None:
    data, expected = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "generated.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        config = load_config(path, environ={})
        assert config.workers == expected["workers"]
        assert config.broker.visibility_timeout == expected["visibility_s"]
        for name, timeout_s in expected["timeouts"].items():
            assert abs(config.task_types[name].timeout - timeout_s) < 1e-9
        assert config.retry.never_retry == tuple(data["retry"]["never_retry"])

        effective = Path(tmp) / "effective.yaml"
        effective.write_text(render_config(path, environ={}))
        assert as_run(load_config(effective, environ={})) == as_run(config)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 512), st.integers(1, 512), st.integers(1, 512))
def test_precedence_holds_for_any_values(yaml_w: int, env_w: int, flag_w: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(f"workers: {yaml_w}\ntask_types:\n  a: {{handler: {HANDLERS[0]}}}\n")
        env = {"DQ_WORKERS": str(env_w)}
        assert load_config(path, environ={}).workers == yaml_w
        assert load_config(path, environ=env).workers == env_w
        assert load_config(path, environ=env, flags={"workers": flag_w}).workers == flag_w


def test_property_tests_run_with_a_fixed_seed_and_bounded_time() -> None:
    """The "ci" profile (tests/conftest.py) reaches every property test, explicit settings too."""
    from tests.unit import (
        test_config_mutations,
        test_memory_broker_stateful,
        test_retry,
        test_task_codec,
    )

    tests = [
        test_generated_configs_load_and_round_trip,
        test_precedence_holds_for_any_values,
        test_config_mutations.test_a_broken_config_loads_or_fails_with_one_line_per_problem,
        test_task_codec.test_any_json_value_round_trips_and_the_standard_library_reads_it,
        *(v for k, v in vars(test_retry).items() if hasattr(v, "hypothesis")),
    ]
    chosen = [t._hypothesis_internal_use_settings for t in tests]
    chosen.append(test_memory_broker_stateful.MemoryBrokerMachine.TestCase.settings)
    assert len(chosen) >= 5
    for used in chosen:
        assert used.derandomize  # the same examples on every run
        assert used.database is None  # nothing replayed from a previous run
        assert used.deadline is None
        assert Phase.shrink not in used.phases  # a failure is reported, not shrunk for minutes
