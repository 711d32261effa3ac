"""PostgreSQL storage for broker: the interface of store.Store, for several broker processes
sharing one database (`--db postgresql://...`). Needs asyncpg: from the checkout, pip install '.[postgres]'.

PostgreSQL is both the shared store and the bus between processes:
- Inserts are group-committed, as on SQLite: every insert queued while the previous batch
  was committing goes into the next transaction, which ends with ONE `pg_notify`.
- Every process, on a notification from another process, after (re)connecting, and every
  SAFETY_NET seconds, reads the events with id > the last one it published, from the table,
  in id order, and hands them to on_commit (Hub.publish): large ones (a NOTIFY payload holds
  ~8 kB) and notifications lost while the listening connection was down included. Its own
  batches it publishes as committed when everything before them is published already, and
  reads them back after the others' otherwise (_answer); its own notifications, which name
  it in their payload, are not read back.
- Commit order = id order. Ids come from a sequence, and with concurrent writers a
  transaction that drew id 7 can commit after the one that drew id 8: a reader that saw 8
  and moved its "after" mark past it would never see 7. So each batch transaction takes the
  transaction-level advisory lock COMMIT_ORDER_LOCK before it draws ids; the lock is held
  until its commit (and released only after the commit is visible). Batches of all processes
  therefore draw ids and commit one after the other, and the committed ids are always a
  prefix of the sequence. The cost: one batch commits at a time across the whole cluster of
  processes, so the insert rate is (events per batch) / (one batch's round trips + fsync).
  Group commit keeps that high (docs/scaling.md has the numbers); user and setting writes do
  not take the lock, since no resume depends on their order (except a change of tenant or
  scopes, below).
- Ids and resume (see store.py's RESUME_PROOF): each process start raises the id sequence
  to the clock in microseconds under COMMIT_ORDER_LOCK and records the skipped range in
  id_gaps; a change of tenant or scopes records the newest id under the same lock; retention
  raises `pruned` in the transaction that deletes. A resume checks all that and reads its
  first page in one statement, so in one snapshot.
- Account changes (update_user) send a notification on ACCOUNTS_CHANNEL in their
  transaction; every process then re-reads the user and drops its cached credentials
  (on_account_change). After a reconnect of the listening connection, every cached account
  is re-read, since notifications may have been missed.

Errors: a database that is down or unreachable raises StoreError (broker answers 503 with
Retry-After); the background tasks retry by themselves until it is back.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from store import (
    HORIZON,
    MAX_BATCH,
    PRUNE_SCAN,
    PRUNE_SCAN_BATCHES,
    RAISE_HORIZON,
    RESUME_PROOF,
    TABLES,
    UPDATABLE,
    USER_ROW,
    AccountHook,
    CommitHook,
    Event,
    PageOfTables,
    Pruned,
    StoreError,
    User,
    UsernameTaken,
    Watermark,
    _column_value,
    export_pages,
    plan_prune,
)

log = logging.getLogger("broker.pgstore")

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
    tokens_valid_after BIGINT NOT NULL DEFAULT 0,
    seq BIGSERIAL                      -- creation order, for list_users (SQLite's rowid)
);
CREATE TABLE IF NOT EXISTS events (
    id BIGSERIAL PRIMARY KEY,          -- committed in id order: see COMMIT_ORDER_LOCK
    tenant_name TEXT NOT NULL,
    event TEXT NOT NULL,
    data TEXT NOT NULL,                -- compact JSON text, byte for byte (not jsonb)
    timestamp BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_tenant ON events (tenant_name, id);
CREATE TABLE IF NOT EXISTS latest (
    tenant_name TEXT NOT NULL,
    event TEXT NOT NULL,
    event_id BIGINT NOT NULL,
    PRIMARY KEY (tenant_name, event)
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- The resume rule's records, as in store.py: newest id when tenant or scopes last changed,
-- ids never issued (every id strictly between after_id and before_id), retention's horizon.
ALTER TABLE users ADD COLUMN IF NOT EXISTS access_changed_at BIGINT;
CREATE TABLE IF NOT EXISTS id_gaps (
    after_id BIGINT PRIMARY KEY,
    before_id BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS pruned (
    tenant_name TEXT PRIMARY KEY,
    upto BIGINT NOT NULL
);
"""

