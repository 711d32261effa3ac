"""Test harness: a real broker process on a loopback port, with a real SQLite file, or a
database of a throwaway PostgreSQL cluster that the tests start themselves (`postgres`).

Nothing here is mocked. `server` starts `python -m broker` on port 0, reads the port it
chose from its log, and speaks HTTP to it over real sockets. `SSE` is a tiny raw-socket
Server-Sent Events client that decodes chunked framing itself, so tests see exactly the
bytes the server wrote.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import importlib.util
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pg_cluster import Postgres, postgres_bin

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "test-admin-token"


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class Server:
    """One broker process. Restartable on the same database file and port."""

    tmp: Path
    extra_args: list[str] = field(default_factory=list)
    db: Path = None  # type: ignore[assignment]  # or a postgresql:// URL (a str)
    port: int = 0
    proc: subprocess.Popen | None = None
    log_lines: list[str] = field(default_factory=list)
    admin_token: str = ADMIN
    umask: int | None = None  # the process's, when given (tests of file modes)

    def __post_init__(self) -> None:
        self.db = self.db or self.tmp / "broker.db"

    # -- process control -------------------------------------------------------------------
    def start(self, timeout: float = 15.0) -> Server:
        args = [sys.executable, "-m", "broker", "--host", "127.0.0.1",
                "--port", str(self.port), "--db", str(self.db),
                "--admin_token", self.admin_token, *self.extra_args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     umask=-1 if self.umask is None else self.umask)
        ready = threading.Event()
        threading.Thread(target=self._drain_log, args=(self.proc, ready), daemon=True).start()
        if not ready.wait(timeout):
            self.kill()
            raise RuntimeError("broker did not start:\n" + "\n".join(self.log_lines[-30:]))
        return self

    def _drain_log(self, proc: subprocess.Popen, ready: threading.Event) -> None:
        # The log must be read continuously, or a full pipe would block the server.
        for line in proc.stderr:  # type: ignore[union-attr]
            self.log_lines.append(line.rstrip("\n"))
            match = re.search(r"listening on \S+:(\d+)", line)
            if match and not ready.is_set():
                self.port = int(match.group(1))
                ready.set()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        return code

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, sig: int = signal.SIGTERM) -> Server:
        self.stop(sig)
        return self.start()

    @property
    def log(self) -> str:
        return "\n".join(self.log_lines)

    # -- HTTP ------------------------------------------------------------------------------
    def request(self, method: str, path: str, body=None, headers: dict | None = None,
                raw: bytes | None = None, timeout: float = 10.0) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = dict(headers or {})
            payload = raw
            if body is not None:
                payload = json.dumps(body).encode()
                headers.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        finally:
            conn.close()

    def post(self, path: str, body=None, **kw) -> Response:
        return self.request("POST", path, body, **kw)

    def get(self, path: str, **kw) -> Response:
        return self.request("GET", path, **kw)

    # -- the common user flow --------------------------------------------------------------
    def create_user(self, username: str, password: str = "correct horse 1",
                    tenant: str = "tenant_1", scopes: list[str] | None = None, **extra) -> Response:
        body = {"username": username, "password": password, "admin_token": self.admin_token,
                "tenant_name": tenant, "scopes": scopes if scopes is not None else [], **extra}
        return self.post("/create_user", body)

    def login(self, username: str, password: str = "correct horse 1") -> str:
        resp = self.post("/login", {"username": username, "password": password})
        assert resp.status == 200, resp.body
        return resp.json()["jwt"]

    def user(self, username: str, password: str = "correct horse 1", tenant: str = "tenant_1",
             **extra) -> dict[str, str]:
        """Create a user and return Bearer auth headers for it."""
        resp = self.create_user(username, password, tenant, **extra)
        assert resp.status == 200, resp.body
        return bearer(self.login(username, password))

    def insert(self, auth: dict[str, str], event: str, data) -> Response:
        return self.post("/insert", {"event": event, "data": data}, headers=auth)

    def sse(self, auth: dict[str, str] | None = None, path: str = "/sse",
            headers: dict[str, str] | None = None, timeout: float = 10.0) -> SSE:
        return SSE(self.port, path, {**(auth or {}), **(headers or {})}, timeout)


def wait_or_kill(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Give a helper process `timeout` seconds to exit on its own, then kill it."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def basic(username: str, password: str) -> dict[str, str]:
    raw = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


@dataclass
class Frame:
    id: int | None
    event: str | None
    data: str | None
    raw: bytes

    def json(self):
        return json.loads(self.data) if self.data is not None else None


class SSE:
    """A raw-socket SSE client. `status`/`headers` after connect; `frames()` yields parsed frames."""

    def __init__(self, port: int, path: str, headers: dict[str, str], timeout: float) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Accept: text/event-stream"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.buffer = b""
        head = self._read_until(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.chunked = self.headers.get("transfer-encoding") == "chunked"
        self.body = b""  # decoded body bytes not yet split into frames
        self.ended = False  # the server sent the terminating chunk or closed
        # Body bytes may have come in the same read as the head: decode them now, or
        # read_raw would wait on the socket for data that is already here.
        self._decode_available()

    def _read_more(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buffer += data
        return True

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            if not self._read_more():
                raise ConnectionError("closed before " + repr(marker))
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def _decode_available(self) -> None:
        """Move complete chunks (or raw bytes, when not chunked) from buffer to body."""
        if not self.chunked:
            self.body += self.buffer
            self.buffer = b""
            return
        while b"\r\n" in self.buffer:
            size_line, _, rest = self.buffer.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if len(rest) < size + 2:
                return
            if size == 0:
                self.ended = True
            self.body += rest[:size]
            self.buffer = rest[size + 2:]

    def read_raw(self, timeout: float = 5.0) -> bytes:
        """Read until at least one complete frame (text ending in a blank line) is decoded."""
        deadline = time.monotonic() + timeout
        while b"\n\n" not in self.body and not self.ended:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                more = self._read_more()
            except TimeoutError:
                raise TimeoutError(f"no SSE frame within {timeout:.1f}s") from None
            if not more:
                self.ended = True
                break
            self._decode_available()
        frame, sep, self.body = self.body.partition(b"\n\n")
        return frame + sep

    def next(self, timeout: float = 5.0, skip_comments: bool = True) -> Frame:
        while True:
            raw = self.read_raw(timeout)
            if not raw:
                raise ConnectionError("stream ended")
            if skip_comments and raw.startswith(b":"):
                continue
            return parse_frame(raw)

    def take(self, count: int, timeout: float = 5.0) -> list[Frame]:
        return [self.next(timeout) for _ in range(count)]

    def nothing_within(self, seconds: float) -> bool:
        try:
            self.next(seconds)
        except (TimeoutError, ConnectionError):
            return True
        return False

    def close(self) -> None:
        self.sock.close()


def parse_frame(raw: bytes) -> Frame:
    fields: dict[str, str] = {}
    for line in raw.decode().split("\n"):
        if line and not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value
    ident = fields.get("id")
    return Frame(int(ident) if ident else None, fields.get("event"), fields.get("data"), raw)


# -- PostgreSQL: a throwaway cluster for the session, a fresh database per test ------------

# Test modules whose `server` runs on both engines (the others run on SQLite only).
BOTH_ENGINES = {"test_api", "test_stream", "test_stream_accounts", "test_resume"}


@pytest.fixture(scope="session")
def postgres():
    bindir = postgres_bin()
    message = ""
    if bindir is None:
        message = "PostgreSQL is not installed (Debian: apt-get install postgresql)"
    elif importlib.util.find_spec("asyncpg") is None:
        message = "asyncpg is not installed (pip install '.[test]')"
    if message:
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI must run the PostgreSQL tests")
        pytest.skip(message)
    cluster = Postgres(bindir)
    yield cluster
    cluster.remove()


def pytest_generate_tests(metafunc):
    if "engine" in metafunc.fixturenames and metafunc.module.__name__ in BOTH_ENGINES:
        metafunc.parametrize("engine", ENGINES, indirect=True)


@pytest.fixture
def engine(request) -> str:
    return getattr(request, "param", "sqlite")


ENGINES = ["sqlite", "postgres"]


def database_for(request, engine: str, tmp: Path) -> Path | str:
    """A SQLite path in `tmp`, or the URL of a fresh PostgreSQL database."""
    if engine == "postgres":
        return request.getfixturevalue("postgres").new_database()
    return tmp / "broker.db"


@pytest.fixture
def database(engine, request, tmp_path):
    return database_for(request, engine, tmp_path)


@pytest.fixture
def server(tmp_path, database):
    srv = Server(tmp_path, db=database).start()
    yield srv
    srv.kill()


def rows(db: Path | str, query: str, args: tuple = ()) -> list[tuple]:
    """A query's rows, read directly from a SQLite file (read-only) or a PostgreSQL URL;
    `?` placeholders on both."""
    if isinstance(db, str):
        import asyncpg
        numbers = iter(range(1, len(args) + 1))
        numbered = re.sub(r"\?", lambda _: f"${next(numbers)}", query)

        async def fetch() -> list[tuple]:
            conn = await asyncpg.connect(db)
            try:
                return [tuple(row) for row in await conn.fetch(numbered, *args)]
            finally:
                await conn.close()
        return asyncio.run(fetch())
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(query, args).fetchall()
    finally:
        conn.close()


def execute(db: Path | str, statement: str) -> None:
    """Change a database directly (no broker running on it): one statement, committed."""
    if isinstance(db, str):
        rows(db, statement)  # outside a transaction, asyncpg commits it
        return
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.execute(statement)
    finally:
        conn.close()


@pytest.fixture
def make_server(tmp_path, database):
    """A factory for servers with extra command-line arguments."""
    started: list[Server] = []

    def make(*args: str, db: Path | str | None = None) -> Server:
        srv = Server(tmp_path, list(args), db=db or database).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.kill()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With CI=true a skipped test fails the run: .ci/run installs everything the tests need
    (PostgreSQL, nginx, Chromium, npm packages...), so a skip there means a missing install."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if os.environ.get("CI") == "true" and skipped and exitstatus == 0:
        print(f"\nCI=true: {skipped} test(s) skipped; in CI a skip is a failure")
        session.exitstatus = 1
