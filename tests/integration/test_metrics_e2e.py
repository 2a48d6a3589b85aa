"""A known workload through the real engine; /metrics over HTTP must match the handlers' counts."""

from __future__ import annotations

import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from runner.app import Runner, build_runtime
from runner.config.models import PipelineConfig
from runner.observe.metrics import MetricsListener
from tests.integration import recording_handlers as rec


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_match_what_handlers_saw() -> None:
    rec.reset()
    config = PipelineConfig.model_validate(
        {
            "workers": 3,
            "retry": {
                "max_attempts": 3,
                "backoff": {"initial": 0.01, "max": 0.02},
                "never_retry": ["ValueError"],
            },
            "task_types": {
                "a": {"handler": "tests.integration.recording_handlers:work", "concurrency": 2},
                "b": {"handler": "tests.integration.recording_handlers:work"},
            },
            "metrics": {"enabled": True, "host": "127.0.0.1", "port": 0},
            "logging": {"format": "json", "level": "ERROR"},
        }
    )
    runner: Runner = build_runtime(config)
    payloads: list[tuple[str, Any]] = []
    payloads += [("a", {"fail": 0})] * 20
    payloads += [("a", {"fail": 1})] * 5  # one retry each, then success
    payloads += [("b", {"fail": 5})] * 3  # exhausted after 3 attempts
    payloads += [("b", {"bad": True})] * 2  # never_retry -> dead at once
    with runner:
        runner.publish_many(payloads)
        assert runner.run_until_empty(timeout=30)
        metrics = next(x for x in runner.events.listeners if isinstance(x, MetricsListener))
        assert metrics.port
        samples = _scrape(metrics.port)
    calls = rec.CALLS
    started_a = calls["a:ok"] + calls["a:failed"]
    started_b = calls["b:ok"] + calls["b:failed"] + calls["b:bad"]
    assert samples[("dq_tasks_published_total", (("type", "a"),))] == 25
    assert samples[("dq_tasks_started_total", (("type", "a"),))] == started_a == 30
    assert samples[("dq_tasks_started_total", (("type", "b"),))] == started_b == 11
    assert samples[("dq_tasks_succeeded_total", (("type", "a"),))] == calls["a:ok"] == 25
    assert samples[("dq_tasks_retried_total", (("type", "a"),))] == calls["a:failed"] == 5
    assert samples[("dq_tasks_retried_total", (("type", "b"),))] == 6
    dead_b = {
        labels: v
        for (name, labels), v in samples.items()
        if name == "dq_tasks_dead_total" and ("type", "b") in labels
    }
    assert sum(dead_b.values()) == 5
    assert samples[("dq_task_duration_seconds_count", (("type", "a"),))] == started_a
    assert samples[("dq_dead_letters", ())] == 5
    # And the summary the CLI prints agrees.
    summary = runner.summary.to_dict()
    assert summary["totals"]["succeeded"] == 25
    assert summary["totals"]["dead"] == 5
