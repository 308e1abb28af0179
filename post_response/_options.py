"""The middleware's options: their names and defaults, and checks whose messages name the fix."""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypedDict

from ._call import is_async
from ._checks import check_backoff, check_flag, check_retries, check_timeout, describe
from ._errors import ConfigurationError
from ._journal import Journal

if TYPE_CHECKING:
    from ._task import TaskHandle

__all__ = [
    "DEFAULTS",
    "POLICIES",
    "Config",
    "ErrorHook",
    "Options",
    "Policy",
    "check_app",
    "configure",
    "skip_reason",
]

Policy = Literal["no_server_error", "no_error", "always"]
POLICIES: tuple[Policy, ...] = ("no_server_error", "no_error", "always")
ErrorHook = Callable[["TaskHandle", BaseException], object]


class Options(TypedDict, total=False):
    """Keyword arguments of `PostResponseMiddleware` (all optional; see its docstring)."""

    policy: Policy
    concurrency: int
    timeout: float | None
    max_tasks: int
    on_error: ErrorHook | None
    detach: bool
    shutdown_timeout: float | None
    max_running: int | None
    max_queued: int | None
    opentelemetry: bool
    celery_app: object
    retries: int
    backoff: float
    journal: str | os.PathLike[str] | Journal | None


@dataclass(frozen=True)
class Config:
    """Options, checked and complete."""

    policy: Policy = "no_server_error"
    concurrency: int = 1
    timeout: float | None = None
    max_tasks: int = 1000
    on_error: ErrorHook | None = None
    detach: bool = True
    shutdown_timeout: float | None = 20.0
    max_running: int | None = 10_000  # bounded by default: see README, "Security"
    max_queued: int | None = 10_000
    opentelemetry: bool = False
    celery_app: object = None
    retries: int = 0  # a task's default: `set(retries=...)`
    backoff: float = 0.5  # seconds before a first retry: `set(backoff=...)`
    journal: Journal | None = None  # a path given is opened as `Journal(path)`


DEFAULTS = Config()
_NAMES = frozenset(Config.__dataclass_fields__)


def configure(options: Mapping[str, object], source: str = "PostResponseMiddleware") -> Config:
    """Check `options` and fill in the defaults. Messages name each option as it was given:
    `PostResponseMiddleware(timeout=...)`, or `settings.POST_RESPONSE["timeout"]` when
    `source` is a settings name (it has a dot).

    Raises:
        TypeError: An option name is unknown (a typo, say).
        ConfigurationError: An option has an invalid value (a `ValueError`).
    """
    unknown = sorted(map(repr, set(options) - _NAMES))  # repr: settings keys may be anything
    if unknown:
        msg = (
            f"{source} got unknown options {', '.join(unknown)}; "
            f"the options are {', '.join(sorted(_NAMES))}."
        )
        raise TypeError(msg)
    given = dict(options)

    def option(name: str) -> str:
        return f'{source}["{name}"]' if "." in source else f"{source}({name}=...)"

    policy = given.get("policy", DEFAULTS.policy)
    if policy not in POLICIES:
        msg = f"{option('policy')} must be one of {', '.join(map(repr, POLICIES))}; got {policy!r}."
        raise ConfigurationError(msg)
    for name in ("concurrency", "max_tasks"):
        _check_count(given.get(name, 1), option(name))
    for name in ("max_running", "max_queued"):
        _check_count(given.get(name), option(name), optional=True)
    for name in ("detach", "opentelemetry"):
        check_flag(given.get(name, True), option(name))
    for name in ("timeout", "shutdown_timeout"):
        if name in given:
            given[name] = check_timeout(given[name], option(name))
    if "retries" in given:
        given["retries"] = check_retries(given["retries"], option("retries"))
    if "backoff" in given:
        given["backoff"] = check_backoff(given["backoff"], option("backoff"))
    if given.get("journal") is not None:
        given["journal"] = _journal(given["journal"], option("journal"))
    _check_celery_app(given.get("celery_app"), option("celery_app"))
    _check_hook(given.get("on_error"), option("on_error"))
    return Config(**given)  # type: ignore[arg-type]  # each value was checked above


