"""Brokers as plug-ins: capability flags, BaseBroker's defaults, and ``module:Class`` kinds.

The third-party classes live in tests/unit/plugin_brokers.py, a module outside the package, as a
user's would. The flags decide what the runner and the operator commands do; config knows the
built-in kinds' flags as data (runner.config.kinds), which must match the classes'.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from runner import build_runtime, load_config
from runner.backends import BROKERS, broker_class, create_broker
from runner.brokers.base import Answer, BaseBroker, Delivery, Depth, Settle
from runner.config.kinds import BROKER_KINDS, BrokerFlags
from runner.config.load import config_warnings
from runner.config.models import PipelineConfig
from runner.deadletter.memory import MemoryDeadLetters
from runner.errors import ConfigError, NotSupported
from runner.model import AttemptRecord, DeadLetter, Task
from runner.ops import admin
from runner.ops.leftover import forced_exit_line
from tests.integration import recording_handlers
from tests.unit.plugin_brokers import TaggedDeadLetters, WrappedBroker

PLUG_IN = "tests.unit.plugin_brokers"
FLAGS = BrokerFlags._fields

_CONFIG = """\
broker:
  kind: {kind}
  visibility_timeout: 5s
{more}workers: 3
retry: {{max_attempts: 2, backoff: {{initial: 10ms, max: 10ms}}}}
task_types:
  work: {{handler: tests.integration.recording_handlers:work, timeout: 2s}}
"""


def _write(tmp_path: Path, kind: str, more: str = "") -> Path:
    path = tmp_path / "plug.yaml"
    path.write_text(_CONFIG.format(kind=kind, more=more))
    return path


def _config(tmp_path: Path, kind: str, more: str = "") -> PipelineConfig:
    return load_config(_write(tmp_path, kind, more), environ={})


# -- the flags -----------------------------------------------------------------------------------


def _built_in(kind: str) -> PipelineConfig:
    broker: dict[str, Any] = {"kind": kind, "path": "q.db", "url": "redis://127.0.0.1:1/0"}
    return PipelineConfig.model_validate(
        {"broker": broker, "task_types": {"a": {"handler": "handlers.demo:send_email"}}}
    )


@pytest.mark.parametrize(
    ("kind", "flags"),
    [
        ("memory", BrokerFlags(False, False, True, True, gates_in_get=True, settle_effects=True)),
        ("sqlite", BrokerFlags(True, True, True, True, gates_in_get=True, settle_effects=True)),
        ("redis", BrokerFlags(True, True, True, False, gates_in_get=True, settle_effects=True)),
    ],
)
def test_each_built_in_broker_declares_its_flags_as_config_knows_them(
    kind: str, flags: BrokerFlags
) -> None:
    cls = broker_class(_built_in(kind))
    assert all(flag in vars(cls) for flag in FLAGS), "declared by the class itself"
    assert BrokerFlags(*(getattr(cls, flag) for flag in FLAGS)) == flags
    assert BROKER_KINDS[kind] == flags  # what config's defaults and rules go by
    assert issubclass(cls, BaseBroker)


def test_every_kind_config_accepts_has_a_class() -> None:
    assert set(BROKERS) == set(BROKER_KINDS)


@pytest.mark.parametrize(
    ("kind", "per_worker"),
    [("memory", 16), ("sqlite", 2), ("redis", 2), (f"{PLUG_IN}:WrappedBroker", 2)],
)
def test_the_prefetch_default_is_deep_only_on_a_broker_neither_durable_nor_shared(
    kind: str, per_worker: int
) -> None:
    # A module:Class broker is not imported for a default: BaseBroker's flags are assumed.
    assert _built_in(kind).effective_prefetch() == per_worker * 4


def test_the_dead_letter_default_follows_durable() -> None:
    assert _built_in("memory").dead_letter.kind == "memory"
    assert _built_in("sqlite").dead_letter.kind == "broker"
    # "broker" on a broker that is not durable: an in-memory store (see the pipeline test).
    assert _built_in(f"{PLUG_IN}:WrappedBroker").dead_letter.kind == "broker"


# -- BaseBroker's defaults -------------------------------------------------------------------


class _Minimal(BaseBroker):
    """The single calls only; every call is written to ``calls``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def _call(self, name: str, arg: Any, answer: Any = Answer.DONE) -> Any:
        self.calls.append((name, arg))
        return answer

    def put_many(self, tasks: Sequence[Task], timeout: float | None = None) -> None:
        self._call("put_many", tasks)

    def get(self, slots: Mapping[str, int], limit: int, timeout: float) -> list[Delivery]:
        return list(self._call("get", (dict(slots), limit, timeout), [_delivery("got")]))

    def ack(self, delivery: Delivery) -> Answer:
        return Answer(self._call("ack", delivery.receipt))

    def retry(self, delivery: Delivery, delay_s: float, failure: AttemptRecord) -> Answer:
        return Answer(self._call("retry", (delivery.receipt, delay_s, failure.message)))

    def dead(self, delivery: Delivery, record: DeadLetter) -> Answer:
        return Answer(self._call("dead", (delivery.receipt, record.reason), Answer.FENCED))

    def release(self, delivery: Delivery) -> Answer:
        return Answer(self._call("release", delivery.receipt, Answer.ALREADY_DONE))

    def extend(self, deliveries: Sequence[Delivery]) -> list[Answer]:
        return [Answer.DONE for _ in deliveries]

    def wake(self) -> None:
        pass

    def depth(self) -> dict[str, Depth]:
        return {}

    def close(self) -> None:
        pass


