"""The two databases the registry runs on, behind one small interface.

SQL is written once, with ``?`` placeholders and portable statements (``INSERT ... ON
CONFLICT ... DO NOTHING`` and partial unique indexes exist in both); each backend adapts
placeholders and time values. Every error of a driver becomes
:class:`RegistryUnavailable` here; none leaves this module.

* **SQLite** (stdlib ``sqlite3``, the default): one connection in WAL mode, used from one
  dedicated thread so that no blocking call runs on the event loop; ``BEGIN IMMEDIATE``
  makes each transaction take the write lock at once, so two transactions (or two
  processes on one file) are serialised rather than failing on upgrade.
* **PostgreSQL** (asyncpg): a connection pool; transactions at READ COMMITTED, where
  ``INSERT ... ON CONFLICT DO NOTHING`` waits for a concurrent insert of the same key to
  commit and then does nothing, which is what makes two replicas agree on one host.
"""

from __future__ import annotations

import asyncio
import functools
import re
import sqlite3
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

from gateway.authservice.registry.model import RegistryUnavailable

__all__ = [
    "Database",
    "PostgresDatabase",
    "Row",
    "SqliteDatabase",
    "Tx",
    "as_datetime",
    "open_database",
    "redact_url",
]

Row = tuple[Any, ...]
Dialect = Literal["sqlite", "postgresql"]
T = TypeVar("T")


class Tx(Protocol):
    """One open transaction."""

    async def execute(self, sql: str, *args: object) -> int:
        """Run a statement; returns the number of rows it changed."""

    async def fetchone(self, sql: str, *args: object) -> Row | None: ...

    async def fetchall(self, sql: str, *args: object) -> list[Row]: ...


class Database(Protocol):
    dialect: Dialect

    def transaction(self) -> Any:
        """``async with db.transaction() as tx``: commit on success, roll back on error."""

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


class _SqliteTx:
    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db

    async def execute(self, sql: str, *args: object) -> int:
        return await self._db.call(_sqlite_execute, sql, args)

    async def fetchone(self, sql: str, *args: object) -> Row | None:
        rows = await self._db.call(_sqlite_fetch, sql, args)
        return rows[0] if rows else None

    async def fetchall(self, sql: str, *args: object) -> list[Row]:
        return await self._db.call(_sqlite_fetch, sql, args)


def _sqlite_execute(conn: sqlite3.Connection, sql: str, args: tuple[object, ...]) -> int:
    return conn.execute(sql, tuple(map(_sqlite_param, args))).rowcount


def _sqlite_fetch(conn: sqlite3.Connection, sql: str, args: tuple[object, ...]) -> list[Row]:
    return list(conn.execute(sql, tuple(map(_sqlite_param, args))).fetchall())


class SqliteDatabase:
    """Parameters: ``path`` — the database file (created if missing)."""

    dialect: Dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self._path = path
        # One thread owns the connection: sqlite3 calls block, and never on the loop.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        self._conn = await self._run(self._connect)

    def _connect(self) -> sqlite3.Connection:
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves. timeout: wait for another
        # process's write lock (a second auth service on the same file) instead of failing.
        conn = sqlite3.connect(
            self._path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a registration acknowledged to a gateway survives a power cut.
        conn.execute("PRAGMA synchronous=FULL")
        self._path.chmod(0o600)
        return conn

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, functools.partial(fn, *args))
        except sqlite3.Error as exc:
            raise RegistryUnavailable(f"sqlite {self._path}: {exc}") from exc

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        if self._conn is None:
            raise RegistryUnavailable("registry database is not open")
        return await self._run(fn, self._conn, *args)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        async with self._lock:
            await self.call(sqlite3.Connection.execute, "BEGIN IMMEDIATE")
            try:
                yield _SqliteTx(self)
            except BaseException:
                # Shielded: a cancelled request must still leave the connection usable.
                await asyncio.shield(self.call(sqlite3.Connection.execute, "ROLLBACK"))
                raise
            await asyncio.shield(self.call(sqlite3.Connection.execute, "COMMIT"))

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


class _PgTx:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: object) -> int:
        status = await _pg_call(self._conn.execute(_numbered(sql), *args))
        return _rowcount(str(status))

    async def fetchone(self, sql: str, *args: object) -> Row | None:
        row = await _pg_call(self._conn.fetchrow(_numbered(sql), *args))
        return tuple(row) if row is not None else None

    async def fetchall(self, sql: str, *args: object) -> list[Row]:
        rows = await _pg_call(self._conn.fetch(_numbered(sql), *args))
        return [tuple(r) for r in rows]


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

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        if self._pool is None:
            raise RegistryUnavailable("registry database is not open")
        conn = await _pg_call(self._pool.acquire())
        try:
            tx = conn.transaction()
            await _pg_call(tx.start())
            try:
                yield _PgTx(conn)
            except BaseException:
                await _pg_call(tx.rollback())
                raise
            await _pg_call(tx.commit())
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
