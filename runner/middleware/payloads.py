"""Payload checks: the size limit, and pydantic models declared by handler annotations.

A handler whose first parameter is annotated with a pydantic ``BaseModel`` subclass::

    class Order(BaseModel):
        sku: str
        qty: int = Field(gt=0)

    def ship(order: Order, ctx: TaskContext) -> None: ...

gets its payload validated twice: by ``dq-run publish`` (runner.ops.drafts: a bad payload is
refused, nothing is published) and by the worker before the handler runs (a bad payload that got
in another way goes to the dead-letter queue with reason ``invalid payload``; the worker lives
on). The handler then receives the model instance, not the raw dict. Payloads stay plain JSON
on the wire.

Only a plain ``BaseModel`` subclass counts: ``Order | None``, ``list[Order]`` or an annotation
that cannot be resolved (a name imported under ``TYPE_CHECKING`` only) means no validation.
"""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from runner.errors import InvalidPayload
from runner.middleware.base import Middleware
from runner.model import TaskContext

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


class PayloadValidation(Middleware):
    """The first built-in middleware: checks a type's payloads against its handler's model.

    At publish a bad payload is refused (nothing is put); before each attempt the payload is
    validated again (a bad one that got in another way is dead-lettered with reason ``invalid
    payload``, never run) and the handler receives the model instance.
    """

    def __init__(self, model: type[BaseModel]) -> None:
        self.model = model

    def on_publish(self, type_name: str, payload: Any, headers: dict[str, Any]) -> None:
        check_payload(self.model, payload)

    def before_attempt(self, ctx: TaskContext, payload: Any) -> Any:
        return check_payload(self.model, payload)


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
