"""Publish input, checked before anything is published (``dq-run publish``).

``read_drafts`` reads ``TYPE PAYLOAD_JSON`` or JSON Lines and checks each task: the type is
known, the JSON parses, the payload fits ``MAX_PAYLOAD_BYTES`` and the model its handler
declares (runner.middleware.payloads); it reports every problem, located, before anything is
published.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from runner.codec import to_json_bytes
from runner.config.models import PipelineConfig
from runner.errors import InputError, InvalidPayload, Problem, UsageError
from runner.loader import load_handler
from runner.middleware.payloads import MAX_PAYLOAD_BYTES, check_payload, payload_model


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
    return payload_model(
        load_handler(spec.handler, search_path=config.handler_paths, execution=spec.execution).func
    )
