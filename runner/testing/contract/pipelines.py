"""Broker contract, pipelines: an effect put of a held id is skipped, a join's parts arrive with
their settles and its task is put once with the last of them (deleting the join's dead record),
``Effects.dead_letters`` and ``Effects.unless``, and the admin's ``tasks_of`` and ``cancel``.

Runs once per broker that ``broker_factory`` gives; skipped for a broker that does not declare
``settle_effects``.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest

from runner.brokers.base import (
    Answer,
    Arrival,
    Broker,
    DeadLetterFilter,
    Depth,
    Effects,
    PipelineAdmin,
    Settle,
    SetValue,
)
from runner.model import DeadReason, Task
from runner.testing.contract.fixtures import BrokerMaker
from runner.testing.contract.helpers import (
    ALL,
    GET_TIMEOUT_S,
    dead_record,
    get_one,
    put,
    task,
)

DONE = Answer.DONE


def _effective(make_broker: BrokerMaker, **settings: object) -> Broker:
    broker = make_broker(**settings)
    if not broker.settle_effects:
        pytest.skip(f"{type(broker).__name__} declares settle_effects = False")
    return broker


def _ack_with(broker: Broker, effects: Effects, type_: str = "a") -> None:
    """Puts a task of ``type_``, takes it and acks it with ``effects``."""
    put(broker, task(type_, "parent"))
    delivery = get_one(broker, type_, timeout=GET_TIMEOUT_S)
    assert broker.settle_many([Settle(delivery, "ack", effects=effects)]) == [DONE]


def _payloads(broker: Broker, type_: str) -> list[object]:
    return [d.task.payload for d in broker.get({type_: 100}, 100, 0)]


@pytest.mark.parametrize("state", ["ready", "delayed", "leased"])
def test_an_effect_put_of_a_held_id_is_skipped(make_broker: BrokerMaker, state: str) -> None:
    broker = _effective(make_broker)
    held = task("b", "first", not_before=broker.now() + 30 if state == "delayed" else 0.0)
    put(broker, held)
    if state == "leased":
        get_one(broker, "b")

    _ack_with(broker, Effects(puts=(replace(held, payload="second", not_before=0.0),)))
    expected = {"ready": Depth(ready=1), "delayed": Depth(delayed=1), "leased": Depth(leased=1)}
    assert broker.depth()["b"] == expected[state]
    if state == "ready":
        assert _payloads(broker, "b") == ["first"]


def test_an_effect_put_of_an_id_no_longer_held_is_put(make_broker: BrokerMaker) -> None:
    """Only a held id is skipped: one acked before is put again (fencing keeps a parent's ack
    from being applied twice; this is what lets an ack put its own task back)."""
    broker = _effective(make_broker)
    done = put(broker, task("b", "first"))[0]
    assert broker.ack(get_one(broker, "b")) == DONE
    _ack_with(broker, Effects(puts=(replace(done, payload="again"),)))
    assert _payloads(broker, "b") == ["again"]


def _arrival(index: int, size: int = 3, key: str = "join:g", joined: str = "joined") -> Arrival:
    return Arrival(
        key=key,
        index=index,
        size=size,
        value=json.dumps({"part": index}),
        task=Task(type="c", payload=None, id=joined, headers={"root_id": "r"}),
    )


def test_the_last_part_of_a_join_puts_its_task_with_every_part_in_order(
    make_broker: BrokerMaker,
) -> None:
    broker = _effective(make_broker)
    for index in (2, 0):
        _ack_with(broker, Effects(arrivals=(_arrival(index),)))
        assert broker.depth().get("c", Depth()) == Depth()
    _ack_with(broker, Effects(arrivals=(_arrival(1),)))

    joined = get_one(broker, "c", timeout=GET_TIMEOUT_S)
    assert joined.task.id == "joined"
    assert joined.task.payload == [{"part": 0}, {"part": 1}, {"part": 2}]
    assert joined.task.headers["root_id"] == "r"
    assert joined.task.attempt == 1


def test_a_part_that_arrives_twice_counts_once(make_broker: BrokerMaker) -> None:
    broker = _effective(make_broker)
    _ack_with(broker, Effects(arrivals=(_arrival(0, size=2),)))
    second = replace(_arrival(0, size=2), value='"later"')
    _ack_with(broker, Effects(arrivals=(second,)))
    assert broker.depth().get("c", Depth()) == Depth()  # one part of two

    _ack_with(broker, Effects(arrivals=(_arrival(1, size=2),)))
    assert _payloads(broker, "c") == [[{"part": 0}, {"part": 1}]]  # the first value kept


def test_joins_of_different_keys_are_apart(make_broker: BrokerMaker) -> None:
    broker = _effective(make_broker)
    _ack_with(broker, Effects(arrivals=(_arrival(0, size=2, key="join:x", joined="jx"),)))
    _ack_with(broker, Effects(arrivals=(_arrival(1, size=2, key="join:y", joined="jy"),)))
    assert broker.depth().get("c", Depth()) == Depth()
    _ack_with(broker, Effects(arrivals=(_arrival(1, size=2, key="join:x", joined="jx"),)))
    assert [d.task.id for d in broker.get({"c": 10}, 10, 0)] == ["jx"]


def test_delete_values_drops_the_parts_of_a_join(make_broker: BrokerMaker) -> None:
    broker = _effective(make_broker)
    _ack_with(broker, Effects(arrivals=(_arrival(0, size=2),)))
    assert broker.delete_values(["join:g"]) >= 0
    _ack_with(broker, Effects(arrivals=(_arrival(1, size=2),)))
    assert broker.depth().get("c", Depth()) == Depth()  # part 0 was dropped: one of two


def test_a_join_fires_once_its_dead_part_is_replaced_and_its_record_goes(
    make_broker: BrokerMaker,
) -> None:
    """A dead part dead-letters the join (``Effects.dead_letters``, written with the part's own
    record); when that part later arrives, the join fires and its record is deleted."""
    broker = _effective(make_broker)
    admin = make_broker.admin(broker)
    _ack_with(broker, Effects(arrivals=(_arrival(0, size=2),)))

    put(broker, task("a", "doomed"))
    doomed = get_one(broker, "a")
    join_record = replace(
        dead_record(doomed, reason=DeadReason.UPSTREAM_DEAD),
        task=_arrival(1, size=2).task,
    )
    effects = Effects(dead_letters=(join_record,))
    dies = Settle(doomed, "dead", record=dead_record(doomed), effects=effects)
    assert broker.settle_many([dies]) == [DONE]
    records = {r.id: r.reason for r in admin.dead_letters(DeadLetterFilter())}
    assert records == {doomed.task.id: "error", "joined": DeadReason.UPSTREAM_DEAD}

    # Written again (a second part died): still one record of the join.
    put(broker, task("a", "doomed too"))
    other = get_one(broker, "a")
    dies_too = Settle(other, "dead", record=dead_record(other), effects=effects)
    assert broker.settle_many([dies_too]) == [DONE]
    assert sorted(r.id for r in admin.dead_letters(DeadLetterFilter())).count("joined") == 1

    _ack_with(broker, Effects(arrivals=(_arrival(1, size=2),)))
    assert _payloads(broker, "c") == [[{"part": 0}, {"part": 1}]]
    assert "joined" not in {r.id for r in admin.dead_letters(DeadLetterFilter())}


def test_unless_skips_the_hand_offs_but_not_the_settle(make_broker: BrokerMaker) -> None:
    broker = _effective(make_broker)
    admin = make_broker.admin(broker)
    broker.set_values([SetValue("cancel:r", "1")])
    put(broker, task("a", "parent"))
    delivery = get_one(broker, "a")
    record = replace(dead_record(delivery), task=task("c", "joined"))
    effects = Effects(
        puts=(task("b", 1),),
        arrivals=(_arrival(0, size=1),),
        dead_letters=(record,),
        sets=(SetValue("result:x", "1"),),
        unless="cancel:r",
    )
    assert broker.settle_many([Settle(delivery, "ack", effects=effects)]) == [DONE]
    assert broker.depth().get("a", Depth()) == Depth()  # acked
    assert broker.depth().get("b", Depth()) == Depth()
    assert broker.depth().get("c", Depth()) == Depth()
    assert admin.dead_letters(DeadLetterFilter()) == []
    assert broker.read_values(["result:x"]) == {"result:x": "1"}

    # Without the key, the same effects apply.
    _ack_with(broker, replace(effects, unless="cancel:other", dead_letters=()))
    assert broker.depth()["b"] == Depth(ready=1)
    assert broker.depth()["c"] == Depth(ready=1)


def test_each_settle_in_a_batch_is_skipped_by_its_own_unless_key(
    make_broker: BrokerMaker,
) -> None:
    """Acks of several pipelines in one settle_many: only the one whose key is live starts
    nothing; a key set between the others' (or one whose ttl ran out) skips none of them."""
    broker = _effective(make_broker)
    broker.set_values([SetValue("cancel:r2", "1"), SetValue("cancel:r15", "1")])
    broker.set_values([SetValue("cancel:r35", "1", ttl_s=0.05)])
    time.sleep(0.2)
    put(broker, *(task("a", n) for n in (1, 2, 3, 4)))
    deliveries = broker.get({"a": 4}, 4, GET_TIMEOUT_S)
    assert len(deliveries) == 4
    roots = {1: "r1", 2: "r2", 3: "r3", 4: "r4"}
    ops = [
        Settle(
            d,
            "ack",
            effects=Effects(
                puts=(task("b", d.task.payload),), unless="cancel:" + roots[d.task.payload]
            ),
        )
        for d in deliveries
    ]
    assert broker.settle_many(ops) == [DONE] * 4
    assert sorted(_payloads(broker, "b")) == [1, 3, 4]  # type: ignore[type-var]


