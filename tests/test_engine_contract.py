"""Both engines keep the one storage contract (issue 19): every method and attribute of
store.Engine exists on store.Store and pgstore.PgStore with the same signature, a
coroutine in the contract is a coroutine in each engine, and an open engine has them all (mypy checks the types too: see
pyproject.toml)."""

from __future__ import annotations

import asyncio
import inspect
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, rows

sys.path.insert(0, str(ROOT))
store = pytest.importorskip("store")
pgstore = pytest.importorskip("pgstore")  # needs asyncpg: the 'postgres' extra

MEMBERS = [name for name in dir(store.Engine) if not name.startswith("_")]


def test_the_contract_names_what_broker_and_tools_use() -> None:
    assert {"insert_event", "tenant_state", "resume_page", "prune", "export_tables",
            "import_tables", "close"} <= set(MEMBERS)
    assert "published" in store.Engine.__annotations__


@pytest.mark.parametrize("engine", [store.Store, pgstore.PgStore], ids=["sqlite", "postgres"])
@pytest.mark.parametrize("name", MEMBERS)
def test_each_engine_has_the_contracts_signatures(engine: type, name: str) -> None:
    promised = getattr(store.Engine, name)
    kept = getattr(engine, name, None)
    assert kept is not None, f"{engine.__name__} has no {name}"
    assert inspect.signature(kept) == inspect.signature(promised), name
    assert inspect.iscoroutinefunction(kept) == inspect.iscoroutinefunction(promised), name
    # What the contract promises as an async iterator may come from an async generator.
    iterates = inspect.signature(promised).return_annotation == "PageOfTables"
    assert inspect.isasyncgenfunction(kept) <= iterates, name


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_an_open_engine_has_every_member_and_a_watermark_at_the_newest_id(engine, request,
                                                                           tmp_path) -> None:
    db = engine_database(engine, request, tmp_path)

    async def check() -> None:
        published: list[int] = []
        opened = await store.open_store(db, lambda events: published.append(events[-1].id))
        try:
            for name in [*MEMBERS, *store.Engine.__annotations__]:
                assert hasattr(opened, name), name
            assert isinstance(opened.published, store.Watermark)
            assert opened.published.upto == await opened.newest_event_id() == 0
            first = await opened.insert_event("t", "e", "1")
            # Advanced right after on_commit was handed the event: a waiter returns.
            await asyncio.wait_for(opened.published.reached(first.id), 5)
            assert published[-1] == opened.published.upto == first.id
        finally:
            await opened.close()
        reopened = await store.open_store(db, lambda events: None)
        try:
            assert reopened.published.upto == first.id
        finally:
            await reopened.close()
    asyncio.run(check())


def engine_database(engine: str, request, tmp_path) -> str:
    if engine == "sqlite":
        return str(tmp_path / "broker.db")
    return request.getfixturevalue("postgres").new_database()


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_resume_pages_stop_at_max_bytes_and_prune_reports_its_horizons(engine, request,
                                                                       tmp_path) -> None:
    db = engine_database(engine, request, tmp_path)

    async def check() -> None:
        opened = await store.open_store(db, lambda events: None)
        try:
            data = '"' + "x" * 98 + '"'  # 100 bytes
            events = [await opened.insert_event("t", f"e{i % 2}", data) for i in range(5)]
            ids = [event.id for event in events]

            async def page(limit: int, max_bytes: int) -> list[int]:
                found = await opened.resume_page("nobody", "t", 0, limit, max_bytes)
                assert found is not None and found[1] == ids[-1]
                return [event.id for event in found[0]]
            assert await page(10, 250) == ids[:3]  # stops once the data reach 250 bytes
            assert await page(10, 300) == ids[:3]
            assert await page(10, 301) == ids[:4]
            assert await page(10, 0) == ids[:1]  # at least one
            assert await page(2, 10**6) == ids[:2]
            # e0 is ids 0, 2, 4 and e1 is 1, 3: all but the newest of each are deleted.
            pruned = await opened.prune(int(time.time()) + 10, batch=2)
            assert (pruned.deleted, pruned.horizons, pruned.more) == (2, {"t": ids[1]}, True)
            pruned = await opened.prune(int(time.time()) + 10, batch=2)
            assert (pruned.deleted, pruned.horizons, pruned.more) == (1, {"t": ids[2]}, False)
            latest, recent, newest, horizon = await opened.tenant_state("t", 10, 10**6)
            assert [e.id for e in latest] == [ids[3], ids[4]] == [e.id for e in recent]
            assert (newest, horizon) == (ids[-1], ids[2])
            # The recent events stop where their data reach max_bytes.
            for max_bytes, kept in ((1, [ids[4]]), (100, [ids[4]]), (101, [ids[3], ids[4]])):
                recent = (await opened.tenant_state("t", 10, max_bytes))[1]
                assert [e.id for e in recent] == kept
            pruned = await opened.prune(int(time.time()) + 10, batch=2)
            assert (pruned.deleted, pruned.horizons, pruned.more) == (0, {}, False)
        finally:
            await opened.close()
    asyncio.run(check())


USAGE_RECOUNTED = """
    SELECT u.names, u.bytes, count(*), sum(length(l.event) + length(e.data))
    FROM tenant_usage u JOIN latest l ON l.tenant_name = u.tenant_name
    JOIN events e ON e.id = l.event_id WHERE u.tenant_name = ? GROUP BY u.names, u.bytes"""


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_usage_follows_the_newest_values_in_one_batch_and_across_batches(engine, request,
                                                                         tmp_path) -> None:
    # Concurrent inserts share a batch (a group commit; on PostgreSQL the set-based insert,
    # far from the limits): values replaced within it and across batches, names repeated.
    db = engine_database(engine, request, tmp_path)

    async def insert_all() -> None:
        opened = await store.open_store(db, lambda events: None, max_event_names=100,
                                        max_tenant_bytes=10**6)
        try:
            for round_ in range(3):
                await asyncio.gather(*(opened.insert_event("u", f"n{i % 7}", str(i * round_))
                                       for i in range(50)))
        finally:
            await opened.close()
    asyncio.run(insert_all())
    names, used, counted_names, counted_bytes = rows(Path(db) if engine == "sqlite" else db,
                                                     USAGE_RECOUNTED, ("u",))[0]
    assert (names, used) == (counted_names, counted_bytes) == (7, used)