def _delivery(receipt: str) -> Delivery:
    return Delivery(task=Task(type="a", payload=None, attempt=1), receipt=receipt)


def _ops() -> list[Settle]:
    failure = AttemptRecord(1, "E", "boom", "", started_at=0.0, duration_s=0.0, worker="w")
    record = DeadLetter(_delivery("d").task, "max attempts", "E", "boom", "", 1, 0.0, 0.0, 0.0)
    return [
        Settle(_delivery("r1"), "release"),
        Settle(_delivery("a1"), "ack"),
        Settle(_delivery("t1"), "retry", delay_s=0.5, failure=failure),
        Settle(_delivery("d1"), "dead", record=record),
    ]


def test_base_broker_settle_many_makes_each_single_call_in_order() -> None:
    broker = _Minimal()
    answers = broker.settle_many(_ops())
    assert answers == [Answer.ALREADY_DONE, Answer.DONE, Answer.DONE, Answer.FENCED]
    assert broker.calls == [
        ("release", "r1"),
        ("ack", "a1"),
        ("retry", ("t1", 0.5, "boom")),
        ("dead", ("d1", "max attempts")),
    ]


def test_base_broker_exchange_settles_first_then_gets_without_blocking() -> None:
    broker = _Minimal()
    answers, deliveries = broker.exchange(_ops()[1:2], {"a": 3}, 2)
    assert answers == [Answer.DONE]
    assert [d.receipt for d in deliveries] == ["got"]
    assert broker.calls == [("ack", "a1"), ("get", ({"a": 3}, 2, 0))]


def test_base_broker_defaults_to_a_durable_shared_batching_broker() -> None:
    flags = (
        BaseBroker.durable,
        BaseBroker.shared,
        BaseBroker.batch_settles,
        BaseBroker.carry_settles,
    )
    assert flags == (True,) * 4


def test_a_base_broker_missing_a_call_cannot_be_built() -> None:
    class Partial(BaseBroker):
        def put_many(self, tasks: Sequence[Task], timeout: float | None = None) -> None:
            pass

    with pytest.raises(TypeError, match="abstract"):
        Partial()  # type: ignore[abstract]


# -- a module:Class broker, end to end -----------------------------------------------------------


