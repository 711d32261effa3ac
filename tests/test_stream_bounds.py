"""What a stream may cost the server (issue 17): the sync, a replay and live frames together
keep at most about --max_buffer unsent bytes per stream in the server, and a stream that
broker ends (the per-user cap, a revocation, a drain that does not happen in time) is gone
within 10 s, connection and memory, whether or not its client reads.

The clients here never read: raw sockets with a small receive window (set before
connecting), so the kernel keeps tens of KB and the rest waits in the server, where it is
measured: the server's RSS (/proc/<pid>/status) and its open connections (/metrics).

Also here, for the in-memory tenant state: the state cache keeps to --cache_bytes, a resume
from behind the pruned horizon after a restart gets the state (the in-memory state must
not replay around what retention deleted), and the event loop's longest stall while a
cold tenant of 10,000 names is loaded for a connect.

The drain deadline: how long a stream may take no bytes before the server gives up on it.
These tests take it to be --request_timeout (the time a client has to send a request, and
so to take what it is sent) and run with DRAIN_DEADLINE; where a test is about another way
a stream ends, the deadline is set long (QUIET_DEADLINE) so that it plays no part."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import ENGINES, SSE, Server, bearer, execute
from stream_support import admin, eventually, open_resume, unique
from test_ops import metric
from test_resume import insert, wait_for_pruned

MiB = 1 << 20
MAX_BUFFER = MiB  # --max_buffer's default, which these tests keep
BIG = "x" * 1_000_000  # the data of a 1 MB event
BIG_EVENTS = ("--max_body", str(2 * MiB))
DRAIN_DEADLINE = 3.0
DRAIN_ARGS = ("--request_timeout", str(DRAIN_DEADLINE))
QUIET_DEADLINE = ("--request_timeout", "60")
GONE_WITHIN = 10.0  # after the server ends a stream, or gives up on it
# RSS is noisy by a few MiB (allocator arenas, the argon2 pool, the kernel's page
# accounting): every bound below leaves this much on top of what it allows.
SLACK = 8 * MiB


# -- measuring the server ----------------------------------------------------------------

def rss(server: Server) -> int:
    """The server process's resident set, in bytes."""
    assert server.proc is not None
    with open(f"/proc/{server.proc.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class PeakRss:
    """Samples the server's RSS every 20 ms from start() to stop(); keeps the highest."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.peak = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PeakRss:
        self.peak = rss(self.server)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.done.wait(0.02):
            try:
                self.peak = max(self.peak, rss(self.server))
            except (OSError, AssertionError):
                return  # the server exited

    def stop(self) -> int:
        self.done.set()
        self.thread.join(5)
        return self.peak


def settled_rss(server: Server, seconds: float = 1.0) -> int:
    """RSS once it has stopped moving (freed memory goes back over a moment): the lowest
    of a few samples over `seconds`."""
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples.append(rss(server))
        time.sleep(0.1)
    return min(samples)


def metrics(server: Server) -> str:
    return server.get("/metrics", headers=bearer(server.admin_token)).body.decode()


def open_connections(server: Server) -> int:
    """Connections the server holds open, not counting the one asking."""
    return int(metric(metrics(server), "broker_open_connections")) - 1


def mib(size: float) -> str:
    return f"{size / MiB:.1f} MiB"


# -- clients that never read ---------------------------------------------------------------

def silent_stream(server: Server, auth: dict[str, str],
                  headers: dict[str, str] | None = None) -> socket.socket:
    """GET /sse from a client that never reads. On loopback the kernel would otherwise take
    megabytes (a 64 KB MSS); a 4 KB receive window and a WAN-sized MSS, set before
    connecting, leave it tens of KB, as on a real network."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1400)
    sock.connect(("127.0.0.1", server.port))
    head = ["GET /sse HTTP/1.1", f"Host: 127.0.0.1:{server.port}", "Accept: text/event-stream"]
    head += [f"{k}: {v}" for k, v in {**auth, **(headers or {})}.items()]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    return sock


def insert_big(server: Server, auth: dict[str, str], names: list[str]) -> list[int]:
    """One 1 MB event per name, over one keep-alive connection; their ids."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    ids = []
    try:
        for name in names:
            body = json.dumps({"event": name, "data": BIG})
            conn.request("POST", "/insert", body, {**auth, "Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = resp.read()
            assert resp.status == 200, payload[:200]
            ids.append(json.loads(payload)["id"])
    finally:
        conn.close()
    return ids


def big_tenant(server: Server, events: int = 8) -> dict[str, str]:
    """A user whose tenant's state is `events` latest values of 1 MB (distinct names), loaded
    in the server's memory by one connect that read it all: what every later measure starts
    from."""
    auth = server.user(unique("heavy"), tenant=unique("heavy"))
    insert_big(server, auth, [f"big{n}" for n in range(events)])
    reader = server.sse(auth, timeout=30)
    assert len(reader.take(events, timeout=30)) == events
    reader.close()
    assert eventually(lambda: open_connections(server) == 0, 5)
    return auth


def wait_gone(server: Server, at_most: int, until: float) -> float | None:
    """Seconds until the server holds at most `at_most` connections, or None when it still
    held more at the monotonic time `until`."""
    start = time.monotonic()
    while True:
        if open_connections(server) <= at_most:
            return time.monotonic() - start
        if time.monotonic() >= until:
            return None
        time.sleep(0.1)


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


# -- the sync -------------------------------------------------------------------------------

STREAMS = 10


def assert_bounded(what: str, held_whole: str, baseline: int, peak: int, after: int,
                   allowed: int, gone: float | None) -> None:
    """The server's RSS grew at most `allowed` while silent streams were sent something
    big, it gave the memory back, and the connections were gone in time."""
    growth, kept = peak - baseline, after - baseline
    report = (f"RSS baseline {mib(baseline)}, peak +{mib(growth)} (allowed {mib(allowed)}), "
              f"after +{mib(kept)}; connections gone after "
              f"{'never' if gone is None else f'{gone:.1f} s'}")
    print(f"\n{what}: {report}")
    assert growth <= allowed, f"{held_whole}: {report}"
    assert gone is not None, (f"connections still open {DRAIN_DEADLINE + GONE_WITHIN:.0f} s "
                              "after connecting: " + report)
    assert kept <= SLACK, "memory not given back: " + report


def test_a_big_sync_to_clients_that_never_read_costs_about_max_buffer_each(make_server):
    # 8 latest values of 1 MB, 10 streams that never read: the server may hold about
    # --max_buffer of each stream's sync, not the whole 8 MB, and once it gives up on them
    # (the drain deadline) their connections and memory are gone within 10 s.
    server = make_server(*BIG_EVENTS, *DRAIN_ARGS)
    auth = big_tenant(server)
    baseline = settled_rss(server)
    sampler = PeakRss(server).start()
    connected = time.monotonic()
    socks = [silent_stream(server, auth) for _ in range(STREAMS)]
    try:
        assert eventually(lambda: f"broker_sse_subscribers {STREAMS}" in metrics(server)
                          or open_connections(server) < STREAMS, 5)
        time.sleep(1.0)  # whatever the server writes at connect, it has written
        gone = wait_gone(server, 0, connected + DRAIN_DEADLINE + GONE_WITHIN)
        peak = sampler.stop()
        after = settled_rss(server)
    finally:
        sampler.stop()
        close_all(socks)
    assert_bounded(f"big sync, {STREAMS} silent streams", "the server holds each stream's "
                   "whole sync", baseline, peak, after, STREAMS * 2 * MAX_BUFFER + SLACK, gone)


# -- a replay -------------------------------------------------------------------------------

@pytest.mark.parametrize("state", ["loaded", "cold"])
def test_a_big_replay_to_a_client_that_never_reads_costs_about_max_buffer(make_server, state):
    # 40 events of 1 MB after the client's Last-Event-ID: a replay page of 1,000 events
    # whatever their size holds all 40 MB at once (and copies of it); pages bounded by bytes,
    # sent as the client reads, hold about --max_buffer. "cold": the reviewer's case, the
    # tenant's state not in memory (after a restart), so the connect loads it too: that
    # load, today the 100 newest events whatever their size, must be bounded as well.
    server = make_server(*BIG_EVENTS, *DRAIN_ARGS)
    name = unique("replayed")
    auth = server.user(name, tenant=unique("replayed"))
    since = insert(server, auth, "start", 0)[0]
    insert_big(server, auth, ["log"] * 40)
    if state == "cold":
        server.restart()
        # As in the other cases, a login before measuring: the first password check pins
        # glibc's mmap threshold (broker.return_big_blocks_to_the_system), without which
        # freed megabytes stay in the heap whatever the server does.
        server.login(name)
    else:
        reader = server.sse(auth, timeout=30)  # the tenant's state is loaded before measuring
        assert [frame.event for frame in reader.take(2, timeout=30)] == ["start", "log"]
        reader.close()
        assert eventually(lambda: open_connections(server) == 0, 5)
    baseline = settled_rss(server)
    sampler = PeakRss(server).start()
    connected = time.monotonic()
    sock = silent_stream(server, auth, {"Last-Event-ID": str(since)})
    try:
        time.sleep(2.0)  # the replay's first pages are read and written
        gone = wait_gone(server, 0, connected + DRAIN_DEADLINE + GONE_WITHIN)
        peak = sampler.stop()
        after = settled_rss(server)
    finally:
        sampler.stop()
        sock.close()
    # A page bounded by bytes as rows, as frames and chunked, the next page read ahead, the
    # write buffer: a few --max_buffer, not the 40 MB.
    assert_bounded(f"big replay, one silent stream, state {state}", "the replay is held whole",
                   baseline, peak, after, 6 * MAX_BUFFER + SLACK, gone)


# -- streams that broker ends ---------------------------------------------------------------

def test_streams_closed_by_the_user_cap_are_gone_even_when_they_never_read(make_server):
    # --max_streams_per_user 2 and 10 streams that never read: each connect over the cap
    # closes one; a graceful close waits for the client to take the unsent sync, which it
    # never does. Within 10 s the 8 closed ones must be gone, connections and memory.
    server = make_server(*BIG_EVENTS, *QUIET_DEADLINE, "--max_streams_per_user", "2")
    auth = big_tenant(server)
    baseline = settled_rss(server)
    socks = [silent_stream(server, auth) for _ in range(STREAMS)]
    try:
        assert eventually(lambda: metric(metrics(server),
                                         "broker_user_stream_limit_closes_total") == 8, 5)
        closed = time.monotonic()
        gone = wait_gone(server, 2, closed + GONE_WITHIN)
        after = settled_rss(server)
        still_open = open_connections(server)
    finally:
        close_all(socks)
    # The two streams the cap keeps may hold their sync for now (a slow phone's first
    # minute): allow them a whole one each.
    allowed = 2 * 8 * MiB + SLACK
    report = (f"RSS baseline {mib(baseline)}, after +{mib(after - baseline)} "
              f"(allowed {mib(allowed)}); {still_open} connections open, closed ones gone "
              f"after {'never' if gone is None else f'{gone:.1f} s'}")
    print(f"\nuser cap, {STREAMS} silent streams: {report}")
    assert gone is not None, f"streams closed by the cap still open {GONE_WITHIN:.0f} s " \
                             "later: " + report
    assert after - baseline <= allowed, "the closed streams' memory is still held: " + report


def live_silent_stream(server: Server, auth: dict[str, str]) -> socket.socket:
    """A stream that went live (its sync is tiny) and then stopped reading with about 600 KB
    unsent: under --max_buffer, so the server does not cut it as a slow consumer."""
    sock = silent_stream(server, auth)
    assert eventually(lambda: "broker_sse_subscribers 1" in metrics(server), 5)
    for n in range(6):
        insert(server, auth, "chunk", {"n": n, "pad": "y" * 100_000})
    time.sleep(0.5)
    assert open_connections(server) == 1, "the stream was cut before the test"
    return sock


@pytest.mark.parametrize("phase", ["syncing", "live"])
def test_a_revoked_users_stream_that_never_reads_is_gone_within_10s(make_server, phase):
    server = make_server(*BIG_EVENTS, *QUIET_DEADLINE)
    name = unique("revoked")
    if phase == "syncing":  # 8 MB of sync that it never takes
        auth = big_tenant(server)
        name = server.get("/verify", headers=auth).json()["username"]
        sock = silent_stream(server, auth)
        assert eventually(lambda: "broker_sse_subscribers 1" in metrics(server), 5)
        time.sleep(0.5)
    else:
        auth = server.user(name, tenant=unique("revoked"))
        insert(server, auth, "state", 1)
        sock = live_silent_stream(server, auth)
    try:
        assert admin(server, "/revoke_user", username=name).status == 200
        revoked = time.monotonic()
        gone = wait_gone(server, 0, revoked + GONE_WITHIN)
    finally:
        sock.close()
    assert gone is not None, f"the revoked user's {phase} stream was still open " \
                             f"{GONE_WITHIN:.0f} s after the revocation"
    print(f"\nrevoked, {phase}: gone after {gone:.1f} s")


# -- the state cache's budget ---------------------------------------------------------------

CACHE_BYTES = 500_000
VALUE_10K = "s" * 10_000


def test_the_state_cache_holds_no_more_than_cache_bytes_after_syncs_and_inserts(make_server):
    # 8 tenants of 10 names of 10 kB: each cached state holds at least its 100 kB of latest
    # values, so --cache_bytes 500000 has room for 5 at most. A connect builds a tenant's
    # sync (the values joined) and the next insert drops it: the cache's count of bytes must
    # follow both ways, or it drifts and the budget no longer bounds anything.
    server = make_server("--cache_bytes", str(CACHE_BYTES))
    tenants = [server.user(unique("budget"), tenant=unique("budget")) for _ in range(8)]
    for auth in tenants:
        for n in range(10):
            insert(server, auth, f"name{n}", VALUE_10K)
    for cycle in range(3):
        for auth in tenants:
            stream = server.sse(auth)
            assert len(stream.take(10)) == 10
            stream.close()
            insert(server, auth, "name0", [cycle, VALUE_10K])
    text = metrics(server)
    counted = metric(text, "broker_state_cache_bytes")
    cached = metric(text, "broker_state_cache_tenants")
    report = (f"{cached:.0f} tenants of at least 100 kB cached, counted as {counted:.0f} bytes, "
              f"with --cache_bytes {CACHE_BYTES}")
    print(f"\nstate cache: {report}")
    assert 0 <= counted <= CACHE_BYTES, report
    assert cached * 100_000 <= CACHE_BYTES, "the cache holds more than its budget: " + report


# -- a resume from behind the pruned horizon, from a cold state -----------------------------

def frames_until_quiet(stream: SSE, quiet: float = 0.5) -> list[tuple]:
    frames: list[tuple] = []
    while True:
        try:
            frame = stream.next(timeout=quiet)
        except TimeoutError:
            return frames
        frames.append((frame.id, frame.event, frame.json()))


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_a_resume_behind_the_pruned_horizon_after_a_restart_gets_the_state(make_server):
    # The tenant's log after the prune: the kept `b` and the newest `a`; the older a's are
    # gone. A client that saw `b` (still in the log, but older than the horizon) cannot be
    # proven to have seen what was deleted after it: the store path sends the state. The
    # in-memory state, loaded cold after the restart, holds fewer than 100 events and so
    # believes it has the tenant's whole log: it would replay just the newest `a`.
    server = make_server()
    tenant = unique("horizon")
    auth = server.user(unique("sensor"), tenant=tenant)
    kept_b = insert(server, auth, "b", "kept")
    for n in range(3):
        newest_a = insert(server, auth, "a", n)
    server.stop()
    execute(server.db, "UPDATE events SET timestamp = timestamp - 7200 "
                       f"WHERE tenant_name = '{tenant}'")
    server.extra_args = ["--retention", "1h"]
    server.start()
    wait_for_pruned(server, 2)
    state = [kept_b, newest_a]
    stream = open_resume(server, auth, kept_b[0], "header")
    try:
        got = frames_until_quiet(stream)
    finally:
        stream.close()
    assert got == state, f"resumed from {kept_b[0]} behind the pruned horizon: got {got}, " \
                         f"the state is {state}"
    fresh = server.sse(auth)  # and that is what a fresh connect gets, too
    assert frames_until_quiet(fresh) == state
    fresh.close()


# -- a cold tenant at the limits does not stall the loop ------------------------------------

NAMES = 10_000
VALUE = "v" * 1_600
# GET / over one keep-alive connection every 3 ms, from another process (no GIL shared with
# the test's readers), until a line arrives on stdin; then the samples as JSON.
PROBE = textwrap.dedent("""
    import json, select, socket, sys, time
    sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
    request = b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n"
    samples = []
    print("ready", flush=True)
    while not select.select([sys.stdin], [], [], 0.003)[0]:
        sent = time.monotonic()
        sock.sendall(request)
        data = b""
        while not data.endswith(b"}"):
            data += sock.recv(4096)
        samples.append((sent, time.monotonic() - sent))
    print(json.dumps(samples), flush=True)
""")


def insert_names(server: Server, auth: dict[str, str], count: int, threads: int = 4) -> None:
    """`count` distinct names, one value each, from a few keep-alive connections at once."""
    def run(first: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        for n in range(first, count, threads):
            body = json.dumps({"event": f"name{n:05}", "data": VALUE})
            conn.request("POST", "/insert", body, {**auth, "Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
        conn.close()

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert not worker.is_alive()


def read_sync(server: Server, auth: dict[str, str], count: int) -> tuple[float, float]:
    """Connect and read until `count` frames have come (counted in the raw bytes: the test's
    SSE decoder is too slow for 16 MB); returns when it connected and when it was done."""
    started = time.monotonic()
    stream = server.sse(auth, timeout=30)
    try:
        seen, tail = 0, stream.body + stream.buffer  # what came with the head
        while True:
            # Every frame starts a line with "id:"; the retry frame's "id:" follows a colon.
            # The last 3 bytes are kept: a marker split between two reads is counted once.
            seen += tail.count(b"\nid:")
            if seen >= count:
                break
            data = stream.sock.recv(1 << 20)
            assert data, f"the stream ended after {seen} frames"
            tail = tail[-3:] + data
    finally:
        stream.close()
    return started, time.monotonic()


def probed_connect(server: Server, auth: dict[str, str]) -> tuple[float, float]:
    """One connect, its sync read whole, while a probe times GET /: the longest wait for
    an answer while it went on, and how long it took."""
    probe = subprocess.Popen([sys.executable, "-c", PROBE, str(server.port)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert probe.stdin is not None and probe.stdout is not None
    try:
        assert probe.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        start, end = read_sync(server, auth, NAMES)
        time.sleep(0.2)
        probe.stdin.write("stop\n")
        probe.stdin.flush()
        samples = json.loads(probe.stdout.readline())
    finally:
        probe.kill()
        probe.wait(10)
    during = [wait for sent, wait in samples if start - 0.01 <= sent <= end]
    assert len(samples) > 30 and during, "the probe hardly ran"
    return max(during), end - start


def shown(measures: list[tuple[float, float]]) -> str:
    return ", ".join(f"{wait * 1000:.0f} ms (in {took:.2f} s)" for wait, took in measures)


def test_connecting_to_a_cold_tenant_of_10000_names_never_stalls_the_loop(make_server):
    # 10,000 latest values of 1.6 kB (16 MB). After a restart the first connect loads them
    # and gets them, while another client times GET /: the longest wait must stay far under
    # what a user notices. Then, with --cache_bytes under the state's size, every connect
    # loads it again. Each case three times: a stall is there every time, while a spike
    # from the other work on a shared machine is not, so the shortest of the three counts.
    server = make_server()
    auth = server.user(unique("wide"), tenant=unique("wide"))
    began = time.monotonic()
    insert_names(server, auth, NAMES)
    print(f"\n{NAMES} inserts: {time.monotonic() - began:.1f} s")
    after_restart = []
    for _ in range(3):
        server.restart()  # cold: the tenant's state is not in memory
        after_restart.append(probed_connect(server, auth))
    server.extra_args = ["--cache_bytes", str(4 * MiB)]
    server.restart()
    over_cache = [probed_connect(server, auth) for _ in range(3)]
    report = (f"longest GET / wait during a connect to {NAMES} names: after a restart "
              f"{shown(after_restart)}; with --cache_bytes 4 MiB {shown(over_cache)}")
    print(report)
    assert min(after_restart)[0] < 0.1, "the loop stalls: " + report
    assert min(over_cache)[0] < 0.1, "the loop stalls: " + report


# -- live frames held for a stream that is still syncing ------------------------------------

def test_a_stream_that_syncs_slower_than_its_tenant_inserts_is_ended(make_server):
    # While a stream syncs, its group keeps the tenant's new events for it: those count
    # against --max_buffer too. A client that takes its 600 KB sync at 40 KB/s while the tenant
    # inserts 400 KB meanwhile is ended mid-sync (it resumes with Last-Event-ID), rather than
    # have the server hold all it missed. The same client of a quiet tenant syncs whole.
    server = make_server("--max_buffer", "65536")
    auth = server.user(unique("slow"), tenant=unique("slow"))
    for n in range(20):
        assert server.insert(auth, f"state{n}", "s" * 30_000).status == 200

    def slow_read(inserting: bool) -> tuple[int, bool]:
        sock = silent_stream(server, auth)
        sock.settimeout(0.2)
        received, ended = 0, False
        if inserting:
            threading.Thread(target=lambda: [server.insert(auth, "live", "l" * 4_000)
                                             for _ in range(100)], daemon=True).start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            except ConnectionResetError:
                ended = True
                break
            if not data:
                ended = True
                break
            received += len(data)
            if not inserting and received > 600_000:
                break
            time.sleep(0.1)  # about 40 KB/s
        sock.close()
        return received, ended

    whole, ended = slow_read(inserting=False)
    assert whole > 600_000 and not ended, (whole, ended, server.log[-500:])
    cut, ended = slow_read(inserting=True)
    assert ended and cut < 600_000, (cut, ended)
    assert "too slow to sync" in server.log, server.log[-2000:]
