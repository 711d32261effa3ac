"""Several broker processes on one PostgreSQL database (issue 9): to a client they are one
broker. Every event inserted through any process reaches every subscriber on every process
once, in id order; a resume works on any process; account changes act everywhere within a
second; a killed broker or a restarted database loses nothing acknowledged.

Real processes, a real PostgreSQL cluster started by the tests (conftest.Postgres)."""

from __future__ import annotations

import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import SSE, Server, basic, bearer, rows
from pg_cluster import Postgres
from stream_support import (
    admin,
    assert_all_closed_within,
    eventually,
    open_resume,
    sequence_problems,
    status_everywhere,
    unique,
    wait_until_closed,
)

PASSWORD = "correct horse 1"
REFUSED = {"verify": 401, "insert": 401, "sse": 401}


def start_brokers(tmp_path: Path, url: str, count: int, *args: str) -> list[Server]:
    """`count` brokers on one database, started at the same moment (schema setup races)."""
    servers = [Server(tmp_path, list(args), db=url) for _ in range(count)]  # type: ignore[arg-type]
    with ThreadPoolExecutor(count) as pool:
        list(pool.map(Server.start, servers))
    return servers


@pytest.fixture
def brokers(tmp_path, postgres: Postgres):
    servers = start_brokers(tmp_path, postgres.new_database(), 3, "--heartbeat", "0.5")
    yield servers
    for srv in servers:
        srv.kill()


def live_streams(servers: list[Server], auth: dict[str, str],
                 inserter: Server) -> list[SSE]:
    """One subscriber per broker, each proven live by a warm-up event."""
    streams = [srv.sse(auth) for srv in servers]
    warm = inserter.insert(auth, "warm", 0).json()["id"]
    for stream in streams:
        assert stream.next().id == warm
    return streams


def insert_many(srv: Server, auth: dict[str, str], count: int, tag: str,
                acked: list[int] | None = None) -> list[int]:
    ids = acked if acked is not None else []
    for i in range(count):
        resp = srv.insert(auth, tag, {"n": i})
        assert resp.status == 200, resp.body
        ids.append(resp.json()["id"])
    return ids


def collect(stream: SSE, count: int, timeout: float = 10.0) -> list[int]:
    return [frame.id for frame in stream.take(count, timeout)]  # type: ignore[misc]


def test_every_subscriber_on_every_process_gets_every_event_once_in_order(brokers) -> None:
    a = brokers[0]
    auth = a.user(unique("fan"), tenant=unique("fan"))  # one JWT, valid on every process
    streams = live_streams(brokers, auth, a)
    with ThreadPoolExecutor(3) as pool:
        batches = list(pool.map(lambda srv: insert_many(srv, auth, 60, "e"), brokers))
    expected = sorted(i for batch in batches for i in batch)
    assert len(set(expected)) == 180
    for stream in streams:
        seen = collect(stream, len(expected))
        assert seen == expected, sequence_problems(seen, expected)
        assert stream.nothing_within(0.3), "an event delivered twice"
        stream.close()


def test_resume_on_another_process_has_no_gap_and_no_duplicate(brokers) -> None:
    a, b, c = brokers
    auth = a.user(unique("resume"), tenant=unique("resume"))
    first = insert_many(a, auth, 5, "x")
    stream = a.sse(auth, headers={"Last-Event-ID": "0"})
    assert collect(stream, 5) == first
    stream.close()
    missed = insert_many(b, auth, 7, "x") + insert_many(a, auth, 3, "x")
    resumed = open_resume(c, auth, first[-1], via="header")
    assert collect(resumed, 10) == missed
    live = insert_many(b, auth, 2, "x")
    assert collect(resumed, 2) == live
    assert resumed.nothing_within(0.3)
    resumed.close()


def test_an_event_over_8_kB_is_delivered_through_every_process(brokers) -> None:
    auth = brokers[0].user(unique("big"), tenant=unique("big"))
    streams = live_streams(brokers, auth, brokers[0])
    sent = {}
    for index, srv in enumerate(brokers):
        payload = {"from": index, "blob": "x" * 20_000}
        sent[srv.insert(auth, "big", payload).json()["id"]] = payload
    for stream in streams:
        frames = stream.take(3)
        assert {frame.id: frame.json() for frame in frames} == sent
        stream.close()


def test_an_event_reaches_the_other_processes_by_notification_not_the_safety_net(
        brokers) -> None:
    """A process reads the log when another one notifies (its own notifications it skips);
    were the notifications ignored, events would wait for the read every 2 s."""
    a, b, _ = brokers
    auth = a.user(unique("notify"), tenant=unique("notify"))
    stream = live_streams([b], auth, a)[0]
    for n in range(3):
        sent_at = time.monotonic()
        event_id = a.insert(auth, "now", {"n": n}).json()["id"]
        assert stream.next().id == event_id
        assert time.monotonic() - sent_at < 1.0, "delivered by the safety net, not notified"
    stream.close()


