"""SQLite storage for broker: users, the insert-only event log, and settings.

Every SQL statement of the project lives in this file. broker.py sees only the `Store`
class, whose coroutine methods are its whole interface, so another engine could stand in.

Threads: one writer thread owns the only writing connection and commits in groups: every
request queued while the previous commit was on disk goes into the next transaction, so
durable (synchronous=FULL) writes do not cap throughput at one fsync per request. Reads run
on a small pool of threads, each with its own read-only connection (WAL lets readers run
beside the writer). The event loop only ever waits on futures.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    tenant_name TEXT NOT NULL,
    email TEXT,
    scopes TEXT NOT NULL,              -- JSON array of strings
    data TEXT,                         -- JSON, or NULL
    tokens_valid_after INTEGER NOT NULL DEFAULT 0,  -- JWTs issued before this second are void
    access_changed_at INTEGER  -- newest event id when its tenant or scopes last changed, or NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,            -- increases with every insert, never reused (see id_gaps)
    tenant_name TEXT NOT NULL,
    event TEXT NOT NULL,
    data TEXT NOT NULL,                -- compact JSON, exactly as sent on the stream
    timestamp INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_tenant ON events (tenant_name, id);
-- The newest event id per (tenant, event name), kept in the insert's own transaction, so
-- the sync on connect reads one row per name instead of scanning the log.
CREATE TABLE IF NOT EXISTS latest (
    tenant_name TEXT NOT NULL,
    event TEXT NOT NULL,
    event_id INTEGER NOT NULL,
    PRIMARY KEY (tenant_name, event)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- Ids this log never issued: every id strictly between after_id and before_id. One row per
-- open that found the log behind the clock (see Store._open_writer).
CREATE TABLE IF NOT EXISTS id_gaps (
    after_id INTEGER PRIMARY KEY,
    before_id INTEGER NOT NULL
);
-- Retention's horizon per tenant: the newest id it deleted. Events after it are all there.
CREATE TABLE IF NOT EXISTS pruned (
    tenant_name TEXT PRIMARY KEY,
    upto INTEGER NOT NULL
) WITHOUT ROWID;
"""

log = logging.getLogger("broker.store")

USER_COLUMNS = "id, username, password_hash, revoked, tenant_name, email, scopes, data, " \
               "tokens_valid_after"
# A user as read: the columns above, and the id at which its tenant or scopes last changed.
USER_ROW = USER_COLUMNS + ", access_changed_at"
UPDATABLE = ("password_hash", "revoked", "tenant_name", "email", "scopes", "data",
             "tokens_valid_after")
MAX_BATCH = 512  # requests sharing one transaction at most
# Every table and its columns, in the order `broker migrate` copies them from one engine to
# another (export_tables / import_tables); a new table or column must be added here.
TABLES = {
    "users": USER_COLUMNS + ", access_changed_at",
    "events": "id, tenant_name, event, data, timestamp",
    "latest": "tenant_name, event, event_id",
    "settings": "key, value",
    "id_gaps": "after_id, before_id",
    "pruned": "tenant_name, upto",
}
EXPORT_PAGE = 5000  # events per page of a copy


class StoreError(Exception):
    """The database cannot do this now (disk full, locked, read-only, I/O error)."""


class UsernameTaken(Exception):
    pass


class QuotaExceeded(Exception):
    """An insert would take its tenant past --max_event_names or --max_tenant_bytes; the
    message names the limit. Nothing was stored."""


@dataclass(slots=True)
class User:
    id: str
    username: str
    password_hash: str
    revoked: bool
    tenant_name: str
    email: str | None
    scopes: list[str]
    data: Any
    tokens_valid_after: int
    # The newest event id when its tenant or scopes last changed (None: never): a resume
    # from an id up to it proves nothing (see resume_page). Set by the store only.
    access_changed_at: int | None = None


@dataclass(slots=True)
class Event:
    id: int
    tenant_name: str
    event: str
    data: str  # compact JSON text
    timestamp: int


@dataclass(slots=True)
class Pruned:
    """What one prune call did: how many events it deleted, each tenant whose horizon it
    raised with the new horizon, and whether to call again now (more old events may wait)."""
    deleted: int
    horizons: dict[str, int]
    more: bool


