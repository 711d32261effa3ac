"""Real-time delivery (issue 3): resume with Last-Event-ID, access_token for EventSource,
heartbeats, and the fan-out engine's treatment of a stalled reader. Real server, real sockets."""

from __future__ import annotations

import http.client
import itertools
import json
import random
import selectors
import socket
import threading
import time
from collections.abc import Sequence

from conftest import SSE, Server, bearer, parse_frame
from stream_support import (
    RESET_ERRORS,
    dechunk,
    eventually,
    open_resume,
    sequence_problems,
    sse_status,
    unique,
)

# -- resume ------------------------------------------------------------------------------


def insert_logged(server: Server, auth: dict[str, str], log: list[tuple[int, str, object]],
                  event: str, data: object) -> int:
    """Insert and remember (id, event, data) in `log`, the test's copy of the tenant's log."""
    resp = server.insert(auth, event, data)
    assert resp.status == 200, resp.body
    event_id = resp.json()["id"]
    log.append((event_id, event, data))
    return event_id


def test_resume_replays_every_later_event_in_order_then_goes_live(server):
    auth = server.user(unique("resumer"), tenant=unique("resume"))
    stranger = server.user(unique("stranger"), tenant=unique("other"))
    log: list[tuple[int, str, object]] = []
    # Repeated names: a replay must contain every event, where the sync would give one per name.
    for n, name in enumerate(["a", "b", "a", "c", "a", "b"]):
        insert_logged(server, auth, log, name, {"n": n})
        assert server.insert(stranger, name, {"foreign": n}).status == 200

    for via in ("header", "query"):
        since = log[1][0]
        expected = [entry for entry in log if entry[0] > since]
        stream = open_resume(server, auth, since, via)
        assert stream.status == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        frames = stream.take(len(expected))
        assert [(f.id, f.event, f.json()) for f in frames] == expected, via
        live_id = insert_logged(server, auth, log, "live", {"via": via})
        live = stream.next()
        assert (live.id, live.event, live.json()) == (live_id, "live", {"via": via})
        assert stream.nothing_within(0.3), "a frame after the live event: duplicate or sync"
        stream.close()


def test_resume_from_zero_replays_the_whole_log_not_the_latest_values(server):
    auth = server.user(unique("historian"), tenant=unique("history"))
    log: list[tuple[int, str, object]] = []
    for n in range(5):
        insert_logged(server, auth, log, "counter", n)
    stream = open_resume(server, auth, 0, "header")
    frames = stream.take(5)
    assert [(f.id, f.event, f.json()) for f in frames] == log
    assert stream.nothing_within(0.3)
    stream.close()


def test_resume_from_the_newest_id_replays_nothing_then_goes_live(server):
    auth = server.user(unique("current"), tenant=unique("current"))
    log: list[tuple[int, str, object]] = []
    newest = insert_logged(server, auth, log, "state", "old")
    stream = open_resume(server, auth, newest, "query")
    assert stream.status == 200
    assert stream.nothing_within(0.4), "the latest-values sync was sent on resume"
    live_id = insert_logged(server, auth, log, "state", "new")
    frame = stream.next()
    assert (frame.id, frame.json()) == (live_id, "new")
    stream.close()


def test_resume_beyond_the_newest_id_gets_the_latest_values_then_goes_live(server):
    # An id this log never issued (another database, a restore): the client's state cannot
    # be trusted, so it gets the latest values, as on a fresh connect (issue 10).
    auth = server.user(unique("future"), tenant=unique("future"))
    log: list[tuple[int, str, object]] = []
    insert_logged(server, auth, log, "other", "kept")
    newest = insert_logged(server, auth, log, "state", "before")
    for via in ("header", "query"):
        stream = open_resume(server, auth, newest + 1000, via)
        assert stream.status == 200, via
        state = [(f.id, f.event, f.json()) for f in stream.take(2)]
        assert state == [log[0], log[-1]], f"{via}: not the latest values"
        assert stream.nothing_within(0.3), f"{via}: more than the latest values"
        live_id = insert_logged(server, auth, log, "state", via)
        frame = stream.next()
        assert (frame.id, frame.event, frame.json()) == (live_id, "state", via)
        stream.close()


