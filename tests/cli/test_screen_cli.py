"""What a person sees of dq-run run (issue 17), black box: Ctrl-C twice at any point of the
shutdown, the memory demo's Ctrl-C, the backlog in the summary, publishing at INFO, and a real
pseudo-terminal 80 columns wide.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.deadletter.file import FileDeadLetters
from tests.cli.run_kit import DQ_RUN, REPO, Lines, dq_env, run, shutdown_record, start
from tests.cli.slow_dead_letters import TAKING, WRITING

SLOW = """
workers: 2
shutdown: {{grace: 30s}}
logging: {{format: {fmt}, level: INFO}}
{broker}
task_types:
  work: {{handler: handlers.demo:send_email, concurrency: 2, timeout: 20s}}
{dead_letter}
simulate:
  tasks: 40
  mix: {{work: 1}}
  faults:
    work: {{latency: [4s, 4.5s]}}
"""

#: The second signal must end the process at once: well under the 30 s grace period.
_EXIT_WITHIN_S = 5.0


def _config(tmp_path: Path, fmt: str = "json", broker: str = "", dead_letter: str = "") -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(SLOW.format(fmt=fmt, broker=broker, dead_letter=dead_letter))
    return str(path)


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _two_signals(proc: subprocess.Popen[str], err: Lines) -> float:
    """SIGINT, and a second one once the first was taken (the grace period began): how long
    the process took to exit after the second."""
    proc.send_signal(signal.SIGINT)
    err.wait_for('"worker.stopping"')
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=20)
    return time.monotonic() - t0


def _forced_exit_line(config: str) -> str:
    """Run ``config``, send two signals once a task runs; the last line the run wrote (it must
    exit 130, within _EXIT_WITHIN_S of the first signal)."""
    proc = start(config)
    Lines(proc.stdout)  # drained, and closed at its end
    err = Lines(proc.stderr)
    err.wait_for('"task.started"')
    elapsed = _two_signals(proc, err)
    stderr = err.text()
    assert proc.returncode == 130, stderr
    assert elapsed < _EXIT_WITHIN_S
    return stderr.strip().splitlines()[-1]


def test_second_signal_in_the_grace_period_says_where_the_memory_tasks_went(
    tmp_path: Path,
) -> None:
    dlq = tmp_path / "dlq.jsonl"
    config = _config(tmp_path, dead_letter=f"dead_letter: {{kind: file, path: {dlq}}}")
    last = _forced_exit_line(config)
    # 38 queued and the 2 running ones: nothing of the 40 is lost, and the line says where.
    assert last == (
        f"forced exit: 40 unfinished tasks dead-lettered, in {dlq} "
        "(`dq-run run CONFIG --replay` runs them)"
    )
    assert len(dlq.read_text().splitlines()) == 40


def test_second_signal_while_the_stop_writes_the_dead_letters_loses_none(
    tmp_path: Path,
) -> None:
    # The stop runs off the main thread, where the signal lands: the memory broker's lock,
    # held by the stop's drain, is not held by the interrupted thread, so the forced exit
    # waits for that drain (well within ASK_WAIT_S) and counts what it wrote. Run on the
    # main thread, the stop held that lock where the signal stopped it: the line said the
    # tasks were lost, and they were.
    dlq = tmp_path / "dlq.jsonl"
    store = (
        "dead_letter: {kind: 'tests.cli.slow_dead_letters:SlowDeadLetters', "
        f"options: {{path: '{dlq}', pause_s: 0.15}}}}"
    )
    proc = start(_config(tmp_path, dead_letter=store))
    Lines(proc.stdout)
    err = Lines(proc.stderr)
    err.wait_for('"task.started"')
    proc.send_signal(signal.SIGINT)
    # The 2 running tasks finish within the grace period; the 38 queued are dead-lettered.
    err.wait_for(f"{WRITING} 38", timeout=30)
    proc.send_signal(signal.SIGINT)
    _all_in_the_slow_store(proc, err, dlq, 38)


def test_nothing_written_after_the_last_words_reaches_the_screen() -> None:
    # The run goes on, on its own thread, while the second signal's handler writes its line:
    # what the process writes after that line (the summary, a last log line, a handler's
    # thread) must not come after it, so stdout and stderr go to /dev/null first.
    code = (
        "import os, sys\n"
        "from runner.ops.service import _last_words\n"
        "print('before', flush=True)\n"
        "_last_words('forced exit: bye')\n"
        "print('after', flush=True)\n"
        "sys.stderr.write('after\\n'); sys.stderr.flush()\n"
        "os.write(1, b'after\\n'); os.write(2, b'after\\n')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "before\n"
    assert done.stderr == "forced exit: bye\n"


def _all_in_the_slow_store(proc: subprocess.Popen[str], err: Lines, dlq: Path, n: int) -> None:
    """After a second signal: exit 130, the last line counts ``n`` tasks dead-lettered in the
    SlowDeadLetters store, and its file holds ``n`` records."""
    proc.wait(timeout=20)
    stderr = err.text()
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == (
        f"forced exit: {n} unfinished tasks dead-lettered, in the dead-letter store "
        "tests.cli.slow_dead_letters:SlowDeadLetters"
    )
    assert len(dlq.read_text().splitlines()) == n


def test_two_signals_while_a_replay_takes_the_dead_letters_lose_none(tmp_path: Path) -> None:
    # The replay takes the records from the file and queues their tasks under the memory
    # broker's lock. Run on the main thread, a second signal that landed in between kept that
    # lock held for good: the records had left the file, the tasks never reached the queue.
    dlq = tmp_path / "dlq.jsonl"
    FileDeadLetters(dlq).add_many([shutdown_record("work", {"n": n}) for n in range(5)])
    store = (
        "dead_letter: {kind: 'tests.cli.slow_dead_letters:SlowDeadLetters', "
        f"options: {{path: '{dlq}', pause_s: 0.1}}}}"
    )
    proc = start(_config(tmp_path, dead_letter=store), "--no-simulate", "--replay")
    Lines(proc.stdout)
    err = Lines(proc.stderr)
    err.wait_for(f"{TAKING} 5")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)  # the first is taken before the second comes (two signals, not one)
    proc.send_signal(signal.SIGINT)
    _all_in_the_slow_store(proc, err, dlq, 5)


def test_second_signal_on_sqlite_says_what_stays_queued(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    config = _config(tmp_path, broker=f"broker: {{kind: sqlite, path: {db}}}")
    last = _forced_exit_line(config)
    found = re.fullmatch(
        rf"forced exit: (\d+) tasks stay queued in the SQLite file {re.escape(str(db))} and "
        r"(\d+) are leased \((\d+) running here\); this process's leases expire after "
        r"visibility_timeout \(30s\) and their tasks are handed out again",
        last,
    )
    assert found, last
    queued, leased, running = int(found[1]), int(found[2]), int(found[3])
    # The prefetched tasks are leased until the stop hands them back: every task is counted.
    assert running == 2 and queued + leased == 40


@contextlib.contextmanager
def _blocked_stdout() -> Iterator[tuple[int, int]]:
    """A pipe whose buffer is already full: the child blocks on its first write to it."""
    reader, writer = os.pipe()
    os.set_blocking(writer, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(writer, b"x" * 4096)
    os.set_blocking(writer, True)
    try:
        yield reader, writer
    finally:
        for fd in (reader, writer):
            with contextlib.suppress(OSError):
                os.close(fd)


#: The number of write(2) in /proc/PID/task/TID/syscall.
_WRITE_SYSCALL = {"x86_64": 1, "aarch64": 64}


def _blocked_writing(pid: int, fd: int) -> bool:
    """Whether a thread of ``pid`` (the run's: the main thread only waits for it) is blocked
    in write(2) on ``fd`` (Linux: the first two fields of /proc/PID/task/TID/syscall are the
    call's number and its first argument)."""
    write = str(_WRITE_SYSCALL[platform.machine()])
    for path in Path(f"/proc/{pid}/task").glob("*/syscall"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            fields = path.read_text().split()
            if len(fields) > 1 and fields[0] == write and int(fields[1], 16) == fd:
                return True
    return False


def test_second_signal_while_the_summary_prints_exits_130_with_a_line(tmp_path: Path) -> None:
    """The handlers were restored before the summary was printed: a second Ctrl-C there
    became click's Abort, exit 1, the summary cut and no message."""
    config = _config(tmp_path)
    Path(config).write_text(Path(config).read_text().replace("[4s, 4.5s]", "[300ms, 400ms]"))
    with _blocked_stdout() as (_, stdout):
        proc = subprocess.Popen(
            [DQ_RUN, config],
            cwd=REPO,
            env=dq_env(),
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
        )
        err = Lines(proc.stderr)
        err.wait_for('"task.started"')
        proc.send_signal(signal.SIGINT)
        # The shutdown has dead-lettered the queue and is now stuck printing the summary
        # into the full pipe.
        err.wait_for('"tasks.drained"')
        err.wait_until(lambda: _blocked_writing(proc.pid, 1), "the summary blocked on stdout")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
        elapsed = time.monotonic() - t0
    stderr = err.text()
    assert proc.returncode == 130, stderr
    assert elapsed < _EXIT_WITHIN_S
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("forced exit: ") and "the summary was cut short" in last
    assert "dead-lettered, in memory only: lost at exit" in last
    assert "Traceback" not in stderr and "Aborted" not in stderr


def test_ctrl_c_on_the_memory_demo_groups_what_was_left(tmp_path: Path) -> None:
    """146 `task.dead reason=shutdown` lines and a 146-row DLQ table: now one line and one
    row per type, and where the records went. The summary fits 80 columns."""
    summary = tmp_path / "summary.json"
    proc = start(
        "configs/demo.yaml", "--summary-json", str(summary),
        TASKS="3000", WORKERS="4", DQ_LOGGING__FORMAT="text", COLUMNS="80",
    )  # fmt: skip
    stdout, err = Lines(proc.stdout), Lines(proc.stderr)
    err.wait_for("task.succeeded")
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    out, stderr = stdout.text(), err.text()
    assert proc.returncode == 0, stderr
    data = json.loads(summary.read_text())
    drained = data["dead_by_reason"]["shutdown"]
    assert drained > 100  # the demo had a queue to drain: the case this is about
    dead_lines = [line for line in stderr.splitlines() if " task.dead " in line]
    assert not any("reason=shutdown" in line for line in dead_lines)
    per_type = [line for line in stderr.splitlines() if " tasks.drained " in line]
    assert 1 <= len(per_type) <= 3
    counts = [int(re.search(r"count=(\d+)", line)[1]) for line in per_type]  # type: ignore[index]
    assert sum(counts) == drained
    assert all("in memory only: lost at exit" in line for line in per_type)
    rows = [line for line in out.splitlines() if "│" in line and "shutdown" in line]
    assert 1 <= len(rows) <= 3 and all(re.search(r"\d+ tasks", row) for row in rows), out
    assert ": never ran" not in out
    assert f"{drained} tasks still queued at shutdown were dead-lettered" in " ".join(out.split())
    assert all(len(line) <= 80 for line in out.splitlines()), out
    # Nothing was lost on the way: a publish blocked on the full queue at shutdown did not
    # put its batch after the drain (1100 published, 1000 accounted for, before).
    totals = data["totals"]
    assert totals["published"] == totals["succeeded"] + totals["dead"]


def test_the_summary_says_which_tasks_came_from_the_backlog(tmp_path: Path) -> None:
    """202 tasks published into SQLite, then a run that simulates 100: it printed
    `published 100, succeeded 302` and nothing else."""
    db = tmp_path / "q.db"
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        f"broker: {{kind: sqlite, path: {db}}}\nworkers: 4\nlogging: {{format: json}}\n"
        "task_types:\n  work: {handler: handlers.demo:send_email, timeout: 5s}\n"
        "simulate: {tasks: 100, mix: {work: 1}, faults: {work: {latency: [1ms, 2ms]}}}\n"
    )
    lines = tmp_path / "tasks.jsonl"
    lines.write_text('{"type": "work", "payload": {"to": "a@example.com"}}\n' * 202)
    assert run("publish", str(config), "--file", str(lines)).returncode == 0
    summary = tmp_path / "summary.json"
    result = run(str(config), "--summary-json", str(summary), COLUMNS="80")
    assert result.returncode == 0, result.stderr
    totals = json.loads(summary.read_text())["totals"]
    assert totals["published"] == 100 and totals["succeeded"] == 302
    assert totals["from_backlog"] == 202
    text = " ".join(result.stdout.split())
    assert "202 of the 302 tasks finished here were created before this run started" in text


@pytest.mark.slow  # 16 s: a full simulated run
def test_simulated_publishing_is_one_info_line_per_batch() -> None:
    """At INFO every task.published was printed: 3,000 lines for 3,000 tasks."""
    result = run("configs/demo.yaml", TASKS="250", WORKERS="4", DQ_LOGGING__FORMAT="json")
    assert result.returncode == 0, result.stderr
    events = _json_lines(result.stderr)
    assert not [e for e in events if e["event"] == "task.published"]
    batches = [e for e in events if e["event"] == "tasks.published"]
    assert [e["count"] for e in batches] == [100, 100, 50]
    assert batches[-1]["message"].startswith("published 50 tasks (250/250): ")


# -- a real terminal ------------------------------------------------------------------------

_CSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _run_in_pty(args: list[str], columns: int, actions: Any, **env: str) -> tuple[int, str]:
    """Run dq-run on a pseudo-terminal ``columns`` wide; ``actions(pid, output)`` drives it
    (``output()`` returns what was written so far). Returns the exit code and the output."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen(
        [DQ_RUN, *args], cwd=REPO, env=dq_env(TERM="xterm", **env),
        stdin=follower, stdout=follower, stderr=follower, close_fds=True,
    )  # fmt: skip
    os.close(follower)
    chunks: list[bytes] = []

    def pump() -> None:
        while True:
            ready, _, _ = select.select([leader], [], [], 0.1)
            if not ready:
                if proc.poll() is not None:
                    return
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the child side closed
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        actions(proc, lambda: b"".join(chunks).decode("utf-8", "replace"))
        code = proc.wait(timeout=60)
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    return code, b"".join(chunks).decode("utf-8", "replace")


def _wait_output(output: Any, text: str, timeout: float = 30.0, *, regex: bool = False) -> None:
    """Wait until ``output()`` contains ``text`` (or matches it, with ``regex``)."""
    deadline = time.monotonic() + timeout
    while not (re.search(text, output()) if regex else text in output()):
        assert time.monotonic() < deadline, f"no {text!r} in {output()[-2000:]!r}"
        time.sleep(0.05)


def test_double_ctrl_c_on_a_terminal_80_columns_wide(tmp_path: Path) -> None:
    """On a terminal (the live panel up, text logs) the second Ctrl-C exits 130 with its
    line, and nothing written is wider than the terminal."""
    config = _config(tmp_path, fmt="auto")

    def actions(proc: subprocess.Popen[bytes], output: Any) -> None:
        _wait_output(output, "0/40 done")
        _wait_output(output, "task.started")
        proc.send_signal(signal.SIGINT)
        _wait_output(output, "worker.stopping")
        proc.send_signal(signal.SIGINT)

    code, text = _run_in_pty([config], 80, actions)
    assert code == 130, text
    plain = _CSI.sub("", text)
    assert "forced exit: 40 unfinished tasks dead-lettered, in memory only" in " ".join(
        plain.split()
    )
    too_wide = [line for line in re.split(r"[\r\n]", plain) if len(line) > 80]
    assert not too_wide, too_wide
    assert "Traceback" not in plain and "Aborted" not in plain


def test_the_demo_on_a_terminal_draws_one_final_panel() -> None:
    """The panel tore and repeated at shutdown (`done 6407:55:22.231 WARNING task.dead`, the
    panel twice in scrollback). After Ctrl-C the last frame is drawn once, below every log
    line, and no log line is glued to it."""

    def actions(proc: subprocess.Popen[bytes], output: Any) -> None:
        _wait_output(output, "task.succeeded")
        # The panel is live and has counted tasks done: logs are being written above it.
        _wait_output(output, r"[1-9]\d*/2000 done", regex=True)
        proc.send_signal(signal.SIGINT)

    code, text = _run_in_pty(["configs/demo.yaml"], 80, actions, TASKS="2000", WORKERS="4")
    assert code == 0, text
    plain = _CSI.sub("", text)
    glued = re.search(r"done \d+ ?\d\d:\d\d:\d\d\.\d{3} ", plain)
    assert glued is None, glued
    # Live shows the cursor again once its last frame is drawn: from there to the summary,
    # no task line (they were written above the panel, or are one line per type now).
    after_panel = _CSI.sub("", text[text.rindex("\x1b[?25h") :]).split("Summary")[0]
    assert " task." not in after_panel, after_panel
    before = _CSI.sub("", text[: text.rindex("\x1b[?25h")])
    assert re.search(r"\d+/2000 done", before[-1000:]), before[-1000:]  # the last frame


def test_a_shared_broker_on_a_terminal_shows_done_and_the_queue_not_a_fraction(
    tmp_path: Path,
) -> None:
    """SQLite may be shared by other processes draining the same backlog: 202 queued and 100
    simulated showed `302/100 done`; a fraction would be wrong either way."""
    db = tmp_path / "q.db"
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        f"broker: {{kind: sqlite, path: {db}}}\nworkers: 4\n"
        "task_types:\n  work: {handler: handlers.demo:send_email, timeout: 5s}\n"
        "simulate: {tasks: 100, mix: {work: 1}, faults: {work: {latency: [1ms, 2ms]}}}\n"
    )
    lines = tmp_path / "tasks.jsonl"
    lines.write_text('{"type": "work", "payload": {"to": "a@example.com"}}\n' * 202)
    assert run("publish", str(config), "--file", str(lines)).returncode == 0
    code, text = _run_in_pty([str(config)], 80, lambda proc, output: None)
    assert code == 0, text
    plain = _CSI.sub("", text)
    assert "302 done  queued 0" in plain, plain[-3000:]
    assert not re.search(r"\d+/\d+ done", plain)


def test_brokers_say_whether_other_processes_may_share_them() -> None:
    from runner.brokers.memory import MemoryBroker
    from runner.brokers.redis.broker import RedisBroker
    from runner.brokers.sqlite.broker import SqliteBroker

    assert MemoryBroker.shared is False
    assert SqliteBroker.shared is True and RedisBroker.shared is True
