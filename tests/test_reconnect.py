"""Reconnect storms and restarts (issue 12): the sync from memory stays exact while inserts
race the connects, resuming after a restart under load loses and repeats nothing, every
stream starts with a jittered `retry:` field, and one user's streams are capped.
Real server processes, real sockets."""

from __future__ import annotations

import http.client
import random
import re
import signal
import socket
import threading
import time

import pytest
from conftest import SSE, Server, bearer
from stream_support import eventually, open_resume, sequence_problems, unique
from test_ops import metric
from test_stream import open_stalled_subscriber

RETRY_FRAME = re.compile(rb":data:event:id:\nretry:(\d+)\n\n")

# -- the sync while inserts race the connects -----------------------------------------------

PUBLISHERS = 4
INSERTS_PER_PUBLISHER = 100
CONNECTING_CLIENTS = 24


class SyncRace:
    """Publishers insert into one tenant, each under its own event name, while clients connect
    at random moments and read their sync and every event after it."""

    def __init__(self, server: Server, auth: dict[str, str]) -> None:
        self.server, self.auth = server, auth
        self.acked: dict[int, str] = {}  # id -> event name
        self.received: dict[int, list[tuple[int, str]]] = {}
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.done = threading.Event()

    def publish(self, index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=10)
        body = '{"event":"p%d","data":%d}'
        for n in range(INSERTS_PER_PUBLISHER):
            conn.request("POST", "/insert", body % (index, n),
                         {**self.auth, "Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = resp.read()
            if resp.status != 200:
                self.errors.append(f"publisher {index}: {resp.status} {payload!r}")
                return
            with self.lock:
                self.acked[int(payload.split(b'"id":')[1].split(b",")[0])] = f"p{index}"
        conn.close()

    def follow(self, index: int) -> None:
        time.sleep(random.Random(index).random() * 0.8)  # connect somewhere in the inserts
        stream = self.server.sse(self.auth)
        frames = self.received.setdefault(index, [])
        try:
            while not (self.done.is_set() and self.caught_up(frames)):
                try:
                    frame = stream.next(timeout=0.5)
                except TimeoutError:
                    continue
                frames.append((frame.id, frame.event))
        except ConnectionError as exc:
            self.errors.append(f"client {index}: {exc!r}")
        finally:
            stream.close()

    def caught_up(self, frames: list[tuple[int, str]]) -> bool:
        return bool(frames) and frames[-1][0] >= max(self.acked)

    def check(self, index: int) -> None:
        """The first frames are the sync: one per name (every name had an event before the
        race), the newest of each as of the newest one among them (`upto`). After them
        come exactly the tenant's events after `upto`, in order."""
        frames = self.received[index]
        names = sorted({name for name in self.acked.values()})
        sync, live = frames[:len(names)], frames[len(names):]
        assert sorted(name for _, name in sync) == names, (index, sync)
        upto = max(event_id for event_id, _ in sync)
        for event_id, name in sync:
            newest = max(i for i, n in self.acked.items() if n == name and i <= upto)
            assert event_id == newest, f"client {index}: sync has {event_id} for {name}, " \
                                       f"the newest up to {upto} is {newest}"
        assert [i for i, _ in sync] == sorted(i for i, _ in sync), "sync not oldest first"
        expected = sorted(i for i in self.acked if i > upto)
        seen = [event_id for event_id, _ in live]
        assert seen == expected, f"client {index}: " + sequence_problems(seen, expected)


@pytest.mark.parametrize("cache", ["cached", "never cached"])
def test_sync_is_exact_while_inserts_race_the_connects(make_server, cache):
    # "never cached": a one-byte cache, so every connect loads its tenant's state from the
    # database while the inserts go on, and is held live events meanwhile.
    server = make_server(*(["--cache_bytes", "1"] if cache == "never cached" else []))
    auth = server.user(unique("racer"), tenant=unique("race"))
    race = SyncRace(server, auth)
    for index in range(PUBLISHERS):  # every name has a value before the race
        race.acked[server.insert(auth, f"p{index}", -1).json()["id"]] = f"p{index}"
    clients = [threading.Thread(target=race.follow, args=(i,)) for i in range(CONNECTING_CLIENTS)]
    publishers = [threading.Thread(target=race.publish, args=(i,)) for i in range(PUBLISHERS)]
    for thread in clients + publishers:
        thread.start()
    for thread in publishers:
        thread.join(60)
    race.done.set()
    for thread in clients:
        thread.join(60)
        assert not thread.is_alive()
    assert not race.errors, race.errors
    assert len(race.acked) == PUBLISHERS * (INSERTS_PER_PUBLISHER + 1)
    for index in race.received:
        race.check(index)
    # The race really happened: some clients connected before the last insert.
    assert sum(len(frames) > PUBLISHERS for frames in race.received.values()) > 1


def test_a_state_evicted_from_the_cache_is_loaded_again(make_server):
    # Room for about one tenant's state: connecting to the second evicts the first.
    server = make_server("--cache_bytes", "3000")
    tenants = [server.user(unique("evict"), tenant=unique("evict")) for _ in range(2)]
    ids = {}
    for round_ in range(2):
        for index, auth in enumerate(tenants):
            ids[index] = server.insert(auth, "state", {"round": round_, "pad": "x" * 900}) \
                .json()["id"]
            stream = server.sse(auth)
            assert stream.next().id == ids[index]
            stream.close()
    text = server.get("/metrics", headers=bearer(server.admin_token)).body.decode()
    assert metric(text, "broker_state_cache_evictions_total") >= 2
    assert metric(text, "broker_state_cache_bytes") <= 3000


# -- resuming after a restart while inserts go on -------------------------------------------

RESUMERS = 12


class Resumer:
    """A subscriber that, whenever its stream ends or cannot connect, resumes from the last
    id it saw with Last-Event-ID, as EventSource does."""

    def __init__(self, server: Server, auth: dict[str, str], last_id: int) -> None:
        self.server, self.auth, self.last_id = server, auth, last_id
        self.seen: list[int] = []
        self.reconnects = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                stream = open_resume(self.server, self.auth, self.last_id, "header")
            except OSError:
                time.sleep(0.05)  # the server is restarting
                continue
            self.reconnects += 1
            try:
                self.read(stream)
            except (ConnectionError, OSError):
                pass
            finally:
                stream.close()

    def read(self, stream: SSE) -> None:
        while not self.stop.is_set():
            try:
                frame = stream.next(timeout=0.3)
            except TimeoutError:
                continue
            self.seen.append(frame.id)
            self.last_id = frame.id


class Inserter:
    """Inserts one event after another, through the restart; a refused insert is retried."""

    def __init__(self, server: Server, auth: dict[str, str]) -> None:
        self.server, self.auth = server, auth
        self.acked: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                resp = self.server.insert(self.auth, f"e{n % 5}", n)
            except (OSError, http.client.HTTPException):
                time.sleep(0.02)
                continue
            if resp.status == 200:
                self.acked.append(resp.json()["id"])
                n += 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_resume_after_a_restart_under_inserts_gets_every_event_once_in_order(server, sig):
    auth = server.user(unique("restart"), tenant=unique("restart"))
    start = server.insert(auth, "start", 0).json()["id"]
    inserter = Inserter(server, auth)
    resumers = [Resumer(server, auth, start) for _ in range(RESUMERS)]
    threads = [threading.Thread(target=r.run) for r in (inserter, *resumers)]
    for thread in threads:
        thread.start()
    try:
        assert eventually(lambda: len(inserter.acked) >= 30, 10)
        server.restart(sig)
        before = len(inserter.acked)
        assert eventually(lambda: len(inserter.acked) >= before + 30, 10)
    finally:
        inserter.stop.set()
        threads[0].join(10)
    final = inserter.acked[-1]
    caught_up = eventually(lambda: all(r.last_id >= final for r in resumers), 15)
    for resumer in resumers:
        resumer.stop.set()
    for thread in threads:
        thread.join(10)
    assert caught_up, [r.last_id for r in resumers]
    # The log itself, replayed from the start: what every resumer should have seen.
    everything = open_resume(server, auth, 0, "header")
    log_ids = [everything.next().id]
    while log_ids[-1] < final:
        log_ids.append(everything.next().id)
    everything.close()
    assert set(inserter.acked) <= set(log_ids)
    expected = [i for i in log_ids if start < i <= final]
    for resumer in resumers:
        assert resumer.reconnects >= 2, "the restart did not end the stream"
        seen = [i for i in resumer.seen if i <= final]
        assert seen == expected, sequence_problems(seen, expected)


# -- the retry field --------------------------------------------------------------------------


def test_every_stream_starts_with_a_jittered_retry_field(server):
    auth = server.user(unique("retry"), tenant=unique("retry"))
    first = server.insert(auth, "state", 1).json()["id"]
    delays = set()
    for via in ("fresh", "resume", "fresh", "fresh", "resume", "fresh"):
        stream = server.sse(auth) if via == "fresh" else open_resume(server, auth, 0, "header")
        match = RETRY_FRAME.fullmatch(stream.read_raw())
        assert match, via
        delays.add(int(match.group(1)))
        assert stream.next().id == first  # then the sync or the replay, as ever
        stream.close()
    assert all(2000 <= delay <= 6000 for delay in delays), delays
    assert len(delays) > 1, "the same retry delay for every stream"


# -- one user's streams are capped ----------------------------------------------------------


def test_one_stream_over_the_user_cap_closes_that_users_oldest(make_server):
    server = make_server("--max_streams_per_user", "3")
    tenant = unique("capped")
    runaway = server.user(unique("runaway"), tenant=tenant)
    neighbour = server.user(unique("neighbour"), tenant=tenant)
    other = server.sse(neighbour)
    streams = [server.sse(runaway) for _ in range(3)]
    first = server.insert(runaway, "tick", 1).json()["id"]
    assert all(s.next().id == first for s in [other, *streams])

    newest = server.sse(runaway)
    assert newest.next().id == first  # its sync
    assert streams[0].nothing_within(2.0) and streams[0].ended, "the oldest stream is still open"
    second = server.insert(runaway, "tick", 2).json()["id"]
    for stream in (other, *streams[1:], newest):
        assert stream.next().id == second
    text = server.get("/metrics", headers=bearer(server.admin_token)).body.decode()
    assert metric(text, "broker_user_stream_limit_closes_total") == 1
    assert metric(text, "broker_sse_subscribers") == 4
    for stream in (other, *streams, newest):
        stream.close()


def test_the_user_cap_closes_a_stream_that_takes_no_bytes_first(make_server):
    # A zombie (a peer behind a dead NAT) stops taking bytes; it goes before older streams.
    server = make_server("--max_streams_per_user", "2", "--max_buffer", str(16 << 20))
    auth = server.user(unique("zombie"), tenant=unique("zombie"))
    oldest = server.sse(auth)
    zombie = open_stalled_subscriber(server.port, auth)
    assert eventually(lambda: server.get("/metrics", headers=bearer(server.admin_token))
                      .body.count(b"broker_sse_subscribers 2") == 1, 5)
    for n in range(40):  # about 400 KB that the zombie does not read
        server.insert(auth, "load", {"n": n, "pad": "x" * 10_000})
    newest = server.sse(auth)
    assert newest.status == 200
    assert zombie_closed(zombie), "the stalled stream was not the one closed"
    last = server.insert(auth, "after", 1).json()["id"]
    assert [f.id for f in oldest.take(41)][-1] == last
    assert [f.id for f in newest.take(2)][-1] == last  # its sync, then "after"
    for stream in (oldest, newest):
        stream.close()


def zombie_closed(sock: socket.socket, timeout: float = 10.0) -> bool:
    """Read the stalled socket to its end; True when the server closed it."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            if not sock.recv(1 << 20):
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.close()
    return False