def _pipeline(broker: Broker) -> dict[str, Task]:
    """A root, three of its tasks (ready, delayed, leased) and a task of another root."""
    root = {"root_id": "r1"}
    made = {
        "root": task("a", "root", id="r1"),
        "ready": task("b", 1, headers={**root, "parent_id": "r1"}),
        "delayed": task("b", 2, headers=root, not_before=broker.now() + 60),
        "leased": task("c", 3, headers=root),
        "other": task("b", 4, headers={"root_id": "r2"}),
    }
    put(broker, *made.values())
    assert get_one(broker, "c").task.id == made["leased"].id
    return made


def test_tasks_of_lists_a_roots_queued_tasks_with_their_state(make_broker: BrokerMaker) -> None:
    broker = _effective(make_broker)
    admin = make_broker.admin(broker)
    assert isinstance(admin, PipelineAdmin)
    made = _pipeline(broker)

    listed = {q.task.id: q.state for q in admin.tasks_of("r1")}
    assert listed == {
        made["root"].id: "ready",
        made["ready"].id: "ready",
        made["delayed"].id: "delayed",
        made["leased"].id: "leased",
    }
    by_id = {q.task.id: q.task for q in admin.tasks_of("r1")}
    assert by_id[made["ready"].id].headers["parent_id"] == "r1"
    assert admin.tasks_of("nothing") == []


