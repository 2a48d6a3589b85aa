"""The end-of-run summary as a person reads it: 80 columns, grouped shutdown dead letters, and
which finished tasks came from the backlog (issue 17)."""

from __future__ import annotations

import io
import time

from rich.console import Console

from runner.events import Event
from runner.model import new_task_id
from runner.observe.summary import Summary


def rendered(summary: Summary, width: int = 80, **kwargs: str) -> list[str]:
    """The summary as a terminal of ``width`` columns shows it (Rich's recording console)."""
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None)
    summary.render(console, **kwargs)
    return console.export_text().splitlines()


def words(lines: list[str]) -> str:
    return " ".join(" ".join(lines).split())


def dead(summary: Summary, type_name: str, reason: str, error: str, attempts: int = 3) -> None:
    summary.handle(
        Event("task.dead", task_id=new_task_id(), type=type_name, attempt=attempts,
              reason=reason, error=error)
    )  # fmt: skip


def busy_summary() -> Summary:
    summary = Summary()
    for type_name in ("email", "thumbnail_for_the_product_catalogue", "report"):
        for _ in range(3):
            summary.handle(Event("task.published", task_id=new_task_id(), type=type_name))
            summary.handle(
                Event("task.succeeded", task_id=new_task_id(), type=type_name, duration_s=0.05)
            )
    dead(summary, "report", "never_retry", "PoisonPayload: payload #3 can never be processed " * 3)
    dead(summary, "email", "exhausted", "ConnectionError: smtp.example.com:25 refused")
    return summary


def test_every_table_fits_80_columns() -> None:
    """The summary was drawn 110 columns wide, and its DLQ table (101 columns) wrapped."""
    lines = rendered(busy_summary(), 80)
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    text = "\n".join(lines)
    assert "Summary" in text and "Dead-letter queue" in text
    assert "PoisonPayload: payload #3" in text and "…" in text  # cut with an ellipsis
    assert "ConnectionError" in text


def test_narrower_tables_drop_the_least_useful_columns() -> None:
    lines = rendered(busy_summary(), 60)
    assert all(len(line) <= 60 for line in lines), [line for line in lines if len(line) > 60]
    text = "\n".join(lines)
    assert "succeeded" in text and "dead" in text  # what matters stays
    assert "timed out" not in text  # what matters least went first


def test_shutdown_dead_letters_are_one_row_per_type_with_their_count() -> None:
    """Ctrl-C on the demo printed a 146-row DLQ of `: never ran: the broker was drained`."""
    summary = busy_summary()
    for _ in range(140):
        dead(summary, "email", "shutdown", "never ran: the broker was drained (shutdown)", 0)
    for _ in range(6):
        dead(summary, "email", "shutdown", "OSError: boom", 1)
    for _ in range(23):
        dead(summary, "report", "shutdown", "never ran: the broker was drained (shutdown)", 0)
    lines = rendered(summary, 80, drained_to="in var/dlq.jsonl")
    shutdown_rows = [line for line in lines if "shutdown" in line and "│" in line]
    assert len(shutdown_rows) == 2, lines
    email, report = shutdown_rows
    assert "146 tasks" in email and "email" in email and "0-1" in email
    assert "140 never ran, 6 unfinished" in email
    assert "23 tasks" in report and "23 never ran" in report
    assert not any(": never ran" in line for line in lines)
    tail = words(lines[-2:])
    assert "169 tasks still queued at shutdown were dead-lettered, in var/dlq.jsonl" in tail
    assert all(len(line) <= 80 for line in lines)
    # The data keeps every record: the grouping is only how it is shown.
    assert summary.to_dict()["dead_by_reason"]["shutdown"] == 169


def test_the_summary_says_which_finished_tasks_came_from_the_backlog() -> None:
    """`published 100, succeeded 302` left a person guessing: 202 were queued before the run."""
    before = [new_task_id() for _ in range(202)]
    time.sleep(0.002)  # ids carry their creation time in milliseconds
    summary = Summary()
    for task_id in before:
        summary.handle(Event("task.succeeded", task_id=task_id, type="email", duration_s=0.01))
    for _ in range(100):
        task_id = new_task_id()
        summary.handle(Event("task.published", task_id=task_id, type="email"))
        summary.handle(Event("task.succeeded", task_id=task_id, type="email", duration_s=0.01))
    data = summary.to_dict()
    assert data["totals"]["from_backlog"] == 202
    assert data["by_type"]["email"]["from_backlog"] == 202
    text = words(rendered(summary, 80))
    assert "202 of the 302 tasks finished here were created before this run started" in text
    assert "(the backlog); 100 after it." in text


def test_no_backlog_no_note() -> None:
    summary = Summary()
    task_id = new_task_id()
    summary.handle(Event("task.published", task_id=task_id, type="email"))
    summary.handle(Event("task.succeeded", task_id=task_id, type="email", duration_s=0.01))
    assert summary.to_dict()["totals"]["from_backlog"] == 0
    assert "backlog" not in " ".join(rendered(summary, 80))
