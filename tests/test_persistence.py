"""Persistence: users, events and the generated JWT secret survive restarts, including a
SIGKILL right after a run of acknowledged inserts."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading

import pytest
from api_support import unique
from conftest import ADMIN, ROOT, Server, bearer

PASSWORD = "correct horse 1"


def sync_frames(srv: Server, auth: dict[str, str], count: int) -> dict[str, tuple[int, object]]:
    """Connect and read the `count` frames of the sync: {event: (id, data)}."""
    stream = srv.sse(auth)
    try:
        frames = stream.take(count)
        assert stream.nothing_within(0.3), "more sync frames than expected"
    finally:
        stream.close()
    return {f.event: (f.id, f.json()) for f in frames}


def test_users_and_events_survive_graceful_restart(server: Server) -> None:
    name, tenant = unique("keep"), unique("tenant")
    created = server.create_user(name, tenant=tenant, scopes=["a"], email="k@example.com",
                                 data={"x": 1})
    assert created.status == 200
    revoked = unique("revoked")
    assert server.create_user(revoked, tenant=tenant).status == 200
    assert server.post("/revoke_user", {"admin_token": ADMIN, "username": revoked}).status == 200
    auth = bearer(server.login(name))
    acks = {}
    for event, value in [("a", 1), ("b", [2]), ("a", {"three": 3})]:
        acks[event] = (server.insert(auth, event, value).json()["id"], value)
    user_before = server.post("/get_user", {"admin_token": ADMIN, "username": name}).json()

    server.restart()

    user_after = server.post("/get_user", {"admin_token": ADMIN, "username": name}).json()
    assert user_after == user_before and user_after["id"] == created.json()["id"]
    fresh = bearer(server.login(name))  # the password hash survived
    assert sync_frames(server, fresh, 2) == acks
    assert server.post("/login", {"username": revoked, "password": PASSWORD}).status == 401
    later = server.insert(fresh, "c", None).json()["id"]
    assert later > max(event_id for event_id, _ in acks.values())  # ids are never reused


def test_generated_jwt_secret_survives_restart(make_server, tmp_path) -> None:
    srv = make_server()  # no --jwt_secret: the server generates and stores one
    name = unique("secret")
    assert srv.create_user(name).status == 200
    token = srv.login(name)
    assert srv.get("/verify", headers=bearer(token)).status == 200

    srv.restart()
    resp = srv.get("/verify", headers=bearer(token))
    assert resp.status == 200, resp.body

    # The secret is random per database, never a fixed default: another database's server
    # rejects this token even for a user of the same name.
    other = make_server(db=tmp_path / "other.db")
    assert other.create_user(name).status == 200
    assert other.get("/verify", headers=bearer(token)).status == 401


def insert_many(srv: Server, auth: dict[str, str], prefix: str, count: int,
                acked: dict[str, tuple[int, object]], lock: threading.Lock) -> None:
    for n in range(count):
        value = {"writer": prefix, "n": n}
        resp = srv.insert(auth, f"{prefix}_{n}", value)
        assert resp.status == 200, resp.body
        with lock:
            acked[f"{prefix}_{n}"] = (resp.json()["id"], value)


@pytest.mark.parametrize("writers", [1, 4])
def test_sigkill_after_acknowledged_inserts_loses_nothing(server: Server, writers: int) -> None:
    name = unique("durable")
    assert server.create_user(name, tenant=unique("tenant")).status == 200
    auth = bearer(server.login(name))
    acked: dict[str, tuple[int, object]] = {}
    lock = threading.Lock()
    per_writer = 60 // writers
    threads = [threading.Thread(target=insert_many,
                                args=(server, auth, f"w{i}", per_writer, acked, lock))
               for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(acked) == 60  # every insert was acknowledged (a failed thread leaves gaps)

    server.stop(signal.SIGKILL)  # no chance to flush anything after the last answer
    server.start()

    # Every event name is distinct, so the sync of latest values lists every acknowledged one.
    auth = bearer(server.login(name))
    assert sync_frames(server, auth, 60) == acked
    # Resuming from 0 (Last-Event-ID, issue 3) replays the tenant's whole log: exactly the
    # acknowledged events, each once, in id order.
    stream = server.sse(auth, headers={"Last-Event-ID": "0"})
    try:
        replayed = [(f.id, f.event) for f in stream.take(60)]
        assert stream.nothing_within(0.3)
    finally:
        stream.close()
    assert replayed == sorted((event_id, event) for event, (event_id, _) in acked.items())


def run_broker(args: list[str], timeout: float = 20.0) -> subprocess.CompletedProcess:
    """A broker that is expected to refuse to start: its exit status and log."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    return subprocess.run([sys.executable, "-m", "broker", "--host", "127.0.0.1",
                           "--port", "0", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_a_second_broker_on_the_same_sqlite_file_is_refused(server: Server) -> None:
    auth = server.user(unique("owner"))
    first = server.insert(auth, "before", 1).json()["id"]
    second = run_broker(["--db", str(server.db)])
    assert second.returncode == 1, second.stderr
    assert "in use by another broker" in second.stderr
    assert "postgresql://" in second.stderr
    assert "Traceback" not in second.stderr
    # The owner did not notice: it still inserts and serves.
    assert server.insert(auth, "after", 2).json()["id"] > first


def test_reads_and_a_backup_beside_the_running_server_work(server: Server, tmp_path) -> None:
    auth = server.user(unique("reader"))
    event_id = server.insert(auth, "kept", {"v": 1}).json()["id"]
    reader = sqlite3.connect(f"file:{server.db}?mode=ro", uri=True)
    try:
        assert reader.execute("SELECT max(id) FROM events").fetchone()[0] == event_id
        copy = sqlite3.connect(tmp_path / "backup.db")
        reader.backup(copy)
        assert copy.execute("SELECT data FROM events WHERE id = ?",
                            (event_id,)).fetchone()[0] == '{"v":1}'
        copy.close()
    finally:
        reader.close()
    assert server.insert(auth, "after", 2).status == 200  # the server's writes go on


def test_a_killed_owner_does_not_block_the_restart(server: Server) -> None:
    name = unique("crash")
    event_id = server.insert(server.user(name), "kept", 1).json()["id"]
    server.stop(signal.SIGKILL)  # the kernel releases the lock with the process
    server.start()
    assert server.insert(bearer(server.login(name)), "next", 2).json()["id"] > event_id


def test_reuse_port_is_refused_on_sqlite(tmp_path) -> None:
    result = run_broker(["--db", str(tmp_path / "x.db"), "--reuse_port"])
    assert result.returncode == 2
    assert "--reuse_port needs PostgreSQL" in result.stderr
    assert not (tmp_path / "x.db").exists()