def check_app(app: object, source: str, *, wsgi: bool = False) -> None:
    """Refuse, when the middleware is built, an `app` it could never call: not callable,
    or an app of the other interface (a WSGI app given to the ASGI middleware, say).

    Raises:
        TypeError: What `app` is, and how to wrap it instead.
    """
    if not callable(app):
        msg = f"{source}(app) needs the app to wrap, a callable; got {type(app).__qualname__}."
        raise TypeError(msg)
    if wsgi and is_async(app):
        msg = (
            f"{source} got an ASGI app ({describe(app)} is async); wrap it with "
            "`post_response.PostResponseMiddleware(app)` instead."
        )
        raise TypeError(msg)
    if wsgi or _takes(app, 3):
        return
    if _takes(app, 2):
        msg = (
            f"{source} got a WSGI app ({describe(app)} takes `environ, start_response`); "
            "wrap it with `post_response.wsgi.PostResponseWSGIMiddleware(app)` instead."
        )
    else:
        msg = (
            f"{source} wraps ASGI 3 apps, called as `app(scope, receive, send)`, and "
            f"{describe(app)} cannot take those three arguments. An ASGI 2 app (`app(scope)`, "
            "returning a callable) can be wrapped in "
            "`asgiref.compatibility.guarantee_single_callable(app)` first."
        )
    raise TypeError(msg)


def skip_reason(
    policy: Policy, status: int, complete: bool, client_gone: bool, *, raised: bool
) -> str | None:
    """Why `policy` skips a request's tasks, or None to run them.

    Args:
        status: The response's status, 0 if none was sent.
        complete: The response was sent in full.
        client_gone: The client went away (a disconnect seen, or an error writing to it).
        raised: The app raised.
    """
    if policy == "always":
        return None
    if status >= 500 or (status >= 400 and policy == "no_error"):
        return f"the response status was {status}"
    if complete or client_gone:
        return None
    if raised:
        return "the app raised before completing the response"
    return "the app returned without completing the response"


def _takes(func: object, count: int) -> bool:
    """Whether `func` can be called with `count` positional arguments; True when its
    signature cannot be read (a builtin, a C extension): it gets the benefit of the doubt."""
    try:
        signature = inspect.signature(func)  # type: ignore[arg-type]  # callable() was checked
    except (TypeError, ValueError):
        return True
    try:
        signature.bind(*(None,) * count)
    except TypeError:
        return False
    return True


def _check_hook(hook: object, name: str) -> None:
    if hook is None:
        return
    if not callable(hook):
        msg = f"{name} must be a callable taking (task, exception); got {hook!r}."
        raise ConfigurationError(msg)
    if not _takes(hook, 2):
        msg = (
            f"{name} is called as `on_error(task, exc)`, but {describe(hook)} cannot take "
            "those two arguments; give it two positional parameters: "
            "`def on_error(task, exc): ...`."
        )
        raise ConfigurationError(msg)


def _check_celery_app(app: object, name: str) -> None:
    if app is None:
        return
    celery = sys.modules.get("celery")  # a Celery app exists only once Celery is imported
    if celery is None or not isinstance(app, celery.Celery):
        msg = (
            f"{name} must be the Celery app whose tasks `add_task()` should enqueue "
            f"(`Celery(...)`); got {type(app).__qualname__}."
        )
        raise ConfigurationError(msg)


def _check_count(value: object, name: str, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        also = ", or None for no limit" if optional else ""
        msg = f"{name} must be a whole number of at least 1{also}; got {value!r}."
        raise ConfigurationError(msg)


def _journal(value: object, name: str) -> Journal:
    if isinstance(value, Journal):
        return value
    if isinstance(value, (str, os.PathLike)) and os.fspath(value):
        return Journal(value)
    msg = (
        f'{name} must be the path of the journal\'s SQLite file (`journal="tasks.db"`) '
        f"or a `post_response.Journal(...)`; got {type(value).__qualname__}."
    )
    raise ConfigurationError(msg)
