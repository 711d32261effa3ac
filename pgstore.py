"""PostgreSQL storage for broker: the store.Engine contract, for several broker processes
sharing one database (`--db postgresql://...`). Needs asyncpg: from the checkout,
pip install '.[postgres]'. What is the same on both engines is in store.py (SqlEngine, the
shared statements and rules); this file holds what PostgreSQL does its own way.

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
- Quotas (store.QUOTA_CHECK) are checked in the insert function, under COMMIT_ORDER_LOCK,
  so every process sees the same usage; a refused insert fails alone, not its batch. A batch
  far from the limits is inserted set-based, as without quotas (INSERT_FUNCTIONS): measured,
  a per-insert loop cut the rate of large batches from about 55,000 to 11,000 inserts/s.
- Account changes (update_user) send a notification on ACCOUNTS_CHANNEL in their
  transaction; every process then re-reads the user and drops its cached credentials
  (on_account_change). After a reconnect of the listening connection, every cached account
  is re-read, since notifications may have been missed.

Errors: a database that is down or unreachable raises StoreError (broker answers 503 with
Retry-After); the background tasks retry by themselves until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import asyncpg

import store
from store import AccountHook, CommitHook, Event, PageOfTables, Pruned, StoreError, User

log = logging.getLogger("broker.pgstore")

# store.SCHEMA with PostgreSQL's types, a column for the users' creation order (SQLite's
# rowid), and the column added since the first release, for databases made before it.
PG_SCHEMA = store.SCHEMA
for sqlite_text, pg_text in (("users (", "users (\n    seq BIGSERIAL,"),
                             ("\n    id INTEGER PRIMARY KEY", "\n    id BIGSERIAL PRIMARY KEY"),
                             ("INTEGER", "BIGINT"), (" WITHOUT ROWID", "")):
    PG_SCHEMA = PG_SCHEMA.replace(sqlite_text, pg_text)
PG_SCHEMA += "ALTER TABLE users ADD COLUMN IF NOT EXISTS access_changed_at BIGINT;"

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
# What a database that is down, restarting or unreachable raises (a TimeoutError is an OSError).
DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)

# A batch transaction in ONE round trip: a single statement outside any transaction block,
# so it commits when it ends (asyncpg returns its rows at ReadyForQuery, after that commit,
# so an insert is still answered only once committed). broker_insert_events takes the
# commit-order lock, then reads `prior_id`, the newest id committed before this batch (a
# PL/pgSQL statement takes a fresh snapshot, so it sees every batch that committed while this
# one waited for the lock); then inserts, and notifies. It returns a row per insert, in batch
# order: its id or the quota that refused it, and `prior_id`. The notification's payload
# names the sending process (PgStore.sender). Each round trip also waits for a turn of a busy
# event loop, so one instead of several keeps commits short and batches large.
#
# The quotas: a batch that cannot reach a limit (every tenant in it stays within both even if
# each of its inserts were a new name, its whole size added) is inserted at once by
# broker_insert_rows, set-based; otherwise each insert is checked (store.QUOTA_CHECK) and
# inserted alone, so that each sees the ones before it. broker_insert_rows inserts the events
# in batch order and updates `latest` and `tenant_usage` (by each name's last value, against
# the stored state, which the statement's snapshot still shows).
ROW = {"tenant": "tenants[i]", "event": "event_names[i]", "max_names": "max_names",
       "max_bytes": "max_bytes", "size": "length(event_names[i]) + length(datas[i])"}


def _plpgsql(statement: str, **expressions: str) -> str:
    """A store.py statement with PL/pgSQL's expressions for its :named parameters."""
    return re.sub(r":(\w+)", lambda name: expressions[name[1]], statement)


