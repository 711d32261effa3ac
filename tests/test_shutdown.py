"""Graceful shutdown (issue 3): on SIGTERM or SIGINT the server stops accepting, lets the
requests in flight finish, ends every SSE stream with the terminating chunk, closes the
database and exits 0 within 5 seconds; every acknowledged event is there after a restart."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time

import pytest
from conftest import SSE, Server
from stream_support import eventually, open_resume, read_rest, refuses_connections, unique

EXIT_WITHIN = 5.0
WRITERS = 4
INSERTS_PER_WRITER = 150


class InsertBurst:
    """Threads inserting as fast as they can until the server stops answering."""

    def __init__(self, server: Server, auth: dict[str, str]) -> None:
        self.server, self.auth = server, auth
        self.sent: dict[str, int] = {}  # event name -> its data, for every attempt
        self.acked: dict[int, tuple[str, int]] = {}
        self.statuses: set[int] = set()
        self.lock = threading.Lock()

    def run(self, writer: int) -> None:
        for n in range(INSERTS_PER_WRITER):
            event = f"w{writer}_{n}"
            with self.lock:
                self.sent[event] = n
            try:
                resp = self.server.insert(self.auth, event, n)
            except (OSError, http.client.HTTPException):
                return  # refused or cut off: the server is going away
            with self.lock:
                self.statuses.add(resp.status)
                if resp.status == 200:
                    self.acked[resp.json()["id"]] = (event, n)


def replay_all(server: Server, auth: dict[str, str]) -> list[tuple[int, str, object]]:
    """Every event of the user's tenant, by resuming from id 0."""
    stream = open_resume(server, auth, 0, "header")
    frames = []
    try:
        while True:
            frame = stream.next(timeout=0.5)
            frames.append((frame.id, frame.event, frame.json()))
    except TimeoutError:
        pass
    stream.close()
    return frames


def assert_stream_ended_cleanly(stream: SSE, deadline: float, label: str) -> None:
    leftover, terminated, _ = read_rest(stream, max(0.1, deadline - time.monotonic()))
    stream.close()
    assert terminated, f"{label} ended without the terminating chunk"
    assert leftover == b"" or leftover.endswith(b"\n\n"), f"{label}: a frame was cut short"


def assert_exited_cleanly(server: Server, signalled: float) -> None:
    assert server.proc is not None
    code = server.proc.wait(max(0.1, signalled + EXIT_WITHIN - time.monotonic()))
    assert code == 0, "\n".join(server.log_lines[-20:])
    assert time.monotonic() - signalled < EXIT_WITHIN


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_ends_streams_cleanly_keeps_acked_inserts_and_exits_zero(make_server, sig):
    server = make_server()
    auth = server.user(unique("stayer"), tenant=unique("drain"))
    streams = [server.sse(auth) for _ in range(3)]
    warm_id = server.insert(auth, "warmup", 0).json()["id"]
    for stream in streams:
        assert stream.next().id == warm_id  # the stream is live
    burst = InsertBurst(server, auth)
    writers = [threading.Thread(target=burst.run, args=(i,)) for i in range(WRITERS)]
    for thread in writers:
        thread.start()
    assert eventually(lambda: len(burst.acked) >= 20, timeout=5.0)

    signalled = time.monotonic()
    server.proc.send_signal(sig)
    for index, stream in enumerate(streams):
        assert_stream_ended_cleanly(stream, signalled + EXIT_WITHIN, f"stream {index}")
    for thread in writers:
        thread.join(EXIT_WITHIN)
    assert_exited_cleanly(server, signalled)
    assert burst.statuses <= {200, 503}, burst.statuses

    server.start()
    replayed = replay_all(server, auth)
    ids = [event_id for event_id, _, _ in replayed]
    assert ids == sorted(set(ids))
    by_id = {event_id: (event, data) for event_id, event, data in replayed}
    lost = {i: e for i, e in burst.acked.items() if by_id.get(i) != e}
    assert not lost, f"acknowledged but not kept: {list(lost.items())[:5]}"
    for event, data in by_id.values():
        assert event == "warmup" or burst.sent.get(event) == data, (event, data)


def start_partial_insert(server: Server, auth: dict[str, str], event: str,
                         data: object) -> tuple[socket.socket, bytes]:
    """Send an insert's head and the first bytes of its body; return the socket and the rest."""
    body = json.dumps({"event": event, "data": data}).encode()
    head = ["POST /insert HTTP/1.1", f"Host: 127.0.0.1:{server.port}",
            "Content-Type: application/json", f"Content-Length: {len(body)}",
            *(f"{k}: {v}" for k, v in auth.items())]
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=EXIT_WITHIN)
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body[:5])
    return sock, body[5:]


def finish_request(sock: socket.socket, rest: bytes) -> tuple[int, bytes]:
    sock.sendall(rest)
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, response.read()


def test_sigterm_lets_a_request_still_being_received_finish(make_server):
    """A request whose head has arrived is in flight, even while its body is still on the
    way (a phone uploading over a slow link): it is answered, and then the server exits."""
    server = make_server()
    auth = server.user(unique("uploader"), tenant=unique("upload"))
    stream = server.sse(auth)
    sock, rest = start_partial_insert(server, auth, "inflight", {"late": True})
    time.sleep(0.3)  # the server has read the request head

    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert eventually(lambda: refuses_connections(server.port), timeout=1.0), \
        "still accepting connections 1 s after the signal"
    try:
        status, body = finish_request(sock, rest)
    except (OSError, http.client.HTTPException) as exc:
        pytest.fail(f"the request in flight was dropped at shutdown: {exc!r}")
    finally:
        sock.close()
    assert status == 200, body
    event_id = json.loads(body)["id"]
    assert_stream_ended_cleanly(stream, signalled + EXIT_WITHIN, "the stream")
    assert_exited_cleanly(server, signalled)

    server.start()
    assert replay_all(server, auth) == [(event_id, "inflight", {"late": True})]


def test_sighup_does_not_stop_the_server(server):
    auth = server.user(unique("hup"))
    stream = server.sse(auth)
    server.proc.send_signal(signal.SIGHUP)
    assert eventually(lambda: "SIGHUP" in server.log, timeout=5)
    assert server.proc.poll() is None
    assert server.insert(auth, "after_hup", 1).status == 200
    assert stream.next().event == "after_hup"
    stream.close()
