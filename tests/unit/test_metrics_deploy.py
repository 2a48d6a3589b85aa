"""deploy/: the scrape config targets the worker, and the dashboard queries only real metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from runner.brokers.base import Bucket, Circuit, Depth
from runner.config.models import MetricsConfig
from runner.events import Event
from runner.model import DeadReason
from runner.observe.metrics import DEAD_REASONS, MetricsListener

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

    def buckets(self) -> dict[str, Bucket]:
        return {}

    def circuits(self) -> dict[str, Circuit]:
        return {}


def healthy_scrape() -> str:
    """A scrape of a pipeline where nothing went wrong: tasks published, started, succeeded;
    nothing retried, timed out or died (the dashboard showed "no data" there)."""
    listener = MetricsListener(MetricsConfig(), FakeState())
    for name in ("task.published", "task.started", "task.succeeded"):
        listener.handle(Event(name, task_id="t", type="email", duration_s=0.1, queue_wait_s=0.1))
    return listener.exposition().decode()


def exposed_names() -> set[str]:
    """Sample names in a healthy pipeline's scrape (histograms give _bucket etc.)."""
    text = healthy_scrape()
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


def test_every_counter_of_every_type_and_reason_starts_at_zero() -> None:
    """dq_tasks_dead_total had no sample until something died, so the success-ratio panel
    (succeeded / (succeeded + dead)) showed "no data" on a healthy pipeline."""
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(healthy_scrape())
        for s in family.samples
    }
    for reason in DEAD_REASONS:
        key = ("dq_tasks_dead_total", (("reason", reason), ("type", "email")))
        assert samples.get(key) == 0.0, key
    for name in ("dq_tasks_retried_total", "dq_tasks_timed_out_total", "dq_lease_lost_total",
                 "dq_interrupts_total", "dq_overruns_total"):  # fmt: skip
        assert samples.get((name, (("type", "email"),))) == 0.0, name
    assert samples.get(("dq_broker_reconnects_total", ())) == 0.0
    assert samples.get(("dq_tasks_succeeded_total", (("type", "email"),))) == 1.0


def test_every_dead_letter_reason_in_the_code_starts_at_zero() -> None:
    """DEAD_REASONS is every reason a task can die for: runner.model.DeadReason, but the
    CORRUPT_RECORD a damaged stored record is shown with (never a task.dead event). That the
    code gives no reason outside DeadReason is tests/unit/test_names.py's to check."""
    assert set(DEAD_REASONS) == set(DeadReason) - {DeadReason.CORRUPT_RECORD}
    assert len(DEAD_REASONS) == len(set(DEAD_REASONS))


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
