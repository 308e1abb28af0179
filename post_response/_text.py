"""Text the library writes but did not choose: client input, and a task's arguments.

A request's path and method come from the client, percent-decoded by the server: written
into a log message as they are, a `%0A` starts a forged log line and a `%1B` sends escape
codes to the terminal of whoever reads the log. `escape()` makes them harmless.

A task's arguments carry emails, tokens and passwords, so the library never writes their
values: `outline()` names a call by its argument types only.
"""

from __future__ import annotations

from typing import Any

__all__ = ["clipped", "escape", "outline"]


def escape(text: str) -> str:
    """`text` with each non-printable character written as Python writes it in a repr
    (`\\n`, `\\x1b`, `\\u2028`); printable characters, non-ASCII ones such as `é`
    included, stay as they are.

    Backslashes are left alone, so `\\n` in a message may also be a backslash and an `n`
    the client sent; structured log fields keep the raw value for whoever must tell.
    """
    if text.isprintable():  # nearly always: no copy, no per-character work
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def clipped(text: str, limit: int = 200) -> str:
    """`text` as a log message shows it: its repr, cut after `limit` characters with its
    length said, so that a line does not grow with a value a client chose (a key of a
    megabyte made of a request's body). The whole value stays where it came from (`task.key`)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text):,} characters)"


def outline(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """`name(str, subject=str)`: a call by its argument types, never their values (the
    name escaped: a Celery signature's may come from anywhere)."""
    parts = [type(arg).__qualname__ for arg in args]
    parts += [f"{escape(str(key))}={type(value).__qualname__}" for key, value in kwargs.items()]
    return f"{escape(name)}({', '.join(parts)})"
