"""ASGI type aliases, shaped like Starlette's so the middleware slots into any stack."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeAlias

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]

# What the middleware wraps: any ASGI 3 callable, whatever types it annotates its scope
# and messages with (Starlette's mappings, or asgiref's TypedDicts as Quart does).
AnyASGIApp: TypeAlias = Callable[[Any, Any, Any], Awaitable[None]]
