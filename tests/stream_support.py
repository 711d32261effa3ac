"""Helpers for the real-time delivery tests (issue 3): opening streams in the ways a browser
or a misbehaving client would, and reading a stream to its very end. No fixtures here."""

from __future__ import annotations

import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable
from itertools import pairwise

from conftest import SSE, Response, Server

# Every stream-ending failure a raw client can see: a clean EOF is handled separately.
RESET_ERRORS = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


def unique(prefix: str) -> str:
    """A fresh name: usernames are unique across tenants, and a tenant's latest values are
    shared by every subscriber of it."""
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def open_resume(server: Server, auth: dict[str, str], last_id: int | str, via: str) -> SSE:
    """Reconnect the way EventSource does (`Last-Event-ID` header) or via the query parameter."""
    if via == "header":
        return server.sse(auth, headers={"Last-Event-ID": str(last_id)})
    assert via == "query", via
    return server.sse(auth, path=f"/sse?last_event_id={last_id}")


def sse_status(server: Server, auth: dict[str, str] | None, path: str = "/sse",
               headers: dict[str, str] | None = None) -> int:
    """The status of GET /sse without waiting for a body (a 200 stream never ends)."""
    stream = server.sse(auth, path=path, headers=headers)
    stream.close()
    return stream.status


def status_everywhere(server: Server, auth: dict[str, str]) -> dict[str, int]:
    """The status each authenticated endpoint gives these credentials."""
    insert = server.insert(auth, unique("probe"), 1)
    return {"verify": server.get("/verify", headers=auth).status,
            "insert": insert.status,
            "sse": sse_status(server, auth)}


def admin(server: Server, path: str, **fields) -> Response:
    return server.post(path, {"admin_token": server.admin_token, **fields})


def wait_until_closed(stream: SSE, timeout: float) -> float | None:
    """Discard frames until the server ends the stream (terminating chunk, EOF or reset).
    Returns the seconds it took, or None when the stream is still open after `timeout`."""
    start = time.monotonic()
    deadline = start + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if not stream.read_raw(remaining):
                return time.monotonic() - start
    except TimeoutError:
        return None
    except RESET_ERRORS:
        return time.monotonic() - start


def assert_all_closed_within(streams: dict[str, SSE], since: float, seconds: float) -> None:
    """Every stream was ended by the server within `seconds` of the monotonic time `since`."""
    for kind, stream in streams.items():
        took = wait_until_closed(stream, timeout=max(0.01, since + seconds - time.monotonic()))
        assert took is not None, f"the {kind} stream was still open {seconds} s later"
        stream.close()


def dechunk(raw: bytes) -> tuple[bytes, bool]:
    """Decode HTTP/1.1 chunked framing. Returns the payload of the complete chunks and whether
    the terminating zero-size chunk was among them; a truncated tail is ignored."""
    body = b""
    while b"\r\n" in raw:
        size_line, _, rest = raw.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return body, True
        if len(rest) < size + 2:
            break
        body += rest[:size]
        raw = rest[size + 2:]
    return body, False


def read_rest(stream: SSE, timeout: float) -> tuple[bytes, bool, bool]:
    """Read a chunked stream to the end, bypassing the SSE decoder. Returns (the decoded body not
    yet handed out as frames, whether the terminating chunk arrived, whether the connection
    closed or reset within `timeout`)."""
    raw = stream.buffer  # the SSE decoder only ever consumes whole chunks
    deadline = time.monotonic() + timeout
    closed = False
    try:
        while time.monotonic() < deadline:
            stream.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = stream.sock.recv(65536)
            if not data:
                closed = True
                break
            raw += data
    except TimeoutError:
        pass
    except RESET_ERRORS:
        closed = True
    body, terminated = dechunk(raw)
    return stream.body + body, terminated, closed


def eventually(check: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return True
    return False


def sequence_problems(seen: list[int], expected: list[int]) -> str:
    """A short description of how `seen` differs from `expected` (for assertion messages)."""
    duplicates = sorted(i for i, n in Counter(seen).items() if n > 1)
    missing = sorted(set(expected) - set(seen))
    unexpected = sorted(set(seen) - set(expected))
    disorder = [(a, b) for a, b in pairwise(seen) if b <= a]
    return (f"{len(seen)} seen / {len(expected)} expected; duplicates {duplicates[:10]}, "
            f"missing {missing[:10]}, unexpected {unexpected[:10]}, "
            f"out of order {disorder[:5]}")