# Advisory lock keys: arbitrary constants, the same in every broker process.
SCHEMA_LOCK = 0x62726F6B657201  # "broker" 01: schema setup, when processes start at once
COMMIT_ORDER_LOCK = 0x62726F6B657202  # "broker" 02: one event batch commits at a time
PRUNE_LOCK = 0x62726F6B657203  # "broker" 03: one process prunes at a time
EVENTS_CHANNEL = "broker_events"
ACCOUNTS_CHANNEL = "broker_accounts"
POOL_SIZE = 8  # connections per process, besides the listening one
SAFETY_NET = 2.0  # seconds: read the log and check the listening connection this often
PUBLISH_WAIT = 5.0  # longest an insert waits to be published before it is answered anyway
CATCH_UP_PAGE = 500
TIMEOUT = 10.0  # seconds for a connection or a statement
# What a database that is down, restarting or unreachable raises.
DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)

NEWEST_ID = "SELECT coalesce(max(id), 0) FROM events"
EVENT_COLUMNS = "id, tenant_name, event, data, timestamp"
# A batch transaction in ONE round trip: a single statement outside any transaction block,
# so it commits when it ends (asyncpg returns its rows at ReadyForQuery, after that commit,
# so an insert is still answered only once committed). The function takes the commit-order
# lock, then reads `prior`, the newest id committed before this batch (a PL/pgSQL statement
# takes a fresh snapshot, so it sees every batch that committed while this one waited for the
# lock), then inserts the events, updates `latest` and notifies; it returns the ids and
# `prior`. The notification's payload names the sending process (PgStore.sender). Each round
# trip also waits for a turn of a busy event loop, so one instead of three keeps commits
# short and batches large.
INSERT_FUNCTION = f"""
CREATE OR REPLACE FUNCTION broker_insert_events(
    tenants TEXT[], names TEXT[], datas TEXT[], stamp BIGINT, channel TEXT, sender TEXT)
RETURNS TABLE (new_id BIGINT, prior_id BIGINT) LANGUAGE plpgsql AS $$
DECLARE
    committed_before BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock({COMMIT_ORDER_LOCK});
    SELECT coalesce(max(e.id), 0) INTO committed_before FROM events e;
    RETURN QUERY WITH inserted AS (
        INSERT INTO events (tenant_name, event, data, timestamp)
        SELECT t, n, d, stamp FROM unnest(tenants, names, datas) WITH ORDINALITY
            AS batch(t, n, d, i)
        ORDER BY i
        RETURNING events.id, events.tenant_name, events.event),
    upsert AS (
        INSERT INTO latest (tenant_name, event, event_id)
        SELECT DISTINCT ON (tenant_name, event) tenant_name, event, id FROM inserted
        ORDER BY tenant_name, event, id DESC
        ON CONFLICT (tenant_name, event) DO UPDATE SET event_id = excluded.event_id)
    SELECT inserted.id, committed_before FROM inserted;
    PERFORM pg_notify(channel, sender);
END $$"""
INSERT_EVENTS = "SELECT new_id, prior_id FROM broker_insert_events($1, $2, $3, $4, $5, $6)"
EVENTS_SINCE = f"SELECT {EVENT_COLUMNS} FROM events WHERE id > $1 ORDER BY id LIMIT $2"
# Sync reads: the events, the newest id of the whole log and the tenant's pruned horizon in
# ONE statement, so in one snapshot and one round trip (one row of NULL events when none).
LATEST_OF_TENANT = f"""
    SELECT ({NEWEST_ID}), ({HORIZON}), e.* FROM (SELECT 1) one LEFT JOIN (
        SELECT e.id, e.tenant_name, e.event, e.data, e.timestamp
        FROM latest l JOIN events e ON e.id = l.event_id WHERE l.tenant_name = $1) e ON true
    ORDER BY e.id"""
