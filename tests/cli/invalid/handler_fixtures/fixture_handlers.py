"""Handlers with mistakes, for the invalid-config corpus (loaded through handler_paths)."""

from __future__ import annotations

from typing import Any

NOT_CALLABLE = 42


def three_args(payload: Any, ctx: Any, extra: Any) -> None:
    """Takes one argument too many to be a handler."""


def fine(payload: Any) -> None:
    """A valid one-argument handler."""
