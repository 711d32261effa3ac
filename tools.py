"""Tools that are not the server: `broker TOOL ARGS...` runs TOOLS[TOOL](ARGS) and exits with
what it returns. Each tool is one self-contained function taking its own arguments.

  broker backup DEST [--db SOURCE]   a consistent copy of a live SQLite database, checked
  broker migrate SOURCE TARGET       copy a whole database, SQLite <-> PostgreSQL
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path

from store import Engine, StoreError, is_postgres_url, open_store, shown_db

BACKUP_STEP_PAGES = 1024  # pages copied per step (4 MiB with SQLite's default page size)

# -- broker backup ----------------------------------------------------------------------------


def backup(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="broker backup", description=(
        "Write a consistent copy of a database, live or not, then check the copy's integrity. "
        "The server keeps running and inserting meanwhile."))
    parser.add_argument("dest", metavar="DEST", help="the file to write (replaced if it exists)")
    # --db, with BROKER_DB and the default as for the server.
    parser.add_argument("--db", "-d", default=os.environ.get("BROKER_DB", "broker.db"),
                        help="the live database (default: $BROKER_DB, else broker.db)")
    args = parser.parse_args(argv)
    if is_postgres_url(args.db):
        print("broker backup: copies SQLite files; back up PostgreSQL with its own tools "
              "(pg_dump, or base backups and WAL archiving)", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        pages = backup_database(args.db, args.dest)
    except (sqlite3.Error, OSError) as exc:
        print(f"broker backup: failed: {exc}", file=sys.stderr)
        return 1
    print(f"broker backup: {args.db} -> {args.dest}: {pages} pages, integrity ok, "
          f"{time.monotonic() - started:.2f}s", file=sys.stderr)
    return 0


def backup_database(source: str, dest: str) -> int:
    """Copy `source` to `dest` with SQLite's online backup API; returns the page count.

    The copy is one snapshot: a read transaction is held on the source for the whole copy,
    so the steps never restart, and in WAL mode readers never block the server's writer:
    inserts go on throughout. It is written beside `dest` and renamed over it only once
    PRAGMA integrity_check passes, so `dest` is never a half-written or damaged file. It
    holds what the source does (password hashes, the JWT secret): its mode is copy_mode."""
    if not Path(source).is_file():
        raise OSError(f"no database at {source!r}")
    if Path(f"{dest}-wal").exists():
        # SQLite would apply that log to the new file: a server may be running on DEST.
        raise OSError(f"{dest}-wal exists: DEST is a database in use; choose another DEST")
    partial = f"{dest}.partial"
    Path(partial).unlink(missing_ok=True)
    try:
        with contextlib.closing(sqlite3.connect(f"file:{source}?mode=rw", uri=True,
                                                isolation_level=None)) as src:
            src.execute("PRAGMA busy_timeout = 5000")
            src.execute("BEGIN")
            src.execute("SELECT count(*) FROM sqlite_master").fetchone()  # the snapshot starts
            os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # before data
            with contextlib.closing(sqlite3.connect(partial, isolation_level=None)) as copy:
                src.backup(copy, pages=BACKUP_STEP_PAGES)
                problems = [row[0] for row in copy.execute("PRAGMA integrity_check")]
                if problems != ["ok"]:
                    raise sqlite3.DatabaseError("integrity check of the copy failed: "
                                                + "; ".join(problems[:5]))
                pages = copy.execute("PRAGMA page_count").fetchone()[0]
            src.execute("COMMIT")
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    os.chmod(partial, copy_mode(source))
    os.replace(partial, dest)
    return pages


def copy_mode(source: str) -> int:
    """The mode of a copy of the SQLite file `source`: the owner's bits of the source's, so
    never less strict than it, and never readable by others (whatever the umask)."""
    return os.stat(source).st_mode & 0o600


class ToolError(Exception):
    """A tool cannot do what it was asked; the message says why."""


# -- broker migrate ---------------------------------------------------------------------------


def migrate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="broker migrate", description=(
        "Copy everything (users, events with their ids, latest values, the JWT secret) from "
        "one database to another: SQLite to PostgreSQL or back. Stop the brokers using SOURCE "
        "first."))
    parser.add_argument("source", help="SQLite path or postgresql:// URL to copy from")
    parser.add_argument("target", help="a SQLite path that does not exist yet, or an empty "
                                       "PostgreSQL database")
    args = parser.parse_args(argv)
    try:
        counts = asyncio.run(copy_database(args.source, args.target))
    except (ToolError, StoreError) as exc:
        print(f"broker migrate: {exc}", file=sys.stderr)
        return 1
    print(f"broker migrate: copied {shown_db(args.source)} to {shown_db(args.target)}: "
          + ", ".join(f"{count} {table}" for table, count in counts.items()))
    return 0


async def copy_database(source: str, target: str) -> dict[str, int]:
    """Copy every table; the counts match at the end or it fails. A SQLite target that the
    copy created is removed again when it fails."""
    if not is_postgres_url(source) and not os.path.isfile(source):
        raise ToolError(f"no SQLite database at {source!r}")
    target_is_new_file = not is_postgres_url(target)
    if target_is_new_file and os.path.lexists(target):
        raise ToolError(f"{target!r} exists; the target must be a new file (or an empty "
                        "PostgreSQL database): nothing was changed")
    try:
        counts = await _copy(source, target)
        if target_is_new_file and not is_postgres_url(source):
            os.chmod(target, copy_mode(source))  # created 0600 (see store.py)
        return counts
    except BaseException:
        if target_is_new_file:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.remove(target + suffix)
        raise


async def _copy(source: str, target: str) -> dict[str, int]:
    async with contextlib.AsyncExitStack() as opened:
        from_store = await _open(source, "source", opened)
        to_store = await _open(target, "target", opened)
        counts = await to_store.table_counts()
        # Every open records a gap of its own (import_tables replaces it): not content.
        if any(count for table, count in counts.items() if table != "id_gaps"):
            raise ToolError("the target database is not empty: nothing was changed")
        await to_store.import_tables(from_store.export_tables())
        want, got = await from_store.table_counts(), await to_store.table_counts()
        if want != got:
            raise ToolError(f"the copy is incomplete: {want} in the source, {got} copied")
        if await from_store.newest_event_id() != await to_store.newest_event_id():
            raise ToolError("the newest event ids differ after the copy")
        return got


async def _open(db: str, role: str, opened: contextlib.AsyncExitStack) -> Engine:
    """Open one database of the copy; it is closed when `opened` ends."""
    try:
        engine = await open_store(db, lambda events: None)  # nobody subscribes to a copy
    except StoreError as exc:
        raise ToolError(f"{role}: {exc}") from None
    opened.push_async_callback(engine.close)
    return engine


# -- dispatch -----------------------------------------------------------------------------------

TOOLS: dict[str, Callable[[list[str]], int]] = {"backup": backup, "migrate": migrate}


def main(argv: list[str]) -> int:
    tool = TOOLS.get(argv[0])
    if tool is None:
        print(f"broker: unknown command {argv[0]!r}; commands: {', '.join(TOOLS)} "
              "(or options for the server: broker --help)", file=sys.stderr)
        return 2
    return tool(argv[1:])
