"""Small helpers shared by the API, auth, CLI and persistence tests (no fixtures here)."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import jwt
from conftest import ROOT, Response, Server

# The secret-less part of every broker JWT: exactly these claims.
JWT_CLAIMS = {"iat", "exp", "sub", "iss", "aud"}


def unique(prefix: str) -> str:
    """A name no other test uses: usernames are unique across tenants, and each tenant's
    latest values are shared by all of its subscribers."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def assert_error(resp: Response, status: int) -> None:
    """Every error is `{"error": "<non-empty string>"}` with a JSON content type."""
    assert resp.status == status, (resp.status, resp.body)
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    body = resp.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert isinstance(body["error"], str) and body["error"].strip(), body


def assert_unauthorized(resp: Response) -> None:
    assert_error(resp, 401)
    assert resp.headers.get("www-authenticate", "").strip(), resp.headers


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unsigned_token(claims: dict[str, Any]) -> str:
    """An `alg: none` token: header and claims with an empty signature."""
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims).encode())
    return f"{header}.{payload}."


def claims_for(username: str, lifetime: int = 300, **override: Any) -> dict[str, Any]:
    """Claims shaped like the broker's own, for crafting tokens."""
    now = int(time.time())
    claims: dict[str, Any] = {"iat": now, "exp": now + lifetime, "sub": username,
                              "iss": "Broker", "aud": ""}
    claims.update(override)
    return {k: v for k, v in claims.items() if v is not None}


def forge(claims: dict[str, Any], secret: str, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


def head_raw(srv: Server, path: str = "/") -> tuple[bytes, bytes]:
    """Send HEAD on a fresh connection that the server must close; return (head, rest).
    http.client never reads a body after HEAD, so only raw bytes show whether one came."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def launch(srv: Server, args: list[str], env: dict[str, str] | None = None,
           timeout: float = 15.0) -> Server:
    """Start `python -m broker` with exactly `args` (plus host, port and db) and extra
    environment variables: unlike Server.start, no --admin_token is added, so flag
    spellings and BROKER_* variables can be tested. Reuses the harness's log reader."""
    cmd = [sys.executable, "-m", "broker", "--host", "127.0.0.1", "--port", "0",
           "--db", str(srv.db), *args]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    srv.proc = subprocess.Popen(cmd, cwd=ROOT, env={**clean, **(env or {})},
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    ready = threading.Event()
    threading.Thread(target=srv._drain_log, args=(srv.proc, ready), daemon=True).start()
    if not ready.wait(timeout):
        srv.kill()
        raise RuntimeError("broker did not start:\n" + srv.log[-3000:])
    return srv


def wait_for_log(srv: Server, needle: str, timeout: float = 5.0) -> None:
    """Log lines are read by a thread; wait until `needle` has arrived."""
    deadline = time.monotonic() + timeout
    while needle not in srv.log:
        assert time.monotonic() < deadline, f"{needle!r} not in log:\n{srv.log[-3000:]}"
        time.sleep(0.05)


def min_time(run, times: int) -> float:
    """The fastest of `times` runs: the least disturbed by other work on the machine."""
    best = float("inf")
    for _ in range(times):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best