class Watermark:
    """The newest event id handed to on_commit, and a way to wait until one has been."""

    def __init__(self, upto: int = 0) -> None:
        self.upto = upto
        self.waiters: list[tuple[int, asyncio.Future[None]]] = []

    def advance(self, upto: int) -> None:
        """Set `upto` and wake every waiter for an id up to it."""
        self.upto = upto
        if self.waiters:
            ready = [future for wanted, future in self.waiters if wanted <= upto]
            self.waiters = [(wanted, future) for wanted, future in self.waiters if wanted > upto]
            for future in ready:
                if not future.done():  # a waiter that gave up (a timeout) is cancelled
                    future.set_result(None)

    async def reached(self, upto: int) -> None:
        """Return once `self.upto >= upto`."""
        if upto > self.upto:
            future = asyncio.get_running_loop().create_future()
            self.waiters.append((upto, future))
            await future


def _user(row: tuple) -> User:
    uid, username, pw_hash, revoked, tenant, email, scopes, data, valid_after, changed = row
    return User(uid, username, pw_hash, bool(revoked), tenant, email, json.loads(scopes),
                None if data is None else json.loads(data), valid_after, changed)


CommitHook = Callable[[list[Event]], None]
AccountHook = Callable[[str | None], Awaitable[None]]
PageOfTables = AsyncIterator[tuple[str, list[tuple]]]


class Engine(Protocol):
    """What broker.py and tools.py use of a storage engine: `Store` (SQLite, this file) and
    `pgstore.PgStore` (PostgreSQL); `open_store` opens the one a --db names.

    Every coroutine raises StoreError when the database cannot do it now (down, unreachable,
    disk full, locked, read-only); nothing was changed then, unless its docstring says
    otherwise, and the caller may try again later. Committed means durable: on disk (SQLite,
    synchronous=FULL) or committed by PostgreSQL.

    on_commit(events), given to open_store, runs on the event loop with every committed event
    exactly once, in id order, in batches; on PostgreSQL those of every process sharing the
    database. Ids increase with every insert and are never reused."""

    # The newest id handed to on_commit: set at open to the newest id of the log, advanced
    # right after each on_commit call. Waiting on it is how a reader of the log catches up
    # with what on_commit delivered.
    published: Watermark

    async def close(self) -> None:
        """Finish the reads and writes under way, then close every connection."""

    async def setting_or_default(self, key: str, default: str) -> str:
        """The stored value of `key`; stores `default` first when there is none (of
        processes starting at once, the first one's wins)."""

    async def create_user(self, user: User) -> None:
        """Store a new user (not its access_changed_at). Raises UsernameTaken."""

    async def get_user(self, username: str) -> User | None:
        """The user as committed, or None."""

    async def list_users(self) -> list[User]:
        """Every user, in creation order."""

    async def update_user(self, username: str, changes: dict[str, Any]) -> User | None:
        """Apply `changes` (keys from UPDATABLE; another key raises ValueError) in one
        transaction and return the updated user, or None when there is none. When the tenant
        or the scopes really change, access_changed_at becomes the newest event id, in the
        same transaction (see resume_page). On PostgreSQL, every process hears of it
        (on_account_change)."""

    async def replace_password_hash(self, username: str, old_hash: str,
                                    new_hash: str) -> User | None:
        """Set the password hash to `new_hash` if it is still `old_hash` (a rehash with new
        parameters must not undo a password change); the updated user, or None."""

    async def insert_event(self, tenant_name: str, event: str, data: str) -> Event:
        """Append an event (data: compact JSON text) and make it the tenant's latest value
        of `event`; returns once it is committed and handed to on_commit. Raises
        QuotaExceeded (nothing stored, nothing delivered) when it would take the tenant past
        a limit given to open_store."""

    async def newest_event_id(self) -> int:
        """The newest id of the log (0 when empty), as committed now."""

    async def tenant_state(self, tenant_name: str,
                           recent: int) -> tuple[list[Event], list[Event], int, int]:
        """The newest event of each name in the tenant, its `recent` newest events (both
        oldest first), the newest event id of the whole log, and the tenant's pruned horizon
        (the newest id retention deleted from it; 0 when none), all from one snapshot."""

    async def resume_page(self, username: str, tenant_name: str, after_id: int, limit: int,
                          max_bytes: int) -> tuple[list[Event], int] | None:
        """When the log proves that a client of `username` which has seen `after_id` has
        seen everything of `tenant_name` up to it: the tenant's events after `after_id`, in
        id order, up to `limit` of them and stopping once their data reach `max_bytes` in
        total (at least one when there is one), and the newest id of the log. None when it
        cannot prove it (the caller then sends the latest values). Proof and page come from
        one snapshot. The proof (RESUME_PROOF): the id was issued here (not newer than the
        newest, not in a gap of ids never issued), no event of the tenant after it was
        pruned, the user's tenant and scopes did not change at or after it, and it is not the
        id of another tenant's event."""

    async def prune(self, older_than: int, batch: int = 500) -> Pruned:
        """Delete up to `batch` events with a timestamp before `older_than` (Unix seconds),
        oldest first, never the newest of a name in a tenant, raising each tenant's horizon
        in the same transaction. One call examines a bounded number of rows (it continues
        where the previous call of the sweep stopped); call again while `more`. On
        PostgreSQL one process prunes at a time: the others' calls do nothing meanwhile."""

    async def table_counts(self) -> dict[str, int]:
        """The number of rows of every table of TABLES."""

    def export_tables(self) -> PageOfTables:
        """Every row of every table as (table, rows) pages, columns as in TABLES; users in
        creation order, events in id order."""

    async def import_tables(self, pages: PageOfTables) -> None:
        """Insert export_tables' pages (of either engine) into this empty database, ids
        kept; new events get ids above them."""


