"""Unique tasks from the outside, on a real SQLite file: several `dq-run publish` processes
publishing one key at once put one task; a held key prints the holder and says so; a dead
letter whose key a newer task holds is skipped by replay."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from runner.brokers.base import Broker, DeadLetterFilter, Effects, Settle
from runner.brokers.redis.broker import RedisBroker
from runner.brokers.sqlite.broker import SqliteBroker
from runner.testing.contract.helpers import dead_record
from tests.cli.run_kit import DQ_RUN, REPO, dq_env, run
from tests.redis_server import RedisServer

PIPELINE = """
broker: {broker}
task_types:
  sync: {{handler: handlers.demo:send_email, unique: {{key: "user-{{payload.user}}"}}}}
"""


def _config(tmp_path: Path, broker: str | None = None) -> str:
    path = tmp_path / "pipeline.yaml"
    text = broker or f"{{kind: sqlite, path: {tmp_path / 'q.db'}}}"
    path.write_text(PIPELINE.format(broker=text))
    return str(path)


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_concurrent_publishers_in_several_processes_put_one_task(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    broker: Broker
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        namespace = f"unique-{uuid.uuid4().hex[:8]}"
        config = _config(tmp_path, f"{{kind: redis, url: '{server.url}', namespace: {namespace}}}")
        broker = RedisBroker(server.url, namespace, 100, 1.0, "block", 30.0)
    else:
        config = _config(tmp_path)
        broker = SqliteBroker(str(tmp_path / "q.db"), 100, 1.0, "block", 30.0)
    assert run("validate", config).returncode == 0  # creates nothing, warms the imports
    publishers = [
        subprocess.Popen(
            [DQ_RUN, "publish", config, "sync", json.dumps({"user": 7, "n": n})],
            cwd=REPO,
            env=dq_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(6)
    ]
    outputs = [p.communicate(timeout=60) for p in publishers]
    assert all(p.returncode == 0 for p in publishers), [err for _, err in outputs]
    ids = {out.split()[0] for out, _ in outputs}
    assert len(ids) == 1  # every process printed the one task's id
    noted = [out for out, _ in outputs if "not published: unique key 'sync:user-7'" in out]
    assert len(noted) == 5
    try:
        assert broker.depth()["sync"].ready == 1
    finally:
        broker.close()


def test_replay_skips_a_dead_letter_whose_key_a_newer_task_holds(tmp_path: Path) -> None:
    config = _config(tmp_path)
    first = run("publish", config, "sync", '{"user": 1}').stdout.split()[0]
    with SqliteBroker(str(tmp_path / "q.db"), 100, 1.0, "block", 30.0) as broker:
        (delivery,) = broker.get({"sync": 1}, 1, 5)
        let_go = Effects(deletes=("unique:sync:user-1",))  # what the engine's dead-letter does
        op = Settle(delivery, "dead", record=dead_record(delivery), effects=let_go)
        assert broker.settle_many([op])
        assert len(broker.dead_letters(DeadLetterFilter())) == 1
    newer = run("publish", config, "sync", '{"user": 1}').stdout.split()[0]
    assert newer != first
    replayed = run("dlq", "replay", config, "--all")
    assert replayed.returncode == 0, replayed.stderr
    assert f"skipped {first}: its unique key is held by {newer}" in replayed.stderr
    assert "nothing to replay" in replayed.stdout
