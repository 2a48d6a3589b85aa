"""Pipeline hand-offs (issue 23): a type's ``then:`` stages start their tasks with the parent's
ack; fan-out over a list of its return value, ids derived from the parent's; joins fire once with
every part in order, a dead part dead-letters its join until it is replayed; ``on_dead``."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner import PipelineConfig, build_runtime
from runner.brokers.base import Answer, DeadLetterFilter, Settle
from runner.brokers.memory import MemoryBroker
from runner.deadletter.memory import MemoryDeadLetters
from runner.engine.handoff import Pipeline, Stage, child_id, on_dead, on_success
from runner.errors import PermanentError
from runner.events import Event
from runner.model import DeadLetter, Task
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
    made = on_success(parent, value, Pipeline(stages), now=100.0)[0]
    assert [(t.type, t.payload) for t in made] == [
        ("resize", "a"),
        ("resize", "b"),
        ("notify", value),
    ]
    assert [t.id for t in made] == [child_id(parent.id, i) for i in range(3)]
    lineage = {"root_id": "r00t", "parent_id": parent.id}
    group = f"{parent.id}.0"
    assert [t.headers for t in made] == [
        {**lineage, "fanout": [group, 0, 2]},
        {**lineage, "fanout": [group, 1, 2]},
        lineage,
    ]
    alone = on_success(Task("fetch", {}), 5, Pipeline((Stage("notify"),)), 0.0)[0][0]
    assert alone.headers["root_id"]


def test_a_stage_that_cannot_be_made_fails_the_parent_for_good() -> None:
    parent = Task("fetch", {})
    with pytest.raises(PermanentError, match="has no list there"):
        on_success(parent, {"images": "one"}, Pipeline((Stage("resize", each="images"),)), 0.0)
    with pytest.raises(PermanentError, match="more than its max_fanout"):
        on_success(parent, {"images": [1, 2, 3]}, Pipeline((Stage("resize", "images", 2),)), 0.0)


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
    assert all(
        {k: h[k] for k in ("root_id", "parent_id")} == {"root_id": root, "parent_id": root}
        for *_, h in flow_handlers.recorded
    )
    summary = runner.summary.to_dict()
    assert summary["totals"]["published"] == 2 + 4  # the children count as published
    assert [(r.id, r.reason) for r in dead] == [(broken, "permanent")]
    assert "has no list there" in dead[0].message


@pytest.mark.parametrize(
    "kind", ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)]
)
def test_a_return_value_that_is_not_json_dead_letters_its_parent_alone(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A stage's payload is its parent's return value: one that is not JSON fails that parent
    for good, in its own attempt, and the tasks settled in the same batch hand off as usual
    (it used to fail the whole batch's settle, every time it was redelivered)."""
    broker: dict[str, object] = {}
    if kind == "sqlite":
        broker = {"kind": "sqlite", "path": str(tmp_path / "q.db")}
    elif kind == "redis":
        server = request.getfixturevalue("redis_server")
        broker = {"kind": "redis", "url": server.url,
                  "namespace": request.getfixturevalue("redis_namespace")}  # fmt: skip
    record = "tests.unit.flow_handlers:record"
    config = PipelineConfig.model_validate(
        {
            "broker": broker,
            "workers": 4,
            "task_types": {
                "odd": {
                    "handler": "tests.unit.flow_handlers:unjsonable",
                    "then": [{"type": "next"}],
                },
                "even": {"handler": "tests.unit.flow_handlers:echo", "then": [{"type": "next"}]},
                "next": {"handler": record},
            },
        }
    )
    flow_handlers.recorded.clear()
    runner = build_runtime(config, observe=False)
    with runner:
        bad = runner.publish("odd", None)
        good = [runner.publish("even", n) for n in range(6)]
        assert runner.run_until_empty(timeout=30) is True
        dead = runner.broker.dead_letters(DeadLetterFilter())  # type: ignore[attr-defined]
    assert sorted(p for t, _, p, _ in flow_handlers.recorded) == list(range(6))
    assert {h["parent_id"] for *_, h in flow_handlers.recorded} == set(good)
    assert [(r.id, r.reason) for r in dead] == [(bad, "permanent")]
    assert "is not JSON" in dead[0].message