def test_resume_with_a_non_numeric_id_is_400(server):
    auth = server.user(unique("garbled"), tenant=unique("garbled"))
    for value in ("abc", "12abc", "1 2"):
        resp = server.get("/sse", headers={**auth, "Last-Event-ID": value})
        assert resp.status == 400, (value, resp.status, resp.body)
        assert isinstance(resp.json().get("error"), str), resp.body
    for value in ("abc", "7x"):
        resp = server.get(f"/sse?last_event_id={value}", headers=auth)
        assert resp.status == 400, (value, resp.status, resp.body)
        assert isinstance(resp.json().get("error"), str), resp.body


# -- resume while inserts race many reconnects --------------------------------------------

PUBLISHERS = 4
INSERTS_PER_PUBLISHER = 120
CLIENTS = 12
# Frames a client reads before it hangs up; 0 hangs up right after the response head,
# which races the server's backlog read.
QUOTAS = (0, 0, 1, 2, 3, 5, 13, 40)
RACE_DEADLINE = 25.0


class ResumeRace:
    """Publishers insert into one tenant while clients keep dropping and resuming."""

    def __init__(self, server: Server, auth: dict[str, str], start_id: int) -> None:
        self.server, self.auth, self.start_id = server, auth, start_id
        self.acked: dict[int, tuple[str, object]] = {}
        # Per client: (id, event, data, connection number) for every frame it read.
        self.seen: dict[int, list[tuple[int, str, object, int]]] = {}
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.final_id: int | None = None  # set once every publisher has finished
        self.reconnects_during_inserts = 0
        self.deadline = time.monotonic() + RACE_DEADLINE

    def run(self, extra_publishers: Sequence[threading.Thread] = (),
            extra_clients: Sequence[threading.Thread] = ()) -> None:
        """Race PUBLISHERS against CLIENTS that keep resuming, then check that every client
        saw every acknowledged event once, in id order, as it was inserted."""
        publishers = [threading.Thread(target=self.publish, args=(i,), name=f"pub{i}")
                      for i in range(PUBLISHERS)] + list(extra_publishers)
        clients = [threading.Thread(target=self.follow, args=(i,), name=f"client{i}")
                   for i in range(CLIENTS)] + list(extra_clients)
        for thread in clients:
            thread.start()
        run_threads(publishers, RACE_DEADLINE)
        self.final_id = max(self.acked, default=self.start_id)
        for thread in clients:
            thread.join(RACE_DEADLINE)
            assert not thread.is_alive(), f"{thread.name} still running"
        assert not self.errors, self.errors
        expected = sorted(self.acked)
        assert len(expected) == PUBLISHERS * INSERTS_PER_PUBLISHER
        for index, seen in sorted(self.seen.items()):
            ids = [entry[0] for entry in seen]
            assert ids == expected, f"client {index}: " + sequence_problems(ids, expected) + \
                "; " + duplicate_origins(seen, self.start_id)
            for event_id, event, data, _ in seen:
                assert (event, data) == self.acked[event_id], f"client {index}, id {event_id}"
        # The race must really have happened: clients reconnected while inserts were running.
        assert self.reconnects_during_inserts >= CLIENTS * 3, self.reconnects_during_inserts

    def publish(self, index: int) -> None:
        rng = random.Random(1000 + index)
        for n in range(INSERTS_PER_PUBLISHER):
            event, data = f"e{n % 4}", {"publisher": index, "n": n}
            resp = self.server.insert(self.auth, event, data)
            if resp.status != 200:
                with self.lock:
                    self.errors.append(f"publisher {index}: insert {n} -> {resp.status}")
                return
            with self.lock:
                self.acked[resp.json()["id"]] = (event, data)
            time.sleep(rng.random() * 0.004)  # spread the inserts over the reconnects

    def follow(self, index: int) -> None:
        rng = random.Random(index)
        via = "header" if index % 2 else "query"
        last, seen = self.start_id, self.seen.setdefault(index, [])
        for connection in itertools.count():
            if time.monotonic() >= self.deadline:
                break
            final_id = self.final_id
            if final_id is not None and last >= final_id:
                return
            if final_id is None:
                with self.lock:
                    self.reconnects_during_inserts += 1
            last = self.read_some(index, via, last, rng.choice(QUOTAS), seen, connection)
            if last < 0:
                return
        with self.lock:
            self.errors.append(f"client {index}: not caught up by the deadline")

    def read_some(self, index: int, via: str, last: int, quota: int,
                  seen: list[tuple[int, str, object, int]], connection: int) -> int:
        """One connection: resume after `last`, read up to `quota` frames, hang up.
        Returns the last id seen, or -1 after a fatal error."""
        stream = open_resume(self.server, self.auth, last, via)
        try:
            if stream.status != 200:
                raise AssertionError(f"status {stream.status}")
            for _ in range(quota):
                frame = stream.next(timeout=0.5)
                seen.append((frame.id, frame.event, frame.json(), connection))
                last = frame.id
        except TimeoutError:
            pass  # caught up with the publishers for now: hang up and resume
        except (AssertionError, ConnectionError) as exc:
            with self.lock:
                self.errors.append(f"client {index}: {exc!r}")
            return -1
        finally:
            stream.close()
        return last