RECENT_OF_TENANT = f"""
    SELECT {EVENT_COLUMNS} FROM events WHERE tenant_name = $1 ORDER BY id DESC LIMIT $2"""
# The proof (store.RESUME_PROOF: tenant $1, id $2, user $3), the newest id and the first
# page after $2 (up to $4 events, until their data reach $5 bytes), all in one statement
# (one snapshot): one row of NULL events when there are none. octet_length reads a stored
# value's size without loading it.
RESUME_PAGE = f"""
    SELECT head.proven, head.newest, e.id, e.tenant_name, e.event, e.data, e.timestamp
    FROM (SELECT {RESUME_PROOF} AS proven, ({NEWEST_ID}) AS newest) head
    LEFT JOIN (SELECT *, sum(octet_length(data)) OVER (ORDER BY id) - octet_length(data)
                         AS before
               FROM (SELECT {EVENT_COLUMNS} FROM events WHERE tenant_name = $1 AND id > $2
                     ORDER BY id LIMIT $4) page) e ON head.proven AND e.before < $5
    ORDER BY e.id"""
RECORD_GAP = """
    INSERT INTO id_gaps (after_id, before_id) VALUES ($1, $2)
    ON CONFLICT (after_id) DO UPDATE SET before_id = greatest(id_gaps.before_id,
                                                              excluded.before_id)"""

def _user(row: asyncpg.Record) -> User:
    return User(row[0], row[1], row[2], row[3], row[4], row[5], json.loads(row[6]),
                None if row[7] is None else json.loads(row[7]), row[8], row[9])


class _Insert:
    __slots__ = ("data", "event", "future", "tenant_name")

    def __init__(self, tenant_name: str, event: str, data: str, future: asyncio.Future) -> None:
        self.tenant_name = tenant_name
        self.event = event
        self.data = data
        self.future = future


