"""A database of its own on the machine's PostgreSQL (127.0.0.1:5432, trust auth) for a test.

`.ci/run` starts PostgreSQL; elsewhere the tests that need it skip, saying how to get one.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from .servers import require_service

SERVER = "postgresql://postgres@127.0.0.1:5432"


@contextlib.contextmanager
def new_database() -> Iterator[str]:
    """The name of a new, empty database, unique to this run; dropped afterwards, whatever
    connections are still open to it."""
    require_service(
        5432,
        "the PostgreSQL tests need PostgreSQL on 127.0.0.1:5432 (trust auth for user postgres): "
        "`apt-get install postgresql && service postgresql start` (CI does)",
    )
    name = f"post_response_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with _admin() as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with _admin() as admin:
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            admin.execute(drop.format(sql.Identifier(name)))


def sessions(database: str, state: str | None = None) -> int:
    """How many connections to `database` the server has (in `state`, such as
    "idle in transaction", if given)."""
    with _admin() as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
            " AND (%s::text IS NULL OR state = %s)",
            (database, state, state),
        ).fetchone()
    return int(row[0]) if row else 0


def _admin() -> psycopg.Connection[TupleRow]:
    return psycopg.connect(f"{SERVER}/postgres", autocommit=True)
