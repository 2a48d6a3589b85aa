"""Payload checks: the size limit, and pydantic models declared by handler annotations.

A handler whose first parameter is annotated with a pydantic ``BaseModel`` subclass::

    class Order(BaseModel):
        sku: str
        qty: int = Field(gt=0)

    def ship(order: Order, ctx: TaskContext) -> None: ...

gets its payload validated twice: by ``dq-run publish`` (a bad payload is refused, nothing is
published) and by the worker before the handler runs (a bad payload that got in another way goes
to the dead-letter queue with reason ``invalid payload``; the worker lives on). The handler then
receives the model instance, not the raw dict. Payloads stay plain JSON on the wire.

``read_drafts`` checks publish input (``TYPE PAYLOAD_JSON`` or JSON Lines): the type is known,
the JSON parses, the payload fits ``MAX_PAYLOAD_BYTES`` and its model; it reports every problem,
located, before anything is published.

Only a plain ``BaseModel`` subclass counts: ``Order | None``, ``list[Order]`` or an annotation
that cannot be resolved (a name imported under ``TYPE_CHECKING`` only) means no validation.
"""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from runner.config import PipelineConfig
from runner.errors import InputError, InvalidPayload, Problem, UsageError
from runner.handlers import load_handler
from runner.simulate import SIM_KEY
from runner.task import TaskContext, to_json_bytes

#: The largest payload ``dq-run publish`` accepts, measured as compact UTF-8 JSON.
MAX_PAYLOAD_BYTES = 256 * 1024

#: How much of a rejected value an error message quotes.
_QUOTE_CHARS = 40


def encoded_size(payload: Any) -> int:
    """Bytes of ``payload`` as compact UTF-8 JSON (how brokers store it)."""
    return len(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode())


def payload_model(func: Callable[..., Any]) -> type[BaseModel] | None:
    """The BaseModel subclass ``func``'s first parameter is annotated with, or None."""
    try:
        parameters = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return None
    if not parameters:
        return None
    target = func if inspect.isfunction(func) or inspect.ismethod(func) else type(func).__call__
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable string annotations: documented as "no validation"
        return None
    hint = hints.get(parameters[0].name)
    if isinstance(hint, type) and issubclass(hint, BaseModel):
        return hint
    return None


