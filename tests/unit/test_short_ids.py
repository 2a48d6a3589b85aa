"""Task ids on screen: the short form (the random end of an id) everywhere, and lookups by it."""

from __future__ import annotations

import io
import logging
import random
import time

import pytest

from runner.brokers.memory import MemoryBroker
from runner.deadletter.memory import MemoryDeadLetters
from runner.errors import UsageError
from runner.events import Event
from runner.model import SHORT_ID_CHARS, DeadLetter, Task, short_id
from runner.observe.logs import FIELDS_ATTR, TextFormatter
from runner.observe.summary import Summary
from runner.ops import admin
from runner.ops.views import dead_letter_table


def same_millisecond_ids(n: int, seed: int = 7) -> list[str]:
    """Ids as new_task_id makes them within one millisecond: one time prefix, random ends."""
    rng = random.Random(seed)
    prefix = f"{time.time_ns() // 1_000_000:012x}"
    return [f"{prefix}{rng.getrandbits(80):020x}" for _ in range(n)]


def record(task_id: str, reason: str = "exhausted") -> DeadLetter:
    now = time.time()
    return DeadLetter(
        task=Task(type="email", payload={}, id=task_id),
        reason=reason,
        error_type="RuntimeError",
        message="boom",
        traceback="",
        attempts=3,
        first_attempt_at=now,
        last_attempt_at=now,
        dead_at=now,
    )


def memory_admin(records: list[DeadLetter]) -> MemoryBroker:
    store = MemoryDeadLetters()
    store.add_many(records)
    return MemoryBroker(
        capacity=100,
        enqueue_timeout=0.1,
        overflow="block",
        visibility_timeout=30,
        dead_letters=store,
    )


def test_short_id_is_the_random_end_of_the_id() -> None:
    ids = same_millisecond_ids(12)
    shorts = [short_id(i) for i in ids]
    assert len(set(shorts)) == 12  # the start would read the same twelve times
    assert all(
        i.endswith(s) and len(s) == SHORT_ID_CHARS >= 6 for i, s in zip(ids, shorts, strict=True)
    )
    assert short_id("abc") == "abc"  # an id shorter than the short form stays whole


def test_text_logs_show_the_short_id() -> None:
    (task_id,) = same_millisecond_ids(1)
    line = logging.LogRecord("runner", logging.INFO, __file__, 1, "", None, None)
    setattr(line, FIELDS_ATTR, {"event": "task.succeeded", "type": "email", "task_id": task_id})
    line.message = line.getMessage()  # as the queue handler's prepare() leaves it
    text = TextFormatter().format(line)
    assert f" email    {short_id(task_id)}" in text
    assert task_id[:8] not in text


def test_the_dead_letter_table_shows_distinct_short_ids() -> None:
    ids = same_millisecond_ids(12)
    rows = dead_letter_table([record(i) for i in ids]).splitlines()[1:]
    assert [row.split()[0] for row in rows] == [short_id(i) for i in ids]


def test_the_summary_shows_short_ids() -> None:
    ids = same_millisecond_ids(3)
    summary = Summary()
    for task_id in ids:
        summary.handle(
            Event("task.dead", task_id=task_id, type="email", attempt=3, reason="exhausted")
        )
    out = io.StringIO()
    summary.render(out)
    text = out.getvalue()
    assert all(short_id(i) in text for i in ids)
    assert ids[0][:12] not in text


def test_find_dead_letter_by_short_id_any_end_or_start_of_six_or_more() -> None:
    ids = same_millisecond_ids(12)
    target = memory_admin([record(i) for i in ids])
    for task_id in ids:
        assert admin.find_dead_letter(target, short_id(task_id)).id == task_id
        assert admin.find_dead_letter(target, task_id[-6:]).id == task_id
        assert admin.find_dead_letter(target, task_id).id == task_id
    unique_start = ids[0][:13]
    if sum(i.startswith(unique_start) for i in ids) == 1:
        assert admin.find_dead_letter(target, unique_start).id == ids[0]
    with pytest.raises(UsageError, match="matches 12 dead letters; give more of it"):
        admin.find_dead_letter(target, ids[0][:12])  # the shared time prefix
    with pytest.raises(UsageError, match="needs 6 characters or more"):
        admin.find_dead_letter(target, ids[0][-5:])


def test_an_ambiguous_end_says_how_many_match() -> None:
    ids = [f"{n:012x}" + "0" * 12 + "deadbeef" for n in range(3)]
    target = memory_admin([record(i) for i in ids])
    with pytest.raises(UsageError, match="'deadbeef' matches 3 dead letters"):
        admin.find_dead_letter(target, "deadbeef")
    with pytest.raises(UsageError, match="'adbeef' matches 3 dead letters"):
        admin.resolve_ids(target, ["adbeef"])


def test_resolve_ids_expands_short_ids_and_keeps_unknown_ones() -> None:
    ids = same_millisecond_ids(4)
    target = memory_admin([record(i) for i in ids])
    given = [short_id(ids[0]), ids[1], "f" * 32, "abc"]
    assert admin.resolve_ids(target, given) == [ids[0], ids[1], "f" * 32, "abc"]
    assert admin.resolve_ids(target, []) == []