INSERT_FUNCTIONS = f"""
CREATE OR REPLACE FUNCTION broker_insert_rows(
    tenants TEXT[], event_names TEXT[], datas TEXT[], stamp BIGINT)
RETURNS SETOF BIGINT LANGUAGE sql AS $$
    WITH batch AS (SELECT * FROM unnest(tenants, event_names, datas) WITH ORDINALITY
                   AS b(t, n, d, i)),
    inserted AS (INSERT INTO events (tenant_name, event, data, timestamp)
        SELECT t, n, d, stamp FROM batch ORDER BY i RETURNING id, tenant_name, event),
    upsert AS (INSERT INTO latest (tenant_name, event, event_id)
        SELECT DISTINCT ON (tenant_name, event) tenant_name, event, id FROM inserted
        ORDER BY tenant_name, event, id DESC
        ON CONFLICT (tenant_name, event) DO UPDATE SET event_id = excluded.event_id),
    usage AS (INSERT INTO tenant_usage (tenant_name, names, bytes)
        SELECT t, count(*) FILTER (WHERE old IS NULL), sum(length(n) + length(d) - coalesce(old, 0))
        FROM (SELECT DISTINCT ON (t, n) t, n, d FROM batch ORDER BY t, n, i DESC) newest
        LEFT JOIN LATERAL ({_plpgsql(store.OLD_SIZE, tenant="t", event="n")}) o ON true
        GROUP BY t {store.ADD_USAGE_TO})
    SELECT id FROM inserted ORDER BY id
$$;
CREATE OR REPLACE FUNCTION broker_insert_events(
    tenants TEXT[], event_names TEXT[], datas TEXT[], stamp BIGINT, channel TEXT, sender TEXT,
    max_names BIGINT, max_bytes BIGINT)
RETURNS TABLE (new_id BIGINT, prior_id BIGINT, refused TEXT) LANGUAGE plpgsql AS $$
DECLARE
    old_size BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock({COMMIT_ORDER_LOCK});
    SELECT coalesce(max(e.id), 0) INTO prior_id FROM events e;
    IF NOT EXISTS (SELECT FROM unnest(tenants, event_names, datas) AS b(t, n, d)
                   LEFT JOIN tenant_usage u ON u.tenant_name = t GROUP BY t, u.names, u.bytes
                   HAVING max_names > 0 AND coalesce(u.names, 0) + count(*) > max_names
                       OR max_bytes > 0 AND coalesce(u.bytes, 0) + sum(length(n) + length(d))
                                            > max_bytes) THEN
        RETURN QUERY SELECT id, prior_id, NULL::text
                     FROM broker_insert_rows(tenants, event_names, datas, stamp) AS id;
    ELSE
        FOR i IN 1 .. cardinality(tenants) LOOP
            {_plpgsql(store.QUOTA_CHECK, **ROW)} INTO refused, old_size;
            -- No row, when refused: then new_id is NULL.
            SELECT broker_insert_rows(tenants[i:i], event_names[i:i], datas[i:i], stamp)
            INTO new_id WHERE refused IS NULL;
            RETURN NEXT;
        END LOOP;
    END IF;
    PERFORM pg_notify(channel, sender);
END $$"""
INSERT_EVENTS = "SELECT * FROM broker_insert_events($1, $2, $3, $4, $5, $6, $7, $8)"
# The proof (store.RESUME_PROOF: tenant $1, id $2, user $3), the newest id and the first
# page after $2 (up to $4 events, until their data reach $5 > 0 bytes), all in one statement
# (one snapshot): one row of NULL events when there are none. octet_length reads a stored
# value's size without loading it.
RESUME_PAGE = f"""
    SELECT head.proven, head.newest, e.id, e.tenant_name, e.event, e.data, e.timestamp
    FROM ({store.RESUME_HEAD}) head
    LEFT JOIN (SELECT *, sum(octet_length(data)) OVER (ORDER BY id) - octet_length(data) AS before
               FROM ({store.TENANT_PAGE}) page) e ON head.proven AND e.before < $5
    ORDER BY e.id"""


class _Insert(NamedTuple):
    tenant_name: str
    event: str
    data: str
    future: asyncio.Future


