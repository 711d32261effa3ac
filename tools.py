"""Tools that are not the server: `broker <command> ...` (see `broker backup --help`).

broker.main hands over here when its first argument is a word rather than an option.
Each command is a function taking its arguments and returning the exit status.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path

BACKUP_STEP_PAGES = 1024  # pages copied per step (4 MiB with SQLite's default page size)


def db_option(parser: argparse.ArgumentParser) -> None:
    """--db, with BROKER_DB and the default as for the server."""
    parser.add_argument("--db", "-d", default=os.environ.get("BROKER_DB", "broker.db"),
                        help="the live database (default: $BROKER_DB, else broker.db)")


def backup(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="broker backup",
        description="Write a consistent copy of a database, live or not, then check the "
                    "copy's integrity. The server keeps running and inserting meanwhile.")
    parser.add_argument("dest", metavar="DEST", help="the file to write (replaced if it exists)")
    db_option(parser)
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        pages = copy_database(args.db, args.dest)
    except (sqlite3.Error, OSError) as exc:
        print(f"broker backup: failed: {exc}", file=sys.stderr)
        return 1
    print(f"broker backup: {args.db} -> {args.dest}: {pages} pages, integrity ok, "
          f"{time.monotonic() - started:.2f}s", file=sys.stderr)
    return 0


def copy_database(source: str, dest: str) -> int:
    """Copy `source` to `dest` with SQLite's online backup API; returns the page count.

    The copy is one snapshot: a read transaction is held on the source for the whole copy,
    so the steps never restart, and in WAL mode readers never block the server's writer:
    inserts go on throughout. It is written beside `dest` and renamed over it only once
    PRAGMA integrity_check passes, so `dest` is never a half-written or damaged file."""
    if not Path(source).is_file():
        raise OSError(f"no database at {source!r}")
    if Path(f"{dest}-wal").exists():
        # SQLite would apply that log to the new file: a server may be running on DEST.
        raise OSError(f"{dest}-wal exists: DEST is a database in use; choose another DEST")
    partial = f"{dest}.partial"
    Path(partial).unlink(missing_ok=True)
    src = sqlite3.connect(f"file:{source}?mode=rw", uri=True, isolation_level=None)
    try:
        src.execute("PRAGMA busy_timeout = 5000")
        src.execute("BEGIN")
        src.execute("SELECT count(*) FROM sqlite_master").fetchone()  # the snapshot starts
        copy = sqlite3.connect(partial, isolation_level=None)
        try:
            src.backup(copy, pages=BACKUP_STEP_PAGES)
            check_integrity(copy)
            pages = copy.execute("PRAGMA page_count").fetchone()[0]
        finally:
            copy.close()
        src.execute("COMMIT")
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    finally:
        src.close()
    os.replace(partial, dest)
    return pages


def check_integrity(conn: sqlite3.Connection) -> None:
    problems = [row[0] for row in conn.execute("PRAGMA integrity_check")]
    if problems != ["ok"]:
        raise sqlite3.DatabaseError("integrity check of the copy failed: "
                                    + "; ".join(problems[:5]))


COMMANDS: dict[str, Callable[[list[str]], int]] = {"backup": backup}


def main(argv: list[str]) -> int:
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"broker: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)} "
              "(or options for the server: broker --help)", file=sys.stderr)
        return 2
    return command(argv[1:])