@pytest.mark.parametrize("cls", ["WrappedBroker", "BatchingBroker"])
def test_a_plug_in_broker_runs_a_pipeline_from_yaml(tmp_path: Path, cls: str) -> None:
    """Retries and dead letters go through the plug-in; BaseBroker's settle_many and exchange
    carry the settles of a broker that asks for batches, and none of one that does not."""
    config = _config(tmp_path, f"{PLUG_IN}:{cls}", "  options: {label: from-yaml}\n")
    recording_handlers.reset()
    runner = build_runtime(config, observe=False)
    broker = runner.broker
    assert isinstance(broker, WrappedBroker) and type(broker).__name__ == cls
    assert broker.label == "from-yaml"
    assert isinstance(broker.dead_letters, MemoryDeadLetters)  # not durable: given a store
    with runner:
        runner.publish_many([("work", {"fail": i % 2}) for i in range(40)])
        runner.publish("work", {"bad": True})
        assert runner.run_until_empty(timeout=20)
    totals = runner.summary.to_dict()["totals"]
    assert (totals["succeeded"], totals["retried"], totals["dead"]) == (40, 21, 1)
    assert recording_handlers.CALLS["work:ok"] == 40
    assert broker.dead_letters.count() == 1
    settles = 40 + 21 + 1  # one per attempt: 20 retried once, the bad one retried then dead
    if broker.batch_settles:
        assert broker.batched_settles == settles
    else:
        assert broker.batched_settles == 0


def test_a_plug_in_store_is_built_with_its_options_for_a_broker_that_is_not_durable(
    tmp_path: Path,
) -> None:
    more = f"dead_letter: {{kind: '{PLUG_IN}:TaggedDeadLetters', options: {{tag: t1}}}}\n"
    broker = create_broker(_config(tmp_path, f"{PLUG_IN}:WrappedBroker", more))
    assert isinstance(broker, WrappedBroker)
    assert isinstance(broker.dead_letters, TaggedDeadLetters)
    assert broker.dead_letters.tag == "t1"


def test_a_durable_plug_in_keeps_its_own_dead_letters(tmp_path: Path) -> None:
    broker = create_broker(_config(tmp_path, f"{PLUG_IN}:DurableBroker"))
    assert isinstance(broker, WrappedBroker)
    assert broker.dead_letters is None


# -- what the runner and the operator commands do, by flag -----------------------------------


def test_a_broker_that_is_not_shared_refuses_other_processes(tmp_path: Path) -> None:
    config = _config(tmp_path, f"{PLUG_IN}:WrappedBroker")
    in_process = f"a {PLUG_IN}:WrappedBroker broker lives inside the one dq-run process"
    with pytest.raises(NotSupported, match=f"cannot publish: {in_process}"):
        admin.require_shared(config, "publish")
    with pytest.raises(NotSupported, match=f"no dead letters to read: {in_process}"):
        with admin.open_admin(config):
            pass


def test_a_shared_broker_is_reached_from_another_process(tmp_path: Path) -> None:
    config = _config(tmp_path, f"{PLUG_IN}:SharedBroker")
    admin.require_shared(config, "publish")
    admin.require_shared(config, "stats")
    with pytest.raises(NotSupported, match=f"the {PLUG_IN}:SharedBroker broker has no operator"):
        with admin.open_admin(config):
            pass


@pytest.mark.parametrize(
    ("cls", "line"),
    [
        ("WrappedBroker", "forced exit: nothing was left queued or running"),
        ("DurableBroker", f"unfinished tasks stay in the {PLUG_IN}:DurableBroker broker"),
    ],
)
def test_a_forced_exit_says_what_the_broker_keeps(tmp_path: Path, cls: str, line: str) -> None:
    config = _config(tmp_path, f"{PLUG_IN}:{cls}")
    runner = build_runtime(config, observe=False)
    runner.stop()
    assert line in forced_exit_line(runner, config, stopped=True)


