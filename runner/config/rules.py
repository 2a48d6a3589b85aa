"""Rules a config must meet beyond each field's own type and range: part of load_config.

- ``cross_field_problems``: settings that are valid alone but wrong together (errors).
- ``import_problems``: handlers, never_retry names and ``module:Class`` kinds must import (and a
  broker class declare its capability flags); runs on raw merged data too, so an import mistake
  is reported in the same run as a type or range mistake.
- ``warnings``: legal but probably unintended settings (a concurrency above ``workers``).

Each finding names the key path it is about; load_config turns the path into a file location.

Size: about 530 lines, over our 400: one function per cross-field rule (brokers, retries,
schedules, routing, process types, pipeline stages), all of which load_config runs together;
the pipeline stage rules (types, cycles, joins, on_dead) are the next to move into a module of
their own.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from runner.config.document import KeyPath, dotted
from runner.config.inputs import Inputs, Unknown
from runner.config.kinds import (
    BROKER_ARGUMENTS,
    BROKER_KINDS,
    BrokerFlags,
    default_dead_letter,
    is_class_kind,
)
from runner.config.models import KILL_GRACE_S, PROCESS_KEYS
from runner.errors import ConfigError
from runner.loader import (
    CLASS_PATTERN,
    EXCEPTION_PATTERN,
    HANDLER_PATTERN,
    check_arguments,
    load_class,
    load_handler,
    resolve_exception,
)
from runner.middleware.base import Middleware

if TYPE_CHECKING:
    from runner.config.models import PipelineConfig


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


def cross_field_problems(inputs: Inputs) -> list[Finding]:
    """Errors that involve more than one setting.

    Each rule reads its settings through ``inputs`` and is skipped when one of them is invalid
    (that is reported on its own), so the rules run on a partly invalid config too.
    """
    found: list[Finding] = []

    def judge(rule: Callable[..., Finding | None], *args: Any) -> None:
        try:
            finding = rule(inputs, *args)
        except Unknown:
            return
        if finding is not None:
            found.append(finding)

    judge(_needs, "broker", "redis", "url")
    judge(_needs, "broker", "sqlite", "path")
    judge(_needs, "dead_letter", "file", "path")
    judge(_durable_dead_letter)
    for index in range(_length(inputs, ("handler_paths",))):
        judge(_directory, index)
    places: list[tuple[KeyPath, str]] = [(("retry", "backoff"), "")]
    for name in _names(inputs, ("task_types",)):
        places.append((("task_types", name, "retry", "backoff"), name))
        judge(_timeout, name)
        for key in PROCESS_KEYS:
            judge(_process_only, name, key)
        judge(_kill_window, name)
    for path, name in places:
        judge(_backoff, path, name)
    for name in _names(inputs, ("schedules",)):
        judge(_scheduled_type, name)
    for index in range(len(_served(inputs))):
        judge(_served_type, index)
    for name in _names(inputs, ("task_types",)):
        for index in range(_length(inputs, ("task_types", name, "then"))):
            judge(_stage_type, name, index)
            judge(_join_fed, name, index)
        if _present(inputs, ("task_types", name, "on_dead")):
            judge(_on_dead_type, name)
    judge(_no_stage_cycle)
    judge(_served_here)
    if _present(inputs, ("simulate",)):
        for section in ("mix", "faults"):
            for name in _names(inputs, ("simulate", section)):
                judge(_declared, ("simulate", section, name))
        judge(_mix_weights)
        for name in _names(inputs, ("simulate", "faults")):
            judge(_latency, name)
    return found


def _names(inputs: Inputs, path: KeyPath) -> list[str]:
    try:
        return inputs.names(path)
    except Unknown:
        return []


def _length(inputs: Inputs, path: KeyPath) -> int:
    try:
        return len(inputs.value(path))
    except Unknown:
        return 0


def _present(inputs: Inputs, path: KeyPath) -> bool:
    try:
        return inputs.present(path)
    except Unknown:
        return False


def _needs(inputs: Inputs, section: str, kind: str, key: str) -> Finding | None:
    if _kind(inputs, section) == kind and not inputs.value((section, key)):
        return Finding((section, key), f"required when {section}.kind is {kind}")
    return None


def _kind(inputs: Inputs, section: str) -> str:
    kind = inputs.value((section, "kind"))
    if kind is None:  # dead_letter's default depends on the broker
        return default_dead_letter(inputs.value(("broker", "kind")))
    return str(kind)


def _durable(inputs: Inputs, kind: str) -> bool:
    """The broker kind's ``durable`` flag: known for a built-in, the class's own for a plug-in."""
    if kind in BROKER_KINDS:
        return BROKER_KINDS[kind].durable
    try:
        broker_class = load_class(kind, key="broker.kind", search_path=_search_path(inputs))
    except ConfigError:
        raise Unknown(("broker", "kind")) from None  # import_problems reports it
    return getattr(broker_class, "durable", None) is not False


def _search_path(inputs: Inputs) -> tuple[str, ...]:
    try:
        paths = inputs.value(("handler_paths",))
    except Unknown:
        return ()
    return tuple(p for p in paths if isinstance(p, str))


def _durable_dead_letter(inputs: Inputs) -> Finding | None:
    broker = _kind(inputs, "broker")
    if not _durable(inputs, broker):
        return None
    dead = _kind(inputs, "dead_letter")
    if dead == "broker":
        return None
    return Finding(
        ("dead_letter", "kind"),
        f"a {broker} broker keeps dead letters itself (kind: broker), so a record is "
        f"written in the same step that removes the task; {dead!r} is not allowed",
    )


def _directory(inputs: Inputs, index: int) -> Finding | None:
    directory = inputs.value(("handler_paths",))[index]
    try:
        if Path(directory).is_dir():
            return None
    except OSError as exc:  # a name too long for the file system, say
        return Finding(("handler_paths", index), f"{directory} is not a directory: {exc.strerror}")
    return Finding(("handler_paths", index), f"{directory} is not a directory")


def _timeout(inputs: Inputs, name: str) -> Finding | None:
    timeout = inputs.value(("task_types", name, "timeout"))
    visibility = inputs.value(("broker", "visibility_timeout"))
    if timeout < visibility:
        return None
    return Finding(
        ("task_types", name, "timeout"),
        f"{_seconds(timeout)} must be below broker.visibility_timeout "
        f"({_seconds(visibility)}), or the task is handed out again while it still runs",
    )


def _process_only(inputs: Inputs, name: str, key: str) -> Finding | None:
    if not inputs.present(("task_types", name, key)):
        return None
    execution = inputs.value(("task_types", name, "execution"))
    if execution == "process":
        return None
    return Finding(
        ("task_types", name, key),
        f"applies to execution: process types only (this type's execution is {execution}): "
        f"remove it, or set execution: process",
    )


def _kill_window(inputs: Inputs, name: str) -> Finding | None:
    """A process type's child is dead by timeout + kill_grace: that must come before its lease
    expires, or an orphan could still run beside the task's redelivery."""
    if inputs.value(("task_types", name, "execution")) != "process":
        return None
    timeout = inputs.value(("task_types", name, "timeout"))
    grace = inputs.value(("task_types", name, "kill_grace"))
    grace = KILL_GRACE_S if grace is None else grace
    visibility = inputs.value(("broker", "visibility_timeout"))
    if timeout + grace < visibility:
        return None
    return Finding(
        ("task_types", name, "timeout"),
        f"{_seconds(timeout)} plus kill_grace ({_seconds(grace)}) must be below "
        f"broker.visibility_timeout ({_seconds(visibility)}): a child still dying after its "
        "lease expired could run beside the task's redelivery",
    )