def test_revoke_on_one_process_closes_streams_on_the_others_within_a_second(brokers) -> None:
    a, b, c = brokers
    name = unique("doomed")
    auth = a.user(name, tenant=unique("doomed"))
    basic_auth = basic(name, PASSWORD)
    streams = {"b-bearer": b.sse(auth), "c-basic": c.sse(basic_auth)}
    warm = a.insert(auth, "warm", 1).json()["id"]
    for stream in streams.values():
        assert stream.next().id == warm
    assert admin(a, "/revoke_user", username=name).status == 200
    revoked_at = time.monotonic()
    assert_all_closed_within(streams, revoked_at, 1.0)
    for srv in (b, c):  # the cached JWT and Basic credentials are void there too
        assert status_everywhere(srv, auth) == REFUSED
        assert status_everywhere(srv, basic_auth) == REFUSED
    assert admin(b, "/unrevoke_user", username=name).status == 200
    assert eventually(lambda: c.get("/verify", headers=basic_auth).status == 200, 1.0)


def test_password_and_tenant_changes_act_on_every_process(brokers) -> None:
    a, b, c = brokers
    name, red, blue = unique("mover"), unique("red"), unique("blue")
    old_jwt = a.user(name, tenant=red)
    old_basic = basic(name, PASSWORD)
    assert b.get("/verify", headers=old_basic).status == 200  # cached on b
    stream = c.sse(old_basic)
    assert admin(a, "/update_user", username=name, password="a brand new one 2").status == 200
    assert wait_until_closed(stream, timeout=1.0) is not None, "stream kept after a password change"
    stream.close()
    for srv in (b, c):
        assert eventually(lambda srv=srv: status_everywhere(srv, old_basic) == REFUSED, 1.0)
        assert status_everywhere(srv, old_jwt) == REFUSED
    new_basic = basic(name, "a brand new one 2")
    moving = b.sse(new_basic)
    assert admin(c, "/update_user", username=name, tenant_name=blue).status == 200
    assert wait_until_closed(moving, timeout=1.0) is not None, "stream left in the old tenant"
    moving.close()
    assert a.get("/verify", headers=new_basic).json()["tenant_name"] == blue


def test_kill_9_mid_burst_loses_no_acknowledged_event(brokers) -> None:
    a, b, _ = brokers
    auth = a.user(unique("crash"), tenant=unique("crash"))
    stream = live_streams([b], auth, b)[0]
    acked: list[int] = []
    errors: list[Exception] = []

    def burst() -> None:
        try:
            while True:
                resp = a.insert(auth, "burst", len(acked))
                if resp.status != 200:
                    return
                acked.append(resp.json()["id"])
        except OSError as exc:  # the process died under us
            errors.append(exc)

    writer = threading.Thread(target=burst)
    writer.start()
    assert eventually(lambda: len(acked) >= 30, 20.0)
    a.stop(signal.SIGKILL)
    writer.join(10)
    assert not writer.is_alive()
    # Every acknowledged event reached the subscriber on b, in order (a batch that
    # committed but was never answered may come too: committed, just not acknowledged).
    seen: list[int] = []
    while len(seen) < len(acked) or seen[-1] < acked[-1]:
        seen.append(stream.next(timeout=5.0).id)  # type: ignore[arg-type]
    assert seen == sorted(set(seen)), "out of order or twice"
    assert set(acked) <= set(seen), sequence_problems(seen, acked)
    # And they are in the log: a replay from 0 on b has them all.
    replay = open_resume(b, auth, 0, via="header")
    logged = collect(replay, len(seen) + 1)
    assert set(acked) <= set(logged)
    replay.close()
    stream.close()


def test_database_restart_mid_stream_503s_then_delivers_in_order(
        brokers, postgres: Postgres) -> None:
    a, b, c = brokers
    auth = a.user(unique("outage"), tenant=unique("outage"))
    stranger = unique("stranger")  # a user b has never seen: its login needs the database
    assert a.create_user(stranger).status == 200
    streams = live_streams([b, c], auth, a)
    before = insert_many(a, auth, 3, "before")
    postgres.stop()
    try:
        down = a.insert(auth, "down", 1)
        assert down.status == 503 and down.headers.get("retry-after"), down.body
        assert b.post("/login", {"username": stranger, "password": PASSWORD}).status == 503
        # The streams stay open: heartbeats (every 0.5 s here) keep coming.
        seen: dict[SSE, list[int]] = {stream: [] for stream in streams}
        for stream, ids in seen.items():
            while (frame := stream.next(timeout=3.0, skip_comments=False)).id is not None:
                ids.append(frame.id)
    finally:
        postgres.start()

    after: list[int] = []

    def insert_works() -> bool:
        resp = a.insert(auth, "after", 0)
        if resp.status == 200:
            after.append(resp.json()["id"])
        return resp.status == 200

    assert eventually(insert_works, 15.0, 0.25)
    insert_many(b, auth, 5, "after", after)
    insert_many(c, auth, 5, "after", after)
    for stream, ids in seen.items():
        while len(ids) < len(before) + 11:
            ids.append(stream.next(timeout=15.0).id)  # type: ignore[arg-type]
        assert ids == sorted(set(ids)), "out of order or twice"
        assert ids[:3] == before and set(after) <= set(ids)
        stream.close()
    assert b.post("/login", {"username": stranger, "password": PASSWORD}).status == 200


