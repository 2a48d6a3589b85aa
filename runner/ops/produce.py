"""The demo producer: the tasks the config's ``simulate`` section asks for, each with its faults.

``plan_tasks`` yields (type, payload, headers) for every simulated task, reproducible from the
seed; the fault plan travels in the headers under runner.middleware.simulate.SIM_HEADER.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from runner.config.models import SimulateConfig, SimulatedFaults
from runner.middleware.simulate import SIM_HEADER

#: At most this many consecutive simulated failures for one task.
_MAX_FAILURES = 10


def plan_tasks(
    config: SimulateConfig,
) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(type, payload, headers) for every simulated task, reproducible from ``config.seed``."""
    rng = random.Random(config.seed)
    types = [name for name, weight in config.mix.items() if weight > 0]
    weights = [config.mix[name] for name in types]
    for n in range(config.tasks if types else 0):
        type_name = rng.choices(types, weights)[0]
        faults = config.faults.get(type_name, SimulatedFaults())
        yield type_name, {"n": n}, {SIM_HEADER: {"n": n, **_plan_faults(rng, faults)}}


def _plan_faults(rng: random.Random, faults: SimulatedFaults) -> dict[str, Any]:
    low, high = faults.latency
    fail_attempts = 0
    while fail_attempts < _MAX_FAILURES and rng.random() < faults.failure_rate:
        fail_attempts += 1
    hang = rng.random() < faults.hang_rate
    return {
        "latency_s": round(rng.uniform(low, max(low, high)), 4),
        "fail_attempts": fail_attempts,
        "hang_attempt": 1 if hang else 0,
        "poison": rng.random() < faults.poison_rate,
    }
