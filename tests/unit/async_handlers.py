"""Handlers that are async, or hand back a coroutine, for the tests that refuse them."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Coroutine
from typing import Any


async def fetch(payload: Any, ctx: Any) -> str:
    return "fetched"


fetch_later = functools.partial(fetch)


class Poller:
    async def __call__(self, payload: Any, ctx: Any) -> None:
        return None


poll = Poller()


async def stream(payload: Any, ctx: Any) -> AsyncIterator[int]:
    yield 1


#: What hands_back_a_coroutine returned, so a test can see what became of it.
handed_back: list[Coroutine[Any, Any, str]] = []


def hands_back_a_coroutine(payload: Any, ctx: Any) -> Coroutine[Any, Any, str]:
    """A plain def (so load accepts it) that returns its async helper's coroutine."""
    handed_back.append(fetch(payload, ctx))
    return handed_back[-1]
