"""Both engines keep the one storage contract (issue 19): every method and attribute of
store.Engine exists on store.Store and pgstore.PgStore with the same signature, and a
coroutine in the contract is a coroutine in each engine (mypy checks the types too: see
pyproject.toml)."""

from __future__ import annotations

import inspect
import sys

import pytest
from conftest import ROOT

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
    assert inspect.isasyncgenfunction(kept) == inspect.isasyncgenfunction(promised), name


@pytest.mark.parametrize("engine", [store.Store, pgstore.PgStore], ids=["sqlite", "postgres"])
def test_each_engine_has_a_published_watermark(engine: type) -> None:
    # An attribute set in __init__: its annotation is in the constructor's source.
    assert "self.published = Watermark(" in inspect.getsource(engine.__init__)