class PgStore:
    """Open with `await PgStore.open(url, on_commit, on_account_change)`. on_commit(events)
    gets every committed event of every process once, in id order; on_account_change(name)
    is awaited after another (or this) process changed that user, with None when changes
    may have been missed."""

    def __init__(self, url: str, on_commit: CommitHook,
                 on_account_change: AccountHook | None) -> None:
        self.url = url
        self.on_commit = on_commit
        self.on_account_change = on_account_change
        self.loop = asyncio.get_running_loop()
        self.pool: asyncpg.Pool | None = None
        self.queued: list[_Insert] = []
        self.queued_event = asyncio.Event()  # set when `queued` has inserts
        self.published = Watermark()
        self.prune_after = 0  # where the next prune call of a sweep continues
        self.wake = asyncio.Event()  # the log has (or may have) news: read it
        # The payload of this process's own notifications: _answer publishes its own batches
        # (or wakes the catch-up itself), so hearing them back needs no read of the log.
        self.sender = secrets.token_hex(8)
        self.account_notices: asyncio.Queue[str | None] = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        self.answering: set[asyncio.Task] = set()  # a reference keeps them running

    @classmethod
    async def open(cls, url: str, on_commit: CommitHook,
                   on_account_change: AccountHook | None = None) -> PgStore:
        store = cls(url, on_commit, on_account_change)
        try:
            store.pool = await asyncpg.create_pool(url, min_size=1, max_size=POOL_SIZE,
                                                   reset=_reset,
                                                   timeout=TIMEOUT, command_timeout=TIMEOUT)
            async with store.pool.acquire() as conn, conn.transaction():
                # Several processes may start at once; CREATE ... IF NOT EXISTS alone can
                # still collide in the catalog, so schema setup is serialized.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
                await conn.execute(SCHEMA)
                await conn.execute(INSERT_FUNCTION)
                store.published.upto = await conn.fetchval(NEWEST_ID)
                await conn.execute("SELECT pg_advisory_xact_lock($1)", COMMIT_ORDER_LOCK)
                await _start_id_range(conn)
        except Exception as exc:  # noqa: BLE001 - a bad URL, refused login, missing database
            if store.pool is not None:
                store.pool.terminate()
            raise StoreError(f"cannot open the PostgreSQL database: {exc}") from None
        store.tasks = [asyncio.create_task(work()) for work in (
            store._write_loop, store._listen_loop, store._catch_up_loop, store._account_loop)]
        return store

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.close(), TIMEOUT)
            except (TimeoutError, *DB_ERRORS):
                self.pool.terminate()

    async def _run(self, work: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
        """Run `work` on a pooled connection; a database in trouble raises StoreError."""
        assert self.pool is not None
        try:
            async with self.pool.acquire(timeout=TIMEOUT) as conn:
                return await work(conn)
        except asyncpg.UniqueViolationError:
            raise
        except (TimeoutError, *DB_ERRORS) as exc:
            raise StoreError(str(exc) or type(exc).__name__) from exc

    # -- settings -----------------------------------------------------------------------
    async def setting_or_default(self, key: str, default: str) -> str:
        """The stored value of `key`; stores `default` first when there is none. Processes
        starting at once agree: the first insert wins, the others read it."""
        async def run(conn: asyncpg.Connection) -> str:
            await conn.execute("INSERT INTO settings (key, value) VALUES ($1, $2) "
                               "ON CONFLICT (key) DO NOTHING", key, default)
            return await conn.fetchval("SELECT value FROM settings WHERE key = $1", key)
        return await self._run(run)

    # -- users --------------------------------------------------------------------------
    async def create_user(self, user: User) -> None:
        values = [user.id, user.username, *(_column_value(c, getattr(user, c))
                                            for c in UPDATABLE)]
        values[2 + UPDATABLE.index("revoked")] = user.revoked  # a boolean column here
        marks = ", ".join(f"${i}" for i in range(1, len(values) + 1))
        try:
            await self._run(lambda conn: conn.execute(
                f"INSERT INTO users (id, username, {', '.join(UPDATABLE)}) VALUES ({marks})",
                *values))
        except asyncpg.UniqueViolationError:
            raise UsernameTaken(user.username) from None

    async def get_user(self, username: str) -> User | None:
        row = await self._run(lambda conn: conn.fetchrow(
            f"SELECT {USER_ROW} FROM users WHERE username = $1", username))
        return _user(row) if row else None

    async def list_users(self) -> list[User]:
        rows = await self._run(lambda conn: conn.fetch(
            f"SELECT {USER_ROW} FROM users ORDER BY seq"))
        return [_user(row) for row in rows]

    async def update_user(self, username: str, changes: dict[str, Any]) -> User | None:
        """Apply `changes` (keys from UPDATABLE), tell every process, return the user."""
        unknown = set(changes) - set(UPDATABLE)
        if unknown:
            raise ValueError(f"not updatable: {sorted(unknown)}")
        values = {k: v if k == "revoked" else _column_value(k, v) for k, v in changes.items()}
        access = {k: v for k, v in values.items() if k in ("tenant_name", "scopes")}

        async def run(conn: asyncpg.Connection) -> User | None:
            async with conn.transaction():
                if access:
                    # For the resume rule (see resume_page), only when a value differs. Under
                    # the commit-order lock, the newest id is exact: every event committed
                    # after the change has a larger id.
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", COMMIT_ORDER_LOCK)
                    differs = " OR ".join(f"{column} <> ${i}"
                                          for i, column in enumerate(access, start=2))
                    await conn.execute(f"UPDATE users SET access_changed_at = ({NEWEST_ID}) "
                                       f"WHERE username = $1 AND ({differs})",
                                       username, *access.values())
                if values:
                    assignments = ", ".join(f"{column} = ${i}"
                                            for i, column in enumerate(values, start=2))
                    await conn.execute(f"UPDATE users SET {assignments} WHERE username = $1",
                                       username, *values.values())
                    await conn.execute("SELECT pg_notify($1, $2)", ACCOUNTS_CHANNEL, username)
                row = await conn.fetchrow(f"SELECT {USER_ROW} FROM users WHERE username = $1",
                                          username)
            return _user(row) if row else None
        return await self._run(run)

    async def replace_password_hash(self, username: str, old_hash: str,
                                    new_hash: str) -> User | None:
        """Set the user's password hash to `new_hash` if it is still `old_hash` (a rehash
        with new parameters must not undo a password change); the updated user, or None.
        No notification: the old hash, cached elsewhere, verifies the same password."""
        row = await self._run(lambda conn: conn.fetchrow(
            f"UPDATE users SET password_hash = $3 WHERE username = $1 AND password_hash = $2 "
            f"RETURNING {USER_ROW}", username, old_hash, new_hash))
        return _user(row) if row else None

    # -- events: group commit ------------------------------------------------------------
    async def insert_event(self, tenant_name: str, event: str, data: str) -> Event:
        """Append an event; returns once it is committed and published here."""
        future = self.loop.create_future()
        self.queued.append(_Insert(tenant_name, event, data, future))
        self.queued_event.set()
        return await future

    async def _write_loop(self) -> None:
        while True:
            await self.queued_event.wait()
            # One turn of the loop first, so that the inserts read meanwhile (and the answers
            # of the last batch) go out with this batch rather than wait for the next commit:
            # measured, fan-out to 100 subscribers gets fewer, larger batches (bench/).
            await asyncio.sleep(0)
            batch, self.queued = self.queued[:MAX_BATCH], self.queued[MAX_BATCH:]
            if not self.queued:
                self.queued_event.clear()
            try:
                events, prior = await self._run(functools.partial(self._commit, batch=batch))
            except Exception as exc:  # fail this batch, never the writer
                if not isinstance(exc, StoreError):
                    log.exception("inserting a batch failed")
                self.wake.set()  # it may have committed all the same: its notice was ignored
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            # Answered once published, without holding up the next batch.
            answer = asyncio.ensure_future(self._answer(batch, events, prior))
            self.answering.add(answer)
            answer.add_done_callback(self.answering.discard)

    async def _commit(self, conn: asyncpg.Connection,
                      batch: list[_Insert]) -> tuple[list[Event], int]:
        """One transaction for the batch; returns its events and `prior`."""
        stamp = int(time.time())
        rows = await conn.fetch(INSERT_EVENTS, [j.tenant_name for j in batch],
                                [j.event for j in batch], [j.data for j in batch], stamp,
                                EVENTS_CHANNEL, self.sender)
        ids = sorted(row[0] for row in rows)  # drawn in batch order: see ORDER BY i
        events = [Event(event_id, j.tenant_name, j.event, j.data, stamp)
                  for event_id, j in zip(ids, batch)]
        return events, rows[0][1]

    async def _answer(self, batch: list[_Insert], events: list[Event], prior: int) -> None:
        if self.published.upto >= prior:
            # Everything committed before this batch is published already: publish it now,
            # without reading it back (whatever the catch-up published meanwhile is skipped).
            self._publish([e for e in events if e.id > self.published.upto])
        elif self.published.upto < events[-1].id:
            self.wake.set()  # others' events come first: the catch-up reads ours after them
            try:
                # Committed is acknowledged: if reading it back stalls (the database just
                # went down), answer anyway; it is published when the database is back.
                await asyncio.wait_for(self.published.reached(events[-1].id), PUBLISH_WAIT)
            except TimeoutError:
                log.warning("event %d committed but not yet published", events[-1].id)
        for job, event in zip(batch, events):
            if not job.future.done():
                job.future.set_result(event)

    # -- delivery: read the log in id order ---------------------------------------------
    async def _catch_up_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), SAFETY_NET)
            except TimeoutError:
                pass  # the safety net: a notification can be lost
            self.wake.clear()
            try:
                await self._run(self._catch_up)
            except StoreError as exc:
                log.warning("cannot read new events (retrying): %s", exc)
                await asyncio.sleep(0.5)
            except Exception:  # a bug must not end delivery for good
                log.exception("reading new events failed (retrying)")
                await asyncio.sleep(0.5)

    async def _catch_up(self, conn: asyncpg.Connection) -> None:
        while True:
            rows = await conn.fetch(EVENTS_SINCE, self.published.upto, CATCH_UP_PAGE)
            # An own batch may have been published while this read was under way.
            self._publish([Event(*row) for row in rows if row[0] > self.published.upto])
            if len(rows) < CATCH_UP_PAGE:
                return

    def _publish(self, events: list[Event]) -> None:
        """Hand events to on_commit: always the next ones after `published`, in id order."""
        if not events:
            return
        try:
            self.on_commit(events)
        except Exception:  # keep delivering
            log.exception("publishing committed events failed")
        self.published.advance(events[-1].id)

    async def _listen_loop(self) -> None:
        """Keep one connection LISTENing; reconnect when it drops, then recover."""
        reconnect = False
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(self.url, timeout=TIMEOUT)
                await conn.add_listener(EVENTS_CHANNEL, self._heard)
                await conn.add_listener(ACCOUNTS_CHANNEL,
                                        lambda *notice: self.account_notices.put_nowait(notice[3]))
                if reconnect:
                    log.info("listening again on the database; recovering missed changes")
                    self.account_notices.put_nowait(None)  # re-read every cached account
                self.wake.set()  # and the events committed meanwhile
                reconnect = True
                while not conn.is_closed():
                    await asyncio.sleep(SAFETY_NET)
                    await conn.execute("SELECT 1", timeout=SAFETY_NET)  # a dead link shows
            except (TimeoutError, *DB_ERRORS) as exc:
                log.warning("listening connection to the database lost (retrying): %s", exc)
            except Exception:  # keep listening, whatever happened
                log.exception("listening connection failed (retrying)")
            finally:
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(0.5)

    def _heard(self, _conn: object, _pid: int, _channel: str, sender: str) -> None:
        """Another process committed events (an own batch is published by _answer)."""
        if sender != self.sender:
            self.wake.set()

    async def _account_loop(self) -> None:
        """Account notices, one at a time in arrival order (a later notice's state wins)."""
        while True:
            username = await self.account_notices.get()
            if self.on_account_change is None:
                continue
            try:
                await self.on_account_change(username)
            except Exception:  # StoreError included: the cache was dropped
                log.exception("refreshing account %r failed", username)

    # -- event reads ----------------------------------------------------------------------
    async def newest_event_id(self) -> int:
        return await self._run(lambda conn: conn.fetchval(NEWEST_ID))

    async def tenant_state(self, tenant_name: str,
                           recent: int) -> tuple[list[Event], list[Event], int, int]:
        """As store.Engine.tenant_state: one repeatable-read transaction."""
        async def run(conn: asyncpg.Connection) -> tuple[list[Event], list[Event], int, int]:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                latest = await conn.fetch(LATEST_OF_TENANT, tenant_name)
                rows = await conn.fetch(RECENT_OF_TENANT, tenant_name, recent)
            return ([Event(*row[2:]) for row in latest if row[2] is not None],
                    [Event(*row) for row in reversed(rows)], latest[0][0], latest[0][1])
        return await self._run(run)

    async def resume_page(self, username: str, tenant_name: str, after_id: int, limit: int,
                          max_bytes: int) -> tuple[list[Event], int] | None:
        """As store.Engine.resume_page: the proof and the page in one statement
        (RESUME_PAGE), so in one snapshot."""
        rows = await self._run(lambda conn: conn.fetch(RESUME_PAGE, tenant_name, after_id,
                                                       username, limit, max_bytes))
        if not rows[0][0]:
            return None
        return [Event(*row[2:]) for row in rows if row[2] is not None], rows[0][1]

    async def prune(self, older_than: int, batch: int = 500) -> Pruned:
        """As store.Engine.prune: one transaction (see store.plan_prune), one process at a
        time (PRUNE_LOCK)."""
        async def run(conn: asyncpg.Connection) -> tuple[Pruned, int]:
            async with conn.transaction():
                if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", PRUNE_LOCK):
                    return Pruned(0, {}, False), 0  # another process does this sweep
                rows = await conn.fetch(PRUNE_SCAN, self.prune_after,
                                        batch * PRUNE_SCAN_BATCHES)
                doomed, uptos, cursor = plan_prune(rows, older_than, batch)
                await conn.execute("DELETE FROM events WHERE id = ANY($1::bigint[])", doomed)
                raised = {tenant: upto for tenant, upto in uptos.items()
                          if await conn.fetchval(RAISE_HORIZON, tenant, upto)}
            return Pruned(len(doomed), raised, cursor is not None), cursor or 0
        pruned, self.prune_after = await self._run(run)
        return pruned

    # -- whole-database copies (broker migrate) -----------------------------------------
    async def table_counts(self) -> dict[str, int]:
        async def run(conn: asyncpg.Connection) -> dict[str, int]:
            return {table: await conn.fetchval(f"SELECT count(*) FROM {table}")
                    for table in TABLES}
        return await self._run(run)

    def export_tables(self) -> PageOfTables:
        return export_pages(self._rows, "seq")

    async def _rows(self, query: str, *args: Any) -> list[tuple]:
        """The rows of one statement, as tuples."""
        return [tuple(row) for row in await self._run(lambda conn: conn.fetch(query, *args))]

    async def import_tables(self, pages: PageOfTables) -> None:
        """Insert export_tables' pages (of any engine) into this empty database in one
        transaction, ids kept; the id sequence restarts above the largest."""
        async def run(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                # The gap this open recorded for the empty log gives way to the source's
                # (it would cover the ids being copied); the next start records its own.
                await conn.execute("DELETE FROM id_gaps")
                async for table, rows in pages:
                    if table == "users":
                        rows = [(*row[:3], bool(row[3]), *row[4:]) for row in rows]
                    await conn.copy_records_to_table(table, records=rows,
                                                     columns=TABLES[table].split(", "))
                await conn.execute("SELECT setval(pg_get_serial_sequence('events', 'id'), "
                                   "coalesce(max(id), 0) + 1, false) FROM events")
        await self._run(run)


async def _start_id_range(conn: asyncpg.Connection) -> None:
    """Raise the id sequence to the clock in microseconds (store._start_id_range says why)
    and record the ids skipped as never issued; the caller holds COMMIT_ORDER_LOCK, so no
    batch is drawing ids. The range starts at the sequence's last value, not at max(id): an
    id drawn by a batch that rolled back was never seen, and no drawn id falls in the gap."""
    sequence = await conn.fetchval("SELECT pg_get_serial_sequence('events', 'id')")
    last_value, is_called = await conn.fetchrow(f"SELECT last_value, is_called FROM {sequence}")
    issued = max(last_value if is_called else last_value - 1, await conn.fetchval(NEWEST_ID))
    earlier = await conn.fetchval("SELECT coalesce(max(before_id), 0) FROM id_gaps")
    floor = max(issued + 1, earlier, time.time_ns() // 1000)
    if floor > issued + 1:
        await conn.execute("SELECT setval($1, $2, false)", sequence, floor)
        await conn.execute(RECORD_GAP, issued, floor)


async def _reset(conn: asyncpg.Connection) -> None:
    """Between two uses of a pooled connection. Nothing of ours outlives a transaction (no
    LISTEN, only transaction-level advisory locks), so asyncpg's default reset, a round trip
    each time, is not needed: only a transaction left open is rolled back."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")
