"""What a Redis worker says at start about the server's settings, as log lines (issue 16)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from runner.brokers.redis.broker import RedisBroker, _log_reconnecting
from runner.config.models import LoggingConfig
from runner.observe.logs import setup_logging
from tests.redis_server import RedisServer

Lines = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def json_lines() -> Iterator[Lines]:
    """The runner's JSON log lines written so far (the writer is flushed first)."""
    out = io.StringIO()
    listener = setup_logging(LoggingConfig(format="json", level="INFO"), stream=out)

    def lines() -> list[dict[str, Any]]:
        assert listener.flush()
        return [json.loads(line) for line in out.getvalue().splitlines()]

    yield lines
    listener.close()


def _open_and_close(server: RedisServer) -> None:
    RedisBroker(server.url, "ns", 10, 0.1, "block", 5.0).close()


def _events(lines: Lines, name: str) -> list[dict[str, Any]]:
    return [line for line in lines() if line["event"] == name]


def test_warns_when_redis_keeps_nothing_on_disk(
    redis_server_factory: Callable[..., RedisServer], json_lines: Lines
) -> None:
    server = redis_server_factory()  # appendonly no, no RDB save points
    _open_and_close(server)
    (line,) = _events(json_lines, "broker.no_persistence")
    assert line["level"] == "WARNING"
    assert (line["appendonly"], line["save"]) == ("no", "")
    assert "restart loses every" in line["message"]


@pytest.mark.parametrize(
    "options", [{"appendonly": True}, {"options": {"save": "3600 1"}}], ids=["aof", "rdb"]
)
def test_no_persistence_warning_when_redis_keeps_something(
    redis_server_factory: Callable[..., RedisServer], json_lines: Lines, options: dict[str, Any]
) -> None:
    _open_and_close(redis_server_factory(**options))
    assert _events(json_lines, "broker.no_persistence") == []


def test_the_eviction_warning_carries_its_event_and_policy(
    redis_server_factory: Callable[..., RedisServer], json_lines: Lines
) -> None:
    _open_and_close(redis_server_factory(options={"maxmemory-policy": "allkeys-lru"}))
    (line,) = _events(json_lines, "broker.eviction_policy")
    assert (line["level"], line["policy"]) == ("WARNING", "allkeys-lru")
    assert "logger" not in line  # a runner event, not a stray library line


def test_the_reconnecting_line_carries_its_event_and_fields(json_lines: Lines) -> None:
    _log_reconnecting(2, ConnectionError("connection refused"))
    (line,) = _events(json_lines, "broker.reconnecting")
    assert line["level"] == "WARNING"
    assert (line["attempt"], line["error"]) == (2, "connection refused")
