"""Checks of the ``schedules`` section's values (its model is ScheduleConfig in models.py).

A bad cron expression or an unknown timezone is reported at its own key, as every other config
mistake is; that the schedule's type is declared is a cross-field rule (runner.config.rules).
How schedules fire is runner.engine.schedule.
"""

from __future__ import annotations

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

#: A schedule's name: it is also its key in the broker (``schedule:<name>``).
SCHEDULE_NAME_PATTERN = r"^[a-z][a-z0-9_-]*$"

#: The shortest ``every``: ticks are named to the millisecond, and a scheduler pass costs a
#: broker round trip or two.
MIN_EVERY_S = 0.1


def cron_expression(expression: str) -> str:
    """``expression`` when croniter reads it, with 5 fields (or 6, seconds last)."""
    fields = expression.split()
    if len(fields) not in (5, 6) or not croniter.is_valid(expression):
        raise ValueError(
            f"invalid cron expression {expression!r}: expected 5 fields (minute hour "
            "day-of-month month day-of-week, e.g. '0 3 * * *'), or 6 with seconds last"
        )
    return expression


def zone_name(name: str) -> str:
    """``name`` when it is a timezone this machine knows (the tzdata package ships them all)."""
    try:
        ZoneInfo(name)
    # OSError: a region such as "America" (tzdata's folder of its zones), or a name too long to
    # be a file's.
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(
            f"unknown timezone {name!r}: use an IANA name such as UTC, Europe/Berlin or "
            "America/New_York"
        ) from None
    return name
