"""Handler strings (``module:function``), exception names and plug-in classes (``module:Class``,
a broker or dead-letter store kind), turned into Python objects.

Both are checked when a config is loaded (so a typo fails ``dq-run validate``, not the first task)
and resolved again when the runtime is built.

Where modules are found: the normal ``sys.path`` (installed packages, the standard library),
then the directories in ``search_path`` (a config's ``handler_paths``, already absolute), then
the current working directory. They are appended, never prepended, so a local file cannot
shadow the standard library or an installed package. Appending to ``sys.path`` is the one
process-wide effect; it happens on a call, never at import.

Every failure raises ConfigError with one Problem whose source is empty and whose path is
``handler`` (or ``never_retry``, or the ``key`` given to load_class); load_config re-locates it
at the key's line.
"""

from __future__ import annotations

import builtins
import difflib
import importlib
import inspect
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from runner.errors import ConfigError, PermanentError, Problem

#: ``module:function``; the module part may be dotted.
HANDLER_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"
#: ``module:Class``: a plug-in broker or dead-letter store.
CLASS_PATTERN = HANDLER_PATTERN
#: ``ValueError``, ``module:Class`` or ``module.Class``.
EXCEPTION_PATTERN = r"^[A-Za-z_][\w.]*(:[A-Za-z_][\w.]*)?$"

_PAYLOAD, _CTX = object(), object()


@dataclass(frozen=True)
class Handler:
    """A loaded handler: the callable, and whether it takes the TaskContext second argument."""

    spec: str  # "module:function", as configured
    func: Callable[..., Any]
    takes_ctx: bool
    is_async: bool = False  # an async def, for an async type: calling it gives the coroutine

    def __call__(self, payload: Any, ctx: Any) -> Any:
        """Call the handler with ``(payload, ctx)`` or ``(payload)``, whichever it accepts.

        A handler that hands back an awaitable (a plain function returning a coroutine: load
        refuses an ``async def``) has not done its work: nothing on a worker thread would ever
        await it. The attempt fails with PermanentError saying so (the coroutine is closed
        first, so Python adds no "never awaited" warning), rather than succeed unrun.
        """
        result = self.func(payload, ctx) if self.takes_ctx else self.func(payload)
        if self.is_async:
            return result  # the coroutine, awaited on the event loop (runner.engine.aio)
        if result is not None and isinstance(result, Awaitable):
            if isinstance(result, Coroutine):
                result.close()
            raise PermanentError(
                f"handler {self.spec} returned {type(result).__name__}, which would never be "
                f"awaited on a worker thread, so the task did not run; {_NOT_ASYNC}"
            )
        return result


def load_handler(
    spec: str, *, search_path: Sequence[str] = (), execution: str = "thread"
) -> Handler:
    """Import ``module:function`` and check that it can be called as ``(payload[, ctx])``, and
    that it is an ``async def`` exactly when its type's ``execution`` is ``async``.

    Raises ConfigError (path ``handler``) when the string is malformed, the module cannot be
    imported (or fails while importing), the name is missing or not callable, or the signature
    accepts neither ``(payload, ctx)`` nor ``(payload)``.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        _fail("handler", f"{spec!r} is not 'module:function' (e.g. handlers.demo:send_email)")
    obj = _import_attr(module_name, attr, search_path, "handler")
    if not callable(obj):
        _fail("handler", f"{spec!r} is not callable (it is a {type(obj).__name__})")
    is_async = _is_async(obj)
    if is_async and execution != "async":
        _fail(
            "handler",
            f"{spec!r} is an async def: a {execution} type calls it as a plain function, "
            "where its coroutine would never be awaited; set execution: async on its type, or "
            f"{_NOT_ASYNC}",
        )
    if execution == "async" and not is_async:
        _fail(
            "handler",
            f"{spec!r} is a plain def, but its type has execution: async (the event loop awaits "
            "its handler): make it an async def, or use execution: thread",
        )
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        _fail("handler", f"cannot read the signature of {spec!r}; wrap it in a def")
    for args, takes_ctx in (((_PAYLOAD, _CTX), True), ((_PAYLOAD,), False)):
        try:
            signature.bind(*args)
        except TypeError:
            continue
        return Handler(spec=spec, func=obj, takes_ctx=takes_ctx, is_async=is_async)
    return _fail(
        "handler", f"{spec!r} must accept (payload, ctx) or (payload); it takes {signature}"
    )


#: The other way to run async code from a thread type's handler.
_NOT_ASYNC = (
    "make it a plain def that runs the coroutine, e.g. "
    "def handler(payload, ctx): return asyncio.run(work(payload, ctx))"
)


def _is_async(obj: Any) -> bool:
    """True for an ``async def`` (or async generator) function, also behind functools.partial
    or as a callable object's ``__call__``."""
    call = getattr(obj, "__call__", None)  # noqa: B004 (the method itself, not callable())
    return any(inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f) for f in (obj, call))


