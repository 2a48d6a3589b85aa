"""Tables that fit a terminal (runner.observe.tablefit) and the dlq/stats tables built on it."""

from __future__ import annotations

import time

from runner.model import DeadLetter, Task, new_task_id
from runner.observe.tablefit import Column, elide, fit_columns, plain_table
from runner.ops.admin import Stats
from runner.ops.views import dead_letter_table, stats_table

COLUMNS = [
    Column("id"),
    Column("type", flexible=True, min_width=6),
    Column("attempts", "right", rank=2),
    Column("error", flexible=True, min_width=12),
    Column("when", rank=1),
]
ROWS = [["a1b2c3d4", "thumbnail_for_the_catalogue", "3", "E: " + "x" * 70, "2024-05-01T12:00:00Z"]]


def test_elide_cuts_with_an_ellipsis_within_the_width() -> None:
    assert elide("hello", 5) == "hello"
    assert elide("hello world", 6) == "hello…"
    assert elide("日本語のテキスト", 7) in ("日本…", "日本語…")  # wide characters count double
    assert len(elide("hello", 1)) == 1


def test_everything_shows_when_there_is_room() -> None:
    fit = fit_columns(COLUMNS, ROWS, 500, gap=2)
    assert [i for i, _ in fit] == [0, 1, 2, 3, 4]
    assert [w for _, w in fit] == [8, 27, 8, 73, 20]


def test_flexible_columns_shrink_before_anything_drops() -> None:
    fit = dict(fit_columns(COLUMNS, ROWS, 100, gap=2))
    assert set(fit) == {0, 1, 2, 3, 4}
    assert sum(fit.values()) + 2 * 4 == 100
    assert fit[0] == 8 and fit[4] == 20  # fixed columns keep their width


def test_columns_drop_highest_rank_first_when_shrinking_is_not_enough() -> None:
    # id 8 + type 6 + error 12 (their least) + when 20 + gaps = 52: `attempts` (rank 2) goes
    kept = [i for i, _ in fit_columns(COLUMNS, ROWS, 60, gap=2)]
    assert kept == [0, 1, 3, 4]
    kept = [i for i, _ in fit_columns(COLUMNS, ROWS, 40, gap=2)]
    assert kept == [0, 1, 3]  # then `when` (rank 1); rank 0 never drops
    assert [i for i, _ in fit_columns(COLUMNS, ROWS, 10, gap=2)] == [0, 1, 3]


def test_plain_table_lines_fit_and_right_justify() -> None:
    text = plain_table(COLUMNS, ROWS * 3, 70)
    lines = text.splitlines()
    assert all(len(line) <= 70 for line in lines), lines
    assert lines[0].startswith("id")
    assert "…" in lines[1]
    assert plain_table(COLUMNS, ROWS, None).splitlines()[1].endswith("2024-05-01T12:00:00Z")


def record(type_name: str = "email", message: str = "boom") -> DeadLetter:
    now = time.time()
    return DeadLetter(
        task=Task(type=type_name, payload={}, id=new_task_id()),
        reason="never_retry",
        error_type="PoisonPayload",
        message=message,
        traceback="",
        attempts=3,
        first_attempt_at=now,
        last_attempt_at=now,
        dead_at=now,
    )


def test_dlq_list_fits_80_columns() -> None:
    """`dq-run dlq list` printed ~110-column rows that wrapped on an 80-column terminal."""
    records = [record("report", "payload #3 can never be processed, whatever we do " * 2)] * 3
    wide = dead_letter_table(records, width=200).splitlines()
    assert max(len(line) for line in wide) > 80  # what it needs, given the room
    assert "DEAD_AT" in wide[0]
    lines = dead_letter_table(records, width=80).splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    assert lines[0].split()[:5] == ["ID", "TYPE", "ATTEMPTS", "REASON", "ERROR"]
    assert "PoisonPayload: payload #3" in lines[1] and lines[1].endswith("…")


def test_stats_table_fits_a_narrow_terminal() -> None:
    from runner.brokers.base import Depth
    from runner.ops.admin import TypeStats

    stats = Stats(
        types={"a_task_type_with_a_long_long_name": TypeStats(Depth(1, 2, 3), 4.0)},
        dead_letters=0,
    )
    lines = stats_table(stats, width=40).splitlines()
    assert all(len(line) <= 40 for line in lines), lines
    assert lines[1].startswith("a_task") and "…" in lines[1]


def test_dlq_list_width_follows_the_terminal_and_a_pipe_gets_it_whole(monkeypatch) -> None:
    records = [record("report", "payload #3 can never be processed, whatever we do " * 2)]
    monkeypatch.delenv("COLUMNS", raising=False)
    piped = dead_letter_table(records).splitlines()  # pytest's stdout is not a terminal
    assert "DEAD_AT" in piped[0] and max(len(line) for line in piped) > 80
    monkeypatch.setenv("COLUMNS", "80")
    assert all(len(line) <= 80 for line in dead_letter_table(records).splitlines())