def duplicate_origins(seen: list[tuple[int, str, object, int]], start_id: int) -> str:
    """For each repeated id: the connections that delivered it, and the last id the client
    had seen before the connection that repeated it (what it resumed from)."""
    first_conn: dict[int, int] = {}
    resumed_from: dict[int, int] = {}
    notes, previous, previous_conn = [], start_id, -1
    for event_id, _, _, conn in seen:
        if conn != previous_conn:
            resumed_from[conn], previous_conn = previous, conn
        if event_id in first_conn:
            where = "same connection" if first_conn[event_id] == conn else "after a reconnect"
            notes.append(f"id {event_id} again on connection {conn} ({where}, "
                         f"resumed from {resumed_from[conn]})")
        first_conn.setdefault(event_id, conn)
        previous = event_id
    return "; ".join(notes[:5]) or "no duplicates"


def run_threads(targets: list[threading.Thread], timeout: float) -> None:
    for thread in targets:
        thread.start()
    for thread in targets:
        thread.join(timeout)
        assert not thread.is_alive(), f"{thread.name} still running"


def test_resume_under_concurrent_inserts_sees_every_id_once_in_order(server):
    auth = server.user(unique("racer"), tenant=unique("race"))
    bystander = server.user(unique("bystander"), tenant=unique("elsewhere"))
    start_id = server.insert(auth, "start", None).json()["id"]
    race = ResumeRace(server, auth, start_id)

    def foreign_inserts() -> None:
        # Another tenant's events interleave, so ids in the race tenant are not contiguous.
        for n in range(30):
            server.insert(bystander, "noise", n)

    race.run(extra_publishers=[threading.Thread(target=foreign_inserts, name="foreign")])


# -- access_token for the browser's EventSource -------------------------------------------


def test_access_token_query_parameter_works_on_sse(server):
    name = unique("browser")
    server.create_user(name, tenant=unique("browser"))
    token = server.login(name)
    stream = server.sse(path=f"/sse?access_token={token}")
    assert stream.status == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    first = server.insert(bearer(token), "tick", 1).json()["id"]
    assert stream.next().id == first
    stream.close()
    # EventSource's own reconnect: the same URL plus a Last-Event-ID header.
    second = server.insert(bearer(token), "tick", 2).json()["id"]
    resumed = server.sse(path=f"/sse?access_token={token}", headers={"Last-Event-ID": str(first)})
    frame = resumed.next()
    assert (frame.id, frame.json()) == (second, 2)
    assert resumed.nothing_within(0.3)
    resumed.close()
    both = server.sse(path=f"/sse?last_event_id={first}&access_token={token}")
    assert both.next().id == second
    both.close()


def test_access_token_is_refused_outside_sse_and_when_bad(server):
    name = unique("leaky")
    server.create_user(name, tenant=unique("leaky"))
    token = server.login(name)
    inserted = server.post(f"/insert?access_token={token}", {"event": "x", "data": 1})
    assert inserted.status == 401, inserted.body
    assert "www-authenticate" in inserted.headers
    verified = server.get(f"/verify?access_token={token}")
    assert verified.status == 401, verified.body
    forged = token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB")
    for bad in ("garbage", forged, ""):
        resp = server.get(f"/sse?access_token={bad}")
        assert resp.status == 401, (bad, resp.status, resp.body)
        assert "www-authenticate" in resp.headers
    assert sse_status(server, None, path=f"/sse?access_token={token}") == 200


