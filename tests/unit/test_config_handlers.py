"""runner.loader: module:function strings and exception names."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from runner.errors import ConfigError, PermanentError
from runner.loader import Handler, load_handler, resolve_exception
from tests.unit import async_handlers


def test_two_argument_handler_gets_ctx() -> None:
    handler = load_handler("handlers.demo:resize_image")
    assert handler.takes_ctx
    assert handler({"width": 1280, "height": 720}, object()) == (640, 360)


def test_one_argument_handler_is_called_without_ctx() -> None:
    handler = Handler(spec="x:y", func=lambda payload: payload * 2, takes_ctx=False)
    assert handler(21, object()) == 42


def test_search_path_finds_local_modules(tmp_path: Path) -> None:
    (tmp_path / "cfg_search_mod.py").write_text("def h(payload, ctx=None):\n    return 'ok'\n")
    handler = load_handler("cfg_search_mod:h", search_path=[str(tmp_path)])
    assert handler.takes_ctx
    assert handler(None, None) == "ok"


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("nocolon", "is not 'module:function'"),
        ("handlers.demoo:send_email", "cannot import module 'handlers.demoo'"),
        ("handlers.demo:send_emails", "did you mean 'send_email'?"),
        ("runner.model:HISTORY_LIMIT", "is not callable"),
        ("operator:setitem", "must accept (payload, ctx) or (payload)"),
        ("runner.model:new_task_id", "must accept (payload, ctx) or (payload)"),
    ],
)
def test_bad_handlers(spec: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_handler(spec)
    (problem,) = info.value.problems
    assert problem.path == "handler"
    assert fragment in problem.message


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ValueError", ValueError),
        ("KeyboardInterrupt", KeyboardInterrupt),
        ("runner.errors:PermanentError", PermanentError),
        ("runner.errors.PermanentError", PermanentError),
    ],
)
def test_resolve_exception(name: str, expected: type[BaseException]) -> None:
    assert resolve_exception(name) is expected


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("ValueErorr", "did you mean 'ValueError'?"),
        ("len", "is not an exception class"),
        ("runner.model:Task", "is not an exception class"),
        ("no_such_module_x:Err", "cannot import module"),
    ],
)
def test_resolve_exception_errors(name: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_exception(name)
    assert fragment in info.value.problems[0].message


def test_handler_is_frozen() -> None:
    handler: Any = load_handler("handlers.demo:send_email")
    with pytest.raises(AttributeError):
        handler.takes_ctx = False


@pytest.mark.parametrize("name", ["fetch", "fetch_later", "poll", "stream"])
def test_an_async_handler_is_refused_with_the_fix(name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_handler(f"tests.unit.async_handlers:{name}")
    message = str(caught.value)
    assert "is an async def: a thread type calls it as a plain function" in message
    assert "set execution: async on its type" in message
    assert "asyncio.run(work(payload, ctx))" in message


def test_a_handler_returning_a_coroutine_fails_permanently_and_closes_it() -> None:
    handler = load_handler("tests.unit.async_handlers:hands_back_a_coroutine")
    with pytest.raises(PermanentError, match="returned coroutine, which would never be awaited"):
        handler({}, object())
    # Closed, so Python does not warn "coroutine ... was never awaited" when it is collected.
    assert inspect.getcoroutinestate(async_handlers.handed_back[-1]) == inspect.CORO_CLOSED
