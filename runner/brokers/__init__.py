"""Brokers: the protocol (``base``) and one module per backend, chosen by ``create_broker``.

Backends are imported lazily in their ``match`` arm, so a memory pipeline never imports redis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from runner.brokers.base import Broker, BrokerAdmin, DeadLetterFilter, Delivery, Depth
from runner.errors import ConfigError, Problem

if TYPE_CHECKING:
    from runner.config import PipelineConfig

__all__ = ["Broker", "BrokerAdmin", "DeadLetterFilter", "Delivery", "Depth", "create_broker"]


def create_broker(
    config: PipelineConfig,
    on_reconnect: Callable[[int, BaseException | None], None] | None = None,
    read_only: bool = False,
) -> Broker:
    """A new broker built from ``config.broker`` (and ``config.dead_letter`` for memory).

    ``on_reconnect(attempt, error)`` is told about every reconnect attempt of brokers that
    hold a network connection (Redis). ``read_only``: for operator reads; a SQLite file is then
    opened read-only (an existing queue only, nothing written).
    """
    settings = config.broker
    match settings.kind:
        case "memory":
            from runner.brokers.memory import MemoryBroker
            from runner.deadletter import MemoryDeadLetters, create_dead_letter_store

            # dead_letter.kind "broker" on a memory broker means its own in-memory store.
            store = create_dead_letter_store(config) or MemoryDeadLetters()
            return MemoryBroker(
                capacity=settings.capacity,
                enqueue_timeout=settings.enqueue_timeout,
                overflow=settings.overflow,
                visibility_timeout=settings.visibility_timeout,
                dead_letters=store,
            )
        case "sqlite":
            from runner.brokers.sqlite import SqliteBroker

            return SqliteBroker(
                path=_required(settings.path, "broker.path", "sqlite"),
                capacity=settings.capacity,
                enqueue_timeout=settings.enqueue_timeout,
                overflow=settings.overflow,
                visibility_timeout=settings.visibility_timeout,
                read_only=read_only,
                file_mode=int(settings.file_mode, 8),
            )
        case "redis":
            from runner.brokers.redis import RedisBroker

            return RedisBroker(
                url=_required(settings.url, "broker.url", "redis"),
                namespace=settings.namespace,
                capacity=settings.capacity,
                enqueue_timeout=settings.enqueue_timeout,
                overflow=settings.overflow,
                visibility_timeout=settings.visibility_timeout,
                on_reconnect=on_reconnect,
            )


def _required(value: str | None, path: str, kind: str) -> str:
    if not value:
        raise ConfigError([Problem("", path, f"required when broker.kind is {kind}")])
    return value