def test_cancel_dead_letters_a_roots_waiting_tasks(make_broker: BrokerMaker) -> None:
    broker = _effective(make_broker)
    admin = make_broker.admin(broker)
    assert isinstance(admin, PipelineAdmin)
    made = _pipeline(broker)
    leased = broker.get({"c": 1}, 1, 0)  # already out; nothing more to hand
    assert leased == []

    cancelled = admin.cancel("r1", "cancelled by a test")
    waiting = {made[k].id for k in ("root", "ready", "delayed")}
    assert set(cancelled) == waiting
    records = {r.id: r for r in admin.dead_letters(DeadLetterFilter())}
    assert set(records) == waiting
    for record in records.values():
        assert (record.reason, record.error_type) == (DeadReason.CANCELLED, "Cancelled")
        assert record.message == "cancelled by a test"
    assert broker.depth()["b"] == Depth(ready=1)  # the other root's
    assert broker.depth()["c"] == Depth(leased=1)  # left to its worker
    assert {q.task.id for q in admin.tasks_of("r1")} == {made["leased"].id}
    assert admin.cancel("r1", "again") == []

    # Reversible: a replay puts them back.
    assert admin.replay(sorted(waiting)) == 3
    assert {q.task.id for q in admin.tasks_of("r1")} == {*waiting, made["leased"].id}
    got = broker.get(ALL, 10, 0)
    assert {d.task.id for d in got} >= {made["root"].id, made["ready"].id}