def test_query_strings_never_reach_the_log(server):
    name = unique("secretive")
    server.create_user(name, tenant=unique("secretive"))
    token = server.login(name)
    assert sse_status(server, None, path=f"/sse?access_token={token}&last_event_id=0") == 200
    assert server.get(f"/verify?access_token={token}").status == 401
    assert server.post(f"/insert?access_token={token}", {"event": "x", "data": 1}).status == 401
    # Each request's log line is written once it is answered (a stream's: once it ends).
    assert eventually(lambda: "/verify" in server.log and "/insert" in server.log, 3.0), \
        "requests are not logged:\n" + server.log
    time.sleep(0.3)
    log = server.log
    assert token not in log
    assert token.split(".")[2] not in log  # not even the signature
    assert "access_token" not in log
    assert "last_event_id" not in log
    for path in ("/sse?", "/verify?", "/insert?"):
        assert path not in log


# -- heartbeats ---------------------------------------------------------------------------


def test_idle_stream_gets_heartbeat_comments(make_server):
    server = make_server("--heartbeat", "0.5")
    auth = server.user(unique("idle"), tenant=unique("idle"))  # empty tenant: no sync frames
    stream = server.sse(auth)
    assert stream.status == 200
    assert stream.read_raw(timeout=1.5).startswith(b":data:event:id:\nretry:")  # the first frame
    for _ in range(3):
        assert stream.read_raw(timeout=1.5) == b":\n\n"
    # Events still come through intact between heartbeats, and the heartbeats go on after.
    event_id = server.insert(auth, "wake", {"up": True}).json()["id"]
    frame = stream.next(timeout=2.0)
    assert (frame.id, frame.event, frame.json()) == (event_id, "wake", {"up": True})
    start, beats = time.monotonic(), 0
    while time.monotonic() - start < 2.0:
        try:
            assert stream.read_raw(timeout=2.0 - (time.monotonic() - start)) == b":\n\n"
        except TimeoutError:
            break
        beats += 1
    assert 2 <= beats <= 6, f"{beats} heartbeats in 2 s with --heartbeat 0.5"
    stream.close()


# -- the fan-out engine and a stalled reader ----------------------------------------------

READERS = 100
EVENTS = 300
PAD = "x" * 3000  # ~3 KB frames
MAX_BUFFER = 65536


def open_stalled_subscriber(port: int, auth: dict[str, str]) -> socket.socket:
    """A subscriber that never reads. On loopback the kernel's 64 KB MSS makes the server's
    send buffer ~4 MB, which would swallow the whole test; a small receive window and a
    WAN-sized MSS (set before connecting) keep the kernel's share to tens of KB, as on a
    real network, so the server's own buffer is what fills up."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1400)
    sock.connect(("127.0.0.1", port))
    head = ["GET /sse HTTP/1.1", f"Host: 127.0.0.1:{port}", "Accept: text/event-stream"]
    head += [f"{k}: {v}" for k, v in auth.items()]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    return sock


def drain(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Read everything until EOF or reset. Returns (bytes read, whether it ended in time)."""
    data, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                return data, True
            data += chunk
    except TimeoutError:
        return data, False
    except RESET_ERRORS:
        return data, True
    return data, False


