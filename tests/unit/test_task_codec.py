"""The envelope codec: orjson, with the standard library where orjson refuses."""

from __future__ import annotations

import json
import math
import time

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
