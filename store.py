"""Storage for broker: users, the insert-only event log, settings, and per-tenant usage.

Every SQL statement of the project lives here or in pgstore.py. broker.py and tools.py see
only the `Engine` contract: `open_store` opens `Store` (SQLite, this file) for a path, or
`pgstore.PgStore` (PostgreSQL) for a postgresql:// URL. What both engines do the same way is
written once, here: the schema (pgstore adapts its types), the statements whose text both
dialects accept ($1, $2... placeholders: asyncpg binds them by position, sqlite3 by name,
see _named), the methods built on them (`SqlEngine`), and the rules as pure functions
(plan_update, plan_prune, id_floor) or SQL (RESUME_PROOF, QUOTA_CHECK).

SQLite threads: one writer thread owns the only writing connection and commits in groups:
every request queued while the previous commit was on disk goes into the next transaction,
so durable (synchronous=FULL) writes do not cap throughput at one fsync per request. Reads
run on a small pool of threads, each with its own read-only connection (WAL lets readers
run beside the writer). The event loop only ever waits on futures.
"""

from __future__ import annotations

import asyncio
import contextlib
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

# SQLite's schema; pgstore.PG_SCHEMA is this with PostgreSQL's types. Besides users and the
# event log: `latest`, the newest event id per (tenant, event name), kept in the insert's own
# transaction, so the sync on connect reads one row per name instead of scanning the log;
# `id_gaps`, ids this log never issued: every id strictly between after_id and before_id, one
# row per open that found the log behind the clock (see id_floor); `pruned`, retention's
# horizon per tenant: the newest id it deleted (events after it are all there);
# `tenant_usage`, per tenant and kept in the insert's own transaction: its event names (rows
# of `latest`) and the total size of their newest values, for the quotas (QUOTA_CHECK).
SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    revoked BOOLEAN NOT NULL DEFAULT false,
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
CREATE TABLE IF NOT EXISTS latest (
    tenant_name TEXT NOT NULL, event TEXT NOT NULL, event_id INTEGER NOT NULL,
    PRIMARY KEY (tenant_name, event)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS id_gaps (after_id INTEGER PRIMARY KEY, before_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pruned (tenant_name TEXT PRIMARY KEY, upto INTEGER NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tenant_usage (
    tenant_name TEXT PRIMARY KEY, names INTEGER NOT NULL, bytes INTEGER NOT NULL) WITHOUT ROWID;
"""

log = logging.getLogger("broker.store")

# A user as read: its columns; the last, the id at which its tenant or scopes last changed.
USER_ROW = ("id, username, password_hash, revoked, tenant_name, email, scopes, data, "
            "tokens_valid_after, access_changed_at")
UPDATABLE = ("password_hash", "revoked", "tenant_name", "email", "scopes", "data",
             "tokens_valid_after")
EVENT_COLUMNS = "id, tenant_name, event, data, timestamp"
MAX_BATCH = 512  # requests sharing one transaction at most
# Every table and its columns, in the order `broker migrate` copies them from one engine to
# another (export_tables / import_tables); a new table or column must be added here.
TABLES = {"users": USER_ROW, "events": EVENT_COLUMNS, "latest": "tenant_name, event, event_id",
          "settings": "key, value", "id_gaps": "after_id, before_id",
          "pruned": "tenant_name, upto", "tenant_usage": "tenant_name, names, bytes"}
EXPORT_PAGE = 5000  # events per page of a copy
PRUNE_SCAN_BATCHES = 4  # one prune call examines at most this many batches' worth of rows


class StoreError(Exception):
    """The database cannot do this now (disk full, locked, read-only, I/O error)."""


class UsernameTaken(Exception):
    """create_user: the username is taken."""


class QuotaExceeded(Exception):
    """An insert would take its tenant past --max_event_names (distinct event names) or
    --max_tenant_bytes (the total size of the newest value of each name; a value's size is
    the length of its event name plus that of its data, compact ASCII JSON: characters, as
    len() and SQL's length() count them). The message names the limit. Nothing was stored or
    delivered. Only growth is refused: a new name when the tenant has max_event_names
    already, or a value that would raise the total above max_tenant_bytes; so a tenant
    already over a limit (a lowered one) keeps working within what it has. The rule is
    QUOTA_CHECK, checked in the insert's own transaction."""


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
            for future in ready:  # a waiter that gave up (a timeout) is cancelled: skipped
                settle(future, None)

    async def reached(self, upto: int) -> None:
        """Return once `self.upto >= upto`."""
        if upto > self.upto:
            future = asyncio.get_running_loop().create_future()
            self.waiters.append((upto, future))
            await future


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

    async def tenant_state(self, tenant_name: str, recent: int,
                           max_bytes: int) -> tuple[list[Event], list[Event], int, int]:
        """The newest event of each name in the tenant, its `recent` newest events, but from
        the newest back only while their data stay within `max_bytes` (both oldest first), the newest event id of the whole log, and the tenant's pruned horizon
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


# -- statements both dialects run as they are ------------------------------------------------

NEWEST_ID = "SELECT coalesce(max(id), 0) FROM events"
USER_BY_NAME = f"SELECT {USER_ROW} FROM users WHERE username = $1"
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
# The proof and the newest id of the log; then the tenant's events after the id, in id order,
# up to $4 of them (its arguments: the proof's, and $4).
RESUME_HEAD = f"SELECT {RESUME_PROOF} AS proven, ({NEWEST_ID}) AS newest"
TENANT_PAGE = f"""SELECT {EVENT_COLUMNS} FROM events WHERE tenant_name = $1 AND id > $2
                  ORDER BY id LIMIT $4"""
EVENTS_SINCE = f"SELECT {EVENT_COLUMNS} FROM events WHERE id > $1 ORDER BY id LIMIT $2"
# A tenant's state in ONE statement, so from one snapshot: a first row (kind 0) with the newest
# id of the log and tenant $1's pruned horizon, then (kind 1) the newest event of each of its
# names, then (kind 2) its $2 newest events, each oldest first.
TENANT_STATE = f"""
    SELECT 0, ({NEWEST_ID}), NULL, NULL, NULL,
           (SELECT coalesce(max(upto), 0) FROM pruned WHERE tenant_name = $1)
    UNION ALL SELECT 1, e.id, e.tenant_name, e.event, e.data, e.timestamp
              FROM latest l JOIN events e ON e.id = l.event_id WHERE l.tenant_name = $1
    UNION ALL SELECT 2, e.id, e.tenant_name, e.event, e.data, e.timestamp FROM events e JOIN (
        SELECT id, sum(size) OVER (ORDER BY id DESC) - size AS newer FROM (
            SELECT id, length(data) AS size FROM events WHERE tenant_name = $1
            ORDER BY id DESC LIMIT $2) newest) sized ON e.id = sized.id WHERE sized.newer < $3
    ORDER BY 1, 2"""
# Retention: up to $2 events after $1 in id order, and whether each is the newest of its name.
PRUNE_SCAN = """
    SELECT e.id, e.tenant_name, e.timestamp, l.event_id IS NOT NULL FROM events e LEFT JOIN
    latest l ON l.tenant_name = e.tenant_name AND l.event = e.event AND l.event_id = e.id
    WHERE e.id > $1 ORDER BY e.id LIMIT $2"""
# A row when it raised tenant $1's horizon to $2.
RAISE_HORIZON = """
    INSERT INTO pruned (tenant_name, upto) VALUES ($1, $2)
    ON CONFLICT (tenant_name) DO UPDATE SET upto = excluded.upto
    WHERE excluded.upto > pruned.upto RETURNING upto"""
EARLIER_FLOOR = "SELECT coalesce(max(before_id), 0) FROM id_gaps"
RECORD_GAP = """
    INSERT INTO id_gaps (after_id, before_id) VALUES ($1, $2)
    ON CONFLICT (after_id) DO UPDATE SET before_id = excluded.before_id
    WHERE excluded.before_id > id_gaps.before_id"""
# Usage of databases made before tenant_usage: counted once, at the open that creates it.
COUNT_USAGE = """
    INSERT INTO tenant_usage (tenant_name, names, bytes)
    SELECT l.tenant_name, count(*), sum(length(l.event) + length(e.data))
    FROM latest l JOIN events e ON e.id = l.event_id
    WHERE NOT EXISTS (SELECT 1 FROM tenant_usage) GROUP BY l.tenant_name"""
# The insert's statements, with :named parameters: SQLite binds them, PostgreSQL's insert
# functions put their expressions in their place (pgstore.INSERT_FUNCTIONS).
#
# The size of the value that an insert of :event in :tenant replaces (no row: a new name).
OLD_SIZE = """SELECT length(l.event) + length(e.data) AS old FROM latest l JOIN events e
              ON e.id = l.event_id WHERE l.tenant_name = :tenant AND l.event = :event"""
# The quota rule (QuotaExceeded) for one insert of a value of :size: which limit refuses it
# ('names' or 'bytes') or NULL, and the size of the value it replaces (NULL: a new name).
QUOTA_CHECK = f"""
    SELECT CASE WHEN old IS NULL AND :max_names > 0 AND names >= :max_names THEN 'names'
                WHEN :max_bytes > 0 AND :size > coalesce(old, 0)
                     AND bytes - coalesce(old, 0) + :size > :max_bytes THEN 'bytes' END,
           old
    FROM (SELECT ({OLD_SIZE}) AS old, coalesce(u.names, 0) AS names, coalesce(u.bytes, 0) AS bytes
          FROM (SELECT 1) one LEFT JOIN tenant_usage u ON u.tenant_name = :tenant) counts"""
# After inserts the check allowed: the names they add and the bytes (the new value's size
# minus the replaced one's, :old, which is NULL for a new name).
ADD_USAGE_TO = """ON CONFLICT (tenant_name) DO UPDATE SET
    names = tenant_usage.names + excluded.names, bytes = tenant_usage.bytes + excluded.bytes"""
ADD_USAGE = f"""
    INSERT INTO tenant_usage (tenant_name, names, bytes)
    VALUES (:tenant, :old IS NULL, :size - coalesce(:old, 0)) {ADD_USAGE_TO}"""
UPSERT_LATEST = """
    INSERT INTO latest (tenant_name, event, event_id) VALUES (:tenant, :event, :id)
    ON CONFLICT (tenant_name, event) DO UPDATE SET event_id = excluded.event_id"""


class SqlEngine:
    """What both engines do with the same statements, over each one's `_rows` (one
    statement, read) and `_change` (one statement, written and committed). The other
    methods of Engine are each engine's own."""

    users_order: str  # the column that orders users by creation

    def __init__(self, on_commit: CommitHook, max_event_names: int = 0,
                 max_tenant_bytes: int = 0) -> None:
        self.on_commit = on_commit
        self.published = Watermark()
        self.prune_after = 0  # where the next prune call of a sweep continues
        self.max_event_names = max_event_names
        self.max_tenant_bytes = max_tenant_bytes
        self.loop = asyncio.get_running_loop()

    # The engine's: the rows of one statement with $1, $2... placeholders, read, or written
    # and committed.
    _rows: Callable[..., Awaitable[list[tuple]]]
    _change: Callable[..., Awaitable[list[tuple]]]

    async def setting_or_default(self, key: str, default: str) -> str:
        # A no-op update, so that the row is returned when it exists already.
        return (await self._change("INSERT INTO settings (key, value) VALUES ($1, $2) "
                                   "ON CONFLICT (key) DO UPDATE SET value = settings.value "
                                   "RETURNING value", key, default))[0][0]

    async def create_user(self, user: User) -> None:
        values = [user.id, user.username, *(column_value(c, getattr(user, c)) for c in UPDATABLE)]
        marks = ", ".join(f"${n}" for n in range(1, len(values) + 1))
        # No row back: the username (or the id) is taken.
        if not await self._change(f"INSERT INTO users (id, username, {', '.join(UPDATABLE)}) "
                                  f"VALUES ({marks}) ON CONFLICT DO NOTHING RETURNING id", *values):
            raise UsernameTaken(user.username)

    async def get_user(self, username: str) -> User | None:
        rows = await self._rows(USER_BY_NAME, username)
        return user_from_row(rows[0]) if rows else None

    async def list_users(self) -> list[User]:
        rows = await self._rows(f"SELECT {USER_ROW} FROM users ORDER BY {self.users_order}")
        return [user_from_row(row) for row in rows]

    async def update_user(self, username: str, changes: dict[str, Any]) -> User | None:
        plan = plan_update(username, changes)
        if plan is None:
            return await self.get_user(username)
        rows = await self._change(f"{plan[0]} RETURNING {USER_ROW}", *plan[1])
        return user_from_row(rows[0]) if rows else None

    async def replace_password_hash(self, username: str, old_hash: str,
                                    new_hash: str) -> User | None:
        # No account notice on PostgreSQL: the old hash, cached elsewhere, verifies the same
        # password.
        rows = await self._change("UPDATE users SET password_hash = $3 WHERE username = $1 "
                                  f"AND password_hash = $2 RETURNING {USER_ROW}",
                                  username, old_hash, new_hash)
        return user_from_row(rows[0]) if rows else None

    async def newest_event_id(self) -> int:
        return (await self._rows(NEWEST_ID))[0][0]

    async def tenant_state(self, tenant_name: str, recent: int,
                           max_bytes: int) -> tuple[list[Event], list[Event], int, int]:
        rows = await self._rows(TENANT_STATE, tenant_name, recent, max_bytes)
        latest, newest = ([Event(*row[1:]) for row in rows if row[0] == kind] for kind in (1, 2))
        return latest, newest, rows[0][1], rows[0][5]

    async def table_counts(self) -> dict[str, int]:
        return {table: (await self._rows(f"SELECT count(*) FROM {table}"))[0][0]
                for table in TABLES}

    async def export_tables(self) -> PageOfTables:
        for table, columns in TABLES.items():
            if table != "events":
                order = self.users_order if table == "users" else "1, 2"
                yield table, await self._rows(f"SELECT {columns} FROM {table} ORDER BY {order}")
                continue
            after = 0
            while page := await self._rows(EVENTS_SINCE, after, EXPORT_PAGE):
                yield table, page
                after = page[-1][0]

    def _publish(self, events: list[Event]) -> None:
        """Hand committed events to on_commit (the next ones after `published`, in id
        order), then advance `published`."""
        if not events:
            return
        try:
            self.on_commit(events)
        except Exception:  # keep delivering, and answer the inserting requests
            log.exception("publishing committed events failed")
        self.published.advance(events[-1].id)

    def quota_exceeded(self, tenant_name: str, limit: str) -> QuotaExceeded:
        """The error for QUOTA_CHECK's answer `limit` ('names' or 'bytes')."""
        flag = "max_event_names" if limit == "names" else "max_tenant_bytes"
        limited = f"--{flag} ({getattr(self, flag)} {limit})"
        return QuotaExceeded(f"tenant {tenant_name!r} is at {limited}")


# -- the rules, as pure functions -------------------------------------------------------------

def settle(future: asyncio.Future, outcome: Any) -> None:
    """Answer a request's future with its outcome, an exception or a result (unless the
    request was cancelled: its client went away)."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _named(*args: Any) -> dict[str, Any]:
    """Arguments for a statement with $1, $2... placeholders, as sqlite3 binds them."""
    return {str(number): arg for number, arg in enumerate(args, start=1)}


def column_value(column: str, value: Any) -> Any:
    """A User field as stored (revoked stays a bool: SQLite stores it as 1 or 0)."""
    if column == "scopes" or (column == "data" and value is not None):
        return json.dumps(value)
    return value


def user_from_row(row: Any) -> User:
    """A user from a row of USER_ROW's columns (revoked: 0/1 from SQLite, a bool from
    PostgreSQL)."""
    uid, username, pw_hash, revoked, tenant, email, scopes, data, valid_after, changed = row
    return User(uid, username, pw_hash, bool(revoked), tenant, email, json.loads(scopes),
                None if data is None else json.loads(data), valid_after, changed)


def plan_update(username: str, changes: dict[str, Any]) -> tuple[str, list[Any], bool] | None:
    """The statement that applies `changes` (keys from UPDATABLE, else ValueError) to the
    user, its arguments, and whether it may change the user's access (tenant or scopes);
    None when there is nothing to change.

    For the resume rule: when what the user's stream carries changes, no Last-Event-ID up to
    the newest id proves anything (see RESUME_PROOF), so access_changed_at becomes the newest
    id, in the same statement, only when a value really differs (SET sees the old row)."""
    if unknown := set(changes) - set(UPDATABLE):
        raise ValueError(f"not updatable: {sorted(unknown)}")
    values = {column: column_value(column, value) for column, value in changes.items()}
    if not values:
        return None
    assignments = [f"{column} = ${n}" for n, column in enumerate(values, start=2)]
    differs = [f"{column} <> ${n}" for n, column in enumerate(values, start=2)
               if column in ("tenant_name", "scopes")]
    if differs:
        assignments.append(f"access_changed_at = CASE WHEN {' OR '.join(differs)} "
                           f"THEN ({NEWEST_ID}) ELSE access_changed_at END")
    return (f"UPDATE users SET {', '.join(assignments)} WHERE username = $1",
            [username, *values.values()], bool(differs))


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


def id_floor(issued: int, earlier: int, now: int) -> tuple[int, tuple[int, int] | None]:
    """The smallest id this run may issue, given the largest id issued so far, the end of
    the latest recorded gap (EARLIER_FLOOR) and the clock in microseconds: the clock, unless
    the log or a gap is ahead of it; and the gap to record (RECORD_GAP), ids skipped as never
    issued.

    Why: after a restore from a backup (or a fresh database), the log may be behind ids that
    clients have already seen, from a history that is lost. Since every run starts its ids
    at the clock, such ids fall into a recorded gap (or beyond the newest), and those
    clients are sent the latest values instead of a replay that would skip what changed.
    Not below an earlier gap either (a clock set back, a log copied from a machine ahead):
    ids inside a recorded gap could never be resumed. 16 digits today; JavaScript numbers
    hold them exactly until the year 2255."""
    floor = max(issued + 1, earlier, now)
    return floor, (issued, floor) if floor > issued + 1 else None


# -- SQLite ------------------------------------------------------------------------------------

# The id is the next after the newest, but at least the floor set at open (id_floor).
INSERT_EVENT = f"""
    INSERT INTO events (id, tenant_name, event, data, timestamp)
    VALUES (max(:floor, ({NEWEST_ID}) + 1), :tenant, :event, :data, :stamp)"""


def _connect(path: str, readonly: bool = False) -> sqlite3.Connection:
    uri = f"file:{path}?mode=ro" if readonly else f"file:{path}?mode=rwc"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


@dataclass(slots=True)
class _Job:
    """One write queued for the writer thread; `run` gets the connection, returns a result."""

    run: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future
    result: Any = None


class Store(SqlEngine):
    """SQLite. Open with `await Store.open(path, on_commit)`; `on_commit(events)` runs on the
    event loop after each commit with the events it made durable, in id order, before any
    of the inserting requests is answered."""

    users_order = "rowid"

    def __init__(self, path: str, on_commit: CommitHook, **limits: int) -> None:
        super().__init__(on_commit, **limits)
        self.path = path
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.local = threading.local()
        self.readers = ThreadPoolExecutor(2, thread_name_prefix="store-read")
        self.writer: threading.Thread | None = None
        self.reader_conns: list[sqlite3.Connection] = []
        self.id_floor = 1  # the smallest id the next insert may take (see id_floor)
        self.lock_fd: int | None = _lock_for_this_process(path)  # held until close

    @classmethod
    async def open(cls, path: str, on_commit: CommitHook, **limits: int) -> Store:
        """Create or check the database (the limits: see open_store). Raises StoreError when
        it is corrupt or unreadable, rather than silently starting over with an empty one."""
        store = cls(path, on_commit, **limits)  # the read threads start at the first read
        try:
            writer_conn = await store.loop.run_in_executor(None, store._open_writer)
        except sqlite3.Error as exc:
            await store.close()  # the lock
            raise StoreError(f"cannot open database {path!r}: {exc}") from exc
        store.writer = threading.Thread(target=store._write_loop, args=(writer_conn,),
                                        name="store-write", daemon=True)
        store.writer.start()
        return store

    def _open_writer(self) -> sqlite3.Connection:
        conn = _connect(self.path)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            # FULL: a commit is on disk (the WAL is fsynced) before we acknowledge it.
            conn.execute("PRAGMA synchronous = FULL")
            # Checkpoints reuse the WAL from its start; this truncates it back after one that
            # grew large (a burst, a long backup), so the WAL stays bounded on a small disk.
            conn.execute("PRAGMA journal_size_limit = 16777216")
            conn.executescript(SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(users)")}
            if "access_changed_at" not in columns:  # a database of the first release
                conn.execute("ALTER TABLE users ADD COLUMN access_changed_at INTEGER")
            # A damaged file fails here, at start, not at the first request: quick_check
            # reads every page of every table and index.
            ok = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
            if ok != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {ok}")
            conn.execute(COUNT_USAGE)
            self.published.upto = conn.execute(NEWEST_ID).fetchone()[0]
            earlier = conn.execute(EARLIER_FLOOR).fetchone()[0]
            self.id_floor, gap = id_floor(self.published.upto, earlier, time.time_ns() // 1000)
            if gap:
                conn.execute(RECORD_GAP, _named(*gap))
        except BaseException:
            conn.close()
            raise
        return conn

    async def close(self) -> None:
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

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        stopping = False
        while not stopping:
            # A batch: the next job and every one queued meanwhile; None (close) ends it.
            batch = [self.jobs.get()]
            while batch[-1] is not None and len(batch) < MAX_BATCH and not self.jobs.empty():
                batch.append(self.jobs.get())
            stopping = batch[-1] is None
            jobs = [job for job in batch if job is not None]
            if jobs:  # not only the None of close, which takes no write lock
                error = self._commit(conn, jobs)
                self.loop.call_soon_threadsafe(self._finish, jobs, error)
        conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[_Job]) -> StoreError | None:
        """Run a batch in one transaction. A job's own failure (a quota refusal, a value
        that breaks a constraint) is rolled back to its savepoint and stays its own (its
        result); a failed commit fails them all (the error returned)."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                conn.execute("SAVEPOINT job")
                try:
                    job.result = job.run(conn)
                except Exception as exc:  # a job's own failure: QuotaExceeded, a bug...
                    if isinstance(exc, sqlite3.Error) and \
                            not isinstance(exc, sqlite3.IntegrityError):
                        raise  # the database itself is in trouble: fail the whole batch
                    conn.execute("ROLLBACK TO job")
                    job.result = exc
                conn.execute("RELEASE job")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):  # no transaction may be open
                conn.execute("ROLLBACK")
            return StoreError(str(exc))
        return None

    def _finish(self, batch: list[_Job], error: StoreError | None) -> None:
        # Publish first, so subscribers hear of an event no later than its publisher does.
        if error is None:
            self._publish([job.result for job in batch if isinstance(job.result, Event)])
        for job in batch:
            settle(job.future, error or job.result)

    async def _change(self, query: str, *args: Any) -> list[tuple]:
        return await self._write(lambda conn: conn.execute(query, _named(*args)).fetchall())

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

    async def _rows(self, query: str, *args: Any) -> list[tuple]:
        return await self._read(lambda conn: conn.execute(query, _named(*args)).fetchall())

    # -- users and events ---------------------------------------------------------------
    async def insert_event(self, tenant_name: str, event: str, data: str) -> Event:
        """As Engine.insert_event; the quota check runs in the writer's transaction, so it
        sees the inserts of the same group commit before it."""
        size = len(event) + len(data)  # see QuotaExceeded

        def run(conn: sqlite3.Connection) -> Event:
            # One set of named arguments: each statement takes the ones it names.
            args: dict[str, Any] = {
                "tenant": tenant_name, "event": event, "data": data, "size": size,
                "max_names": self.max_event_names, "max_bytes": self.max_tenant_bytes,
                "floor": self.id_floor, "stamp": int(time.time())}
            refused, old = conn.execute(QUOTA_CHECK, args).fetchone()
            if refused:
                raise self.quota_exceeded(tenant_name, refused)
            args.update(id=conn.execute(INSERT_EVENT, args).lastrowid, old=old)
            conn.execute(UPSERT_LATEST, args)
            conn.execute(ADD_USAGE, args)
            return Event(args["id"], tenant_name, event, data, args["stamp"])
        return await self._write(run)

    async def resume_page(self, username: str, tenant_name: str, after_id: int, limit: int,
                          max_bytes: int) -> tuple[list[Event], int] | None:
        """As Engine.resume_page: one read transaction; the page is read row by row, so
        nothing past `max_bytes` is loaded."""
        def run(conn: sqlite3.Connection) -> tuple[list[Event], int] | None:
            args = _named(tenant_name, after_id, username, limit)
            conn.execute("BEGIN")
            try:
                proven, newest = conn.execute(RESUME_HEAD, args).fetchone()
                if not proven:
                    return None
                page: list[Event] = []
                size = 0
                rows = conn.execute(TENANT_PAGE, args)
                while (size < max_bytes or not page) and (row := rows.fetchone()):
                    page.append(Event(*row))
                    size += len(row[3])
                rows.close()
                return page, newest
            finally:
                conn.execute("COMMIT")
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

    async def import_tables(self, pages: PageOfTables) -> None:
        """As Engine.import_tables: a transaction per page; a rowid continues from the
        largest, so new events get ids above the copied ones."""
        # The gap this open recorded for the empty log gives way to the source's gaps (it
        # would cover the ids being copied); the next start records one above them.
        await self._change("DELETE FROM id_gaps")
        async for table, rows in pages:
            marks = ", ".join("?" for _ in TABLES[table].split(","))
            statement = f"INSERT INTO {table} ({TABLES[table]}) VALUES ({marks})"

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
    file would drop this process's fcntl locks (a POSIX rule).

    A new file is created 0600 (it holds password hashes and the JWT secret); SQLite gives
    its -wal and -shm files the database file's mode."""
    try:
        # Read-only suffices (flock works on any descriptor), so a read-only file opens too.
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
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
    The limits are per tenant (0: none; see QuotaExceeded); on PostgreSQL, give every
    process the same. Raises StoreError when the database cannot be opened or is damaged;
    it is not changed then."""
    limits = {"max_event_names": max_event_names, "max_tenant_bytes": max_tenant_bytes}
    if not is_postgres_url(db):
        return await Store.open(db, on_commit, **limits)
    try:
        from pgstore import PgStore
    except ImportError:
        raise SystemExit("--db postgresql://... needs asyncpg: from the checkout, "
                         "pip install '.[postgres]'") from None
    return await PgStore.open(db, on_commit, on_account_change, **limits)
