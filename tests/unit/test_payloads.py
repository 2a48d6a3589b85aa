"""Payload models from handler annotations: detection, messages, and the worker's check."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pydantic import BaseModel, Field

from runner.app import build_runtime
from runner.brokers.base import BrokerAdmin, DeadLetterFilter
from runner.config.load import load_config
from runner.errors import InputError, InvalidPayload, UsageError
from runner.middleware.payloads import (
    MAX_PAYLOAD_BYTES,
    PayloadValidation,
    check_payload,
    encoded_size,
    payload_model,
)
from runner.model import Task
from runner.ops.drafts import read_drafts

if TYPE_CHECKING:
    from runner.model import TaskContext


class Item(BaseModel):
    name: str
    count: int = Field(gt=0)


class Hidden(BaseModel):
    x: int


def typed(item: Item, ctx: Any) -> None: ...


def typed_by_string(item: "Item") -> None: ...  # noqa: UP037 - the string form is the test


def untyped(payload, ctx):  # type: ignore[no-untyped-def]
    return None


def optional(item: Item | None) -> None: ...


def dict_payload(payload: dict[str, Any], ctx: TaskContext) -> None: ...


class CallableHandler:
    def __call__(self, item: Item, ctx: Any) -> None: ...


def test_payload_model_is_read_from_the_first_parameter() -> None:
    assert payload_model(typed) is Item
    assert payload_model(typed_by_string) is Item
    assert payload_model(CallableHandler()) is Item
    assert payload_model(untyped) is None
    assert payload_model(optional) is None
    assert payload_model(dict_payload) is None  # TaskContext resolves; dict is no model


def test_an_unresolvable_annotation_means_no_validation() -> None:
    def handler(item: Missing) -> None: ...  # type: ignore[name-defined]  # noqa: F821

    assert payload_model(handler) is None


def test_check_payload_names_each_field_and_what_was_expected() -> None:
    assert check_payload(Item, {"name": "a", "count": 2}) == Item(name="a", count=2)
    with pytest.raises(InvalidPayload) as info:
        check_payload(Item, {"count": "many"})
    error = info.value
    assert isinstance(error, UsageError)
    assert error.model == "Item"
    fields = dict(error.fields)
    assert fields["name"] == "Field required"
    assert fields["count"].startswith("Input should be a valid integer")
    assert '(got "many")' in fields["count"]
    assert str(error).startswith("payload does not match Item: ")


def test_long_rejected_values_are_quoted_short() -> None:
    with pytest.raises(InvalidPayload) as info:
        check_payload(Item, {"name": "a", "count": "y" * 500})
    assert len(dict(info.value.fields)["count"]) < 200


def test_the_validation_middleware_refuses_at_publish_and_hands_the_model_to_the_handler() -> None:
    validation = PayloadValidation(Item)
    validation.on_publish("t", {"name": "a", "count": 1}, {})
    with pytest.raises(InvalidPayload):
        validation.on_publish("t", {"name": "a", "count": 0}, {})
    ctx: Any = None  # not read by this middleware
    assert validation.before_attempt(ctx, {"name": "a", "count": 1}) == Item(name="a", count=1)
    with pytest.raises(InvalidPayload):
        validation.before_attempt(ctx, {"name": "a"})


def test_encoded_size_counts_utf8_bytes() -> None:
    assert encoded_size({"a": "é"}) == len('{"a":"é"}'.encode())
    assert MAX_PAYLOAD_BYTES == 256 * 1024


def _memory_config(tmp_path: Path) -> Path:
    path = tmp_path / "typed.yaml"
    path.write_text(
        "broker: {kind: memory}\n"
        "workers: 2\n"
        "logging: {format: json, level: ERROR}\n"
        "metrics: {enabled: false}\n"
        "task_types:\n"
        "  order: {handler: handlers.typed:ship_order}\n"
    )
    return path


def test_read_drafts_reports_every_problem_located(tmp_path: Path) -> None:
    config = load_config(_memory_config(tmp_path))
    lines = [
        '{"type": "order", "payload": {"sku": "a", "quantity": 1}}',
        "[1, 2]",
        '{"type": "order", "payload": {"sku": "a", "quantity": -1}}',
    ]
    with pytest.raises(InputError) as info:
        read_drafts(config, None, None, lines, "jobs.jsonl")
    sources = [p.source for p in info.value.problems]
    assert sources == ["jobs.jsonl:2", "jobs.jsonl:3"]
    (draft,) = read_drafts(config, "order", '{"sku": "a", "quantity": 1}', None)
    assert draft.payload == {"sku": "a", "quantity": 1}
    with pytest.raises(UsageError, match="not both"):
        read_drafts(config, "order", None, lines)
    with pytest.raises(InputError, match="no tasks"):
        read_drafts(config, None, None, ["", "  "], "empty.jsonl")


def test_worker_dead_letters_an_invalid_payload_and_runs_the_valid_one(tmp_path: Path) -> None:
    config = load_config(_memory_config(tmp_path))
    runner = build_runtime(config, observe=False)
    broker = runner.broker
    assert isinstance(broker, BrokerAdmin)
    with runner:
        # Straight into the broker, as a producer that skips the check (or an older handler
        # version) would: the worker must still refuse it.
        bad_task = Task(type="order", payload={"sku": "", "quantity": "two"}, enqueued_at=1.0)
        runner.broker.put_many([bad_task])
        bad = bad_task.id
        runner.publish("order", {"sku": "a", "quantity": 2})
        assert runner.run_until_empty(timeout=10)
        (record,) = broker.dead_letters(DeadLetterFilter())
        totals = runner.summary.to_dict()["totals"]
    assert (totals["succeeded"], totals["dead"]) == (1, 1)
    assert record.id == bad
    assert record.reason == "invalid payload"
    assert record.error_type == "InvalidPayload"
    assert "sku" in record.message and "quantity" in record.message
