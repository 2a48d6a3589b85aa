"""Pipeline hand-offs (issue 23, first slice): a type's ``then:`` stages start their tasks with
the parent's ack; fan-out over a list of its return value; ids derived from the parent's."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner import PipelineConfig, build_runtime
from runner.brokers.base import DeadLetterFilter
from runner.engine.handoff import Stage, child_id, children
from runner.errors import PermanentError
from runner.model import Task
from tests.unit import flow_handlers


def test_a_childs_id_is_its_parents_and_its_index() -> None:
    parent = Task("fetch", {})
    ids = [child_id(parent.id, i) for i in range(1000)]
    assert len(set(ids)) == 1000
    assert ids == [child_id(parent.id, i) for i in range(1000)]  # the same every time
    assert all(len(i) == 32 and i[:12] == parent.id[:12] for i in ids)  # sorts by creation


def test_children_fan_out_over_a_list_and_carry_their_lineage() -> None:
    parent = Task("fetch", {}, headers={"root_id": "r00t"})
    stages = (Stage("resize", each="order.images"), Stage("notify"))
    value = {"order": {"images": ["a", "b"]}}
    made = children(parent, value, stages, now=100.0)
    assert [(t.type, t.payload) for t in made] == [
        ("resize", "a"),
        ("resize", "b"),
        ("notify", value),
    ]
    assert [t.id for t in made] == [child_id(parent.id, i) for i in range(3)]
    assert all(t.headers == {"root_id": "r00t", "parent_id": parent.id} for t in made)
    assert children(Task("fetch", {}), 5, (Stage("notify"),), 0.0)[0].headers["root_id"]


def test_a_stage_that_cannot_be_made_fails_the_parent_for_good() -> None:
    parent = Task("fetch", {})
    with pytest.raises(PermanentError, match="has no list there"):
        children(parent, {"images": "one"}, (Stage("resize", each="images"),), 0.0)
    with pytest.raises(PermanentError, match="more than its max_fanout"):
        children(parent, {"images": [1, 2, 3]}, (Stage("resize", "images", 2),), 0.0)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_pipeline_runs_its_stages_each_child_once(kind: str, tmp_path: Path) -> None:
    broker = {"kind": "sqlite", "path": str(tmp_path / "q.db")} if kind == "sqlite" else {}
    record = "tests.unit.flow_handlers:record"
    config = PipelineConfig.model_validate(
        {
            "broker": broker,
            "task_types": {
                "fetch": {
                    "handler": "tests.unit.flow_handlers:fetch_order",
                    "then": [{"type": "resize", "each": "images"}, {"type": "notify"}],
                },
                "resize": {"handler": record},
                "notify": {"handler": record},
            },
        }
    )
    flow_handlers.recorded.clear()
    runner = build_runtime(config, observe=False)
    with runner:
        root = runner.publish("fetch", {"order": 7, "images": ["a.png", "b.png", "c.png"]})
        broken = runner.publish("fetch", {"order": 8, "images": "not a list"})
        assert runner.run_until_empty(timeout=30) is True
        dead = runner.broker.dead_letters(DeadLetterFilter())  # type: ignore[attr-defined]
    ran = sorted((t, i, str(p)) for t, i, p, _ in flow_handlers.recorded)
    expected = [
        ("notify", child_id(root, 3), str({"order": 7, "images": ["a.png", "b.png", "c.png"]})),
        ("resize", child_id(root, 0), "a.png"),
        ("resize", child_id(root, 1), "b.png"),
        ("resize", child_id(root, 2), "c.png"),
    ]
    assert ran == sorted(expected)
    assert all(h == {"root_id": root, "parent_id": root} for *_, h in flow_handlers.recorded)
    summary = runner.summary.to_dict()
    assert summary["totals"]["published"] == 2 + 4  # the children count as published
    assert [(r.id, r.reason) for r in dead] == [(broken, "permanent")]
    assert "has no list there" in dead[0].message
