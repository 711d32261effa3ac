"""The resume rule (issue 10): a reconnect with Last-Event-ID is replayed only what the log can
prove the client is missing; otherwise it gets the latest values, as on a fresh connect.
Each case with a real server on real files: a tenant change, events pruned by retention, a
restore from a backup. (An id beyond the newest: tests/test_stream.py.) On SQLite and
PostgreSQL (conftest.BOTH_ENGINES), except the restore from a `broker backup` copy."""

from __future__ import annotations

import re
import subprocess
import sys
import time

from conftest import ROOT, Server, execute
from stream_support import admin, open_resume, unique, wait_until_closed


def insert(server: Server, auth: dict[str, str], event: str, data: object) -> tuple:
    resp = server.insert(auth, event, data)
    assert resp.status == 200, resp.body
    return resp.json()["id"], event, data


def received(stream, count: int) -> list[tuple]:
    return [(f.id, f.event, f.json()) for f in stream.take(count)]


def resumed(server: Server, auth: dict[str, str], last_id: int, count: int) -> list[tuple]:
    """The frames a reconnect at `last_id` is sent before the stream goes quiet."""
    stream = open_resume(server, auth, last_id, "header")
    try:
        frames = received(stream, count)
        assert stream.nothing_within(0.3), "more frames than expected"
        return frames
    finally:
        stream.close()


