"""Broker and dead-letter kinds as config knows them: a built-in name or a ``module:Class``.

Config fills in defaults that depend on what the broker can do (the dead-letter kind, the
prefetch depth) and rejects a dead-letter store that a durable broker would bypass, but it may
not import runner.brokers (tests/unit/test_layering.py). So it keeps the capability flags of the
three built-in kinds here, as data: the classes declare the same flags (runner.brokers.base) and
a unit test keeps the two equal. A ``module:Class`` kind is not imported for a default: defaults
assume BaseBroker's flags (durable and shared, so a shallow prefetch and ``dead_letter: broker``,
which on a broker that is not durable means an in-memory store). The rules import the class to
check it, and read its real ``durable`` there; at run time the class's own flags decide.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import NamedTuple, TypeGuard

from runner.loader import CLASS_PATTERN


class BrokerFlags(NamedTuple):
    """A broker class's capability flags (their meaning: runner.brokers.base)."""

    durable: bool
    shared: bool
    batch_settles: bool
    carry_settles: bool
    gates_in_get: bool
    settle_effects: bool


#: The built-in broker kinds and their flags; runner.backends names the class of each.
_EVERYTHING = {"batch_settles": True, "gates_in_get": True, "settle_effects": True}
BROKER_KINDS: dict[str, BrokerFlags] = {
    "memory": BrokerFlags(durable=False, shared=False, carry_settles=True, **_EVERYTHING),
    "sqlite": BrokerFlags(durable=True, shared=True, carry_settles=True, **_EVERYTHING),
    "redis": BrokerFlags(durable=True, shared=True, carry_settles=False, **_EVERYTHING),
}

#: What defaults assume of a ``module:Class`` broker: BaseBroker's flags.
PLUG_IN_FLAGS = BrokerFlags(
    durable=True,
    shared=True,
    batch_settles=True,
    carry_settles=True,
    gates_in_get=False,
    settle_effects=False,
)

#: The keyword arguments every broker class is built with (runner.backends.create_broker), each the
#: broker setting of that name; so ``broker.options`` may not name them.
BROKER_ARGUMENTS = ("capacity", "enqueue_timeout", "overflow", "visibility_timeout")

#: The built-in dead-letter kinds: an in-memory store, a JSON Lines file, the broker itself.
DEAD_LETTER_KINDS = ("memory", "file", "broker")


def broker_flags(kind: str) -> BrokerFlags:
    """The flags config goes by for ``broker.kind`` (PLUG_IN_FLAGS for a ``module:Class``)."""
    return BROKER_KINDS.get(kind, PLUG_IN_FLAGS)


def default_dead_letter(broker_kind: str) -> str:
    """``dead_letter.kind`` when unset: the broker's own for a durable broker, else memory."""
    return "broker" if broker_flags(broker_kind).durable else "memory"


def is_class_kind(kind: object) -> TypeGuard[str]:
    """True for a ``module:Class`` kind (a plug-in), False for a built-in name or anything else."""
    return isinstance(kind, str) and re.match(CLASS_PATTERN, kind) is not None


def kind_check(names: tuple[str, ...]) -> Callable[[str], str]:
    """A validator accepting one of ``names`` or a ``module:Class``; its error suggests a name."""
    listed = ", ".join(repr(n) for n in names[:-1]) + f" or {names[-1]!r}"

    def check(kind: str) -> str:
        if kind in names or is_class_kind(kind):
            return kind
        close = difflib.get_close_matches(kind, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Input should be {listed}, or a module:Class (got {kind!r}{hint})")

    return check