def _connect(path: str, readonly: bool = False) -> sqlite3.Connection:
    uri = f"file:{path}?mode=ro" if readonly else f"file:{path}?mode=rwc"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 5000")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a commit is on disk (the WAL is fsynced) before we acknowledge it.
        conn.execute("PRAGMA synchronous = FULL")
        # Checkpoints reuse the WAL from its start; this truncates it back after one that
        # grew large (a burst, a long backup), so the WAL stays bounded on a small disk.
        conn.execute("PRAGMA journal_size_limit = 16777216")
    return conn


class _Job:
    """One write queued for the writer thread; `run` gets the connection, returns a result."""

    __slots__ = ("future", "result", "run")

    def __init__(self, run: Callable[[sqlite3.Connection], Any], future: asyncio.Future) -> None:
        self.run = run
        self.future = future
        self.result: Any = None


class Store:
    """Open with `await Store.open(path, on_commit)`; `on_commit(events)` runs on the event
    loop after each commit with the events it made durable, in id order, before any of the
    inserting requests is answered."""

    def __init__(self, path: str, on_commit: CommitHook) -> None:
        self.path = path
        self.on_commit = on_commit
        self.published = Watermark()
        self.prune_after = 0  # where the next prune call of a sweep continues
        self.loop = asyncio.get_running_loop()
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.local = threading.local()
        self.readers = ThreadPoolExecutor(2, thread_name_prefix="store-read")
        self.writer: threading.Thread | None = None
        self.writer_conn: sqlite3.Connection | None = None
        self.reader_conns: list[sqlite3.Connection] = []
        self.id_floor = 1  # the smallest id the next insert may take (see _start_id_range)
        self.lock_fd: int | None = None

    @classmethod
    async def open(cls, path: str, on_commit: CommitHook) -> Store:
        """Create or check the database. Raises StoreError when it is corrupt or unreadable,
        rather than silently starting over with an empty one."""
        store = cls(path, on_commit)
        try:
            store.lock_fd = _lock_for_this_process(path)
        except BaseException:
            store.readers.shutdown()
            raise
        try:
            store.writer_conn = await store.loop.run_in_executor(None, store._open_writer)
        except sqlite3.Error as exc:
            store.readers.shutdown()
            os.close(store.lock_fd)  # type: ignore[arg-type]  # set just above
            raise StoreError(f"cannot open database {path!r}: {exc}") from exc
        store.writer = threading.Thread(target=store._write_loop, name="store-write",
                                        daemon=True)
        store.writer.start()
        return store

    def _open_writer(self) -> sqlite3.Connection:
        conn = _connect(self.path)
        try:
            conn.executescript(SCHEMA)
            _add_missing_columns(conn)
            # Touch every table: a damaged file fails here, at start, not at the first request.
            for table in ("users", "events", "latest", "settings", "id_gaps", "pruned"):
                conn.execute(f"SELECT count(*) FROM (SELECT 1 FROM {table} LIMIT 1)").fetchone()
            ok = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
            if ok != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {ok}")
            self.published.upto = conn.execute(NEWEST_ID).fetchone()[0]
            self.id_floor = _start_id_range(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    async def close(self) -> None:
        """Finish the reads and writes under way, then close every connection."""
        await self.loop.run_in_executor(None, self.readers.shutdown)
        for conn in self.reader_conns:
            conn.close()
        # The writer closes last: the last connection to close checkpoints the WAL into the
        # database file and removes it, which a read-only connection cannot do.
        if self.writer is not None:
            self.jobs.put(None)
            await self.loop.run_in_executor(None, self.writer.join)
            self.writer = None
        if self.lock_fd is not None:  # after every connection: see _lock_for_this_process
            os.close(self.lock_fd)
            self.lock_fd = None

    # -- writes: one thread, group commit -----------------------------------------------
    async def _write(self, run: Callable[[sqlite3.Connection], Any]) -> Any:
        future = self.loop.create_future()
        self.jobs.put(_Job(run, future))
        return await future

    def _write_loop(self) -> None:
        conn = self.writer_conn
        assert conn is not None
        while True:
            job = self.jobs.get()
            if job is None:
                break
            batch = [job]
            while len(batch) < MAX_BATCH:
                try:
                    more = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self.jobs.put(None)  # stop after this batch
                    break
                batch.append(more)
            events, error = self._commit(conn, batch)
            self.loop.call_soon_threadsafe(self._finish, batch, events, error)
        conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[_Job]) -> tuple[list[Event], Any]:
        """Run a batch in one transaction. A job's own failure (say a taken username) is
        rolled back to its savepoint and stays its own; a failed commit fails them all."""
        events: list[Event] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                conn.execute("SAVEPOINT job")
                try:
                    job.result = job.run(conn)
                except sqlite3.IntegrityError as exc:
                    conn.execute("ROLLBACK TO job")
                    job.result = exc
                except sqlite3.Error:
                    raise  # the database itself is in trouble: fail the whole batch
                except Exception as exc:  # noqa: BLE001 - a bug in one job must not stop the writer
                    conn.execute("ROLLBACK TO job")
                    job.result = exc
                conn.execute("RELEASE job")
                if isinstance(job.result, Event):
                    events.append(job.result)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            return [], StoreError(str(exc))
        return events, None

    def _finish(self, batch: list[_Job], events: list[Event], error: Exception | None) -> None:
        # Publish first, so subscribers hear of an event no later than its publisher does.
        if events:
            try:
                self.on_commit(events)
            except Exception:  # never leave the writers' requests unanswered
                log.exception("publishing committed events failed")
            self.published.advance(events[-1].id)
        for job in batch:
            if job.future.done():  # the request was cancelled (client went away)
                continue
            outcome = error or job.result
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

    # -- reads: a small pool, one read-only connection per thread -----------------------
    async def _read(self, run: Callable[[sqlite3.Connection], Any]) -> Any:
        return await self.loop.run_in_executor(self.readers, self._run_read, run)

    def _run_read(self, run: Callable[[sqlite3.Connection], Any]) -> Any:
        conn = getattr(self.local, "conn", None)
        try:
            if conn is None:
                conn = self.local.conn = _connect(self.path, readonly=True)
                self.reader_conns.append(conn)
            return run(conn)
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc

    # -- settings -----------------------------------------------------------------------
    async def setting_or_default(self, key: str, default: str) -> str:
        """The stored value of `key`; stores `default` first when there is none."""
        def run(conn: sqlite3.Connection) -> str:
            conn.execute("INSERT OR IGNORE INTO settings (key, value) VALUES (?, ?)",
                         (key, default))
            return conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()[0]
        return await self._write(run)

    # -- users --------------------------------------------------------------------------
    async def create_user(self, user: User) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT INTO users ({USER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (user.id, user.username, user.password_hash, int(user.revoked),
                 user.tenant_name, user.email, json.dumps(user.scopes),
                 None if user.data is None else json.dumps(user.data), user.tokens_valid_after))
        try:
            await self._write(run)
        except sqlite3.IntegrityError:
            raise UsernameTaken(user.username) from None

    async def get_user(self, username: str) -> User | None:
        def run(conn: sqlite3.Connection) -> User | None:
            row = conn.execute(f"SELECT {USER_ROW} FROM users WHERE username = ?",
                               (username,)).fetchone()
            return _user(row) if row else None
        return await self._read(run)

    async def list_users(self) -> list[User]:
        def run(conn: sqlite3.Connection) -> list[User]:
            rows = conn.execute(f"SELECT {USER_ROW} FROM users ORDER BY rowid").fetchall()
            return [_user(row) for row in rows]
        return await self._read(run)

    async def update_user(self, username: str, changes: dict[str, Any]) -> User | None:
        """Apply `changes` (keys from UPDATABLE) and return the updated user, or None."""
        unknown = set(changes) - set(UPDATABLE)
        if unknown:
            raise ValueError(f"not updatable: {sorted(unknown)}")
        values = {k: _column_value(k, v) for k, v in changes.items()}

        def run(conn: sqlite3.Connection) -> User | None:
            access = {k: v for k, v in values.items() if k in ("tenant_name", "scopes")}
            if access:
                # For the resume rule: when what the user's stream carries changes, no
                # Last-Event-ID up to this one proves anything (see resume_page). Recorded in
                # the change's own transaction, and only when a value really differs.
                differs = " OR ".join(f"{column} <> ?" for column in access)
                conn.execute(f"UPDATE users SET access_changed_at = ({NEWEST_ID}) "
                             f"WHERE username = ? AND ({differs})", (username, *access.values()))
            if values:
                assignments = ", ".join(f"{column} = ?" for column in values)
                conn.execute(f"UPDATE users SET {assignments} WHERE username = ?",
                             (*values.values(), username))
            row = conn.execute(f"SELECT {USER_ROW} FROM users WHERE username = ?",
                               (username,)).fetchone()
            return _user(row) if row else None
        return await self._write(run)

    async def replace_password_hash(self, username: str, old_hash: str,
                                    new_hash: str) -> User | None:
        """Set the user's password hash to `new_hash` if it is still `old_hash` (a rehash
        with new parameters must not undo a password change); the updated user, or None."""
        def run(conn: sqlite3.Connection) -> User | None:
            changed = conn.execute(
                "UPDATE users SET password_hash = ? WHERE username = ? AND password_hash = ?",
                (new_hash, username, old_hash)).rowcount
            row = conn.execute(f"SELECT {USER_ROW} FROM users WHERE username = ?",
                               (username,)).fetchone()
            return _user(row) if changed and row else None
        return await self._write(run)

    # -- events -------------------------------------------------------------------------
    async def insert_event(self, tenant_name: str, event: str, data: str) -> Event:
        """Append an event; returns once it is committed (and published)."""
        def run(conn: sqlite3.Connection) -> Event:
            stamp = int(time.time())
            cursor = conn.execute(INSERT_EVENT, (self.id_floor, tenant_name, event, data, stamp))
            event_id: int = cursor.lastrowid  # type: ignore[assignment]  # set by an INSERT
            conn.execute(
                "INSERT INTO latest (tenant_name, event, event_id) VALUES (?, ?, ?) "
                "ON CONFLICT (tenant_name, event) DO UPDATE SET event_id = excluded.event_id",
                (tenant_name, event, event_id))
            return Event(event_id, tenant_name, event, data, stamp)
        return await self._write(run)

    async def newest_event_id(self) -> int:
        def run(conn: sqlite3.Connection) -> int:
            return conn.execute(NEWEST_ID).fetchone()[0]
        return await self._read(run)

    async def tenant_state(self, tenant_name: str,
                           recent: int) -> tuple[list[Event], list[Event], int, int]:
        """As Engine.tenant_state: one read transaction."""
        def run(conn: sqlite3.Connection) -> tuple[list[Event], list[Event], int, int]:
            conn.execute("BEGIN")
            try:
                latest = conn.execute(LATEST_OF_TENANT, (tenant_name,)).fetchall()
                newest_first = conn.execute(RECENT_OF_TENANT, (tenant_name, recent)).fetchall()
                newest = conn.execute(NEWEST_ID).fetchone()[0]
                horizon = conn.execute(HORIZON, _named(tenant_name)).fetchone()[0]
            finally:
                conn.execute("COMMIT")
            return ([Event(*row) for row in latest],
                    [Event(*row) for row in reversed(newest_first)], newest, horizon)
        return await self._read(run)

    async def resume_page(self, username: str, tenant_name: str, after_id: int, limit: int,
                          max_bytes: int) -> tuple[list[Event], int] | None:
        """As Engine.resume_page: one read transaction; the page is read row by row, so
        nothing past `max_bytes` is loaded."""
        def run(conn: sqlite3.Connection) -> tuple[list[Event], int] | None:
            conn.execute("BEGIN")
            try:
                proven = conn.execute(f"SELECT {RESUME_PROOF}",
                                      _named(tenant_name, after_id, username)).fetchone()[0]
                if not proven:
                    return None
                page, size = [], 0
                rows = conn.execute(EVENTS_AFTER, (tenant_name, after_id, limit))
                for row in rows:
                    page.append(Event(*row))
                    size += len(row[3])
                    if size >= max_bytes:
                        break
                rows.close()
                newest = conn.execute(NEWEST_ID).fetchone()[0]
            finally:
                conn.execute("COMMIT")
            return page, newest
        return await self._read(run)

    async def prune(self, older_than: int, batch: int = 500) -> Pruned:
        """As Engine.prune: one write transaction (see plan_prune)."""
        def run(conn: sqlite3.Connection) -> tuple[Pruned, int]:
            rows = conn.execute(PRUNE_SCAN, _named(self.prune_after, batch * PRUNE_SCAN_BATCHES))
            doomed, uptos, cursor = plan_prune(rows.fetchall(), older_than, batch)
            conn.executemany("DELETE FROM events WHERE id = ?", [(i,) for i in doomed])
            raised = {tenant: upto for tenant, upto in uptos.items()
                      if conn.execute(RAISE_HORIZON, _named(tenant, upto)).fetchall()}
            return Pruned(len(doomed), raised, cursor is not None), cursor or 0
        pruned, self.prune_after = await self._write(run)
        return pruned

    # -- whole-database copies (broker migrate) -----------------------------------------
    async def table_counts(self) -> dict[str, int]:
        def run(conn: sqlite3.Connection) -> dict[str, int]:
            return {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                    for table in TABLES}
        return await self._read(run)

    def export_tables(self) -> PageOfTables:
        return export_pages(self._rows, "rowid")

    async def _rows(self, query: str, *args: Any) -> list[tuple]:
        """The rows of one read (a statement with $1, $2... placeholders)."""
        return await self._read(lambda conn: conn.execute(query, _named(*args)).fetchall())

    async def import_tables(self, pages: PageOfTables) -> None:
        """Insert export_tables' pages (of any engine) into this empty database, ids kept:
        new events get ids above them (a rowid continues from the largest)."""
        # The gap this open recorded for the empty log gives way to the source's gaps (it
        # would cover the ids being copied); the next start records one above them.
        await self._write(lambda conn: conn.execute("DELETE FROM id_gaps").rowcount)
        async for table, rows in pages:
            if not rows:
                continue
            if table == "users":
                rows = [(*row[:3], int(row[3]), *row[4:]) for row in rows]
            statement = f"INSERT INTO {table} ({TABLES[table]}) VALUES " \
                        f"({', '.join('?' * len(rows[0]))})"

            def insert(conn: sqlite3.Connection, query: str = statement, page: list = rows) -> None:
                conn.executemany(query, page)
            await self._write(insert)


def _lock_for_this_process(path: str) -> int:
    """Take an exclusive flock on the database file itself, held until the process exits
    (or the Store closes): a second broker on the same file would not hear the first one's
    inserts, so it is refused. The kernel drops the lock when the process dies, so a crash
    never blocks the restart. SQLite locks with POSIX fcntl locks, which on Linux are
    independent of flock, so readers beside the server (sqlite3, a backup) are not blocked.
    The descriptor stays open while SQLite's connections are: closing any descriptor of the
    file would drop this process's fcntl locks (a POSIX rule)."""
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except PermissionError:  # a read-only file: flock works on any descriptor
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise StoreError(f"cannot open database {path!r}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StoreError(
            f"database {path!r} is in use by another broker process. One process owns a "
            "SQLite file; to run several processes, use PostgreSQL: --db postgresql://...") \
            from None
    return fd

NEWEST_ID = "SELECT coalesce(max(id), 0) FROM events"
# The id is the next after the newest, but at least the floor set at open: see _start_id_range.
INSERT_EVENT = f"""
    INSERT INTO events (id, tenant_name, event, data, timestamp)
    VALUES (max(?, ({NEWEST_ID}) + 1), ?, ?, ?, ?)"""
# Statements with $1, $2... are the same text on both engines: asyncpg binds them by
# position, sqlite3 by name (see _named).
#
# Whether the log proves that a client of user $3 holding id $2 has seen all of tenant $1 up
# to it: the id was issued here (not newer than the newest, not in a gap of ids never issued:
# a restored backup, another database), the events after it were not pruned, the user's
# tenant or scopes did not change at or after it, and it is not the id of another tenant's
# event (which only a stream of that tenant could have sent). An SQL expression.
RESUME_PROOF = f"""
    $2 <= ({NEWEST_ID})
    AND coalesce((SELECT before_id FROM id_gaps WHERE after_id < $2
                  ORDER BY after_id DESC LIMIT 1), 0) <= $2
    AND coalesce((SELECT upto FROM pruned WHERE tenant_name = $1), 0) <= $2
    AND coalesce((SELECT access_changed_at FROM users WHERE username = $3), -1) < $2
    AND coalesce((SELECT tenant_name FROM events WHERE id = $2), $1) = $1"""
HORIZON = "SELECT coalesce(max(upto), 0) FROM pruned WHERE tenant_name = $1"
# Retention: up to $2 events after $1 in id order; whether each is the newest of its name.
PRUNE_SCAN = """
    SELECT e.id, e.tenant_name, e.timestamp, l.event_id IS NOT NULL FROM events e
    LEFT JOIN latest l ON l.tenant_name = e.tenant_name AND l.event = e.event
                      AND l.event_id = e.id
    WHERE e.id > $1 ORDER BY e.id LIMIT $2"""
PRUNE_SCAN_BATCHES = 4  # one prune call examines at most this many batches' worth of rows
# A row when it raised tenant $1's horizon to $2.
RAISE_HORIZON = """
    INSERT INTO pruned (tenant_name, upto) VALUES ($1, $2)
    ON CONFLICT (tenant_name) DO UPDATE SET upto = excluded.upto
    WHERE excluded.upto > pruned.upto RETURNING upto"""
LATEST_OF_TENANT = """
    SELECT e.id, e.tenant_name, e.event, e.data, e.timestamp
    FROM latest l JOIN events e ON e.id = l.event_id
    WHERE l.tenant_name = ? ORDER BY e.id"""
RECENT_OF_TENANT = """
    SELECT id, tenant_name, event, data, timestamp FROM events
    WHERE tenant_name = ? ORDER BY id DESC LIMIT ?"""
EVENTS_AFTER = """
    SELECT id, tenant_name, event, data, timestamp FROM events
    WHERE tenant_name = ? AND id > ? ORDER BY id LIMIT ?"""


def _named(*args: Any) -> dict[str, Any]:
    """Arguments for a statement with $1, $2... placeholders, as sqlite3 binds them."""
    return {str(number): arg for number, arg in enumerate(args, start=1)}


async def export_pages(rows: Callable[..., Awaitable[list[tuple]]],
                       users_order: str) -> PageOfTables:
    """Engine.export_tables, given the engine's `rows(query, *args)` and the column that
    orders its users by creation."""
    for table, columns in TABLES.items():
        if table != "events":
            order = users_order if table == "users" else "1, 2"
            yield table, await rows(f"SELECT {columns} FROM {table} ORDER BY {order}")
            continue
        after, query = 0, f"SELECT {columns} FROM events WHERE id > $1 ORDER BY id LIMIT $2"
        while page := await rows(query, after, EXPORT_PAGE):
            yield table, page
            after = page[-1][0]


def plan_prune(rows: list, older_than: int,
               batch: int) -> tuple[list[int], dict[str, int], int | None]:
    """Which of PRUNE_SCAN's rows (id, tenant, timestamp, is the newest of its name) one
    prune call deletes: the old ones that are not the newest of their name, up to `batch`,
    stopping at the first young one (ids follow time). Returns their ids, the largest id
    deleted per tenant, and the id to continue after, or None when the sweep is done.

    Why a cursor: the kept newest values stay at the log's start; a scan from the start in
    every call would pass them all again, and with many names hold the writer for long."""
    doomed: list[int] = []
    uptos: dict[str, int] = {}
    cursor = None
    for event_id, tenant, stamp, is_latest in rows:
        if stamp >= older_than:
            return doomed, uptos, None
        if not is_latest:
            doomed.append(event_id)
            uptos[tenant] = event_id
        cursor = event_id
        if len(doomed) == batch:
            return doomed, uptos, cursor
    return doomed, uptos, cursor if len(rows) == batch * PRUNE_SCAN_BATCHES else None


def _start_id_range(conn: sqlite3.Connection) -> int:
    """The floor for the ids of this run: the current time in microseconds, or the next id
    when the log is ahead of that. The ids skipped over are recorded as never issued.

    Why: after a restore from a backup (or a fresh database), the log may be behind ids that
    clients have already seen, from a history that is lost. Since every run starts its ids
    at the clock, such ids fall into a recorded gap (or beyond the newest), and those
    clients are sent the latest values instead of a replay that would skip what changed.
    16 digits today; JavaScript numbers hold them exactly until the year 2255."""
    newest = conn.execute(NEWEST_ID).fetchone()[0]
    # Not below an earlier floor either (a clock set back, a log copied from a machine ahead):
    # ids inside a recorded gap could never be resumed.
    earlier = conn.execute("SELECT coalesce(max(before_id), 0) FROM id_gaps").fetchone()[0]
    floor = max(newest + 1, earlier, time.time_ns() // 1000)
    if floor > newest + 1:
        conn.execute("INSERT INTO id_gaps (after_id, before_id) VALUES (?, ?) "
                     "ON CONFLICT (after_id) DO UPDATE SET "
                     "before_id = max(before_id, excluded.before_id)", (newest, floor))
    return floor


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Columns added since the first release, for databases made before them."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(users)")}
    if "access_changed_at" not in columns:
        conn.execute("ALTER TABLE users ADD COLUMN access_changed_at INTEGER")