def wait_for_pruned(server: Server, count: int, timeout: float = 10.0) -> None:
    """Until the server's retention task has logged deleting at least `count` events."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        deleted = sum(int(n) for n in re.findall(r"retention: deleted (\d+) events", server.log))
        if deleted >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"fewer than {count} events pruned:\n{server.log[-2000:]}")


def backup(source, dest) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "broker", "backup", str(dest), "--db",
                           str(source)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)


# -- tenant change ---------------------------------------------------------------------------

def test_tenant_change_at_or_after_the_id_gets_the_new_tenants_state(server):
    red, blue = unique("red"), unique("blue")
    blue_peer = server.user(unique("blue_peer"), tenant=blue)
    blue_state = [insert(server, blue_peer, "colour", "blue"),
                  insert(server, blue_peer, "only_blue", 2)]
    name = unique("mover")
    mover = server.user(name, tenant=red)
    older_red = insert(server, mover, "colour", "red")
    stream = server.sse(mover)
    newest_red = received(stream, 1)[0]
    assert newest_red == older_red
    assert admin(server, "/update_user", username=name, tenant_name=blue).status == 200
    assert wait_until_closed(stream, timeout=2.0) is not None
    stream.close()
    # The id it saw last is older than blue's state, and equal to the newest id at the move:
    # replaying blue "after" it would send nothing, and leave red's data on screen.
    assert resumed(server, mover, newest_red[0], 2) == blue_state
    assert resumed(server, mover, blue_state[0][0], 2) == blue_state

    # An id of a red event, even one newer than the move (a stream of red could only have
    # sent it), proves nothing about blue.
    red_after_move = insert(server, server.user(unique("red_peer"), tenant=red), "colour", "r")
    assert resumed(server, mover, red_after_move[0], 2) == blue_state

    # Once it has seen a blue event after the move, a resume is a replay again.
    after_move = insert(server, blue_peer, "colour", "blue after the move")
    later = insert(server, blue_peer, "only_blue", 3)
    assert resumed(server, mover, after_move[0], 1) == [later]


def test_tenant_change_is_recorded_in_the_database(tmp_path, database):
    # The move's id survives a restart: it is stored with the user, not kept in memory.
    srv = Server(tmp_path, db=database).start()
    try:
        blue = unique("blue")
        peer = srv.user(unique("peer"), tenant=blue)
        blue_state = [insert(srv, peer, "colour", "blue")]
        name = unique("mover")
        mover = srv.user(name, tenant=unique("red"))
        seen = insert(srv, mover, "colour", "red")
        assert admin(srv, "/update_user", username=name, tenant_name=blue).status == 200
        srv.restart()
        assert resumed(srv, mover, seen[0], 1) == blue_state
    finally:
        srv.kill()


# -- pruned by retention ---------------------------------------------------------------------

def test_a_resume_behind_the_pruned_horizon_gets_the_state(make_server):
    server = make_server("--retention", "1s")
    auth = server.user(unique("sensor"), tenant=unique("pruned"))
    first_a = insert(server, auth, "a", 1)
    second_a = insert(server, auth, "a", 2)
    only_b = insert(server, auth, "b", 1)
    newest_a = insert(server, auth, "a", 3)
    wait_for_pruned(server, 2)  # both older a's; b and the newest a are the state
    state = [only_b, newest_a]
    # Events after these ids are gone: a replay would skip them without a word.
    assert resumed(server, auth, first_a[0], 2) == state
    assert resumed(server, auth, 0, 2) == state
    # From the horizon on, everything is there: a replay.
    assert resumed(server, auth, second_a[0], 2) == state
    assert resumed(server, auth, only_b[0], 1) == [newest_a]


# -- restore from a backup -------------------------------------------------------------------

def test_restore_from_a_backup_taken_before_more_inserts(tmp_path):
    srv = Server(tmp_path).start()
    try:
        auth = srv.user(unique("restorer"), tenant=unique("restored"))
        in_backup = insert(srv, auth, "state", "in the backup")
        copy = tmp_path / "nightly.db"
        result = backup(srv.db, copy)
        assert result.returncode == 0, result.stderr
        insert(srv, auth, "state", "lost")
        lost = insert(srv, auth, "other", "lost too")
        srv.stop()
        srv.db = copy  # restore: the server starts on last night's copy
        srv.start()
        # The client saw `lost`, newer than anything in the restored log.
        assert resumed(srv, auth, lost[0], 1) == [in_backup]
        # The restored log goes on; its new ids must not make `lost` look like a real
        # point in this history, or the client would keep "lost" and miss "in the backup".
        new = insert(srv, auth, "fresh", "after the restore")
        assert new[0] > lost[0]
        assert resumed(srv, auth, lost[0], 2) == [in_backup, new]
        # A client that had only seen what the backup holds resumes with a replay.
        assert resumed(srv, auth, in_backup[0], 1) == [new]
    finally:
        srv.kill()


def test_a_restart_keeps_resume_a_replay(server):
    # Every start moves the ids up to the clock; a client that saw the newest id before the
    # restart still resumes with just what came after it.
    auth = server.user(unique("steady"), tenant=unique("steady"))
    insert(server, auth, "other", 1)
    seen = insert(server, auth, "state", 1)
    server.restart()
    assert resumed(server, auth, seen[0], 0) == []
    after = insert(server, auth, "state", 2)
    assert after[0] > seen[0] + 1  # ids jumped to the clock at the restart
    assert resumed(server, auth, seen[0], 1) == [after]


def test_a_start_never_issues_ids_inside_a_recorded_gap(server):
    # A log copied from a machine whose clock was ahead (or a clock set back) holds a gap that
    # reaches past this clock. Ids issued inside it could never be resumed from: the next
    # start begins above it.
    auth = server.user(unique("skewed"), tenant=unique("skewed"))
    seen = insert(server, auth, "state", 1)
    server.stop()
    ahead = seen[0] + 10**12  # 11.6 days in microseconds
    execute(server.db, f"INSERT INTO id_gaps (after_id, before_id) VALUES ({seen[0]}, {ahead})")
    server.start()
    after = insert(server, auth, "state", 2)
    assert after[0] >= ahead
    assert resumed(server, auth, seen[0], 1) == [after]
    assert resumed(server, auth, after[0], 0) == []


def test_a_scope_change_at_or_after_the_id_gets_the_new_state(make_server):
    # With --enforce_scopes, a newly granted `NAME:get` makes older events visible: a replay
    # after the last id seen would never send them.
    server = make_server("--enforce_scopes")
    tenant, name = unique("scoped"), unique("reader")
    writer = server.user(unique("writer"), tenant=tenant, scopes=["*:post"])
    reader = server.user(name, tenant=tenant, scopes=["a:get"])
    older_b = insert(server, writer, "b", "granted later")
    newer_a = insert(server, writer, "a", "seen")
    stream = server.sse(reader)
    assert received(stream, 1) == [newer_a]
    stream.close()
    assert admin(server, "/update_user", username=name, scopes=["a:get", "b:get"]).status == 200
    assert resumed(server, reader, newer_a[0], 2) == [older_b, newer_a]
    # After an event past the change, a resume is a replay; setting the same scopes again
    # changes nothing.
    later = insert(server, writer, "b", "after the change")
    assert resumed(server, reader, newer_a[0], 2) == [newer_a, later]  # still the state
    assert admin(server, "/update_user", username=name, scopes=["a:get", "b:get"]).status == 200
    assert resumed(server, reader, later[0], 0) == []
