"""The YAML retry section reaches the engine: never_retry and jitter, top level and per type.

The retry class has its own tests (test_retry.py); these check the wiring in between. Each reads
a real YAML file through the library API (``load_config`` -> ``build_runtime``) and looks at the
plan the worker will use, or runs a task through the engine, so a value dropped anywhere on the
way (config model, override merge, ``build_types``) fails here.
"""

from __future__ import annotations

from pathlib import Path

from runner import build_runtime, load_config
from runner.app import Runner
from runner.brokers.base import DeadLetterFilter
from runner.brokers.memory import MemoryBroker
from tests.integration import recording_handlers as rec

YAML = """\
workers: 2
retry:
  max_attempts: 5
  backoff: {initial: 1, max: 10, multiplier: 2, jitter: 0.5}
  never_retry: [ValueError]
task_types:
  a:
    handler: tests.integration.recording_handlers:work
  b:
    handler: tests.integration.recording_handlers:work
    retry:
      backoff: {jitter: 0}
      never_retry: [KeyError]
"""


def _runner(tmp_path: Path, text: str = YAML) -> Runner:
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return build_runtime(load_config(path, environ={}), observe=False)


def test_never_retry_from_the_yaml_reaches_each_types_plan(tmp_path: Path) -> None:
    runner = _runner(tmp_path)
    a, b = runner.worker.types["a"].plan, runner.worker.types["b"].plan
    # Top level: ValueError is never retried, anything else is, up to max_attempts.
    assert a.decide(ValueError("x"), 1).reason == "never_retry"
    assert a.decide(ValueError("x"), 1).retry is False
    assert a.decide(OSError("x"), 1).retry is True
    assert a.decide(OSError("x"), 5).reason == "exhausted"
    # Per type: the override replaces the list (ValueError retried again, KeyError not).
    assert b.decide(KeyError("x"), 1).reason == "never_retry"
    assert b.decide(ValueError("x"), 1).retry is True


def test_jitter_from_the_yaml_reaches_each_types_plan(tmp_path: Path) -> None:
    runner = _runner(tmp_path)
    a, b = runner.worker.types["a"].plan, runner.worker.types["b"].plan
    # jitter 0.5 around a 1 s first delay: every draw in [0.5, 1.5]. With 400 uniform draws the
    # chance that none falls in the lowest (or highest) tenth is 0.9**400, about 5e-19, so a
    # plan with the default jitter (0.1) or none fails the spread checks, never by bad luck.
    delays = [a.delay(1) for _ in range(400)]
    assert all(0.5 <= d <= 1.5 for d in delays)
    assert min(delays) < 0.6 and max(delays) > 1.4
    # Per type jitter 0: exactly the exponential schedule, no spread at all.
    assert {b.delay(1) for _ in range(50)} == {1.0}
    assert b.delay(3) == 4.0


def test_a_never_retry_error_is_dead_lettered_at_once_by_the_engine(tmp_path: Path) -> None:
    rec.reset()
    runner = _runner(tmp_path)
    with runner:
        task_id = runner.publish("a", {"bad": True})  # the handler raises ValueError
        assert runner.run_until_empty(timeout=30)
    # One run, no backoff: a retried task would run again (or still wait out its 1 s delay).
    assert rec.CALLS["a:bad"] == 1
    summary = runner.summary.to_dict()
    assert summary["dead_by_reason"] == {"never_retry": 1}
    assert summary["totals"]["retried"] == 0
    assert isinstance(runner.broker, MemoryBroker)
    (record,) = runner.broker.dead_letter_store.records(DeadLetterFilter())
    assert (record.id, record.reason, record.attempts) == (task_id, "never_retry", 1)
    assert record.error_type == "ValueError"