class FanOutReaders:
    """100 subscribers read by one selector loop; records each event's insert->receive delay."""

    def __init__(self, streams: list[SSE]) -> None:
        self.streams = streams
        self.seqs: dict[int, list[int]] = {i: [] for i in range(len(streams))}
        self.delays: list[float] = []
        self.selector = selectors.DefaultSelector()
        for index, stream in enumerate(streams):
            self.selector.register(stream.sock, selectors.EVENT_READ, index)

    def read_until_complete(self, expected: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        unfinished = set(self.seqs)
        while unfinished and time.monotonic() < deadline:
            for key, _ in self.selector.select(timeout=0.2):
                self.read_ready(key.data)
                if self.streams[key.data].ended:  # cut off: its events will be missing
                    self.selector.unregister(key.fileobj)
                if len(self.seqs[key.data]) >= expected or self.streams[key.data].ended:
                    unfinished.discard(key.data)

    def read_ready(self, index: int) -> None:
        stream = self.streams[index]
        raw = stream.read_raw(timeout=2.0)  # the socket is readable: one recv, then a frame
        while raw:
            received = time.time()
            frame = parse_frame(raw)
            if frame.event == "load":
                payload = frame.json()
                self.seqs[index].append(payload["seq"])
                self.delays.append(received - payload["sent"])
            if b"\n\n" not in stream.body:
                break
            raw = stream.read_raw()


def publish_load(server: Server, auth: dict[str, str], ids: list[int]) -> None:
    for seq in range(EVENTS):
        resp = server.insert(auth, "load", {"seq": seq, "sent": time.time(), "pad": PAD})
        assert resp.status == 200, resp.body
        ids.append(resp.json()["id"])


def test_stalled_subscriber_is_cut_off_while_others_stay_on_time(make_server):
    # 101 streams of one user: over the default --max_streams_per_user.
    server = make_server("--max_buffer", str(MAX_BUFFER), "--max_streams_per_user", "200")
    auth = server.user(unique("fan"), tenant=unique("fanout"))
    stalled = open_stalled_subscriber(server.port, auth)
    streams = [server.sse(auth) for _ in range(READERS)]
    assert all(stream.status == 200 for stream in streams)
    # Every subscription is live once each reader has the warm-up event.
    warm_id = server.insert(auth, "warmup", 0).json()["id"]
    assert all(stream.next().id == warm_id for stream in streams)

    readers, ids = FanOutReaders(streams), []
    publisher = threading.Thread(target=publish_load, args=(server, auth, ids))
    publisher.start()
    readers.read_until_complete(EVENTS, timeout=30.0)
    publisher.join(10.0)
    assert len(ids) == EVENTS, "the publisher did not finish"

    for index, seqs in readers.seqs.items():
        assert seqs == list(range(EVENTS)), f"reader {index}: {len(seqs)} events"
    delays = sorted(readers.delays)
    p99 = delays[int(len(delays) * 0.99)]
    assert p99 < 1.0, f"p99 insert->receive {p99:.3f}s (max {delays[-1]:.3f}s)"

    # The stalled subscriber was cut off: draining it now reaches the end of the stream,
    # short of the last events, and it can resume from the last id it got whole.
    data, ended = drain(stalled, timeout=5.0)
    stalled.close()
    assert ended, f"stalled stream still open after draining {len(data)} bytes"
    head, _, chunked = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:80]
    body, _ = dechunk(chunked)
    frames = [parse_frame(raw + b"\n\n") for raw in body.split(b"\n\n")[:-1]]
    got = [frame.id for frame in frames]
    assert warm_id in got, "the stalled subscriber was never subscribed"
    assert len(got) < EVENTS, f"the stalled subscriber was not cut off ({len(got)} frames)"
    missing = [event_id for event_id in ids if event_id > got[-1]]
    resumed = open_resume(server, auth, got[-1], "header")
    assert [frame.id for frame in resumed.take(len(missing))] == missing
    resumed.close()
    for stream in streams:
        stream.close()


# -- long backlogs and old clients --------------------------------------------------------


def insert_many(server: Server, auth: dict[str, str], count: int, size: int) -> list[int]:
    """Insert `count` events of about `size` bytes over one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    ids = []
    for n in range(count):
        body = json.dumps({"event": f"e{n % 7}", "data": {"n": n, "pad": "x" * size}})
        conn.request("POST", "/insert", body, {**auth, "Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        ids.append(json.loads(resp.read())["id"])
    conn.close()
    return ids


def test_a_long_replay_to_a_slow_reader_arrives_whole(make_server):
    # The replay (about 5 MB in three pages) is far larger than --max_buffer and than what
    # loopback's socket buffers hold: while syncing, the server waits for a slow reader
    # instead of cutting it off as it would a live one.
    server = make_server("--max_buffer", "65536")
    auth = server.user(unique("replayer"))
    ids = insert_many(server, auth, 2500, 2000)
    stream = server.sse(auth, headers={"Last-Event-ID": "0"})
    time.sleep(1.0)  # a slow phone: the server's buffer fills up first
    received = []
    for n in range(len(ids)):
        if n % 500 == 0:
            time.sleep(0.2)
        received.append(stream.next(timeout=10).id)
    assert received == ids
    live = server.insert(auth, "after", 1).json()["id"]
    assert stream.next().id == live
    stream.close()


def test_http_1_0_clients_get_a_plain_stream_that_ends_with_the_connection(server):
    auth = server.user(unique("old"))
    first = server.insert(auth, "before", {"v": 1}).json()["id"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(f"GET /sse HTTP/1.0\r\nAuthorization: {auth['Authorization']}\r\n\r\n"
                     .encode())
        data = b""
        while b'data:{"v":1}\n\n' not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"transfer-encoding" not in head.lower()
        retry, _, frame = body.partition(b"\n\n")
        assert retry.startswith(b":data:event:id:\nretry:"), body
        assert frame == f'id:{first}\nevent:before\ndata:{{"v":1}}\n\n'.encode()
