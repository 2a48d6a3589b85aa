"""The envelope codec: orjson, with the standard library where orjson refuses or would be wrong."""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from runner.codec import (
    decode_dead_letter,
    decode_task,
    encode_dead_letter,
    encode_task,
    from_json_bytes,
    to_json_bytes,
)
from runner.model import AttemptRecord, DeadLetter, Task, new_task_id, short_id

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


@settings(deadline=None)  # the seed and the rest come from the profile (tests/conftest.py)
@given(json_values)
# Found by this test (1 seed in 30 or so): orjson reads an integer beyond 64 bits as a float.
@example(-9_223_372_036_854_775_809)
@example({"n": 36_893_488_147_419_103_233})
def test_any_json_value_round_trips_and_the_standard_library_reads_it(value: object) -> None:
    raw = to_json_bytes(value)
    assert from_json_bytes(raw) == value
    assert json.loads(raw) == value


BIG_INTEGERS = [
    2**64,  # the smallest positive integer orjson cannot hold
    -(2**63) - 1,  # the smallest in magnitude below: 19 digits
    36_893_488_147_419_103_233,  # the issue's `dq-run publish C T '{"n": ...}'`
    -(10**40),
    10**300 + 1,
]


@pytest.mark.parametrize(
    "number", BIG_INTEGERS, ids=["2**64", "-2**63-1", "issue", "-10**40", "10**300+1"]
)
def test_integers_beyond_64_bits_read_back_exactly(number: int) -> None:
    for value in (number, [number], {"n": number}, {"a": [1.5, {"deep": number}], "s": "x"}):
        back = from_json_bytes(to_json_bytes(value))
        assert back == value
        assert json.dumps(back) == json.dumps(value)  # a float would print differently
    task = Task("t", {"n": number}, enqueued_at=time.time())
    assert decode_task(encode_task(task)).payload == {"n": number}
    assert type(decode_task(encode_task(task)).payload["n"]) is int
    assert from_json_bytes(f'{{"n": {number}}}') == {"n": number}  # str input, spaced


@pytest.mark.parametrize("number", [2**64 - 1, -(2**63), 10**18, -(10**18)])
def test_integers_at_the_64_bit_edges_stay_integers(number: int) -> None:
    back = from_json_bytes(to_json_bytes({"n": number}))["n"]
    assert back == number and type(back) is int


def test_long_digit_runs_that_are_not_integers_read_the_same() -> None:
    """The standard library reads these (a run of 19 digits): the answer must not change."""
    value = {"s": "1" * 40, "f": 12345678901234567890.5, "e": 1e300, "id": "9" * 19}
    raw = to_json_bytes(value)
    assert from_json_bytes(raw) == value == json.loads(raw)


@pytest.mark.parametrize("depth", [1, 254, 255, 600])  # orjson writes at most 254 levels
def test_deep_nesting_round_trips(depth: int) -> None:
    value: object = "leaf"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    raw = to_json_bytes(value)
    assert from_json_bytes(raw) == value
    assert json.loads(raw) == value


def test_nesting_the_standard_library_cannot_hold_is_refused_with_value_error() -> None:
    depth = 100_000
    with pytest.raises(ValueError, match="nested too deeply"):
        from_json_bytes(b"[" * depth + b"]" * depth)
    with pytest.raises(ValueError, match="nested too deeply"):
        decode_task(b'{"id":"x","type":"t","payload":' + b"[" * depth + b"]" * depth + b"}")
    value: list[object] = []
    for _ in range(depth):
        value = [value]
    with pytest.raises(ValueError, match="nested too deeply"):
        to_json_bytes(value)


def test_non_ascii_round_trips_as_utf8() -> None:
    value = {
        "ü": "日本語 😀",
        "line sep": "\u2028\u2029",
        "nul": "\x00",
        "ß" * 3: ["é", "\U0010ffff"],
    }
    raw = to_json_bytes(value)
    assert "日本語 😀".encode() in raw  # written as UTF-8, not escaped
    assert from_json_bytes(raw) == value
    assert from_json_bytes(raw.decode()) == value
    assert from_json_bytes(b'"\\ud83d\\ude00 \\u00fc"') == "😀 ü"  # an escaped pair is fine


