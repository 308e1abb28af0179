"""The middleware's options: their names and defaults, and checks whose messages name the fix."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypedDict

from ._errors import ConfigurationError
from ._task import check_timeout

if TYPE_CHECKING:
    from ._task import TaskHandle

__all__ = [
    "DEFAULTS",
    "POLICIES",
    "Config",
    "ErrorHook",
    "Options",
    "Policy",
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
    max_running: int | None = None
    max_queued: int | None = None
    opentelemetry: bool = False
    celery_app: object = None


DEFAULTS = Config()
_NAMES = frozenset(Config.__dataclass_fields__)


def configure(options: Mapping[str, object], source: str = "PostResponseMiddleware") -> Config:
    """Check `options` (named as coming from `source`) and fill in the defaults.

    Raises:
        TypeError: An option name is unknown (a typo, say).
        ConfigurationError: An option has an invalid value (a `ValueError`).
    """
    unknown = sorted(set(options) - _NAMES)
    if unknown:
        msg = (
            f"{source} got unknown options {', '.join(map(repr, unknown))}; "
            f"the options are {', '.join(sorted(_NAMES))}."
        )
        raise TypeError(msg)
    given = dict(options)
    policy = given.get("policy", DEFAULTS.policy)
    if policy not in POLICIES:
        msg = f"policy must be one of {', '.join(map(repr, POLICIES))}; got {policy!r}."
        raise ConfigurationError(msg)
    for name in ("concurrency", "max_tasks"):
        _check_count(given.get(name, 1), name)
    for name in ("max_running", "max_queued"):
        _check_count(given.get(name), name, optional=True)
    for name in ("detach", "opentelemetry"):
        _check_flag(given.get(name, True), name)
    for name in ("timeout", "shutdown_timeout"):
        if name in given:
            given[name] = check_timeout(given[name], f"{source}({name}=...)")
    app = given.get("celery_app")
    if app is not None and not hasattr(app, "tasks"):
        msg = f"celery_app must be a Celery app (`Celery(...)`); got {app!r}."
        raise ConfigurationError(msg)
    hook = given.get("on_error")
    if hook is not None and not callable(hook):
        msg = f"on_error must be a callable taking (task, exception); got {hook!r}."
        raise ConfigurationError(msg)
    return Config(**given)  # type: ignore[arg-type]  # each value was checked above


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


def _check_count(value: object, name: str, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        also = ", or None for no limit" if optional else ""
        msg = f"{name} must be a whole number of at least 1{also}; got {value!r}."
        raise ConfigurationError(msg)


def _check_flag(value: object, name: str) -> None:
    if not isinstance(value, bool):
        msg = f"{name} must be True or False; got {value!r}."
        raise ConfigurationError(msg)