class PgStore(store.SqlEngine):
    """Open with `await PgStore.open(url, on_commit, on_account_change)`. on_commit(events)
    gets every committed event of every process once, in id order; on_account_change(name)
    is awaited after another (or this) process changed that user, with None when changes
    may have been missed."""

    users_order = "seq"

    def __init__(self, url: str, on_commit: CommitHook, on_account_change: AccountHook | None,
                 **limits: int) -> None:
        super().__init__(on_commit, **limits)
        self.url = url
        self.on_account_change = on_account_change
        self.pool: asyncpg.Pool | None = None
        self.queued: list[_Insert] = []
        self.queued_event = asyncio.Event()  # set when `queued` has inserts
        self.wake = asyncio.Event()  # the log has (or may have) news: read it
        # The payload of this process's own notifications: _answer publishes its own batches
        # (or wakes the catch-up itself), so hearing them back needs no read of the log.
        self.sender = secrets.token_hex(8)
        self.account_notices: asyncio.Queue[str | None] = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        self.answering: set[asyncio.Task] = set()  # a reference keeps them running

    @classmethod
    async def open(cls, url: str, on_commit: CommitHook,
                   on_account_change: AccountHook | None = None, **limits: int) -> PgStore:
        """Connect and set up the database (the limits: see store.open_store)."""
        engine = cls(url, on_commit, on_account_change, **limits)
        try:
            engine.pool = await asyncpg.create_pool(url, min_size=1, max_size=POOL_SIZE,
                                                   reset=_reset,
                                                   timeout=TIMEOUT, command_timeout=TIMEOUT)
            async with engine.pool.acquire() as conn, conn.transaction():
                # Several processes may start at once; CREATE ... IF NOT EXISTS alone can
                # still collide in the catalog, so schema setup is serialized.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
                await conn.execute(f"{PG_SCHEMA}{INSERT_FUNCTIONS};{store.COUNT_USAGE}")
                engine.published.upto = await conn.fetchval(store.NEWEST_ID)
                await conn.execute("SELECT pg_advisory_xact_lock($1)", COMMIT_ORDER_LOCK)
                await _start_id_range(conn)
        except Exception as exc:  # noqa: BLE001 - a bad URL, refused login, missing database
            if engine.pool is not None:
                engine.pool.terminate()
            raise StoreError(f"cannot open the PostgreSQL database: {exc}") from None
        engine.tasks = [asyncio.create_task(work()) for work in (
            engine._write_loop, engine._listen_loop, engine._catch_up_loop, engine._account_loop)]
        return engine

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.close(), TIMEOUT)
            except DB_ERRORS:
                self.pool.terminate()

    async def _run(self, work: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
        """Run `work` on a pooled connection; a database in trouble raises StoreError."""
        assert self.pool is not None
        try:
            async with self.pool.acquire(timeout=TIMEOUT) as conn:
                return await work(conn)
        except DB_ERRORS as exc:
            raise StoreError(str(exc) or type(exc).__name__) from exc

    async def _rows(self, query: str, *args: Any) -> list[tuple]:
        return [tuple(row) for row in await self._run(lambda conn: conn.fetch(query, *args))]

    _change = _rows  # one statement outside a transaction block commits when it ends

    async def update_user(self, username: str, changes: dict[str, Any]) -> User | None:
        """As store.Engine.update_user, and every process hears of it (ACCOUNTS_CHANNEL)."""
        plan = store.plan_update(username, changes)

        async def run(conn: asyncpg.Connection) -> asyncpg.Record | None:
            async with conn.transaction():
                if plan:
                    if plan[2]:
                        # Under the commit-order lock, the newest id is exact: every event
                        # committed after the change has a larger id.
                        await conn.execute("SELECT pg_advisory_xact_lock($1)", COMMIT_ORDER_LOCK)
                    await conn.execute(plan[0], *plan[1])
                    await conn.execute("SELECT pg_notify($1, $2)", ACCOUNTS_CHANNEL, username)
                return await conn.fetchrow(store.USER_BY_NAME, username)
        row = await self._run(run)
        return store.user_from_row(row) if row else None

    # -- events: group commit ------------------------------------------------------------
    async def insert_event(self, tenant_name: str, event: str, data: str) -> Event:
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
            batch, self.queued = self.queued[:store.MAX_BATCH], self.queued[store.MAX_BATCH:]
            if not self.queued:
                self.queued_event.clear()
            try:
                results, prior = await self._run(functools.partial(self._commit, batch=batch))
            except Exception as exc:  # fail this batch, never the writer
                if not isinstance(exc, StoreError):
                    log.exception("inserting a batch failed")
                self.wake.set()  # it may have committed all the same: its notice was ignored
                for job in batch:
                    store.settle(job.future, exc)
                continue
            # Answered once published, without holding up the next batch.
            answer = asyncio.ensure_future(self._answer(batch, results, prior))
            self.answering.add(answer)
            answer.add_done_callback(self.answering.discard)

    async def _commit(self, conn: asyncpg.Connection,
                      batch: list[_Insert]) -> tuple[list[Event | store.QuotaExceeded], int]:
        """One transaction for the batch; returns each insert's event or refusal, and the
        newest id committed before it."""
        stamp = int(time.time())
        tenants, names, datas, _ = zip(*batch)
        rows = await conn.fetch(INSERT_EVENTS, tenants, names, datas, stamp, EVENTS_CHANNEL,
                                self.sender, self.max_event_names, self.max_tenant_bytes)
        return [self.quota_exceeded(j.tenant_name, refused) if refused else
                Event(event_id, j.tenant_name, j.event, j.data, stamp)
                for j, (event_id, _, refused) in zip(batch, rows)], rows[0][1]

    async def _answer(self, batch: list[_Insert], results: list[Event | store.QuotaExceeded],
                      prior: int) -> None:
        events = [result for result in results if isinstance(result, Event)]
        if self.published.upto >= prior:
            # Everything committed before this batch is published already: publish it now,
            # without reading it back (whatever the catch-up published meanwhile is skipped).
            self._publish([e for e in events if e.id > self.published.upto])
        elif events and self.published.upto < events[-1].id:
            self.wake.set()  # others' events come first: the catch-up reads ours after them
            try:
                # Committed is acknowledged: if reading it back stalls (the database just
                # went down), answer anyway; it is published when the database is back.
                await asyncio.wait_for(self.published.reached(events[-1].id), PUBLISH_WAIT)
            except TimeoutError:
                log.warning("event %d committed but not yet published", events[-1].id)
        for job, result in zip(batch, results):
            store.settle(job.future, result)

    # -- delivery: read the log in id order ---------------------------------------------
    async def _catch_up_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):  # the safety net: a notice can be lost
                await asyncio.wait_for(self.wake.wait(), SAFETY_NET)
            self.wake.clear()
            try:
                await self._run(self._catch_up)
            except Exception as exc:  # the database is down, or a bug: never end delivery
                log.warning("cannot read new events (retrying): %s", exc,
                            exc_info=not isinstance(exc, StoreError))
                await asyncio.sleep(0.5)

    async def _catch_up(self, conn: asyncpg.Connection) -> None:
        while True:
            rows = await conn.fetch(store.EVENTS_SINCE, self.published.upto, CATCH_UP_PAGE)
            # An own batch may have been published while this read was under way.
            self._publish([Event(*row) for row in rows if row[0] > self.published.upto])
            if len(rows) < CATCH_UP_PAGE:
                return

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
            except DB_ERRORS as exc:
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
    async def resume_page(self, username: str, tenant_name: str, after_id: int, limit: int,
                          max_bytes: int) -> tuple[list[Event], int] | None:
        """As store.Engine.resume_page: the proof and the page in one statement
        (RESUME_PAGE), so in one snapshot."""
        rows = await self._run(lambda conn: conn.fetch(RESUME_PAGE, tenant_name, after_id,
                                                       username, limit, max(max_bytes, 1)))
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
                rows = await conn.fetch(store.PRUNE_SCAN, self.prune_after,
                                        batch * store.PRUNE_SCAN_BATCHES)
                doomed, uptos, cursor = store.plan_prune(rows, older_than, batch)
                await conn.execute("DELETE FROM events WHERE id = ANY($1::bigint[])", doomed)
                raised = {tenant: upto for tenant, upto in uptos.items()
                          if await conn.fetchval(store.RAISE_HORIZON, tenant, upto)}
            return Pruned(len(doomed), raised, cursor is not None), cursor or 0
        pruned, self.prune_after = await self._run(run)
        return pruned

    async def import_tables(self, pages: PageOfTables) -> None:
        """As store.Engine.import_tables, in one transaction; the id sequence restarts above
        the largest id."""
        async def run(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                # The gap this open recorded for the empty log gives way to the source's
                # (it would cover the ids being copied); the next start records its own.
                await conn.execute("DELETE FROM id_gaps")
                async for table, rows in pages:
                    if table == "users":  # revoked: 0/1 from SQLite
                        rows = [(*row[:3], bool(row[3]), *row[4:]) for row in rows]
                    await conn.copy_records_to_table(table, records=rows,
                                                     columns=store.TABLES[table].split(", "))
                await conn.execute("SELECT setval(pg_get_serial_sequence('events', 'id'), "
                                   "coalesce(max(id), 0) + 1, false) FROM events")
        await self._run(run)


async def _start_id_range(conn: asyncpg.Connection) -> None:
    """Raise the id sequence to store.id_floor and record the gap; the caller holds
    COMMIT_ORDER_LOCK, so no batch is drawing ids. The ids issued end at the sequence's last
    value, not at max(id): an id drawn by a batch that rolled back was never seen, and no
    drawn id falls in the gap."""
    sequence = await conn.fetchval("SELECT pg_get_serial_sequence('events', 'id')")
    last_value, is_called = await conn.fetchrow(f"SELECT last_value, is_called FROM {sequence}")
    issued = max(last_value if is_called else last_value - 1, await conn.fetchval(store.NEWEST_ID))
    earlier = await conn.fetchval(store.EARLIER_FLOOR)
    floor, gap = store.id_floor(issued, earlier, time.time_ns() // 1000)
    if gap:
        await conn.execute("SELECT setval($1, $2, false)", sequence, floor)
        await conn.execute(store.RECORD_GAP, *gap)


async def _reset(conn: asyncpg.Connection) -> None:
    """Between two uses of a pooled connection. Nothing of ours outlives a transaction (no
    LISTEN, only transaction-level advisory locks), so asyncpg's default reset, a round trip
    each time, is not needed: only a transaction left open is rolled back."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")