LONE_SURROGATES = ["\ud800", "\udfff", "a\udbffb", "\ude00\ud83d"]  # the last pair is reversed


@pytest.mark.parametrize("text", LONE_SURROGATES)
def test_lone_surrogates_are_refused_both_ways(text: str) -> None:
    for value in (text, {"k": text}, {text: 1}, [1, [text]]):
        with pytest.raises(ValueError, match="lone surrogate"):
            to_json_bytes(value)
        escaped = json.dumps(value)  # what another producer may write: \ud800 escapes
        with pytest.raises(ValueError, match="lone surrogate"):
            from_json_bytes(escaped.encode())
        with pytest.raises(ValueError, match="lone surrogate"):
            from_json_bytes(json.dumps(value, ensure_ascii=False))  # a str holding it raw
    envelope = json.dumps({"id": "x", "type": "t", "payload": {"s": text}}).encode()
    with pytest.raises(ValueError, match="lone surrogate"):
        decode_task(envelope)


SURROGATES = st.characters(codec=None, min_codepoint=0xD800, max_codepoint=0xDFFF)


@given(st.lists(st.characters() | SURROGATES, max_size=8).map("".join))
@example("\ud83d\ude00")  # a pair as two code points: escaped, it reads back as one
def test_text_round_trips_or_is_refused_never_read_half_way(text: str) -> None:
    value = {"s": text}
    try:
        text.encode()
    except UnicodeEncodeError:  # a surrogate code point: UTF-8 JSON cannot carry it
        with pytest.raises(ValueError, match="lone surrogate"):
            to_json_bytes(value)
    else:
        assert from_json_bytes(to_json_bytes(value)) == value
    escaped = json.dumps(value).encode()  # another producer's \\uXXXX escapes: pairs combine
    try:
        back = from_json_bytes(escaped)
    except ValueError:
        with pytest.raises(UnicodeEncodeError):  # refused only for a lone surrogate
            json.loads(escaped)["s"].encode()
    else:
        assert back == json.loads(escaped)
        back["s"].encode()  # a handler never receives a string it cannot write back


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


def test_ids_made_in_one_process_sort_in_the_order_they_were_made() -> None:
    """Within a millisecond too: a batch published at once is claimed, acked and traced in
    that order, so the SQLite indexes of ids and of trace keys (which begin with the root's id)
    take them at one place, not at random pages across the millisecond's ids."""
    made = [new_task_id() for _ in range(5000)]
    assert made == sorted(made)
    assert len({i[:12] for i in made}) < len(made)  # some shared a millisecond
    ends = [short_id(i) for i in made]  # what people see stays random, not a count
    assert ends != sorted(ends)


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


def test_headers_round_trip_and_an_envelope_without_them_is_unchanged() -> None:
    """Headers (set by middleware at publish) travel in the envelope; a task without any
    writes no ``headers`` key, so envelopes read by older runners are the same as before."""
    plain = Task("t", {"n": 1})
    assert "headers" not in json.loads(encode_task(plain))
    assert decode_task(encode_task(plain)) == plain
    assert dict(decode_task(encode_task(plain)).headers) == {}
    traced = Task("t", {"n": 1}, headers={"x-trace": "abc", "plan": {"fail": 1}})
    again = decode_task(encode_task(traced))
    assert again == traced
    assert again.headers == {"x-trace": "abc", "plan": {"fail": 1}}


def test_an_expiry_round_trips_and_a_task_without_one_writes_none() -> None:
    plain = Task("t", {"n": 1})
    assert "expires_at" not in json.loads(encode_task(plain))
    expiring = Task("t", {"n": 1}, expires_at=1_900_000_000.25)
    assert decode_task(encode_task(expiring)).expires_at == 1_900_000_000.25
