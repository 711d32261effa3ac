"""Years on a small disk (issue 10): --retention keeps the newest event of each name and
deletes the rest (on both engines), the file stops growing, and `broker backup` copies a live
SQLite database (PostgreSQL has its own tools). Real servers, real files; the test reads the
databases only to check them."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from conftest import ENGINES, ROOT, Server, execute, rows
from pg_cluster import Postgres
from stream_support import unique
from test_resume import backup, insert, received, wait_for_pruned


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_retention_keeps_the_newest_of_each_name_and_deletes_the_rest(make_server):
    server = make_server("--retention", "2s")
    tenant, other_tenant = unique("kept"), unique("kept_other")
    auth = server.user(unique("sensor"), tenant=tenant)
    other = server.user(unique("sensor"), tenant=other_tenant)
    for n in range(5):
        insert(server, auth, "temperature", n)
        insert(server, auth, "humidity", n * 10)
        insert(server, other, "temperature", -n)  # same name, another tenant: its own state
    wait_for_pruned(server, 12)
    kept = rows(server.db, "SELECT tenant_name, event, data FROM events ORDER BY id")
    assert kept == [(tenant, "temperature", "4"), (tenant, "humidity", "40"),
                    (other_tenant, "temperature", "-4")]
    # Young events are not touched; a fresh connect still gets the whole state.
    young = insert(server, auth, "temperature", 5)
    stream = server.sse(auth)
    assert [f.json() for f in stream.take(2)] == [40, 5]
    stream.close()
    assert young[0] in [r[0] for r in rows(server.db, "SELECT id FROM events")]


def test_the_file_stays_flat_over_insert_and_prune_cycles(make_server):
    server = make_server("--retention", "1s")
    auth = server.user(unique("steady"), tenant=unique("steady"))
    payload = "x" * 2000
    sizes = []
    pruned = 0
    for cycle in range(6):
        for n in range(150):
            assert server.insert(auth, f"reading_{n % 5}", [cycle, payload]).status == 200
        pruned += 145  # all but the newest of each of the 5 names
        wait_for_pruned(server, pruned)
        # Move the WAL's pages into the file (what the autocheckpoint does, every 4 MB),
        # so the file's size reflects what is stored.
        conn = sqlite3.connect(server.db)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        sizes.append(server.db.stat().st_size)
    # Freed pages go on SQLite's freelist and are reused by the next cycle's inserts. Without
    # retention each cycle adds about 300 KB (150 x 2 KB), 1.2 MB over the last four. With
    # it, the file holds the most events alive at once: on a loaded machine a prune can lag
    # part of a cycle behind the inserts, hence half a cycle of slack.
    assert sizes[-1] <= sizes[1] + 150 * 1024, sizes


# -- backup ----------------------------------------------------------------------------------

def test_backup_while_four_clients_insert(tmp_path):
    srv = Server(tmp_path).start()
    try:
        tenant = unique("busy")
        clients = [srv.user(unique("writer"), tenant=tenant) for _ in range(4)]
        acked: list[tuple[float, int]] = []  # (monotonic time of the answer, id)
        failures: list[object] = []
        stop = threading.Event()

        def keep_inserting(auth: dict[str, str], index: int) -> None:
            n = 0
            while not stop.is_set():
                resp = srv.insert(auth, f"writer_{index}", n)
                if resp.status != 200:
                    failures.append((resp.status, resp.body))
                    return
                acked.append((time.monotonic(), resp.json()["id"]))
                n += 1

        threads = [threading.Thread(target=keep_inserting, args=(auth, i))
                   for i, auth in enumerate(clients)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        started = time.monotonic()
        copy = tmp_path / "copy.db"
        result = backup(srv.db, copy)
        finished = time.monotonic()
        time.sleep(0.3)
        stop.set()
        for thread in threads:
            thread.join(10)
        assert result.returncode == 0, result.stderr
        assert "integrity ok" in result.stderr
        assert not failures, failures
        before = {event_id for at, event_id in acked if at < started}
        assert len(before) > 20, len(before)
        # Inserts went on while the copy was made: no pause longer than a moment.
        times = sorted(at for at, _ in acked if started <= at <= finished + 0.3)
        gaps = [b - a for a, b in zip([started, *times], [*times, finished + 0.3])]
        assert max(gaps) < 0.5, f"inserts paused for {max(gaps):.2f}s"
        in_copy = {r[0] for r in rows(copy, "SELECT id FROM events")}
        assert before <= in_copy, f"{len(before - in_copy)} acknowledged events missing"
        assert rows(copy, "PRAGMA integrity_check") == [("ok",)]
    finally:
        srv.kill()

    # broker starts on the copy, and serves its state.
    restored = Server(tmp_path, db=copy).start()
    try:
        stream = restored.sse(clients[0])
        frames = received(stream, 4)
        assert sorted(event for _, event, _ in frames) == [f"writer_{i}" for i in range(4)]
        stream.close()
    finally:
        restored.kill()


def test_backup_failures_exit_non_zero(tmp_path):
    missing = backup(tmp_path / "nothing.db", tmp_path / "copy.db")
    assert missing.returncode == 1 and "no database" in missing.stderr, missing.stderr
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    broken = backup(garbage, tmp_path / "copy.db")
    assert broken.returncode == 1 and "failed" in broken.stderr, broken.stderr
    assert not (tmp_path / "copy.db").exists()
    unknown = subprocess.run([sys.executable, "-m", "broker", "bakcup"], cwd=ROOT,
                             capture_output=True, text=True, timeout=30, check=False)
    assert unknown.returncode == 2 and "unknown command" in unknown.stderr, unknown.stderr


def test_bad_retention_and_argon2_options_are_refused(tmp_path):
    for args in (["--retention", "5 minutes"], ["--retention", "12"], ["--retention", "-1s"],
                 ["--argon2_memory_kib", "4"], ["--argon2_time_cost", "0"],
                 ["--argon2_parallelism", "0"]):
        result = subprocess.run([sys.executable, "-m", "broker", "--db",
                                 str(tmp_path / "x.db"), *args], cwd=ROOT,
                                capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 2, (args, result.stderr)
        assert "error" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_backup_of_a_postgresql_url_points_to_its_own_tools(tmp_path, postgres: Postgres):
    result = backup(postgres.new_database(), tmp_path / "copy.db")
    assert result.returncode == 2, result.stderr
    assert "pg_dump" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "copy.db").exists()


def test_backup_takes_the_database_from_broker_db(tmp_path):
    source = tmp_path / "live.db"
    conn = sqlite3.connect(source)
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (42)")
    conn.commit()
    conn.close()
    env = {**os.environ, "BROKER_DB": str(source)}
    result = subprocess.run([sys.executable, "-m", "broker", "backup", str(tmp_path / "copy.db")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert rows(tmp_path / "copy.db", "SELECT x FROM t") == [(42,)]


# -- the cost of a sweep ---------------------------------------------------------------------

KEPT_NAMES, CHURN, CHURN_NAMES = 100_000, 20_000, 100
# Old events straight into the stopped server's database (the same SQL on both engines):
# tenant `kept` has 100,000 names with one value each, the first ids of the log, so every
# one is a latest value that retention keeps; then tenant `churn` has 20,000 values of 100
# names, all but the newest of each superseded.
AGED_LOG = [
    f"""WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {KEPT_NAMES})
        INSERT INTO events (id, tenant_name, event, data, timestamp)
        SELECT i, 'kept', 'name_' || i, '1', 1000 FROM n""",
    f"""WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {CHURN})
        INSERT INTO events (id, tenant_name, event, data, timestamp)
        SELECT {KEPT_NAMES} + i, 'churn', 'name_' || (i % {CHURN_NAMES}), '2', 1000 FROM n""",
    """INSERT INTO latest (tenant_name, event, event_id)
       SELECT tenant_name, event, max(id) FROM events GROUP BY tenant_name, event""",
    "DELETE FROM tenant_usage",  # counted again at the next open
]


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_a_sweep_past_many_kept_values_does_not_hold_up_inserts(make_server):
    server = make_server()
    writer = server.user(unique("writer"), tenant=unique("busy"))  # its JWT outlives restarts
    server.stop()
    for statement in AGED_LOG:
        execute(server.db, statement)
    server.extra_args = ["--retention", "1h"]
    server.start()  # the sweep starts with the server
    latencies: list[float] = []
    while "retention: deleted" not in server.log and len(latencies) < 20_000:
        started = time.perf_counter()
        assert server.insert(writer, "reading", len(latencies)).status == 200
        latencies.append(time.perf_counter() - started)
    wait_for_pruned(server, CHURN - CHURN_NAMES)
    latencies.sort()
    assert len(latencies) >= 20, "the sweep ended before the inserts could measure it"
    p99 = latencies[int(len(latencies) * 0.99)]
    assert p99 < 0.050, f"insert p99 {p99 * 1000:.1f} ms while pruning ({len(latencies)} inserts)"
    # Everything it should delete is gone: each name's newest stays, and the horizons are right.
    counts = dict(rows(server.db, "SELECT tenant_name, count(*) FROM events "
                                  "WHERE tenant_name IN ('kept', 'churn') GROUP BY tenant_name"))
    assert counts == {"kept": KEPT_NAMES, "churn": CHURN_NAMES}
    newest = rows(server.db, "SELECT min(id) FROM events WHERE tenant_name = 'churn'")[0][0]
    assert newest == KEPT_NAMES + CHURN - CHURN_NAMES + 1
    assert dict(rows(server.db, "SELECT tenant_name, upto FROM pruned")) == \
        {"churn": newest - 1}