def _column_value(column: str, value: Any) -> Any:
    if column == "scopes":
        return json.dumps(value)
    if column == "data":
        return None if value is None else json.dumps(value)
    if column == "revoked":
        return int(value)
    return value


# -- choosing the engine --------------------------------------------------------------------

def is_postgres_url(db: str) -> bool:
    return db.startswith(("postgresql://", "postgres://"))


def shown_db(db: str) -> str:
    """The database for the log, without a password in a URL."""
    if not is_postgres_url(db):
        return db
    parts = urlsplit(db)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


async def open_store(db: str, on_commit: CommitHook, on_account_change: AccountHook | None = None,
                     *, max_event_names: int = 0, max_tenant_bytes: int = 0) -> Engine:
    """SQLite for a path; PostgreSQL for a postgresql:// URL (pgstore is imported only then).
    The limits are per tenant (0: none; see QuotaExceeded). Raises StoreError when the
    database cannot be opened or is damaged; it is not changed then."""
    if not is_postgres_url(db):
        return await Store.open(db, on_commit)
    try:
        from pgstore import PgStore
    except ImportError:
        raise SystemExit("--db postgresql://... needs asyncpg: from the checkout, "
                         "pip install '.[postgres]'") from None
    return await PgStore.open(db, on_commit, on_account_change)