def _joining(broker: dict[str, object]) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "broker": broker,
            "retry": {"max_attempts": 1},
            "task_types": {
                "fetch": {
                    "handler": "tests.unit.flow_handlers:fetch_order",
                    "then": [{"type": "resize", "each": "images"}],
                },
                "resize": {
                    "handler": "tests.unit.flow_handlers:shrink",
                    "then": [{"type": "report", "join": True}],
                },
                "report": {"handler": "tests.unit.flow_handlers:record"},
            },
        }
    )


def _broker(kind: str, tmp_path: Path) -> dict[str, object]:
    return {"kind": "sqlite", "path": str(tmp_path / "q.db")} if kind == "sqlite" else {}


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_join_fires_once_with_every_part_in_order(kind: str, tmp_path: Path) -> None:
    flow_handlers.recorded.clear()
    flow_handlers.refused.clear()
    images = [f"{i}.png" for i in range(10)]
    with build_runtime(_joining(_broker(kind, tmp_path)), observe=False) as runner:
        roots = [runner.publish("fetch", {"order": n, "images": images}) for n in range(3)]
        assert runner.run_until_empty(timeout=60) is True
    reports = [(i, p, h) for t, i, p, h in flow_handlers.recorded if t == "report"]
    assert len(reports) == 3
    assert sorted(h["root_id"] for *_, h in reports) == sorted(roots)
    for _, payload, headers in reports:
        assert payload == [f"{i}.png-small" for i in range(10)]
        assert headers["parent_id"] == headers["root_id"]  # under the task that fanned out


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_dead_part_dead_letters_its_join_until_it_is_replayed(kind: str, tmp_path: Path) -> None:
    flow_handlers.recorded.clear()
    flow_handlers.refused.clear()
    flow_handlers.refused.add("1.png")
    images = ["0.png", "1.png", "2.png"]
    with build_runtime(_joining(_broker(kind, tmp_path)), observe=False) as runner:
        runner.publish("fetch", {"order": 1, "images": images})
        assert runner.run_until_empty(timeout=60) is True
        admin = runner.broker
        dead = {r.task.type: r for r in admin.dead_letters(DeadLetterFilter())}  # type: ignore[attr-defined]
        assert set(dead) == {"resize", "report"}
        assert dead["report"].reason == "upstream dead"
        assert dead["resize"].id in dead["report"].message
        assert not [t for t, *_ in flow_handlers.recorded if t == "report"]

        flow_handlers.refused.clear()
        assert admin.replay([dead["resize"].id]) == 1  # type: ignore[attr-defined]
        assert runner.run_until_empty(timeout=60) is True
        left = admin.dead_letters(DeadLetterFilter())  # type: ignore[attr-defined]
    assert left == []  # the join's record went when it fired
    reports = [p for t, _, p, _ in flow_handlers.recorded if t == "report"]
    assert reports == [["0.png-small", "1.png-small", "2.png-small"]]


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_on_dead_starts_a_task_with_the_record(kind: str, tmp_path: Path) -> None:
    flow_handlers.recorded.clear()
    config = PipelineConfig.model_validate(
        {
            "broker": _broker(kind, tmp_path),
            "task_types": {
                "charge": {
                    "handler": "tests.unit.flow_handlers:refuse",
                    "retry": {"never_retry": ["ValueError"]},
                    "on_dead": {"type": "refund"},
                },
                "refund": {"handler": "tests.unit.flow_handlers:record"},
            },
        }
    )
    with build_runtime(config, observe=False) as runner:
        charged = runner.publish("charge", {"amount": 5})
        assert runner.run_until_empty(timeout=30) is True
    ((kind_, _, payload, headers),) = flow_handlers.recorded
    assert kind_ == "refund"
    assert payload["task"]["id"] == charged
    assert payload["task"]["payload"] == {"amount": 5}
    assert (payload["reason"], payload["error_type"]) == ("never_retry", "ValueError")
    assert headers["root_id"] == headers["parent_id"] == charged