def load_class(spec: str, *, key: str, search_path: Sequence[str] = ()) -> type[Any]:
    """Import ``module:Class`` and check that it names a class.

    Raises ConfigError (path ``key``) when the string is malformed, the module cannot be imported
    (or fails while importing), the name is missing (with a did-you-mean) or not a class.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        _fail(key, f"{spec!r} is not 'module:Class'")
    obj = _import_attr(module_name, attr, search_path, key)
    if not isinstance(obj, type):
        _fail(key, f"{spec!r} is not a class (it is a {type(obj).__name__})")
    return obj


def check_arguments(cls: type[Any], key: str, arguments: Mapping[str, Any]) -> None:
    """Raise ConfigError (path ``key``) unless ``cls(**arguments)`` fits its signature (the
    names only; the values are the class's to judge when it is built)."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        return  # no signature to read: the call itself will say
    try:
        signature.bind(**arguments)
    except TypeError as exc:
        takes = ", ".join(
            str(p.replace(annotation=inspect.Parameter.empty))
            for p in signature.parameters.values()
        )
        spec = f"{cls.__module__}:{cls.__qualname__}"
        _fail(key, f"{spec} cannot be built with these options: {exc} (it takes {takes})")


def resolve_exception(name: str, *, search_path: Sequence[str] = ()) -> type[BaseException]:
    """``ValueError`` (a builtin) or ``module:Class`` (also ``module.Class``) -> the class.

    Raises ConfigError (path ``never_retry``) when it cannot be found or is not an exception.
    """
    if ":" in name:
        module_name, _, attr = name.partition(":")
    elif "." in name:
        module_name, _, attr = name.rpartition(".")
    else:
        module_name, attr = "", name
    if module_name:
        obj = _import_attr(module_name, attr, search_path, "never_retry")
    else:
        obj = getattr(builtins, name, None)
        if obj is None:
            names = [n for n, v in vars(builtins).items() if _is_exception(v)]
            _fail("never_retry", f"{name!r} is not a builtin exception{_did_you_mean(name, names)}")
    if not _is_exception(obj):
        _fail("never_retry", f"{name!r} is not an exception class")
    exc_type: type[BaseException] = obj
    return exc_type


def _is_exception(obj: object) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseException)


def _import_attr(module_name: str, attr: str, search_path: Sequence[str], key: str) -> Any:
    for directory in (*search_path, os.getcwd()):
        if directory not in sys.path:
            sys.path.append(directory)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            _fail(key, f"cannot import module {module_name!r}: no module named {exc.name!r}")
        _fail(key, f"importing {module_name!r} failed: {type(exc).__name__}: {exc}")
    except (Exception, SystemExit) as exc:  # the user's module ran and failed: say how
        _fail(key, f"importing {module_name!r} failed: {type(exc).__name__}: {exc}")
    if not hasattr(module, attr):
        public = [n for n in vars(module) if not n.startswith("_")]
        _fail(key, f"module {module_name!r} has no {attr!r}{_did_you_mean(attr, public)}")
    return getattr(module, attr)


def _did_you_mean(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fail(key: str, message: str) -> NoReturn:
    raise ConfigError([Problem("", key, message)])