def _backoff(inputs: Inputs, path: KeyPath, name: str) -> Finding | None:
    """initial <= max, where a type's override falls back to retry.backoff key by key."""
    if name and not inputs.present(path):
        return None  # no override: retry.backoff is checked on its own
    initial, maximum = (_backoff_value(inputs, path, key) for key in ("initial", "max"))
    if initial <= maximum:
        return None
    return Finding(
        (*path, "initial"),
        f"{_seconds(initial)} is above backoff max ({_seconds(maximum)}); every delay would be max",
    )


def _backoff_value(inputs: Inputs, path: KeyPath, key: str) -> float:
    value = inputs.value((*path, key))
    if value is None:
        value = inputs.value(("retry", "backoff", key))
    return float(value)


def _declared(inputs: Inputs, path: KeyPath) -> Finding | None:
    declared = inputs.names(("task_types",), complete=True)
    name = str(path[-1])
    if name in declared:
        return None
    return Finding(path, _unknown_type(name, dict.fromkeys(declared)), at_key=True)


def _scheduled_type(inputs: Inputs, name: str) -> Finding | None:
    declared = inputs.names(("task_types",), complete=True)
    type_name = str(inputs.value(("schedules", name, "type")))
    if type_name in declared:
        return None
    return Finding(("schedules", name, "type"), _unknown_type(type_name, dict.fromkeys(declared)))