# -- config errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "line", "message"),
    [
        (
            f"{PLUG_IN}:WrapedBroker",
            2,
            "broker.kind: module 'tests.unit.plugin_brokers' has no 'WrapedBroker' "
            "(did you mean 'WrappedBroker'?)",
        ),
        (
            "tests.unit.no_such_module:Broker",
            2,
            "broker.kind: cannot import module 'tests.unit.no_such_module'",
        ),
        (f"{PLUG_IN}:BUILT", 2, "broker.kind: 'tests.unit.plugin_brokers:BUILT' is not a class"),
        (
            f"{PLUG_IN}:FlaglessBroker",
            2,
            "declares no capability flag durable, shared, batch_settles, carry_settles, "
            "gates_in_get, settle_effects (subclass "
            "runner.brokers.base.BaseBroker",
        ),
        ("memroy", 2, "broker.kind: Input should be 'memory', 'sqlite' or 'redis', or a "),
        ("memroy", 2, "(got 'memroy'; did you mean 'memory'?)"),
    ],
)
def test_a_bad_broker_kind_is_located(tmp_path: Path, kind: str, line: int, message: str) -> None:
    path = _write(tmp_path, kind)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    found = [str(p) for p in caught.value.problems]
    assert any(p.startswith(f"{path}:{line}:") and message in p for p in found), found


@pytest.mark.parametrize(
    "broker",
    ["{kind: sqlite, path: q.db}", f"{{kind: '{PLUG_IN}:DurableBroker'}}"],
)
def test_a_plug_in_store_on_a_durable_broker_is_an_error(tmp_path: Path, broker: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        f"broker: {broker}\n"
        f"dead_letter: {{kind: '{PLUG_IN}:TaggedDeadLetters'}}\n"
        "task_types:\n  a: {handler: handlers.demo:send_email}\n"
    )
    with pytest.raises(ConfigError, match="broker keeps dead letters itself") as caught:
        load_config(path, environ={})
    assert str(caught.value).startswith(f"{path}:2:")


def test_a_bad_store_class_is_located(tmp_path: Path) -> None:
    more = f"dead_letter: {{kind: '{PLUG_IN}:TagedDeadLetters'}}\n"
    path = _write(tmp_path, f"{PLUG_IN}:WrappedBroker", more)
    with pytest.raises(ConfigError, match="did you mean 'TaggedDeadLetters'") as caught:
        load_config(path, environ={})
    assert str(caught.value).startswith(f"{path}:4:")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("{colour: red}", "got an unexpected keyword argument 'colour' (it takes capacity,"),
        ("{capacity: 5}", "broker.options: capacity: a broker key, not an option"),
    ],
)
def test_options_a_plug_in_cannot_take_are_located(
    tmp_path: Path, options: str, message: str
) -> None:
    path = _write(tmp_path, f"{PLUG_IN}:WrappedBroker", f"  options: {options}\n")
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        load_config(path, environ={})
    assert str(caught.value).startswith(f"{path}:4:")


def test_options_a_plug_in_cannot_take_fail_when_it_is_built_too() -> None:
    # A config built in code skips load_config's rules; building the broker still says why.
    config = PipelineConfig.model_validate(
        {
            "broker": {"kind": f"{PLUG_IN}:WrappedBroker", "options": {"colour": "red"}},
            "task_types": {"a": {"handler": "handlers.demo:send_email"}},
        }
    )
    with pytest.raises(ConfigError, match=r"broker\.options: .* unexpected keyword .*'colour'"):
        create_broker(config)


def test_a_class_that_is_not_a_broker_fails_when_it_is_built() -> None:
    config = PipelineConfig.model_validate(
        {
            "broker": {"kind": f"{PLUG_IN}:NotABroker"},
            "task_types": {"a": {"handler": "handlers.demo:send_email"}},
        }
    )
    with pytest.raises(ConfigError, match="is not a broker: it has no put_many, get, ack"):
        create_broker(config)


def test_options_on_a_built_in_kind_are_a_warning(tmp_path: Path) -> None:
    config = _config(tmp_path, "memory", "  options: {label: x}\n")
    assert config_warnings(config) == [
        "broker.options: ignored: broker.kind is memory; options go to a module:Class kind only"
    ]