def test_a_replayed_task_that_dies_again_starts_its_on_dead_task_again() -> None:
    # Replay resets attempts: a second death at the same attempt number once made the same
    # on_dead task id, whose put a broker skips while the first one is still queued: the
    # second refund would never run. Each death's record makes its own.
    broker = MemoryBroker(
        capacity=10, enqueue_timeout=0, overflow="reject", visibility_timeout=30,
        dead_letters=MemoryDeadLetters(),
    )  # fmt: skip
    pipeline = Pipeline(on_dead="refund")
    broker.put_many([Task("charge", {"amount": 5}, id="c1")])
    for death in (1, 2):
        (delivery,) = broker.get({"charge": 1}, 1, 0)
        task = delivery.task
        record = DeadLetter(task, "never_retry", "E", "m", "", 1, 0.0, 0.0, 1000.0 + death)
        effects = on_dead(task, record, pipeline, 1000.0 + death)
        op = Settle(delivery, "dead", record=record, effects=effects)
        assert broker.settle_many([op]) == [Answer.DONE]
        if death == 1:
            assert broker.replay(["c1"]) == 1
    refunds = broker.get({"refund": 5}, 5, 0)
    assert len(refunds) == 2
    assert len({d.task.id for d in refunds}) == 2


def test_pipeline_mistakes_are_config_errors_with_their_place(tmp_path: Path) -> None:
    from runner.config.load import load_config
    from runner.errors import ConfigError

    path = tmp_path / "p.yaml"
    path.write_text(
        "task_types:\n"
        "  fetch:\n"
        "    handler: tests.unit.flow_handlers:fetch_order\n"
        "    then: [{type: resize}, {type: report, each: images, join: true}]\n"
        "    on_dead: {type: refnud}\n"
        "  resize:\n"
        "    handler: tests.unit.flow_handlers:shrink\n"
        "    then: [{type: report, join: true}]\n"
        "  report:\n"
        "    handler: tests.unit.flow_handlers:record\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    found = sorted(str(p) for p in info.value.problems)
    assert len(found) == 3, found
    assert found[0].startswith(f"{path}:4:")
    assert "task_types.fetch.then[1].join: a stage cannot both fan out" in found[0]
    assert found[1].startswith(f"{path}:5:")
    assert "task_types.fetch.on_dead.type:" in found[1] and "refnud" in found[1]
    assert found[2].startswith(f"{path}:8:")
    assert "task_types.resize.then[0].join: nothing fans out to 'resize'" in found[2]


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_cancel_revokes_a_whole_pipeline(kind: str, tmp_path: Path) -> None:
    """Queued tasks of the root are dead-lettered (cancelled), the running one sees
    ctx.cancelled and its success starts nothing; replaying resumes the pipeline."""
    from runner.engine.handoff import CANCEL_PREFIX, before_replay
    from runner.ops.pipelines import trace

    flow_handlers.recorded.clear()
    flow_handlers.patient_started.clear()
    flow_handlers.patient_wait_s = 10.0
    config = PipelineConfig.model_validate(
        {
            "broker": _broker(kind, tmp_path),
            "workers": 1,
            "task_types": {
                "fetch": {
                    "handler": "tests.unit.flow_handlers:fetch_order",
                    "then": [{"type": "wait", "each": "images"}],
                },
                "wait": {
                    "handler": "tests.unit.flow_handlers:patient",
                    "timeout": 20,
                    "then": [{"type": "notify"}],
                },
                "notify": {"handler": "tests.unit.flow_handlers:record"},
            },
        }
    )
    with build_runtime(config, observe=False) as runner:
        root = runner.publish("fetch", {"order": 1, "images": ["a", "b", "c"]})
        other = runner.publish("fetch", {"order": 2, "images": []})
        assert flow_handlers.patient_started.wait(20)
        cancelled = runner.cancel(root)
        assert runner.run_until_empty(timeout=30) is True
        broker = runner.broker
        dead = broker.dead_letters(DeadLetterFilter())  # type: ignore[attr-defined]
        # The two waits not started: dead-lettered by the broker (queued) or by the worker
        # (prefetched) as they were about to start. The running one finished.
        assert set(cancelled) <= {r.id for r in dead}
        assert len(dead) == 2
        assert {r.reason for r in dead} == {"cancelled"}
        ran = [(t, h.get("cancelled")) for t, _, _, h in flow_handlers.recorded]
        assert ran == [("wait", True)]  # and no notify: its hand-off was skipped
        if kind == "sqlite":
            (tree,) = trace(broker, root)
            assert (tree.type, tree.state) == ("fetch", "succeeded")
            states = sorted(child.state for child in tree.children)
            assert states == ["dead (cancelled)", "dead (cancelled)", "succeeded"]
            assert trace(broker, other)[0].children == []

        # Replaying the cancelled tasks lifts the cancel: they run and hand off again.
        flow_handlers.recorded.clear()
        before_replay(broker, dead)  # type: ignore[arg-type]
        assert broker.read_values([CANCEL_PREFIX + root]) == {}
        assert runner.cancel_watch is not None
        runner.cancel_watch.look()  # what a process sees within a second
        assert broker.replay([r.id for r in dead]) == 2  # type: ignore[attr-defined]
        flow_handlers.patient_started.clear()
        flow_handlers.patient_wait_s = 0.05
        assert flow_handlers.patient_started.wait(20)
        runner.cancel("an unrelated root")  # does not touch this pipeline
        assert runner.run_until_empty(timeout=60) is True
    flow_handlers.patient_wait_s = 10.0
    kinds = sorted(t for t, *_ in flow_handlers.recorded)
    assert kinds == ["notify", "notify", "wait", "wait"]


def test_replay_at_start_skips_a_join_whose_part_died(tmp_path: Path) -> None:
    """``dq-run run --replay`` (Runner.replay_dead_letters) puts the dead part back, not the
    join's own record: the join fires once, from the part's success."""
    flow_handlers.recorded.clear()
    flow_handlers.refused.clear()
    flow_handlers.refused.add("1.png")
    config = _joining(_broker("sqlite", tmp_path))
    with build_runtime(config, observe=False) as runner:
        runner.publish("fetch", {"order": 1, "images": ["0.png", "1.png"]})
        assert runner.run_until_empty(timeout=60) is True
    flow_handlers.refused.clear()
    with build_runtime(config, observe=False) as runner:
        assert runner.replay_dead_letters() == 1
        assert runner.run_until_empty(timeout=60) is True
        left = runner.broker.dead_letters(DeadLetterFilter())  # type: ignore[attr-defined]
    assert left == []
    reports = [p for t, _, p, _ in flow_handlers.recorded if t == "report"]
    assert reports == [["0.png-small", "1.png-small"]]


def test_ctx_logger_lines_of_a_pipeline_task_carry_its_lineage() -> None:
    flow_handlers.recorded.clear()
    config = PipelineConfig.model_validate(
        {
            "task_types": {
                "first": {
                    "handler": "tests.unit.flow_handlers:log_lineage",
                    "then": [{"type": "second"}],
                },
                "second": {"handler": "tests.unit.flow_handlers:log_lineage"},
            }
        }
    )
    with build_runtime(config, observe=False) as runner:
        root = runner.publish("first", {})
        assert runner.run_until_empty(timeout=30) is True
    fields = {kind: extra for kind, _, _, extra in flow_handlers.recorded}
    assert "root_id" not in fields["first"]  # a root: no lineage to tell
    assert (fields["second"]["root_id"], fields["second"]["parent_id"]) == (root, root)
    assert fields["second"]["type"] == "second"  # the usual fields are kept


def test_the_events_of_a_pipeline_task_carry_its_lineage_and_a_roots_do_not() -> None:
    """Logs, metrics and the trace read lineage off the events: every event about a task that
    another started (started, succeeded, dead) names its root and its parent."""
    config = PipelineConfig.model_validate(
        {
            "retry": {"max_attempts": 1},
            "task_types": {
                "first": {
                    "handler": "tests.unit.flow_handlers:echo",
                    "then": [{"type": "second"}, {"type": "third"}],
                },
                "second": {"handler": "tests.unit.flow_handlers:echo"},
                "third": {"handler": "tests.unit.flow_handlers:refuse"},
            },
        }
    )
    events: list[Event] = []
    with build_runtime(config, observe=False) as runner:
        runner.events.subscribe(_Recorder(events))
        root = runner.publish("first", {})
        assert runner.run_until_empty(timeout=30) is True
    seen = {(e.type, str(e.name)): (e.root_id, e.parent_id) for e in events if e.task_id}
    for name in ("task.started", "task.succeeded"):
        assert seen[("first", name)] == (None, None)
        assert seen[("second", name)] == (root, root)
    assert seen[("third", "task.dead")] == (root, root)


class _Recorder:
    def __init__(self, events: list[Event]) -> None:
        self.events = events

    def handle(self, event: Event) -> None:
        self.events.append(event)
