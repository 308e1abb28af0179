"""Run work after the response is sent: a global `add_task()` for any ASGI app.

Wrap the app with `app = PostResponseMiddleware(app)`, then call
`add_task(send_email, to, subject="Welcome")` anywhere inside a request: the call runs
once the response has reached the server, and the client never waits for it.
"""

from ._errors import (
    ConfigurationError,
    InvalidTaskError,
    OutsideRequestError,
    PostResponseError,
    RequestFinishedError,
    TaskLimitError,
    TaskNotDurableError,
    TaskStartedError,
)
from ._journal import Journal, is_replay
from ._middleware import PostResponseMiddleware
from ._task import TaskHandle, TaskState, add_task, cancel, volatile

__version__ = "0.1.0.dev0"

__all__ = [
    "ConfigurationError",
    "InvalidTaskError",
    "Journal",
    "OutsideRequestError",
    "PostResponseError",
    "PostResponseMiddleware",
    "RequestFinishedError",
    "TaskHandle",
    "TaskLimitError",
    "TaskNotDurableError",
    "TaskStartedError",
    "TaskState",
    "add_task",
    "cancel",
    "is_replay",
    "volatile",
]
