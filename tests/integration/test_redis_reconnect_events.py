"""A Redis outage reaches the operator: broker.reconnecting events, counted in the metrics."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from runner.app import build_runtime
from runner.config.models import PipelineConfig
from runner.events import Event
from runner.observe.metrics import MetricsListener
from tests.redis_server import RedisServer


class Seen:
    def __init__(self) -> None:
        self.names: list[str] = []
        self.reconnected = threading.Event()

    def handle(self, event: Event) -> None:
        self.names.append(event.name)
        if event.name == "broker.reconnecting":
            self.reconnected.set()


@pytest.mark.redis
def test_outage_emits_reconnecting_events_and_metric(
    redis_server_factory: Callable[..., RedisServer], redis_namespace: str
) -> None:
    server = redis_server_factory(appendonly="yes", appendfsync="always")
    config = PipelineConfig.model_validate(
        {
            "broker": {"kind": "redis", "url": server.url, "namespace": redis_namespace},
            "task_types": {"email": {"handler": "handlers.demo:send_email"}},
            "logging": {"format": "json", "level": "ERROR"},
        }
    )
    seen = Seen()
    runner = build_runtime(config, observe=False, listeners=[seen])
    metrics = MetricsListener(config.metrics, runner)
    runner.attach(metrics)
    payload: dict[str, Any] = {"to": "a@example.com"}
    with runner:
        runner.publish("email", payload)
        assert runner.run_until_empty(timeout=10)
        server.kill()
        assert seen.reconnected.wait(10), "no broker.reconnecting event during the outage"
        server.restart()
        runner.publish("email", payload)
        assert runner.run_until_empty(timeout=30)
    text = metrics.exposition().decode()
    [line] = [x for x in text.splitlines() if x.startswith("dq_broker_reconnects_total")]
    assert float(line.split()[-1]) >= 1
    task_events = [name for name in seen.names if name.startswith("task.")]
    assert runner.summary.to_dict()["totals"]["succeeded"] == 2, task_events
