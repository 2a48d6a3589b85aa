"""The envelope codec: orjson, with the standard library where orjson refuses."""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner.task import (
    AttemptRecord,
    DeadLetter,
    Task,
    decode_dead_letter,
    decode_task,
    encode_dead_letter,
    encode_task,
    from_json_bytes,
    new_task_id,
    to_json_bytes,
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()  # beyond 64 bits too: the standard library writes those
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_any_json_value_round_trips_and_the_standard_library_reads_it(value: object) -> None:
    raw = to_json_bytes(value)
    assert from_json_bytes(raw) == value
    assert json.loads(raw) == value


def test_non_string_keys_are_written_as_the_standard_library_writes_them() -> None:
    assert from_json_bytes(to_json_bytes({1: "a", 2.5: "b"})) == {"1": "a", "2.5": "b"}


def test_what_is_not_json_is_still_refused() -> None:
    with pytest.raises(TypeError):
        to_json_bytes({"when": object()})


def test_nan_written_by_earlier_versions_is_still_read() -> None:
    """Envelopes the standard library wrote (durable brokers keep them across upgrades)."""
    task = Task("t", {"x": float("nan"), "y": float("inf")})
    raw = json.dumps(task.to_json(), separators=(",", ":"), ensure_ascii=False).encode()
    payload = decode_task(raw).payload
    assert math.isnan(payload["x"]) and payload["y"] == math.inf


def test_task_and_dead_letter_round_trip() -> None:
    now = time.time()
    failure = AttemptRecord(1, "ValueError", "bad é", "tb", now, 0.5, "host:1")
    task = Task("t", {"k": ["ü", 1, 2.5, None]}, attempt=1, enqueued_at=now, history=(failure,))
    assert decode_task(encode_task(task)) == task
    assert decode_task(encode_task(task), attempt=3).attempt == 3
    record = DeadLetter(task, "error", "ValueError", "bad", "tb", 1, now, now, now)
    assert decode_dead_letter(encode_dead_letter(record)) == record


@pytest.mark.parametrize("raw", [b"", b"{", b"[1]", b'{"id": "x"}', b"\xff\xfe", "not json"])
def test_malformed_envelopes_raise_value_error(raw: bytes | str) -> None:
    with pytest.raises(ValueError):
        decode_task(raw)


def test_task_ids_sort_by_creation_time() -> None:
    # The SQLite broker's id index then grows at its end instead of touching a random page per
    # put (measured: 2.5x the insert rate at 100k queued tasks).
    first = [new_task_id() for _ in range(1000)]
    time.sleep(0.002)  # the next millisecond at least
    later = new_task_id()
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in [*first, later])
    assert len(set(first)) == len(first)
    assert max(first) < later
    assert int(later[:12], 16) == pytest.approx(time.time() * 1000, abs=1000)


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    read, write = os.pipe()
    with warnings.catch_warnings():  # 3.12+ warns of forking a process that has threads
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.write(write, "".join(new_task_id() for _ in range(100)).encode())
        os._exit(0)
    os.close(write)
    mine = {new_task_id()[12:] for _ in range(100)}
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        raw = pipe.read()
    theirs = {raw[i + 12 : i + 32] for i in range(0, len(raw), 32)}
    assert len(theirs) == 100
    assert not mine & theirs


def test_seeding_the_random_module_does_not_repeat_ids() -> None:
    random.seed(42)
    first = new_task_id()
    random.seed(42)
    assert new_task_id()[12:] != first[12:]