def _served_here(inputs: Inputs) -> Finding | None:
    kind = _kind(inputs, "broker")
    left_out = set(inputs.names(("task_types",), complete=True)) - set(_served(inputs))
    if not _served(inputs) or not left_out or is_class_kind(kind) or BROKER_KINDS[kind].shared:
        return None
    return Finding(
        ("types",),
        f"the {kind} broker's queue lives in this process: the types left out would never "
        "run (use sqlite or redis to split types across processes)",
    )


def _stage_type(inputs: Inputs, name: str, index: int) -> Finding | None:
    declared = inputs.names(("task_types",), complete=True)
    stage = inputs.value(("task_types", name, "then"))[index]
    if stage.type in declared:
        return None
    path = ("task_types", name, "then", index, "type")
    return Finding(path, _unknown_type(stage.type, dict.fromkeys(declared)))


def _on_dead_type(inputs: Inputs, name: str) -> Finding | None:
    declared = inputs.names(("task_types",), complete=True)
    target = inputs.value(("task_types", name, "on_dead")).type
    if target in declared:
        return None
    path = ("task_types", name, "on_dead", "type")
    return Finding(path, _unknown_type(target, dict.fromkeys(declared)))


def _join_fed(inputs: Inputs, name: str, index: int) -> Finding | None:
    """A join gathers a fan-out: the type it follows must be started by some ``each`` stage."""
    stage = inputs.value(("task_types", name, "then"))[index]
    if not stage.join:
        return None
    path = ("task_types", name, "then", index, "join")
    if stage.each is not None:
        return Finding(path, "a stage cannot both fan out (each) and join")
    names = inputs.names(("task_types",), complete=True)
    for other in names:
        for upstream in inputs.value(("task_types", other, "then")):
            if upstream.type == name and upstream.each is not None:
                return None
    return Finding(
        path,
        f"nothing fans out to {name!r} (no stage with each: starts it), so there is nothing "
        f"to join; add each: to the stage that starts {name!r}, or drop join",
    )


def _no_stage_cycle(inputs: Inputs) -> Finding | None:
    """A pipeline whose stages lead back to a type already in it would never end."""
    names = inputs.names(("task_types",), complete=True)
    edges = {n: [s.type for s in inputs.value(("task_types", n, "then"))] for n in names}
    for start in names:
        cycle = _cycle_from([start], edges)
        if cycle:
            where = ("task_types", cycle[0], "then")
            return Finding(where, f"the stages make a cycle: {' -> '.join(cycle)}")
    return None


def _cycle_from(path: list[str], edges: Mapping[str, list[str]]) -> list[str] | None:
    """A cycle reachable from ``path``'s last type, as the types around it, or None."""
    for nxt in edges.get(path[-1], ()):
        if nxt in path:
            return [*path[path.index(nxt) :], nxt]
        found = _cycle_from([*path, nxt], edges)
        if found:
            return found
    return None


def _served(inputs: Inputs) -> tuple[str, ...]:
    try:
        return tuple(inputs.value(("types",)) or ())
    except Unknown:
        return ()


def _served_type(inputs: Inputs, index: int) -> Finding | None:
    declared = inputs.names(("task_types",), complete=True)
    type_name = _served(inputs)[index]
    if type_name in declared:
        return None
    return Finding(("types", index), _unknown_type(type_name, dict.fromkeys(declared)))


def _mix_weights(inputs: Inputs) -> Finding | None:
    mix = inputs.value(("simulate", "mix"))
    if inputs.value(("simulate", "tasks")) > 0 and sum(mix.values()) == 0:
        return Finding(("simulate", "mix"), "needs at least one task type with a positive weight")
    return None


def _latency(inputs: Inputs, name: str) -> Finding | None:
    path = ("simulate", "faults", name, "latency")
    low, high = inputs.value(path)
    if low > high:
        return Finding(path, f"min ({_seconds(low)}) is above max ({_seconds(high)})")
    return None


def import_problems(data: Any) -> list[Finding]:
    """Import every handler and never_retry name found in (raw or dumped) config data."""
    if not isinstance(data, Mapping):
        return []
    paths = data.get("handler_paths")
    if not isinstance(paths, list | tuple):
        paths = ()  # malformed: reported by validation; import from the working directory only
    # One with a NUL character is reported by validation (imports would fail on it).
    search = tuple(p for p in paths if isinstance(p, str) and "\0" not in p)
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
    for section in ("broker", "dead_letter"):
        found += _plug_in_problems(section, data.get(section), search)
    found += _middleware_problems(data.get("middleware"), search)
    task_types = data.get("task_types")
    if isinstance(task_types, Mapping):
        for name, task_type in task_types.items():
            if isinstance(task_type, Mapping):
                path = ("task_types", name)
                execution = task_type.get("execution", "thread")
                load = partial(
                    load_handler,
                    execution=execution if execution in ("async", "process") else "thread",
                )
                check((*path, "handler"), task_type.get("handler"), HANDLER_PATTERN, load)
                check_names((*path, "retry"), task_type.get("retry"))
    return found


