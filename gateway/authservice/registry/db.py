"""The two databases the registry runs on, behind one small interface.

A transaction is a *body*: a generator that yields statements (:func:`one`, :func:`rows`,
:func:`execute`) and receives their results, then returns its value. The registry's logic
is written once, as bodies; each backend drives them:

* **SQLite** (stdlib ``sqlite3``, the default): one connection in WAL mode, owned by one
  dedicated thread, which runs a whole body — BEGIN, statements, any signing the body
  does, COMMIT — in one hop, so no blocking call runs on the event loop and writers are
  serialised by that thread (and ``BEGIN IMMEDIATE`` against other processes on the file).
* **PostgreSQL** (asyncpg): a connection pool; bodies run at READ COMMITTED, where
  ``INSERT ... ON CONFLICT DO NOTHING`` waits for a concurrent insert of the same key to
  commit and then does nothing — and the body's next statement sees the winner's row.
  That is what makes two replicas agree on one host.

SQL is written once, with ``?`` placeholders and portable statements (``ON CONFLICT``
and partial unique indexes exist in both). Every driver error becomes
:class:`RegistryUnavailable` here; none leaves this module.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import sqlite3
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

from gateway.authservice.registry.model import RegistryUnavailable

__all__ = [
    "Body",
    "Database",
    "PostgresDatabase",
    "Row",
    "SqliteDatabase",
    "Stmt",
    "as_datetime",
    "execute",
    "one",
    "open_database",
    "redact_url",
    "rows",
]

Row = tuple[Any, ...]
Dialect = Literal["sqlite", "postgresql"]
T = TypeVar("T")


@dataclass(frozen=True)
class Stmt:
    """One statement of a body; what it sends back depends on ``want``."""

    want: Literal["one", "rows", "count"]
    sql: str
    args: tuple[object, ...]


def one(sql: str, *args: object) -> Stmt:
    """Yields the first row, or None."""
    return Stmt("one", sql, args)


def rows(sql: str, *args: object) -> Stmt:
    """Yields every row."""
    return Stmt("rows", sql, args)


def execute(sql: str, *args: object) -> Stmt:
    """Yields how many rows the statement changed."""
    return Stmt("count", sql, args)


# A transaction body: ``result = yield one(...)`` ... ``return value``.
Body = Generator[Stmt, Any, T]


class Database(Protocol):
    dialect: Dialect

    async def run(self, body: Callable[[], Body[T]], *, write: bool = True) -> T:
        """Run ``body()`` in one transaction: commit if it returns, roll back if it raises.
        ``write=False`` for bodies that only read."""

    async def aclose(self) -> None: ...


def as_datetime(value: object) -> datetime:
    """A time read back from either backend (SQLite keeps ISO text, PostgreSQL timestamptz)."""
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    if isinstance(value, str):
        return datetime.fromisoformat(value).astimezone(UTC)
    raise TypeError(f"not a time: {value!r}")


def redact_url(url: str) -> str:
    """The URL without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


# --- SQLite -------------------------------------------------------------------------------


def _sqlite_param(value: object) -> object:
    # One fixed ISO format (UTC, microseconds) so that text comparisons order like times.
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    return value


def _sqlite_step(conn: sqlite3.Connection, stmt: Stmt) -> object:
    cursor = conn.execute(stmt.sql, tuple(map(_sqlite_param, stmt.args)))
    if stmt.want == "count":
        return cursor.rowcount
    found = [tuple(r) for r in cursor.fetchall()]
    if stmt.want == "one":
        return found[0] if found else None
    return found


def _sqlite_transaction(conn: sqlite3.Connection, body: Callable[[], Body[T]], write: bool) -> T:
    # IMMEDIATE takes the write lock at BEGIN, so a writer never fails on upgrading a read
    # lock while another process writes; readers start deferred and never block writers.
    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        gen = body()
        result: object = None
        while True:
            try:
                stmt = gen.send(result)
            except StopIteration as done:
                value: T = done.value
                break
            result = _sqlite_step(conn, stmt)
    except BaseException:
        if conn.in_transaction:  # some errors end the transaction themselves
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return value


