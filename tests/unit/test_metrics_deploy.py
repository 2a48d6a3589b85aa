"""deploy/: the scrape config targets the worker, and the dashboard queries only real metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from runner.brokers.base import Depth
from runner.config import MetricsConfig
from runner.events import Event
from runner.metrics import MetricsListener

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "dq.json"
METRIC_NAME = re.compile(r"\bdq_[a-z_]+\b")


class FakeState:
    def depth(self) -> dict[str, Depth]:
        return {"email": Depth(ready=1)}

    def inflight(self) -> dict[str, int]:
        return {"email": 1}

    def limits(self) -> dict[str, int]:
        return {"email": 2}

    def dead_letter_count(self) -> int | None:
        return 0

    def overrunning(self) -> int:
        return 0


def exposed_names() -> set[str]:
    """Sample names in a scrape after every kind of event (histograms give _bucket etc.)."""
    listener = MetricsListener(MetricsConfig(), FakeState())
    for name in ("task.published", "task.started", "task.succeeded", "task.retrying",
                 "task.dead", "task.timeout", "task.lease_lost", "task.interrupted",
                 "task.overrun", "broker.reconnecting"):  # fmt: skip
        listener.handle(Event(name, task_id="t", type="email", duration_s=0.1, queue_wait_s=0.1))
    text = listener.exposition().decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def dashboard_exprs() -> list[str]:
    data = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in data["panels"] for t in panel.get("targets", [])]
    exprs += [v["definition"] for v in data["templating"]["list"] if "definition" in v]
    return exprs


def test_prometheus_scrapes_the_worker_metrics_port() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = [
        f"{name}:{sd['port']}"
        for job in config["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
        for name in sd["names"]
    ]
    assert "worker:9464" in targets
    assert MetricsConfig().port == 9464  # the default the target relies on
    assert all(
        job.get("metrics_path", "/metrics") == "/metrics" for job in config["scrape_configs"]
    )


def test_every_dashboard_metric_exists_in_the_exposition() -> None:
    exposed = exposed_names()
    referenced = {name for expr in dashboard_exprs() for name in METRIC_NAME.findall(expr)}
    assert len(referenced) >= 12  # the dashboard covers the metric set, not a token panel
    assert referenced <= exposed, f"not exposed: {sorted(referenced - exposed)}"


def test_dashboard_panels_use_the_provisioned_datasource() -> None:
    datasources = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uids = {ds["uid"] for ds in datasources["datasources"]}
    data = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in data["panels"]]
    assert len(ids) == len(set(ids))
    for panel in data["panels"]:
        assert panel["datasource"]["uid"] in uids, panel["title"]
        assert panel["targets"], panel["title"]
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "dq.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
