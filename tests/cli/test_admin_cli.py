"""dq-run publish, dlq and stats as a black box: real console script, real SQLite files.

The round trip uses tests/cli/admin_handlers.py:needs_marker, which fails until a marker file
exists (the "dependency" recovered), so a replay succeeds for the reason replays exist.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from runner.brokers.base import DeadLetterFilter
from runner.deadletter.file import FileDeadLetters
from runner.middleware.payloads import MAX_PAYLOAD_BYTES
from runner.model import DeadLetter, Task, short_id
from tests.cli.run_kit import DQ_RUN, REPO, dq_env, run, shutdown_record, stats_json

PIPELINE = """
broker: {{kind: sqlite, path: {db}, capacity: {capacity}}}
workers: 2
retry: {{max_attempts: {attempts}, backoff: {{initial: 10ms, max: 20ms}}}}
logging: {{format: json, level: WARNING}}
task_types:
  flaky: {{handler: tests.cli.admin_handlers:needs_marker, timeout: 5s}}
  order: {{handler: handlers.typed:ship_order}}
"""


def _config(tmp_path: Path, capacity: int = 50, attempts: int = 3) -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE.format(db=tmp_path / "q.db", capacity=capacity, attempts=attempts))
    return str(path)


def _queued(config: str) -> int:
    return sum(
        t["ready"] + t["delayed"] + t["leased"] for t in stats_json(config)["types"].values()
    )


def _flaky(tmp_path: Path) -> dict[str, str]:
    return {"marker": str(tmp_path / "marker"), "done": str(tmp_path / "done")}


def _dead_lines(config: str, *args: str) -> list[dict[str, Any]]:
    result = run("dlq", "list", config, "--json", *args)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def _publish_flaky(tmp_path: Path, config: str, n: int) -> list[str]:
    lines = "".join(
        json.dumps({"type": "flaky", "payload": {**_flaky(tmp_path), "n": i}}) + "\n"
        for i in range(n)
    )
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(lines)
    result = run("publish", config, "--file", str(jobs))
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def _run_until_empty(config: str) -> None:
    result = run("run", config, "--until-empty", "--no-simulate")
    assert result.returncode == 0, result.stderr


def run_with_input(args: list[str], text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DQ_RUN, *args],
        cwd=REPO,
        env=dq_env(),
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# -- publish ---------------------------------------------------------------------------------


def test_publish_one_task_prints_its_id_and_queues_it(tmp_path: Path) -> None:
    config = _config(tmp_path)
    result = run("publish", config, "order", '{"sku": "a-1", "quantity": 2}')
    assert result.returncode == 0, result.stderr
    (task_id,) = result.stdout.split()
    assert len(task_id) == 32
    stats = stats_json(config)
    assert stats["types"]["order"]["ready"] == 1
    assert stats["oldest_age_s"] is not None and stats["oldest_age_s"] >= 0


def test_publish_a_file_with_delay_and_from_stdin(tmp_path: Path) -> None:
    config = _config(tmp_path)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        '{"type": "order", "payload": {"sku": "a", "quantity": 1}}\n'
        "\n"
        '{"type": "order", "payload": {"sku": "b", "quantity": 3, "express": true}}\n'
    )
    result = run("publish", config, "--file", str(jobs), "--delay", "1h")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 2
    assert stats_json(config)["types"]["order"]["delayed"] == 2

    stdin = run_with_input(
        ["publish", config, "--file", "-"],
        '{"type": "order", "payload": {"sku": "c", "quantity": 1}}\n',
    )
    assert stdin.returncode == 0, stdin.stderr
    assert len(stdin.stdout.split()) == 1
    assert stats_json(config)["types"]["order"]["ready"] == 1


def test_publish_at_a_time_holds_tasks_until_then_and_the_past_runs_now(tmp_path: Path) -> None:
    config = _config(tmp_path)
    order = '{"sku": "a", "quantity": 1}'
    for at in ("2999-12-24T18:00:00+01:00", "2020-01-01T00:00:00Z"):
        result = run("publish", config, "order", order, "--at", at)
        assert result.returncode == 0, result.stderr
    types = stats_json(config)["types"]["order"]
    assert (types["delayed"], types["ready"]) == (1, 1)


def test_a_task_that_expired_unstarted_is_dead_lettered_and_replays(tmp_path: Path) -> None:
    config = _config(tmp_path)
    order = '{"sku": "a", "quantity": 1}'
    result = run("publish", config, "order", order, "--expires", "200ms")
    assert result.returncode == 0, result.stderr
    (task_id,) = result.stdout.split()
    time.sleep(0.3)  # no worker runs meanwhile: it expires unstarted
    _run_until_empty(config)
    (line,) = _dead_lines(config)
    assert (line["id"], line["reason"]) == (task_id, "expired")

    replay = run("dlq", "replay", config, task_id)
    assert replay.returncode == 0, replay.stderr
    _run_until_empty(config)  # without its old expiry, it runs
    assert _dead_lines(config) == []
    assert _queued(config) == 0


def test_every_bad_line_is_reported_with_its_number_and_nothing_is_published(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path)
    big = "x" * MAX_PAYLOAD_BYTES
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        "\n".join(
            [
                '{"type": "order", "payload": {"sku": "ok", "quantity": 1}}',  # 1: fine
                '{"type": "ordr", "payload": {}}',  # 2: unknown type
                '{"type": "order", "payload": ',  # 3: invalid JSON
                json.dumps({"type": "flaky", "payload": {"blob": big}}),  # 4: too big
                '{"type": "order", "payload": {"sku": "a", "quantity": "lots"}}',  # 5: model
                '{"type": "order", "payload": {"quantity": 0}}',  # 6: model, two fields
                '{"type": "order", "payload": {"sku": "a", "quantity": 1}, "delay": 5}',  # 7
                '{"type": "order", "payload": {"sku": "ok", "quantity": 2}}',  # 8: fine
            ]
        )
        + "\n"
    )
    result = run("publish", config, "--file", str(jobs))
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    err = result.stderr
    assert f"{jobs}:2: type: unknown task type 'ordr'" in err
    assert f"{jobs}:3: invalid JSON" in err
    assert f"{jobs}:4: payload: " in err and f"over the limit of {MAX_PAYLOAD_BYTES} bytes" in err
    assert f"{jobs}:5: payload.quantity: Input should be a valid integer" in err
    assert '(got "lots")' in err
    assert f"{jobs}:6: payload.sku: Field required [Order]" in err
    assert f"{jobs}:6: payload.quantity: Input should be greater than 0" in err
    assert f"{jobs}:7: delay: unknown key" in err
    assert f"{jobs}:1:" not in err and f"{jobs}:8:" not in err
    assert _queued(config) == 0


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["nope", "{}"], "TYPE: type: unknown task type 'nope'"),
        (["order", "{not json"], "PAYLOAD_JSON: invalid JSON"),
        (["order", '{"sku": "a"}'], "PAYLOAD_JSON: payload.quantity: Field required [Order]"),
        (["order", '{"sku": "a", "quantity": 1}', "--delay", "soon"], "--delay 'soon'"),
        (["order", '{"sku": "a", "quantity": 1}', "--at", "tomorrow"], "--at 'tomorrow': expected"),
        (
            ["order", '{"sku": "a", "quantity": 1}', "--at", "2030-01-01T18:00:00"],
            "has no time zone: add an offset (+01:00) or Z",
        ),
        (
            ["order", '{"sku": "a", "quantity": 1}', "--at", "2030-01-01T18:00Z", "--delay", "1s"],
            "give --delay or --at, not both",
        ),
        (["order", '{"sku": "a", "quantity": 1}', "--expires", "0s"], "--expires '0'"),
        (["order", '{"sku": "a", "quantity": 1}', "--expires", "soon"], "--expires 'soon'"),
        ([], "missing TYPE"),
    ],
)
def test_bad_arguments_exit_2_and_publish_nothing(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    config = _config(tmp_path)
    result = run("publish", config, *args)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert _queued(config) == 0


def test_input_larger_than_capacity_is_refused_whole(tmp_path: Path) -> None:
    config = _config(tmp_path, capacity=3)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"type": "order", "payload": {"sku": "a", "quantity": 1}}\n' * 4)
    result = run("publish", config, "--file", str(jobs))
    assert result.returncode == 2
    assert "4 tasks exceed broker.capacity (3)" in result.stderr
    assert "nothing was published" in result.stderr
    assert _queued(config) == 0


# -- dead letters: the round trip --------------------------------------------------------------


def test_dlq_round_trip_list_show_dry_run_replay_and_success(tmp_path: Path) -> None:
    config = _config(tmp_path)
    ids = _publish_flaky(tmp_path, config, 4)
    _run_until_empty(config)  # the dependency is down: three attempts each, then the DLQ

    # The dead letters outlived the worker process that wrote them (a restart).
    listed = _dead_lines(config)
    assert sorted(r["id"] for r in listed) == sorted(ids)
    assert {(r["attempts"], r["error_type"], r["reason"]) for r in listed} == {
        (3, "DependencyDown", "exhausted")
    }
    table = run("dlq", "list", config)
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split() == [
        "ID", "TYPE", "ATTEMPTS", "REASON", "ERROR", "DEAD_AT"
    ]  # fmt: skip
    assert sorted(line.split()[0] for line in table.stdout.splitlines()[1:]) == sorted(
        short_id(i) for i in ids
    )  # the random end that tells them apart, not the shared time prefix
    assert _dead_lines(config, "--type", "order") == []
    assert len(_dead_lines(config, "--error", "DependencyDown", "--since", "1h")) == 4
    assert _dead_lines(config, "--error", "TimeoutError") == []

    shown = run("dlq", "show", config, ids[0][-8:])
    assert shown.returncode == 0, shown.stderr
    for attempt in (1, 2, 3):
        assert f"--- attempt {attempt} at" in shown.stdout
        assert f"DependencyDown: attempt {attempt}: dependency down" in shown.stdout
    assert shown.stdout.count("Traceback (most recent call last)") == 3
    assert "in needs_marker" in shown.stdout
    assert "--- final error (exhausted): DependencyDown" in shown.stdout

    dry = run("dlq", "replay", config, "--all", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "dry run: 4 would be replayed; nothing changed" in dry.stdout
    assert stats_json(config)["dead_letters"] == 4
    assert _queued(config) == 0

    (tmp_path / "marker").touch()  # the dependency is back
    replayed = run("dlq", "replay", config, short_id(ids[0]), *ids[1:3])  # as tables show
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 3 of 3" in replayed.stdout
    rest = run("dlq", "replay", config, "--all", "--type", "flaky")
    assert "replayed 1 of 1" in rest.stdout
    stats = stats_json(config)
    assert stats["types"]["flaky"]["ready"] == 4
    assert stats["dead_letters"] == 0

    _run_until_empty(config)
    assert sorted((tmp_path / "done").read_text().split()) == sorted(ids)
    assert _dead_lines(config) == []
    nothing = run("dlq", "replay", config, "--all")
    assert nothing.returncode == 0
    assert "nothing to replay" in nothing.stdout


def test_dead_letters_survive_a_worker_restart(tmp_path: Path) -> None:
    config = _config(tmp_path, attempts=1)
    ids = _publish_flaky(tmp_path, config, 2)
    _run_until_empty(config)
    _run_until_empty(config)  # a second worker process starts and stops: nothing changes
    assert sorted(r["id"] for r in _dead_lines(config)) == sorted(ids)
    assert stats_json(config)["dead_letters"] == 2


def test_replay_rate_is_respected(tmp_path: Path) -> None:
    config = _config(tmp_path, attempts=1)
    _publish_flaky(tmp_path, config, 6)
    _run_until_empty(config)
    start = time.monotonic()
    result = run("dlq", "replay", config, "--all", "--rate", "5/s")
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert "replayed 6 of 6" in result.stdout
    # One task per chunk at 5/s: the sixth goes 5 / 5 = 1.0 s after the first, at the earliest.
    assert elapsed >= 1.0
    assert elapsed < 3 * 1.0 + 10  # generous: interpreter start-up is part of the measure
    assert _queued(config) == 6


@pytest.mark.parametrize("rate", ["fast", "0/s", "10/d", "-1/s"])
def test_a_bad_rate_exits_2(tmp_path: Path, rate: str) -> None:
    result = run("dlq", "replay", _config(tmp_path), "--all", "--rate", rate)
    assert result.returncode == 2
    assert "--rate" in result.stderr


def test_replay_usage_errors(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert run("dlq", "replay", config).returncode == 2
    assert run("dlq", "replay", config, "abc", "--all").returncode == 2
    missing = run("dlq", "replay", config, "0" * 32)
    assert missing.returncode == 0
    assert "no matching dead letter with id" in missing.stderr
    assert "nothing to replay" in missing.stdout
    unknown = run("dlq", "show", config, "f" * 32)
    assert unknown.returncode == 2
    assert "no dead letter with id" in unknown.stderr


def test_purge_asks_refuses_without_a_terminal_and_honours_filters(tmp_path: Path) -> None:
    config = _config(tmp_path, attempts=1)
    ids = _publish_flaky(tmp_path, config, 3)
    _run_until_empty(config)

    refused = run("dlq", "purge", config)  # stdin is not a terminal and no --yes
    assert refused.returncode == 2
    assert "pass --yes" in refused.stderr
    assert stats_json(config)["dead_letters"] == 3

    assert "nothing to purge" in run("dlq", "purge", config, "--type", "order").stdout
    one = run("dlq", "purge", config, ids[0], "--yes")
    assert one.returncode == 0, one.stderr
    assert "purged 1" in one.stdout
    assert sorted(r["id"] for r in _dead_lines(config)) == sorted(ids[1:])
    rest = run("dlq", "purge", config, "--error", "DependencyDown", "--yes")
    assert "purged 2" in rest.stdout
    assert stats_json(config)["dead_letters"] == 0


# -- memory broker -------------------------------------------------------------------------------


def _memory_config(tmp_path: Path, dead_letter: str) -> str:
    path = tmp_path / "memory.yaml"
    path.write_text(
        "broker: {kind: memory}\n"
        f"dead_letter: {dead_letter}\n"
        "task_types:\n  order: {handler: handlers.typed:ship_order}\n"
    )
    return str(path)


def test_memory_broker_explains_what_it_cannot_do(tmp_path: Path) -> None:
    config = _memory_config(tmp_path, "{kind: memory}")
    for args in (
        ["publish", config, "order", '{"sku": "a", "quantity": 1}'],
        ["stats", config],
        ["dlq", "list", config],
    ):
        result = run(*args)
        assert result.returncode == 2, args
        assert "a memory broker lives inside the one dq-run process" in result.stderr
        assert "Traceback" not in result.stderr


def test_memory_broker_file_dead_letters_can_be_listed_shown_and_purged(tmp_path: Path) -> None:
    dlq_file = tmp_path / "dead.jsonl"
    config = _memory_config(tmp_path, f"{{kind: file, path: {dlq_file}}}")
    store = FileDeadLetters(dlq_file)
    records = [shutdown_record("order", {"sku": str(i)}) for i in range(2)]
    store.add_many(records)

    assert [r["id"] for r in _dead_lines(config)] == [r.id for r in records]
    shown = run("dlq", "show", config, records[0].id)
    assert shown.returncode == 0, shown.stderr
    assert '"sku": "0"' in shown.stdout
    replay = run("dlq", "replay", config, "--all", "--dry-run")
    assert replay.returncode == 2
    assert "cannot replay into a memory broker" in replay.stderr
    assert str(dlq_file) in replay.stderr
    purged = run("dlq", "purge", config, records[1].id, "--yes")
    assert "purged 1" in purged.stdout
    assert [r.id for r in store.records(DeadLetterFilter())] == [records[0].id]


def test_reading_a_dead_letter_file_writes_nothing_and_a_purge_keeps_its_mode(
    tmp_path: Path,
) -> None:
    """`dlq list` only reads: it works where the operator may only read (as root here, so
    checked as: it creates nothing); `dlq purge` rewrites the file with the config's
    `file_mode`, not the default 0600."""
    dlq_file = tmp_path / "var" / "dead.jsonl"
    config = _memory_config(tmp_path, f"{{kind: file, path: {dlq_file}, file_mode: '0640'}}")
    assert _dead_lines(config) == []
    assert not dlq_file.parent.exists()
    store = FileDeadLetters(dlq_file, 0o640)
    store.add_many([shutdown_record("order", {"n": n}) for n in range(2)])
    dlq_file.with_name("dead.jsonl.lock").unlink()
    assert len(_dead_lines(config)) == 2
    assert not dlq_file.with_name("dead.jsonl.lock").exists()
    purged = run("dlq", "purge", config, store.records(DeadLetterFilter())[0].id, "--yes")
    assert "purged 1" in purged.stdout, purged.stderr
    assert dlq_file.stat().st_mode & 0o777 == 0o640 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_twelve_dead_letters_of_one_millisecond_read_apart_and_show_by_short_id(
    tmp_path: Path,
) -> None:
    dlq_file = tmp_path / "dead.jsonl"
    config = _memory_config(tmp_path, f"{{kind: file, path: {dlq_file}}}")
    now = time.time()
    prefix = f"{int(now * 1000):012x}"  # every id made in the same millisecond
    records = [
        DeadLetter(
            task=Task(type="order", payload={"n": n}, id=f"{prefix}{uuid.uuid4().hex[:20]}"),
            reason="exhausted",
            error_type="RuntimeError",
            message="boom",
            traceback="",
            attempts=3,
            first_attempt_at=now,
            last_attempt_at=now,
            dead_at=now,
        )
        for n in range(12)
    ]
    FileDeadLetters(dlq_file).add_many(records)

    table = run("dlq", "list", config)
    assert table.returncode == 0, table.stderr
    shown = [line.split()[0] for line in table.stdout.splitlines()[1:]]
    assert shown == [short_id(r.id) for r in records]  # the short form, the random end
    assert len(set(shown)) == 12  # twelve rows that can be told apart
    for n, record in enumerate(records):
        found = run("dlq", "show", config, shown[n])
        assert found.returncode == 0, found.stderr
        assert f"id:          {record.id}" in found.stdout
        assert f'"n": {n}' in found.stdout
    ambiguous = run("dlq", "show", config, prefix)  # the time prefix every id shares
    assert ambiguous.returncode == 2
    assert f"'{prefix}' matches 12 dead letters; give more of it" in ambiguous.stderr
