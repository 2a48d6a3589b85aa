"""Hostile config files (issue 16): alias bombs and booleans where numbers belong."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from runner.config.load import load_config, render_config
from runner.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
BASE = "task_types:\n  email:\n    handler: handlers.demo:send_email\n"


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    return [str(p) for p in info.value.problems]


def bomb(levels: int) -> str:
    """The classic "billion laughs": each level is nine uses of the one before."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, levels):
        prev, name = chr(ord("a") + level - 1), chr(ord("a") + level)
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [9, 12])
def test_an_alias_bomb_is_refused_quickly_at_the_alias(tmp_path: Path, levels: int) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BASE + bomb(levels))
    start = time.monotonic()
    found = problems(path)
    assert time.monotonic() - start < 1.5  # nominal 0.5 s, generous bound
    assert len(found) == 1
    # Levels a-d (lines 4-7) expand to about 8,300 values; e's first *d (line 8) passes 10,000.
    assert found[0].startswith(f"{path}:8:8:")
    assert "10,000" in found[0]


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text(BASE + "loop: &l [1, *l]\n")
    found = problems(path)
    assert len(found) == 1
    assert found[0].startswith(f"{path}:4:")
    assert "own anchor" in found[0]


def test_ordinary_aliases_still_work(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(
        "task_types:\n  a: &d {handler: handlers.demo:send_email, timeout: 2s}\n"
        "  b: {<<: *d, timeout: 3s}\n  c: *d\n"
    )
    config = load_config(path, environ={})
    assert config.task_types["b"].timeout == 3.0


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("workers: yes", "workers", "expected an integer"),
        ("broker: {capacity: true}", "broker.capacity", "expected an integer"),
        ("retry: {max_attempts: on}", "retry.max_attempts", "expected an integer"),
        ("retry: {backoff: {multiplier: yes}}", "retry.backoff.multiplier", "expected a number"),
        ("broker: {visibility_timeout: yes}", "broker.visibility_timeout", "expected a duration"),
        ("shutdown: {grace: no}", "shutdown.grace", "expected a duration"),
        ("version: yes", "version", "expected 1"),
        ("metrics: {port: true}", "metrics.port", "expected an integer"),
        ("simulate: {mix: {email: yes}}", "simulate.mix", "expected an integer"),
        (
            "simulate: {mix: {email: 1}, faults: {email: {latency: [yes, 1]}}}",
            "simulate.faults.email.latency",
            "expected a duration",
        ),
    ],
)
def test_a_boolean_is_never_a_number(tmp_path: Path, text: str, key: str, expected: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(BASE + text + "\n")
    found = problems(path)
    assert len(found) == 1, found
    assert f": {key}: {expected}" in found[0]
    assert "not a boolean" in found[0]


def test_a_boolean_still_works_where_one_is_expected(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(BASE + "metrics: {enabled: yes}\nworkers: 2\nretry: {backoff: {jitter: 0}}\n")
    config = load_config(path, environ={"DQ_BROKER__CAPACITY": "7"})
    assert config.metrics.enabled is True
    assert (config.workers, config.broker.capacity) == (2, 7)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://app:hunter2@127.0.0.1:6379/0", "redis://app:***@127.0.0.1:6379/0"),
        ("redis://:hunter2@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://hunter2@127.0.0.1/0", "redis://***@127.0.0.1/0"),
        ("redis://127.0.0.1/0?password=hunter2&db=1", "redis://127.0.0.1/0?password=***&db=1"),
    ],
)
def test_dq_run_config_hides_the_redis_password(tmp_path: Path, url: str, shown: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(BASE + f'broker: {{kind: redis, url: "{url}"}}\n')
    text = render_config(path, environ={})
    assert "hunter2" not in text
    assert f"url: {shown}  # {path}:4; password hidden" in text


def test_an_invalid_redis_url_is_quoted_without_its_password(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(BASE + 'broker: {kind: redis, url: "http://app:hunter2@127.0.0.1/0"}\n')
    (found,) = problems(path)
    assert "hunter2" not in found
    assert "'http://app:***@127.0.0.1/0'" in found


def test_the_shipped_redis_config_serves_metrics_on_loopback_only() -> None:
    config = load_config(REPO / "configs/redis.yaml", environ={})
    assert config.metrics.host == "127.0.0.1"
    # The compose file widens it for its own network only, and publishes no metrics port.
    worker = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["worker"]
    assert worker["environment"]["DQ_METRICS__HOST"] == "0.0.0.0"
    assert not worker.get("ports")
