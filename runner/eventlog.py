"""Log a line that carries an event name and fields, from any layer (brokers included).

The runner's formatters (runner.observe.logs) read a record's structured fields from the
``FIELDS_ATTR`` attribute, set through ``extra``; any other ``extra`` key is ignored by them.
runner.observe.logs needs the config (pydantic), which the brokers may not import, so the
attribute and the helper that sets it live here, below both.
"""

from __future__ import annotations

import logging
from typing import Any

#: The attribute a LogRecord carries its structured fields in (set through `extra`).
FIELDS_ATTR = "dq_fields"


def log_event(
    logger: logging.Logger, level: int, event: str, message: str = "", **fields: Any
) -> None:
    """Log a runner line with an event name and extra fields (used for non-task lines)."""
    if logger.isEnabledFor(level):
        logger.log(level, message or event, extra={FIELDS_ATTR: {"event": event, **fields}})
