"""Tools that are not the server: `broker TOOL ARGS...` runs TOOLS[TOOL](ARGS) and exits with
what it returns. Each tool is one self-contained function taking its own arguments.

  broker migrate SOURCE TARGET   copy a whole database, SQLite <-> PostgreSQL
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Callable

from broker import is_postgres_url, open_store, shown_db
from store import Event, StoreError


class ToolError(Exception):
    """A tool cannot do what it was asked; the message says why."""


# -- broker migrate ---------------------------------------------------------------------------


def migrate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="broker migrate",
        description="Copy everything (users, events with their ids, latest values, the JWT "
                    "secret) from one database to another: SQLite to PostgreSQL or back. Stop "
                    "the brokers using SOURCE first.")
    parser.add_argument("source", help="SQLite path or postgresql:// URL to copy from")
    parser.add_argument("target", help="a SQLite path that does not exist yet, or an empty "
                                       "PostgreSQL database")
    args = parser.parse_args(argv)
    try:
        counts = asyncio.run(copy_database(args.source, args.target))
    except ToolError as exc:
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
        return await _copy(source, target)
    except BaseException:
        if target_is_new_file:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.remove(target + suffix)
        raise


async def _copy(source: str, target: str) -> dict[str, int]:
    try:
        from_store = await open_store(source, _ignore)
    except StoreError as exc:
        raise ToolError(f"source: {exc}") from None
    try:
        try:
            to_store = await open_store(target, _ignore)
        except StoreError as exc:
            raise ToolError(f"target: {exc}") from None
        try:
            if any((await to_store.table_counts()).values()):
                raise ToolError("the target database is not empty: nothing was changed")
            await to_store.import_tables(from_store.export_tables())
            want, got = await from_store.table_counts(), await to_store.table_counts()
            if want != got:
                raise ToolError(f"the copy is incomplete: {want} in the source, {got} copied")
            if await from_store.newest_event_id() != await to_store.newest_event_id():
                raise ToolError("the newest event ids differ after the copy")
            return got
        except StoreError as exc:
            raise ToolError(str(exc)) from None
        finally:
            await to_store.close()
    finally:
        await from_store.close()


def _ignore(events: list[Event]) -> None:
    """Nobody subscribes during a copy."""


# -- dispatch -----------------------------------------------------------------------------------

TOOLS: dict[str, Callable[[list[str]], int]] = {"migrate": migrate}


def run(name: str, argv: list[str]) -> int:
    return TOOLS[name](argv)