class SqliteDatabase:
    """Parameters: ``path`` — the database file (created if missing)."""

    dialect: Dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self._path = path
        # One thread owns the connection: sqlite3 calls block, and never on the loop.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry-sqlite")
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        self._conn = await self._run(self._connect)

    def _connect(self) -> sqlite3.Connection:
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Created 0600 before SQLite opens it: SQLite gives its -wal and -shm files the
        # database file's mode, so the records are never readable by others, even briefly.
        os.close(os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600))
        # isolation_level=None: we issue BEGIN/COMMIT ourselves. timeout: wait for another
        # process's write lock (a second auth service on the same file) instead of failing.
        conn = sqlite3.connect(
            self._path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a registration acknowledged to a gateway survives a power cut.
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, functools.partial(fn, *args))
        except sqlite3.Error as exc:
            raise RegistryUnavailable(f"sqlite {self._path}: {exc}") from exc

    async def run(self, body: Callable[[], Body[T]], *, write: bool = True) -> T:
        if self._conn is None:
            raise RegistryUnavailable("registry database is not open")
        # One hop for the whole transaction. If the caller is cancelled meanwhile, the
        # thread still finishes it: a registration is committed or rolled back, never
        # left half-way (a gateway's retry then finds the stored answer).
        return await self._run(_sqlite_transaction, self._conn, body, write)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._run(conn.close)
        self._executor.shutdown(wait=True)

    def __repr__(self) -> str:
        return f"<SqliteDatabase {self._path}>"


# --- PostgreSQL ---------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\?")


@functools.lru_cache(maxsize=256)
def _numbered(sql: str) -> str:
    """``?`` placeholders as asyncpg's ``$1, $2, ...`` (our SQL has no literal ``?``)."""
    counter = iter(range(1, 1000))
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)


def _rowcount(status: str) -> int:
    # asyncpg returns the command tag: "INSERT 0 1", "UPDATE 3", "DELETE 0", "CREATE TABLE".
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


async def _pg_step(conn: Any, stmt: Stmt) -> object:
    sql = _numbered(stmt.sql)
    if stmt.want == "count":
        return _rowcount(str(await _pg_call(conn.execute(sql, *stmt.args))))
    if stmt.want == "one":
        row = await _pg_call(conn.fetchrow(sql, *stmt.args))
        return tuple(row) if row is not None else None
    return [tuple(r) for r in await _pg_call(conn.fetch(sql, *stmt.args))]


async def _pg_call(awaitable: Any) -> Any:
    import asyncpg

    try:
        return await awaitable
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise RegistryUnavailable(f"postgresql: {exc}") from exc


class PostgresDatabase:
    """Parameters: ``url`` — ``postgresql://user:password@host:port/dbname``;
    ``max_connections`` — the pool's size."""

    dialect: Dialect = "postgresql"

    def __init__(self, url: str, *, max_connections: int = 10) -> None:
        self._url = url
        self._max = max_connections
        self._pool: Any = None

    async def open(self) -> None:
        import asyncpg

        try:
            self._pool = await asyncpg.create_pool(
                self._url, min_size=1, max_size=self._max, command_timeout=30
            )
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, ValueError) as exc:
            raise RegistryUnavailable(f"cannot connect to {redact_url(self._url)}: {exc}") from exc

    async def run(self, body: Callable[[], Body[T]], *, write: bool = True) -> T:
        if self._pool is None:
            raise RegistryUnavailable("registry database is not open")
        conn = await _pg_call(self._pool.acquire())
        try:
            tx = conn.transaction(readonly=not write)
            await _pg_call(tx.start())
            try:
                gen = body()
                result: object = None
                while True:
                    try:
                        stmt = gen.send(result)
                    except StopIteration as done:
                        value: T = done.value
                        break
                    result = await _pg_step(conn, stmt)
            except BaseException:
                await _pg_call(tx.rollback())
                raise
            await _pg_call(tx.commit())
            return value
        finally:
            await self._pool.release(conn)

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def __repr__(self) -> str:
        return f"<PostgresDatabase {redact_url(self._url)}>"


async def open_database(url: str | None, data_dir: Path) -> SqliteDatabase | PostgresDatabase:
    """SQLite in ``data_dir`` when ``url`` is None (or ``sqlite:///PATH``), PostgreSQL for
    ``postgresql://`` / ``postgres://``; anything else is a ``ValueError``."""
    db: SqliteDatabase | PostgresDatabase
    if url is None:
        db = SqliteDatabase(data_dir / "registry.sqlite3")
    elif url.startswith("sqlite:///"):
        db = SqliteDatabase(Path(url.removeprefix("sqlite://")))
    elif url.startswith(("postgresql://", "postgres://")):
        db = PostgresDatabase(url)
    else:
        raise ValueError(
            f"--database must be postgresql://... or sqlite:///PATH, not {redact_url(url)!r}"
        )
    await db.open()
    return db
