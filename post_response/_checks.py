"""Checks of what callers pass in, and names for what they pass: errors that name the fix.

Kept apart from the task record so that `_task.py` has one reason to change. A message
names a value by its type, never by its repr: values carry users' data.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
from types import AsyncGeneratorType, GeneratorType
from typing import TYPE_CHECKING

from ._errors import ConfigurationError, InvalidTaskError

if TYPE_CHECKING:
    from types import CodeType

__all__ = [
    "GENERATOR",
    "GENERATORS",
    "check_backoff",
    "check_delay",
    "check_flag",
    "check_retries",
    "check_retry_on",
    "check_timeout",
    "describe",
    "generator_flags",
    "generator_function",
    "kind",
    "not_callable",
    "returned_generator",
]


def not_callable(func: object) -> InvalidTaskError:
    close = getattr(func, "close", None)
    if hasattr(func, "__await__") and callable(close):
        close()  # a coroutine object: close it so Python does not warn "never awaited"
        name = getattr(func, "__qualname__", type(func).__qualname__)
        msg = (
            f"add_task() got an awaitable ({name}(...) was already called), not a function. "
            f"Pass the function and its arguments instead: `add_task({name}, ...)`."
        )
    else:  # its type, not its repr: a value may hold a user's data
        msg = f"add_task() needs a callable as its first argument, got {kind(func)}."
    return InvalidTaskError(msg)


# A function whose call only creates a generator: its body runs when someone iterates.
# `@types.coroutine` generators are awaitable, and run like async functions.
GENERATOR = inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR
_AWAITABLE_GENERATOR = inspect.CO_ITERABLE_COROUTINE


def generator_flags(func: object, code: CodeType | None) -> int:
    """The generator flags of the code that calling `func` runs first, 0 for an ordinary
    function. `code` is `func.__code__`, or None: then `func` is seen through
    `functools.partial`, and a callable object through its class's `__call__`."""
    if code is None and isinstance(func, functools.partial):
        while isinstance(func, functools.partial):
            func = func.func
        code = getattr(func, "__code__", None)
    if code is None:
        code = getattr(type(func).__call__, "__code__", None)
        if code is None:  # a builtin, a class: not a generator function
            return 0
    flags: int = code.co_flags
    return 0 if flags & _AWAITABLE_GENERATOR else flags & GENERATOR


def generator_function(func: object, flags: int) -> InvalidTaskError:
    name = describe(func)
    short = name.rpartition(".")[2]
    if flags & inspect.CO_ASYNC_GENERATOR:
        kind, consume = "an async generator", f"`async for _ in {short}(...): pass`"
    else:
        kind, consume = "a generator", f"`list({short}(...))`"
    msg = (
        f"add_task() got {name}, a function that returns {kind} when called, so its body "
        "would never run. Make it a plain function (no `yield`), or add a function that "
        f"consumes it: {consume}."
    )
    return InvalidTaskError(msg)


GENERATORS = (GeneratorType, AsyncGeneratorType)  # what a generator function returns


def returned_generator(result: object) -> InvalidTaskError:
    if isinstance(result, AsyncGeneratorType):
        kind, consume = "an async generator", "an async function with `async for _ in gen(): pass`"
    else:
        kind, consume = "a generator", "`add_task(lambda: list(gen()))`"
    msg = (
        f"The task returned {kind} ({describe(result)}) instead of doing its work: a "
        "generator's body runs only when something iterates it. Call a function without "
        f"`yield`, or consume the generator in the task, e.g. {consume}."
    )
    return InvalidTaskError(msg)


def kind(value: object) -> str:
    """What a message says about a value it must not show: its type."""
    return f"a value of type {type(value).__qualname__}"


def describe(func: object) -> str:
    """`module.qualname` of a callable, seen through `functools.partial`.

    Never raises: a callable whose `__qualname__` or `__module__` raises is named by
    `object.__repr__` (`<module.Class object at 0x...>`), so its failure is still logged.
    """
    try:
        while isinstance(func, functools.partial):
            func = func.func
        qualname = getattr(func, "__qualname__", None) or type(func).__qualname__
        module = getattr(func, "__module__", None)
        name = f"{module}.{qualname}" if module else qualname
        if isinstance(name, str):
            # A plain copy: a str subclass's own __repr__ would write the log lines that name it.
            return str.__str__(name)
    except BaseException:  # noqa: S110  (a name for a log line must not fail)
        pass
    return object.__repr__(func)


def check_flag(value: object, where: str) -> bool:
    """`value` if it is a bool, or a `ConfigurationError` naming `where`: `"false"` must not
    mean True."""
    if not isinstance(value, bool):
        msg = f"{where} must be True or False; got {value!r}."
        raise ConfigurationError(msg)
    return value


def check_timeout(value: object, where: str) -> float | None:
    """Return `value` as a timeout in seconds, or raise a `ConfigurationError` naming `where`."""
    if value is None:
        return None
    seconds = _seconds(value)
    if seconds is None or not seconds > 0:
        msg = (
            f"{where} must be a number of seconds above 0, or None for no limit; "
            f"got {_shown(value)}."
        )
        raise ConfigurationError(msg)
    return seconds


def check_delay(value: object, where: str, least: float = 0.0, why: str = "") -> float:
    """Return `value` as a finite number of seconds, `least` or more, or raise a
    `ConfigurationError` naming `where` (and `why` that least)."""
    seconds = _seconds(value)
    if seconds is None or not least <= seconds < math.inf:
        msg = f"{where} must be a number of seconds, {least:g} or more{why}; got {_shown(value)}."
        raise ConfigurationError(msg)
    return seconds


def check_backoff(value: object, where: str) -> float:
    """Return `value` as seconds before a first retry, or raise a `ConfigurationError`."""
    return check_delay(value, where)


def check_retries(value: object, where: str) -> int:
    """Return `value` as a number of retries, or raise a `ConfigurationError` naming `where`.

    At most `sys.maxsize`: the log line of each failed attempt writes the count, and past
    4,300 digits an int cannot be written (the line was lost, "--- Logging error ---")."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= sys.maxsize:
        msg = (
            f"{where} must be a whole number of retries, 0 to sys.maxsize ({sys.maxsize}); "
            f"got {_shown(value)}."
        )
        raise ConfigurationError(msg)
    return value


def _seconds(value: object) -> float | None:
    """`value` as a float, or None when it is not a number (a bool is not one) or an int
    too large for a float (`10**400`, which `float()` refuses with `OverflowError`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def _shown(value: object) -> str:
    """`repr(value)` for a message; an int too large for a float by its size instead (the
    repr of one past 4,300 digits raises `ValueError`)."""
    if isinstance(value, int) and value.bit_length() > _FLOAT_BITS:
        return f"{'a negative' if value < 0 else 'an'} int of {value.bit_length()} bits"
    return repr(value)


_FLOAT_BITS = 1024  # an int longer than this is beyond the largest float


def check_retry_on(value: object) -> type[Exception] | tuple[type[Exception], ...]:
    classes = value if isinstance(value, tuple) else (value,)
    if not classes or not all(isinstance(c, type) and issubclass(c, Exception) for c in classes):
        msg = (
            "set(retry_on=...) must be an exception class, or a tuple of them, deriving "
            "from `Exception` (cancellation and other `BaseException`s are never retried); "
            f"got {value!r}."
        )
        raise ConfigurationError(msg)
    return value  # type: ignore[return-value]  # checked above
