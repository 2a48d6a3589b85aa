"""Root fixtures shared by every test directory.

Redis: tests start their own throwaway ``redis-server`` (tests/redis_server.py) on a free
127.0.0.1 port; they never touch a Redis the machine already runs. When the binary is missing
they skip, unless ``DQ_REQUIRE_REDIS=1`` (set by .ci/run), which turns the skip into a failure.

Hypothesis: property tests run under the profile named by ``DQ_HYPOTHESIS_PROFILE``, "ci" by
default (so `make test`, which CI runs, is the same run every time):

- ``ci``: derandomized (each test's seed is a hash of the test itself: fixed, and recorded in
  the repository as the test's source), no example database, no deadline (timing is never the
  point of a property here), and no shrinking: a failure reports its generated example at once
  instead of shrinking past the 120 s test timeout (Hypothesis allows itself 300 s). Keep a
  failure found this way as an explicit ``@example``.
- ``dev``: the same examples, shrunk to a minimal one (to debug a failure ``ci`` reported).
- ``explore``: random seeds and ten times the examples, to look for new failures.

Parallel: `make test` runs the suite in two pytest-xdist workers (most tests wait on processes,
sockets and timers, not on the CPU). Each worker is its own process with its own session
fixtures (its own throwaway redis-server); a test must not share a file, port or process with
another test except through a fixture.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import Phase, settings

from tests.redis_server import RedisServer, redis_server_binary

if TYPE_CHECKING:
    from tests.unit.engine_kit import Engine

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    phases=(Phase.explicit, Phase.generate),
    print_blob=True,
)
settings.register_profile("dev", settings.get_profile("ci"), phases=tuple(Phase))
settings.register_profile("explore", deadline=None, max_examples=1000, phases=tuple(Phase))
settings.load_profile(os.environ.get("DQ_HYPOTHESIS_PROFILE", "ci"))

# The commands the tests run print tables as wide as a pipe's (no limit), whoever runs the
# suite: a terminal's exported COLUMNS, or pytest-xdist's workers (which set COLUMNS=80 and
# LINES=24), would cut columns the tests read. A test that wants a width passes COLUMNS itself.
for _name in ("COLUMNS", "LINES"):
    os.environ.pop(_name, None)


def _require_redis_binary() -> None:
    if redis_server_binary() is not None:
        return
    message = "redis-server is not installed"
    if os.environ.get("DQ_REQUIRE_REDIS") == "1":
        pytest.fail(f"{message}, and DQ_REQUIRE_REDIS=1 requires it")
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One throwaway redis-server for the whole session; isolate tests with redis_namespace."""
    _require_redis_binary()
    server = RedisServer(tmp_path_factory.mktemp("redis-shared"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_namespace() -> str:
    """A fresh key namespace, so tests sharing redis_server never see each other's keys."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start dedicated servers (for tests that kill or reconfigure them); all stopped after."""
    _require_redis_binary()
    servers: list[RedisServer] = []

    def start(**options: Any) -> RedisServer:
        directory = tmp_path / f"redis-{len(servers)}"
        directory.mkdir()
        server = RedisServer(directory, **options)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(autouse=True)
def _runner_logging_restored() -> Iterator[None]:
    """The ``runner`` logger as it was before each test: ``setup_logging`` (a Runner that
    observes, a CLI command run in-process) gives it a handler, a level and propagate=False,
    which would hide the next test's records from ``caplog`` (and set the level a process
    type's children log at). Tests run in any order (two xdist workers), so none may depend
    on another having left logging alone."""
    logger = logging.getLogger("runner")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    for handler in list(logger.handlers):
        if handler not in handlers:
            logger.removeHandler(handler)
    for handler in handlers:
        if handler not in logger.handlers:
            logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    """Engines (tests/unit/engine_kit.py) a test starts, stopped after it."""
    made: list[Engine] = []
    yield made
    for engine in made:
        engine.stop(grace=1.0)
