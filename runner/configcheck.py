"""Rules a config must meet beyond each field's own type and range: part of load_config.

- ``cross_field_problems``: settings that are valid alone but wrong together (errors).
- ``import_problems``: handlers and never_retry names must import; runs on raw merged data too,
  so an import mistake is reported in the same run as a type or range mistake.
- ``warnings``: legal but probably unintended settings (a concurrency above ``workers``).

Each finding names the key path it is about; load_config turns the path into a file location.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from runner.errors import ConfigError
from runner.handlers import EXCEPTION_PATTERN, HANDLER_PATTERN, load_handler, resolve_exception
from runner.yamlsource import KeyPath, dotted

if TYPE_CHECKING:
    from runner.config import PipelineConfig

_DURABLE = ("sqlite", "redis")


class Finding(NamedTuple):
    """One problem about one key; ``at_key`` points at the key itself rather than its value."""

    path: KeyPath
    message: str
    at_key: bool = False


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _unknown_type(name: str, declared: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(declared), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"declared: {', '.join(sorted(declared))}"
    return f"{name!r} is not a declared task type ({hint})"


def cross_field_problems(config: PipelineConfig) -> list[Finding]:
    """Errors that involve more than one setting."""
    found: list[Finding] = []
    broker = config.broker
    if broker.kind == "redis" and not broker.url:
        found.append(Finding(("broker", "url"), "required when broker.kind is redis"))
    if broker.kind == "sqlite" and not broker.path:
        found.append(Finding(("broker", "path"), "required when broker.kind is sqlite"))
    dead = config.dead_letter
    if dead.kind == "file" and not dead.path:
        found.append(Finding(("dead_letter", "path"), "required when dead_letter.kind is file"))
    if broker.kind in _DURABLE and dead.kind != "broker":
        found.append(
            Finding(
                ("dead_letter", "kind"),
                f"a {broker.kind} broker keeps dead letters itself (kind: broker), so a record is "
                f"written in the same step that removes the task; {dead.kind!r} is not allowed",
            )
        )
    for index, directory in enumerate(config.handler_paths):
        if not Path(directory).is_dir():
            found.append(Finding(("handler_paths", index), f"{directory} is not a directory"))
    found += _backoff_problems(config)
    for name, task_type in config.task_types.items():
        if task_type.timeout >= broker.visibility_timeout:
            found.append(
                Finding(
                    ("task_types", name, "timeout"),
                    f"{_seconds(task_type.timeout)} must be below broker.visibility_timeout "
                    f"({_seconds(broker.visibility_timeout)}), or the task is handed out again "
                    f"while it still runs",
                )
            )
    if config.simulate is not None:
        found += _simulate_problems(config)
    return found


def _backoff_problems(config: PipelineConfig) -> list[Finding]:
    found: list[Finding] = []
    places: list[tuple[KeyPath, str]] = [(("retry", "backoff"), "")]
    places += [
        (("task_types", name, "retry", "backoff"), name)
        for name, task_type in config.task_types.items()
        if task_type.retry is not None and task_type.retry.backoff is not None
    ]
    for path, name in places:
        backoff = config.retry_for(name).backoff if name else config.retry.backoff
        if backoff.initial > backoff.max:
            found.append(
                Finding(
                    (*path, "initial"),
                    f"{_seconds(backoff.initial)} is above backoff max "
                    f"({_seconds(backoff.max)}); every delay would be max",
                )
            )
    return found


def _simulate_problems(config: PipelineConfig) -> list[Finding]:
    simulate = config.simulate
    assert simulate is not None  # checked by the caller
    found: list[Finding] = []
    for section in ("mix", "faults"):
        for name in getattr(simulate, section):
            if name not in config.task_types:
                found.append(
                    Finding(
                        ("simulate", section, name),
                        _unknown_type(name, config.task_types),
                        at_key=True,
                    )
                )
    if simulate.tasks > 0 and sum(simulate.mix.values()) == 0:
        found.append(
            Finding(("simulate", "mix"), "needs at least one task type with a positive weight")
        )
    for name, faults in simulate.faults.items():
        low, high = faults.latency
        if low > high:
            found.append(
                Finding(
                    ("simulate", "faults", name, "latency"),
                    f"min ({_seconds(low)}) is above max ({_seconds(high)})",
                )
            )
    return found


def import_problems(data: Any) -> list[Finding]:
    """Import every handler and never_retry name found in (raw or dumped) config data."""
    if not isinstance(data, Mapping):
        return []
    paths = data.get("handler_paths")
    if not isinstance(paths, list | tuple):
        paths = ()  # malformed: reported by validation; import from the working directory only
    search = tuple(p for p in paths if isinstance(p, str))
    found: list[Finding] = []

    def check(path: KeyPath, value: Any, pattern: str, load: Any) -> None:
        if isinstance(value, str) and re.match(pattern, value):
            try:
                load(value, search_path=search)
            except ConfigError as exc:
                found.extend(Finding(path, problem.message) for problem in exc.problems)

    def check_names(path: KeyPath, retry: Any) -> None:
        names = retry.get("never_retry") if isinstance(retry, Mapping) else None
        if isinstance(names, list | tuple):
            for index, name in enumerate(names):
                check((*path, "never_retry", index), name, EXCEPTION_PATTERN, resolve_exception)

    check_names(("retry",), data.get("retry"))
    task_types = data.get("task_types")
    if isinstance(task_types, Mapping):
        for name, task_type in task_types.items():
            if isinstance(task_type, Mapping):
                path = ("task_types", name)
                check((*path, "handler"), task_type.get("handler"), HANDLER_PATTERN, load_handler)
                check_names((*path, "retry"), task_type.get("retry"))
    return found


def warnings(config: PipelineConfig) -> list[str]:
    """Settings that are legal but probably not what was meant."""
    found: list[tuple[KeyPath, str]] = []
    for name, task_type in config.task_types.items():
        if task_type.concurrency is not None and task_type.concurrency > config.workers:
            found.append(
                (
                    ("task_types", name, "concurrency"),
                    f"{task_type.concurrency} is above workers ({config.workers}); at most "
                    f"{config.workers} can run at once",
                )
            )
    broker = config.broker
    if broker.path and broker.kind != "sqlite":
        found.append((("broker", "path"), f"ignored: broker.kind is {broker.kind}, not sqlite"))
    if broker.url and broker.kind != "redis":
        found.append((("broker", "url"), f"ignored: broker.kind is {broker.kind}, not redis"))
    dead = config.dead_letter
    if dead.path and dead.kind != "file":
        found.append((("dead_letter", "path"), f"ignored: dead_letter.kind is {dead.kind}"))
    if config.simulate is not None:
        for name in config.simulate.faults:
            if name in config.task_types and not config.simulate.mix.get(name):
                found.append(
                    (("simulate", "faults", name), "never used: the type has no weight in mix")
                )
    return [f"{dotted(path)}: {message}" for path, message in found]
