"""`broker migrate SOURCE TARGET` (issue 9): SQLite to PostgreSQL and back, with users, events
and their ids, latest values and the JWT secret; clients resume across the migration."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from conftest import ADMIN, ROOT, Server, rows
from pg_cluster import Postgres
from stream_support import admin, open_resume, unique
from test_resume import insert, resumed, wait_for_pruned

PASSWORD = "correct horse 1"


def migrate(source: str | Path, target: str | Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    return subprocess.run([sys.executable, "-m", "broker", "migrate", str(source), str(target)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def fill(srv: Server) -> tuple[str, dict[str, str]]:
    """Users (one revoked, one with scopes and data) and 8 + 4 events in two tenants."""
    name, tenant = unique("keeper"), unique("tenant")
    auth = srv.user(name, tenant=tenant, scopes=["a:b"], email="k@example.com",
                    data={"z": 1, "a": [2]})
    other = srv.user(unique("other"), tenant=unique("elsewhere"))
    revoked = unique("revoked")
    assert srv.create_user(revoked, tenant=tenant).status == 200
    assert srv.post("/revoke_user", {"admin_token": ADMIN, "username": revoked}).status == 200
    for i in range(12):
        resp = srv.insert(auth if i % 3 else other, f"e{i % 4}", {"b": i, "a": "é" * i})
        assert resp.status == 200, resp.body
    return name, auth


def frames_after(srv: Server, auth: dict[str, str], after: int, count: int) -> list[bytes]:
    stream = open_resume(srv, auth, after, via="header")
    try:
        frames = [frame.raw for frame in stream.take(count)]
        assert stream.nothing_within(0.3), "more than expected after the resume"
        return frames
    finally:
        stream.close()


def run_leg(source: Server, target_db: str | Path, tmp_path: Path) -> Server:
    """Stop `source`, migrate its database to `target_db`, start a broker there."""
    source.stop()
    result = migrate(source.db, target_db)
    assert result.returncode == 0, result.stderr
    assert "copied" in result.stdout and "postgres@" not in result.stderr
    return Server(tmp_path, db=target_db).start()  # type: ignore[arg-type]


def test_migrate_sqlite_to_postgresql_and_back(tmp_path, postgres: Postgres) -> None:
    sqlite_srv = Server(tmp_path).start()
    servers = [sqlite_srv]
    try:
        name, auth = fill(sqlite_srv)
        events = [sqlite_srv.insert(auth, "mine", {"i": i}).json()["id"] for i in range(5)]
        users = sqlite_srv.post("/list_users", {"admin_token": ADMIN}).json()
        sync = frames_after(sqlite_srv, auth, 0, 5 + 8)  # the tenant's whole log
        resume_from = events[1]
        tail = sync[-3:]

        pg_srv = run_leg(sqlite_srv, postgres.new_database(), tmp_path)
        servers.append(pg_srv)
        assert pg_srv.post("/list_users", {"admin_token": ADMIN}).json() == users
        assert frames_after(pg_srv, auth, 0, len(sync)) == sync
        assert frames_after(pg_srv, auth, resume_from, 3) == tail
        newest = pg_srv.insert(auth, "on-pg", {"x": 1}).json()["id"]
        assert newest > events[-1]

        back = tmp_path / "back.db"
        sqlite_again = run_leg(pg_srv, back, tmp_path)
        servers.append(sqlite_again)
        assert sqlite_again.post("/list_users", {"admin_token": ADMIN}).json() == users
        assert frames_after(sqlite_again, auth, resume_from, 4)[:3] == tail
        assert sqlite_again.get("/verify", headers=auth).status == 200  # the first JWT
        assert sqlite_again.insert(auth, "new", 1).json()["id"] > newest
        assert sqlite_again.post("/login", {"username": name, "password": PASSWORD}).status == 200
        revoked = [u for u in users if u["revoked"]]
        assert len(revoked) == 1
        assert sqlite_again.post("/login", {"username": revoked[0]["username"],
                                            "password": PASSWORD}).status == 401
    finally:
        for srv in servers:
            srv.kill()


def test_a_non_empty_target_is_refused_and_left_unchanged(tmp_path, postgres: Postgres) -> None:
    srv = Server(tmp_path).start()
    try:
        fill(srv)
    finally:
        srv.stop()
    existing = tmp_path / "existing.db"
    sqlite3.connect(existing).execute("CREATE TABLE mine (x)").connection.commit()
    before = existing.read_bytes()
    result = migrate(srv.db, existing)
    assert result.returncode == 1 and "must be a new file" in result.stderr, result.stderr
    assert existing.read_bytes() == before

    url = postgres.new_database()
    assert migrate(srv.db, url).returncode == 0
    other = tmp_path / "other.db"
    other_srv = Server(tmp_path, db=other).start()
    try:
        other_srv.user(unique("intruder"))
    finally:
        other_srv.stop()
    result = migrate(other, url)
    assert result.returncode == 1 and "not empty" in result.stderr, result.stderr
    pg_srv = Server(tmp_path, db=url).start()  # type: ignore[arg-type]
    try:  # still exactly the first copy: 3 users, not 4
        assert len(pg_srv.post("/list_users", {"admin_token": ADMIN}).json()) == 3
    finally:
        pg_srv.kill()


def test_migrate_refuses_a_missing_source_and_a_source_in_use(tmp_path) -> None:
    result = migrate(tmp_path / "missing.db", tmp_path / "out.db")
    assert result.returncode == 1 and "no SQLite database" in result.stderr
    srv = Server(tmp_path).start()
    try:
        result = migrate(srv.db, tmp_path / "out.db")
        assert result.returncode == 1 and "in use by another broker" in result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "out.db").exists()
    finally:
        srv.kill()


def test_migrate_carries_what_the_resume_rule_needs(tmp_path, postgres: Postgres) -> None:
    # The pruned horizon, a tenant change and the id gaps travel both ways: a resume the
    # source would answer with the state is answered with the state after the copy too.
    srv = Server(tmp_path, ["--retention", "1s"]).start()
    servers = [srv]
    try:
        sensor = srv.user(unique("sensor"), tenant=unique("pruned"))
        pruned_id = insert(srv, sensor, "a", 1)[0]
        insert(srv, sensor, "a", 2)
        sensor_state = [insert(srv, sensor, "a", 3)]
        wait_for_pruned(srv, 2)
        mover, blue = unique("mover"), unique("blue")
        moved = srv.user(mover, tenant=unique("red"))
        blue_state = [insert(srv, srv.user(unique("peer"), tenant=blue), "colour", "blue")]
        assert admin(srv, "/update_user", username=mover, tenant_name=blue).status == 200
        gaps = len(rows(srv.db, "SELECT * FROM id_gaps"))

        source: Server = srv
        for leg, target_db in enumerate([postgres.new_database(), tmp_path / "back.db"], 1):
            newest = max(row[0] for row in rows(source.db, "SELECT id FROM events"))
            target = run_leg(source, target_db, tmp_path)
            servers.append(target)
            # Each start adds a gap of its own above the copied ids (the migrate's open of
            # the source may add one more).
            assert len(rows(target.db, "SELECT * FROM id_gaps")) >= gaps + leg
            assert resumed(target, sensor, pruned_id, len(sensor_state)) == sensor_state
            assert resumed(target, moved, blue_state[0][0], 1) == blue_state
            sensor_state.append(insert(target, sensor, f"b{leg}", leg))
            assert sensor_state[-1][0] > newest
            source = target
    finally:
        for server in servers:
            server.kill()
