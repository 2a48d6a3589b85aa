"""runner.model.quick_init: the faster ``__init__`` of the frozen dataclasses built per task
builds what the one dataclasses writes would, and refuses a class it does not fit."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest

from runner.brokers.base import Arrival, Delivery, Effects, Settle, SetValue
from runner.engine.timeouts import Run
from runner.events import Event, EventName, task_event
from runner.model import NO_HEADERS, Cancellation, Task, TaskContext, quick_init

_counter = itertools.count()


def _next_label() -> str:
    return f"made-{next(_counter)}"


@dataclasses.dataclass(frozen=True, slots=True)
class _Plain:
    a: int
    b: str = "b"
    c: tuple[int, ...] = ()
    d: str = dataclasses.field(default_factory=_next_label)


@quick_init
@dataclasses.dataclass(frozen=True, slots=True)
class _Quick:
    a: int
    b: str = "b"
    c: tuple[int, ...] = ()
    d: str = dataclasses.field(default_factory=_next_label)


@dataclasses.dataclass(frozen=True)
class _PlainDict:
    a: int
    b: list[int] = dataclasses.field(default_factory=list)


@quick_init
@dataclasses.dataclass(frozen=True)
class _QuickDict:
    a: int
    b: list[int] = dataclasses.field(default_factory=list)


CALLS: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
    ((1,), {}),
    ((1, "x"), {}),
    ((1,), {"c": (2, 3)}),
    ((), {"a": 1, "d": "given", "b": "y"}),
    ((1, "x", (4,), "given"), {}),
]


@pytest.mark.parametrize(("args", "kwargs"), CALLS)
def test_it_builds_what_the_dataclass_init_builds(args: Any, kwargs: Any) -> None:
    plain, quick = _Plain(*args, **kwargs), _Quick(*args, **kwargs)
    fields = [f.name for f in dataclasses.fields(_Plain)]
    expected = [getattr(plain, name) for name in fields]
    got = [getattr(quick, name) for name in fields]
    if "d" not in kwargs and len(args) < 4:  # a factory's value: fresh each time, both ways
        assert plain.d.startswith("made-") and quick.d.startswith("made-")
        assert plain.d != quick.d
        expected, got = expected[:3], got[:3]
    assert got == expected


def test_without_slots_the_fields_go_in_the_instance_dict() -> None:
    one, two = _QuickDict(1), _QuickDict(1)
    assert one.__dict__ == _PlainDict(1).__dict__ == {"a": 1, "b": []}
    one.b.append(1)
    assert two.b == []  # each call its own list: the factory runs per call
    assert _QuickDict(a=2, b=[3]) == _QuickDict(2, [3])


def test_the_instances_stay_frozen_hashable_and_replaceable() -> None:
    task = Task("t", {"x": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.attempt = 2  # type: ignore[misc]
    again = dataclasses.replace(task, attempt=2)
    assert (again.id, again.attempt, again.payload) == (task.id, 2, {"x": 1})
    assert hash(_Quick(1, d="same")) == hash(_Quick(1, d="same"))
    assert len(task.id) == 32 and task.id != Task("t", None).id
    ctx = TaskContext("id", "t", 1, 3, 0.0, Cancellation(), lambda: None)  # type: ignore[arg-type, return-value]
    assert ctx.headers is NO_HEADERS
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.attempt = 2  # type: ignore[misc]


def test_wrong_arguments_fail_as_they_would() -> None:
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'a'"):
        _Quick()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument 'z'"):
        _Quick(1, z=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="multiple values for argument 'a'"):
        _Quick(1, a=2)  # type: ignore[misc]


def test_a_class_it_does_not_fit_is_refused() -> None:
    @dataclasses.dataclass(frozen=True)
    class Later:
        a: int
        b: int = dataclasses.field(init=False, default=0)

    @dataclasses.dataclass(frozen=True)
    class KeywordOnly:
        a: int = dataclasses.field(kw_only=True)

    @dataclasses.dataclass(frozen=True)
    class Checked:
        a: int

        def __post_init__(self) -> None:
            pass

    @dataclasses.dataclass
    class Mutable:
        a: int

    for cls in (Later, KeywordOnly, Checked, Mutable):
        with pytest.raises(TypeError, match="quick_init does not fit"):
            quick_init(cls)


@pytest.mark.parametrize("cls", [Task, TaskContext, Delivery, Effects, SetValue, Arrival])
def test_the_classes_built_per_task_have_it(cls: type) -> None:
    """Built per task, per hand-out or per pipeline task's ack: quick_init's ``__init__`` (its
    own scope holds the slots' setters, or MISSING for a class without slots)."""
    assert cls.__init__.__qualname__ == f"{cls.__qualname__}.__init__"
    scope = cls.__init__.__globals__
    assert "MISSING" in scope and "__dataclass_builtins_object__" not in scope


def test_no_headers_is_an_empty_read_only_mapping_every_task_without_headers_shares() -> None:
    """NO_HEADERS is a dict underneath (``if headers``, ``in`` and ``get`` cost no Python call)
    but nothing may change it: it is every header-less task's headers at once."""
    assert Task(type="t", payload=None).headers is NO_HEADERS
    assert not NO_HEADERS and len(NO_HEADERS) == 0 and "x" not in NO_HEADERS
    assert NO_HEADERS.get("x", 5) == 5 and dict(NO_HEADERS) == {}
    assert hash(Task(type="t", payload=None, id="a")) == hash(Task(type="t", payload=None, id="a"))
    shared: Any = NO_HEADERS
    changes = [
        lambda: shared.__setitem__("x", 1),
        lambda: shared.__delitem__("x"),
        lambda: shared.update(x=1),
        lambda: shared.setdefault("x", 1),
        lambda: shared.pop("x", None),
        shared.popitem,
        shared.clear,
        lambda: shared.__ior__({"x": 1}),
    ]
    for change in changes:
        with pytest.raises(TypeError, match="read-only"):
            change()
    assert dict(NO_HEADERS) == {}


def test_the_classes_built_positionally_on_every_task_keep_their_field_order() -> None:
    """A Task, a Run, an ack's Settle and three events are built for every task with their
    arguments by position (runner.events.task_event, Runner._draft, the memory broker's
    hand-out, Attempts.begin and end): on Python 3.11 a class called with keywords gathers
    them in a dict first, about 1,600 instructions each. Reordering a field would put values in
    the wrong places silently: change those calls with it."""
    assert [f.name for f in dataclasses.fields(Task)] == [
        "type", "payload", "id", "attempt", "enqueued_at", "not_before", "history", "headers",
        "expires_at", "unique_key",
    ]  # fmt: skip
    assert [f.name for f in dataclasses.fields(Event)][:9] == [
        "name", "ts", "task_id", "type", "attempt", "duration_s", "queue_wait_s", "delay_s",
        "outcome",
    ]  # fmt: skip
    assert [f.name for f in dataclasses.fields(Run)][:5] == [
        "deadline", "cancelled", "interrupt", "on_timeout", "on_overrun",
    ]  # fmt: skip
    assert Settle._fields == ("delivery", "kind", "delay_s", "failure", "record", "effects")
    event = task_event(EventName.TASK_SUCCEEDED, "i", "t", 2, duration_s=0.5, outcome="succeeded")
    assert (event.task_id, event.type, event.attempt) == ("i", "t", 2)
    assert (event.duration_s, event.outcome, event.queue_wait_s) == (0.5, "succeeded", None)
    assert event.ts > 0
