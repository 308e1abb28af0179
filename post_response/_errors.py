"""The exceptions post_response raises; each is also the builtin a caller would expect."""

from __future__ import annotations


class PostResponseError(Exception):
    """Base class of every error raised by post_response."""


class OutsideRequestError(PostResponseError, RuntimeError):
    """`add_task()` was called where no request handled by the middleware is running."""


class RequestFinishedError(PostResponseError, RuntimeError):
    """`add_task()` was called after the request's tasks had all been run."""


class TaskLimitError(PostResponseError, RuntimeError):
    """A request tried to add more tasks than the middleware's `max_tasks` allows."""


class InvalidTaskError(PostResponseError, TypeError):
    """`add_task()` was given something that cannot be run as a task."""


class ConfigurationError(PostResponseError, ValueError):
    """An option of the middleware or of a task has an invalid value."""


class TaskStartedError(PostResponseError, RuntimeError):
    """A task's options were changed after the task had started."""


class TaskNotDurableError(PostResponseError, TypeError):
    """With the journal on, `add_task()` was given a task that cannot be journaled."""
