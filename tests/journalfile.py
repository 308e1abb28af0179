"""Open a journal file as another process would: for reading it, or planting entries."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def opened(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection to `path`, committed if the block ends without error, closed in any case
    (`with sqlite3.connect(...)` alone leaves it open; Python 3.13 warns when it is collected)."""
    db = sqlite3.connect(path)
    try:
        with db:
            yield db
    finally:
        db.close()
