"""A handler module that fails while it is imported."""

from __future__ import annotations

raise RuntimeError("this module is broken on purpose")
