"""Django support: options from `settings.POST_RESPONSE`, and tasks that leave no database
connection open. Imported by the middleware only once Django's settings are configured."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar, cast

from asgiref.sync import ThreadSensitiveContext as _ThreadSensitiveContext
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections

from ._backend import asyncio_loop
from ._errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from contextlib import AbstractAsyncContextManager

__all__ = ["Environment", "settings_options"]

_T = TypeVar("_T")
# asgiref before 3.13 has no type hints here.
ThreadSensitiveContext = cast(
    "Callable[[], AbstractAsyncContextManager[object]]", _ThreadSensitiveContext
)


def settings_options() -> dict[str, Any]:
    """The middleware options in `settings.POST_RESPONSE` (a dict), if any."""
    options = getattr(settings, "POST_RESPONSE", {})
    if not isinstance(options, dict):
        msg = (
            "settings.POST_RESPONSE must be a dict of PostResponseMiddleware options, "
            f'such as {{"timeout": 30}}; got {options!r}.'
        )
        raise ConfigurationError(msg)
    return options


class Environment:
    """Run each task as Django runs a request, as far as database connections go.

    Django closes a request's connections when it ends (`close_old_connections`, which
    honours `CONN_MAX_AGE`). Tasks run after that, in other threads, so they do the same:
    a sync task between two calls in its worker thread; an async task in its own
    `ThreadSensitiveContext` (its `sync_to_async` ORM calls share one thread, shut down
    afterwards), with a final call in that thread.
    """

    def run_sync(self, call: Callable[[], _T]) -> _T:
        close_old_connections()
        try:
            return call()
        finally:
            close_old_connections()

    async def run_async(self, awaitable: Awaitable[_T]) -> _T:
        if asyncio_loop() is None:  # Django's async support is asyncio's: nothing to do on trio
            return await awaitable
        async with ThreadSensitiveContext():
            try:
                return await awaitable
            finally:
                await sync_to_async(close_old_connections)()