def check_payload(model: type[BaseModel], payload: Any) -> BaseModel:
    """``payload`` as a ``model`` instance; raises InvalidPayload naming each bad field."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise InvalidPayload(model.__name__, _fields(exc)) from None


def payload_validator(model: type[BaseModel]) -> Callable[[Any], Any]:
    """The worker's ``validate_payload`` for ``model``: raw payload -> model instance.

    A simulated payload (it carries the simulator's fault plan under SIM_KEY) is checked without
    the plan and returned as it is, so the simulator can still read its plan; ``as_model`` then
    turns what the simulator passes on into the model.
    """

    def validate(payload: Any) -> Any:
        if isinstance(payload, dict) and SIM_KEY in payload:
            check_payload(model, {k: v for k, v in payload.items() if k != SIM_KEY})
            return payload
        return check_payload(model, payload)

    return validate


def as_model(
    handler: Callable[[Any, TaskContext], Any], model: type[BaseModel]
) -> Callable[[Any, TaskContext], Any]:
    """Wrap ``handler`` so it always receives a ``model`` instance (validating a raw dict)."""

    def run(payload: Any, ctx: TaskContext) -> Any:
        if not isinstance(payload, model):
            payload = check_payload(model, payload)
        return handler(payload, ctx)

    return run


@dataclass(frozen=True)
class Draft:
    """One checked task to publish, and where it came from (for messages)."""

    type: str
    payload: Any
    source: str  # "jobs.jsonl:3", "PAYLOAD_JSON"


def read_drafts(
    config: PipelineConfig,
    type_name: str | None,
    payload_json: str | None,
    lines: Iterable[str] | None,
    source: str = "-",
) -> list[Draft]:
    """Check ``TYPE [PAYLOAD_JSON]`` or JSON Lines input; raises InputError with every problem.

    ``lines`` (from ``--file``) excludes the positional form. Each line is an object
    ``{"type": ..., "payload": ...}``; blank lines are skipped. An omitted payload is ``{}``.
    """
    if lines is not None:
        if type_name is not None or payload_json is not None:
            raise UsageError("give either TYPE [PAYLOAD_JSON] or --file, not both")
        return _drafts_from_lines(config, lines, source)
    if type_name is None:
        raise UsageError("missing TYPE (or --file FILE for JSON Lines)")
    problems: list[Problem] = []
    payload: Any = {}
    if payload_json is not None:
        try:
            payload = _loads(payload_json)
        except ValueError as exc:
            raise InputError([Problem("PAYLOAD_JSON", "", f"invalid JSON: {exc}")]) from None
    problems += _check(config, type_name, payload, "TYPE", "PAYLOAD_JSON")
    if problems:
        raise InputError(problems)
    return [Draft(type_name, payload, "PAYLOAD_JSON")]


def _drafts_from_lines(config: PipelineConfig, lines: Iterable[str], source: str) -> list[Draft]:
    drafts: list[Draft] = []
    problems: list[Problem] = []
    for number, line in enumerate(lines, start=1):
        where = f"{source}:{number}"
        if not line.strip():
            continue
        try:
            item = _loads(line)
        except ValueError as exc:
            problems.append(Problem(where, "", f"invalid JSON: {exc}"))
            continue
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            problems.append(Problem(where, "", 'expected {"type": "...", "payload": ...}'))
            continue
        extra = sorted(set(item) - {"type", "payload"})
        if extra:
            problems.append(Problem(where, extra[0], "unknown key (only type and payload)"))
            continue
        payload = item.get("payload", {})
        found = _check(config, item["type"], payload, where, where)
        problems += found
        if not found:
            drafts.append(Draft(item["type"], payload, where))
    if problems:
        raise InputError(problems)
    if not drafts:
        raise InputError([Problem(source, "", "no tasks in the input")])
    return drafts


def _loads(text: str) -> Any:
    """json.loads without the standard library's NaN / Infinity extension (JSON has neither)."""
    return json.loads(text, parse_constant=_refuse_constant)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (use null, a number or a string)")


def _reason(exc: ValueError) -> str:
    if isinstance(exc, UnicodeError) and "surrogate" in str(exc):
        return "a string holds a lone surrogate (\\ud800-\\udfff), which UTF-8 cannot carry"
    return str(exc)


def _check(
    config: PipelineConfig, type_name: str, payload: Any, type_at: str, payload_at: str
) -> list[Problem]:
    if type_name not in config.task_types:
        known = ", ".join(sorted(config.task_types))
        return [Problem(type_at, "type", f"unknown task type {type_name!r} (known: {known})")]
    try:
        size = len(to_json_bytes(payload))
    except ValueError as exc:  # the codec refuses what JSON cannot carry (lone surrogates)
        return [Problem(payload_at, "payload", f"cannot be encoded as JSON: {_reason(exc)}")]
    if size > MAX_PAYLOAD_BYTES:
        return [
            Problem(
                payload_at,
                "payload",
                f"{size} bytes encoded, over the limit of {MAX_PAYLOAD_BYTES} bytes",
            )
        ]
    model = _model_for(config, type_name)
    if model is None:
        return []
    try:
        check_payload(model, payload)
    except InvalidPayload as exc:
        return [
            Problem(payload_at, f"payload.{path}" if path else "payload", f"{msg} [{exc.model}]")
            for path, msg in exc.fields
        ]
    return []


def _model_for(config: PipelineConfig, type_name: str) -> type[BaseModel] | None:
    # load_handler is cheap after the first import (load_config already imported every handler).
    spec = config.task_types[type_name]
    return payload_model(load_handler(spec.handler, search_path=config.handler_paths).func)


def _fields(exc: ValidationError) -> list[tuple[str, str]]:
    out = []
    for error in exc.errors(include_url=False):
        path = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"])
        if error["type"] != "missing":
            message += f" (got {_quote(error['input'])})"
        out.append((path, message))
    return out


def _quote(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= _QUOTE_CHARS else text[: _QUOTE_CHARS - 3] + "..."