def test_processes_started_at_once_share_one_jwt_secret(tmp_path, postgres: Postgres) -> None:
    first, second = start_brokers(tmp_path, postgres.new_database(), 2)
    try:
        name = unique("shared")
        auth = first.user(name)
        assert second.get("/verify", headers=auth).status == 200
        second.restart()
        assert second.get("/verify", headers=auth).status == 200
        assert first.get("/verify", headers=bearer(second.login(name))).status == 200
    finally:
        first.kill()
        second.kill()


def test_a_scope_change_on_one_process_closes_streams_on_another(tmp_path,
                                                                  postgres: Postgres) -> None:
    a, b = start_brokers(tmp_path, postgres.new_database(), 2, "--enforce_scopes")
    try:
        name = unique("scoped")
        auth = a.user(name, tenant=unique("scoped"), scopes=["news:get", "news:post"])
        stream = b.sse(auth)
        warm = b.insert(auth, "news", 1).json()["id"]
        assert stream.next().id == warm
        assert admin(a, "/update_user", username=name, scopes=["news:get"]).status == 200
        assert wait_until_closed(stream, timeout=1.0) is not None, "stream kept its old scopes"
        stream.close()
        assert eventually(lambda: b.insert(auth, "news", 2).status == 403, 1.0)
    finally:
        a.kill()
        b.kill()


def frames_on_resume(srv: Server, auth: dict[str, str], last_id: int, count: int) -> list[tuple]:
    stream = open_resume(srv, auth, last_id, via="header")
    try:
        frames = [(frame.id, frame.json()) for frame in stream.take(count)]
        assert stream.nothing_within(0.3), "more frames than expected"
        return frames
    finally:
        stream.close()


def test_a_later_start_keeps_ids_increasing_and_tenant_changes_reach_its_resumes(
        tmp_path, postgres: Postgres) -> None:
    url = postgres.new_database()
    a = Server(tmp_path, db=url).start()  # type: ignore[arg-type]
    servers = [a]
    try:
        name, red, blue = unique("mover"), unique("red"), unique("blue")
        auth = a.user(name, tenant=red)
        peer = a.user(unique("peer"), tenant=blue)
        blue_state = [(a.insert(peer, "colour", "blue").json()["id"], "blue"),
                      (a.insert(peer, "size", 2).json()["id"], 2)]
        before = a.insert(auth, "colour", 0).json()["id"]
        b = Server(tmp_path, db=url).start()  # type: ignore[arg-type]
        servers.append(b)
        after = [srv.insert(auth, "colour", n).json()["id"] for n, srv in enumerate((a, b, a), 1)]
        ids = [before, *after]
        assert ids == sorted(set(ids)), ids
        assert after[0] > before + 1000, "b's start did not move the ids up to the clock"
        # The ids skipped at b's start are a recorded gap, not a lost history: a client that
        # saw `before` resumes on b with a replay.
        assert frames_on_resume(b, auth, before, 3) == list(zip(after, [1, 2, 3]))

        # A tenant change through a: a resume on b gets the new tenant's state, even from an
        # id of that tenant older than the move (a replay after it would skip blue's colour).
        assert admin(a, "/update_user", username=name, tenant_name=blue).status == 200
        assert eventually(lambda: b.get("/verify", headers=auth).json().get("tenant_name")
                          == blue, 2.0)
        assert frames_on_resume(b, auth, blue_state[0][0], 2) == blue_state
        assert frames_on_resume(b, auth, after[-1], 2) == blue_state
    finally:
        for srv in servers:
            srv.kill()


def test_two_processes_pruning_at_once_keep_the_newest_of_each_name(
        tmp_path, postgres: Postgres) -> None:
    url = postgres.new_database()
    a, b = start_brokers(tmp_path, url, 2, "--retention", "1s")
    try:
        auth = a.user(unique("sensor"), tenant=unique("pruned"))
        ids = [(a if n % 2 else b).insert(auth, f"e{n % 3}", n).json()["id"] for n in range(20)]
        kept = [("e0", "18"), ("e1", "19"), ("e2", "17")]
        query = "SELECT event, data FROM events ORDER BY event"
        assert eventually(lambda: rows(url, query) == kept, 10.0), rows(url, query)
        assert rows(url, "SELECT upto FROM pruned") == [(ids[16],)]  # the newest deleted
        deleted = sum(int(n) for srv in (a, b)
                      for n in re.findall(r"retention: deleted (\d+) events", srv.log))
        assert deleted == 17, deleted  # each event deleted once, by one of them
    finally:
        a.kill()
        b.kill()
