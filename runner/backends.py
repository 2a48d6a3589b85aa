"""Brokers and dead-letter stores from the config: the composition root's half that builds them.

``create_broker`` builds the broker ``broker.kind`` names (a built-in, or a ``module:Class``
plug-in given the broker settings as keyword arguments, plus ``broker.options``), and
``create_dead_letter_store`` the store a non-durable broker writes its dead letters to. Used by
runner.app (a running pipeline) and runner.ops (operator commands on an existing queue).

May import: everything below the composition root (config, brokers, deadletter, loader).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

from runner.brokers.base import Broker
from runner.config.kinds import BROKER_ARGUMENTS
from runner.config.models import PipelineConfig
from runner.deadletter.file import FileDeadLetters
from runner.deadletter.memory import MemoryDeadLetters
from runner.deadletter.store import DeadLetterStore
from runner.errors import ConfigError, Problem
from runner.loader import check_arguments, load_class

#: The built-in broker kinds, by the class of each: imported when first used, so a memory
#: pipeline never imports redis. Any other ``broker.kind`` is itself a ``module:Class``.
BROKERS: dict[str, str] = {
    "memory": "runner.brokers.memory:MemoryBroker",
    "sqlite": "runner.brokers.sqlite.broker:SqliteBroker",
    "redis": "runner.brokers.redis.broker:RedisBroker",
}


def broker_class(config: PipelineConfig) -> type[Broker]:
    """The class ``broker.kind`` names, imported now; its capability flags say what it can do.

    Raises ConfigError (at ``broker.kind``) when it cannot be imported or lacks a flag or a
    method of the Broker protocol.
    """
    kind = config.broker.kind
    found = load_class(BROKERS.get(kind, kind), key="broker.kind", search_path=config.handler_paths)
    _require_members(found, Broker, "broker.kind", "a broker")
    return cast("type[Broker]", found)


def create_dead_letter_store(
    config: PipelineConfig, read_only: bool = False
) -> DeadLetterStore | None:
    """The store ``config.dead_letter`` asks for; None when the broker keeps its own.
    ``read_only``: for operator reads (a ``file`` store then creates and writes nothing).

    A ``module:Class`` store is built as ``Class(**dead_letter.options)``.
    """
    settings = config.dead_letter
    match settings.kind:
        case "memory" | None:
            return MemoryDeadLetters()
        case "file":
            if not settings.path:
                raise ConfigError(
                    [Problem("", "dead_letter.path", "required when dead_letter.kind is file")]
                )
            return FileDeadLetters(settings.path, int(settings.file_mode, 8), read_only)
        case "broker":
            return None
        case spec:
            found = load_class(spec, key="dead_letter.kind", search_path=config.handler_paths)
            _require_members(found, DeadLetterStore, "dead_letter.kind", "a dead-letter store")
            store: DeadLetterStore = _construct(found, {}, settings.options, "dead_letter")
            return store


def create_broker(
    config: PipelineConfig,
    on_reconnect: Callable[[int, BaseException | None], None] | None = None,
    read_only: bool = False,
) -> Broker:
    """A new broker built from ``config.broker`` (and ``config.dead_letter`` if not durable).

    Every broker class is called with keyword arguments: ``capacity``, ``enqueue_timeout``,
    ``overflow`` and ``visibility_timeout``; ``dead_letters`` (a DeadLetterStore) when it is not
    durable; then its own: ``path``, ``file_mode`` and ``read_only`` for sqlite, ``url``,
    ``namespace`` and ``on_reconnect`` for redis, and ``broker.options`` for a ``module:Class``.

    ``on_reconnect(attempt, error)`` is told about every reconnect attempt of brokers that
    hold a network connection (Redis). ``read_only``: for operator reads; a SQLite file is then
    opened read-only (an existing queue only, nothing written), and so is a ``file`` store.
    """
    settings = config.broker
    cls = broker_class(config)
    arguments: dict[str, Any] = {name: getattr(settings, name) for name in BROKER_ARGUMENTS}
    if not cls.durable:
        # dead_letter.kind "broker" on a broker that is not durable: an in-memory store.
        arguments["dead_letters"] = (
            create_dead_letter_store(config, read_only) or MemoryDeadLetters()
        )
    match settings.kind:  # the built-in kinds' own settings
        case "memory":
            pass
        case "sqlite":
            arguments["path"] = _required(settings.path, "broker.path", "sqlite")
            arguments["file_mode"] = int(settings.file_mode, 8)
            arguments["read_only"] = read_only
        case "redis":
            arguments["url"] = _required(settings.url, "broker.url", "redis")
            arguments["namespace"] = settings.namespace
            arguments["on_reconnect"] = on_reconnect
        case _:
            broker: Broker = _construct(cls, arguments, settings.options, "broker")
            return broker
    return cls(**arguments)


def _required(value: str | None, path: str, kind: str) -> str:
    if not value:
        raise ConfigError([Problem("", path, f"required when broker.kind is {kind}")])
    return value


def _require_members(cls: type[Any], protocol: type[Any], path: str, what: str) -> None:
    """ConfigError unless ``cls`` has every flag and method of ``protocol``."""
    members = [
        *protocol.__annotations__,
        *(name for name, value in vars(protocol).items() if callable(value)),
    ]
    missing = [name for name in members if not name.startswith("_") and not hasattr(cls, name)]
    if missing:
        spec = f"{cls.__module__}:{cls.__qualname__}"
        raise ConfigError(
            [Problem("", path, f"{spec} is not {what}: it has no {', '.join(missing)}")]
        )


def _construct(
    cls: type[Any], arguments: Mapping[str, Any], options: Mapping[str, Any], section: str
) -> Any:
    """``cls(**arguments, **options)`` for a ``module:Class`` kind; ConfigError (at
    ``SECTION.options``) when it does not take these or refuses their values (TypeError,
    ValueError). load_config checks the same (runner.config.rules), located in the file."""
    path = f"{section}.options"
    taken = sorted(set(arguments) & set(options))
    if taken:
        raise ConfigError(
            [Problem("", path, f"{', '.join(taken)}: a {section} key, not an option")]
        )
    check_arguments(cls, path, {**arguments, **options})
    try:
        return cls(**arguments, **options)
    except (TypeError, ValueError) as exc:
        spec = f"{cls.__module__}:{cls.__qualname__}"
        message = f"{spec} refused its settings: {type(exc).__name__}: {exc}"
        raise ConfigError([Problem("", path, message)]) from exc