def _plug_in_problems(section: str, settings: Any, search: tuple[str, ...]) -> list[Finding]:
    """A ``module:Class`` kind must import, and be callable with the keyword arguments it will
    get (``SECTION.options`` and, for a broker, BROKER_ARGUMENTS and ``dead_letters`` when it is
    not durable). A broker class must also declare its capability flags."""
    if not isinstance(settings, Mapping) or not is_class_kind(settings.get("kind")):
        return []
    kind = settings["kind"]
    try:
        cls = load_class(kind, key=f"{section}.kind", search_path=search)
    except ConfigError as exc:
        return [Finding((section, "kind"), problem.message) for problem in exc.problems]
    given: tuple[str, ...] = ()
    if section == "broker":
        missing = [f for f in BrokerFlags._fields if not isinstance(getattr(cls, f, None), bool)]
        if missing:
            message = (
                f"{kind!r} declares no capability flag {', '.join(missing)} (subclass "
                "runner.brokers.base.BaseBroker, or set each to True or False)"
            )
            return [Finding((section, "kind"), message)]
        given = (*BROKER_ARGUMENTS, *(() if cls.durable else ("dead_letters",)))
    options = settings.get("options")
    if not isinstance(options, Mapping):
        options = {}  # malformed: reported by validation
    path = (section, "options") if options else (section, "kind")
    taken = sorted(set(given) & set(options))
    if taken:
        return [Finding(path, f"{', '.join(taken)}: a {section} key, not an option")]
    arguments = {**dict.fromkeys(given), **{str(k): v for k, v in options.items()}}
    try:
        check_arguments(cls, f"{section}.options", arguments)
    except ConfigError as exc:
        return [Finding(path, problem.message) for problem in exc.problems]
    return []


def _middleware_problems(entries: Any, search: tuple[str, ...]) -> list[Finding]:
    """Each ``middleware[i].use`` must import, name a Middleware subclass, and be callable with
    its ``options`` as keyword arguments."""
    if not isinstance(entries, list | tuple):
        return []  # malformed: reported by validation
    found: list[Finding] = []
    for index, entry in enumerate(entries):
        use = entry.get("use") if isinstance(entry, Mapping) else None
        if not isinstance(use, str) or not re.match(CLASS_PATTERN, use):
            continue  # reported by validation
        assert isinstance(entry, Mapping)
        path: KeyPath = ("middleware", index, "use")
        try:
            cls = load_class(use, key="middleware.use", search_path=search)
        except ConfigError as exc:
            found += [Finding(path, problem.message) for problem in exc.problems]
            continue
        if not issubclass(cls, Middleware):
            found.append(Finding(path, f"{use!r} is not a runner.middleware.Middleware subclass"))
            continue
        options = entry.get("options", {})
        if not isinstance(options, Mapping):
            continue  # malformed: reported by validation
        where: KeyPath = ("middleware", index, "options") if options else path
        try:
            check_arguments(cls, "options", {str(k): v for k, v in options.items()})
        except ConfigError as exc:
            found += [Finding(where, problem.message) for problem in exc.problems]
    return found


def warnings(config: PipelineConfig) -> list[str]:
    """Settings that are legal but probably not what was meant."""
    found: list[tuple[KeyPath, str]] = []
    for name, task_type in config.task_types.items():
        if (
            task_type.execution == "thread"  # async and process types take no threads
            and task_type.concurrency is not None
            and task_type.concurrency > config.workers
        ):
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
    for section, kind, options in (
        ("broker", broker.kind, broker.options),
        ("dead_letter", dead.kind, dead.options),
    ):
        if options and not is_class_kind(kind):
            found.append(
                (
                    (section, "options"),
                    f"ignored: {section}.kind is {kind}; options go to a module:Class kind only",
                )
            )
    if config.simulate is not None:
        for name in config.simulate.faults:
            if name in config.task_types and not config.simulate.mix.get(name):
                found.append(
                    (("simulate", "faults", name), "never used: the type has no weight in mix")
                )
    return [f"{dotted(path)}: {message}" for path, message in found]
