"""broker behind the reverse proxies of docs/deploy.md, run for real on loopback.

nginx (Debian's package) runs in the foreground with its own prefix in tmp_path and the very
configuration files the guide tells people to install: docs/nginx-broker-locations.conf
verbatim (only its read timeout shortened where a test needs it) and docs/nginx-site.conf
with its ports, certificate and log paths pointed at the test's own. Caddy, when installed,
runs docs/Caddyfile the same way.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, Server, wait_or_kill
from stream_support import wait_until_closed

DOCS = ROOT / "docs"
GUIDE = DOCS / "deploy.md"
LOCATIONS = DOCS / "nginx-broker-locations.conf"
SITE = DOCS / "nginx-site.conf"
CADDYFILE = DOCS / "Caddyfile"
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
CADDY = shutil.which("caddy")

needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed "
                                 "(apt-get install nginx)")
needs_tls_tools = pytest.mark.skipif(not (shutil.which("curl") and shutil.which("openssl")),
                                     reason="curl and openssl are needed for the TLS site tests")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"proxy exited with {proc.returncode}:\n{read(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"proxy not listening on {port} after {timeout}s:\n{read(log)}")


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def substitute(text: str, old: str, new: str) -> str:
    """Replace a documented value with the test's, insisting that the document has it once."""
    assert text.count(old) == 1, f"expected {old!r} once in the documented config"
    return text.replace(old, new)


@dataclasses.dataclass
class Proxy:
    port: int
    proc: subprocess.Popen

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            wait_or_kill(self.proc)


@pytest.fixture
def proxies():
    started: list[Proxy] = []
    yield started
    for proxy in started:
        proxy.stop()


def locations(read_timeout: str | None = None) -> str:
    """The documented locations, with another read timeout when a test needs one."""
    text = LOCATIONS.read_text()
    if read_timeout:
        text = substitute(text, "proxy_read_timeout 60s;", f"proxy_read_timeout {read_timeout};")
    return text


def start_nginx(tmp: Path, http_block: str, snippet: str, port: int,
                proxies: list[Proxy]) -> Proxy:
    """nginx in the foreground, one process, everything under `tmp`."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "snippets").mkdir(exist_ok=True)
    (tmp / "snippets" / "broker-locations.conf").write_text(snippet)
    temp_paths = "\n".join(f"    {name}_temp_path {tmp}/{name}_temp;"
                           for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (tmp / "nginx.conf").write_text(f"""
daemon off;
master_process off;  # one process, no privilege drop: reads the files under tmp as they are
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 256; }}
http {{
{temp_paths}
    access_log {tmp}/access.log;
{http_block}
}}
""")
    log = tmp / "error.log"
    proc = subprocess.Popen([NGINX, "-p", str(tmp), "-c", str(tmp / "nginx.conf"),
                             "-e", str(log)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    proxy = Proxy(port, proc)
    proxies.append(proxy)
    wait_for_port(port, proc, log)
    return proxy


def plain_nginx(tmp: Path, broker: Server, proxies: list[Proxy],
                read_timeout: str | None = None) -> Proxy:
    """The documented locations in a plain-HTTP server block (TLS has its own test)."""
    port = free_port()
    # A site-wide gzip for everything, as some distributions' configs have: the locations must
    # keep it off the event stream, where it would hold small frames back.
    block = f"""
    gzip on;
    gzip_types text/event-stream application/json;
    gzip_min_length 1;
    upstream broker {{ server 127.0.0.1:{broker.port}; keepalive 4; }}
    server {{
        listen 127.0.0.1:{port};
        include snippets/broker-locations.conf;
    }}
"""
    return start_nginx(tmp, block, locations(read_timeout), port, proxies)


def through(server: Server, proxy: Proxy) -> Server:
    """The same Server helpers, talking to the proxy's port instead of broker's."""
    return dataclasses.replace(server, port=proxy.port)


def check_events_arrive_at_once(via: Server, count: int = 10, limit: float = 0.2) -> None:
    """Each event inserted through the proxy comes out of its stream within `limit` seconds,
    on its own (a buffering proxy would hold small frames back until its buffer fills)."""
    auth = via.user(f"user{via.port}")
    first = via.insert(auth, "warmup", 0).json()
    stream = via.sse(auth, headers={"Accept-Encoding": "gzip"})
    try:
        assert stream.status == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert "content-encoding" not in stream.headers
        assert stream.next(timeout=2).id == first["id"]
        delays = []
        for n in range(count):
            started = time.monotonic()
            inserted = via.insert(auth, "tick", {"n": n}).json()
            frame = stream.next(timeout=2)
            delays.append(time.monotonic() - started)
            assert (frame.id, frame.event, frame.json()) == (inserted["id"], "tick", {"n": n})
        assert max(delays) < limit, f"event delays through the proxy: {delays}"
    finally:
        stream.close()


def test_guide_shows_the_tested_files():
    guide = GUIDE.read_text()
    for path in (LOCATIONS, SITE, CADDYFILE):
        assert path.read_text().strip() in guide, f"docs/deploy.md must show {path.name} as is"


@needs_nginx
def test_events_pass_through_nginx_at_once(server, tmp_path, proxies):
    proxy = plain_nginx(tmp_path / "nginx", server, proxies)
    check_events_arrive_at_once(through(server, proxy))


@needs_nginx
def test_heartbeat_keeps_idle_stream_open_past_nginx_timeout(make_server, tmp_path, proxies):
    server = make_server("--heartbeat", "1")
    via = through(server, plain_nginx(tmp_path / "nginx", server, proxies, read_timeout="3s"))
    auth = via.user("idle")
    first = via.insert(auth, "state", "on").json()
    stream = via.sse(auth)
    assert stream.next(timeout=2).id == first["id"]

    # 5.5 s of silence apart from heartbeats: nearly twice nginx's 3 s read timeout.
    heartbeats = 0
    deadline = time.monotonic() + 5.5
    while (left := deadline - time.monotonic()) > 0:
        try:
            raw = stream.read_raw(timeout=left)
        except TimeoutError:
            break
        assert raw, f"the stream ended after {5.5 - left:.1f}s"
        assert raw == b":\n\n", raw  # nothing but heartbeats on an idle stream
        heartbeats += 1
    assert heartbeats >= 4

    later = via.insert(auth, "state", "off").json()
    assert stream.next(timeout=1).id == later["id"]
    stream.close()


@needs_nginx
def test_without_heartbeat_nginx_cuts_idle_stream(make_server, tmp_path, proxies):
    # The control for the test above: the 3 s timeout is real, so the heartbeat is what kept
    # that stream open.
    server = make_server("--heartbeat", "30")
    via = through(server, plain_nginx(tmp_path / "nginx", server, proxies, read_timeout="3s"))
    auth = via.user("idle")
    via.insert(auth, "state", "on")
    stream = via.sse(auth)
    stream.next(timeout=2)
    closed_after = wait_until_closed(stream, timeout=8)
    assert closed_after is not None and 2.5 < closed_after < 6, closed_after


# -- the full TLS site: docs/nginx-site.conf ------------------------------------------------

def site_config(tmp: Path, broker_port: int, https_port: int, http_port: int) -> str:
    """docs/nginx-site.conf with its ports, certificate and log pointed into `tmp`."""
    tmp.mkdir(parents=True, exist_ok=True)
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                    "-subj", "/CN=broker.example.com",
                    "-addext", "subjectAltName=DNS:broker.example.com",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    site = SITE.read_text()
    site = substitute(site, "server 127.0.0.1:8080;", f"server 127.0.0.1:{broker_port};")
    site = substitute(site, "listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;")
    site = substitute(site, "listen 80;", f"listen 127.0.0.1:{http_port};")
    site = re.sub(r"\n\s*listen \[::\]:\d+[^;]*;", "", site)  # loopback IPv4 only in tests
    site = substitute(site, "/etc/letsencrypt/live/broker.example.com/fullchain.pem", str(cert))
    site = substitute(site, "/etc/letsencrypt/live/broker.example.com/privkey.pem", str(key))
    return substitute(site, "/var/log/nginx/broker.access.log", str(tmp / "broker.access.log"))


def curl(*args: str, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", *args], check=False,
                          capture_output=True, text=True, timeout=timeout)


@needs_nginx
@needs_tls_tools
def test_tls_site_speaks_http2_and_keeps_tokens_out_of_logs(server, tmp_path, proxies):
    https_port, http_port = free_port(), free_port()
    tmp = tmp_path / "site"
    site = site_config(tmp, server.port, https_port, http_port)
    start_nginx(tmp, site, locations(), https_port, proxies)
    origin = f"https://broker.example.com:{https_port}"
    resolve = ["--resolve", f"broker.example.com:{https_port}:127.0.0.1",
               "--cacert", str(tmp / "cert.pem")]

    # Plain HTTP is redirected to HTTPS.
    redirect = curl("-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                    f"http://127.0.0.1:{http_port}/verify")
    assert redirect.stdout.startswith("301 https://127.0.0.1/verify"), redirect

    # HTTP/2 towards the client, and the JSON endpoints work through it.
    auth = server.user("tls")
    token = auth["Authorization"].removeprefix("Bearer ")
    verify = curl(*resolve, "-w", "\n%{http_version}", "-H",
                  f"Authorization: {auth['Authorization']}", f"{origin}/verify")
    body, version = verify.stdout.rsplit("\n", 1)
    assert version == "2", verify
    assert '"username":"tls"' in body

    # A stream over HTTP/2 with the token in the query, as a browser's EventSource sends it.
    first = server.insert(auth, "greeting", "hello").json()
    stream = subprocess.Popen(
        ["curl", "-sSN", *resolve, "--max-time", "5", f"{origin}/sse?access_token={token}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        frame = read_frame(stream)
        assert frame == f'id:{first["id"]}\nevent:greeting\ndata:"hello"\n\n'.encode()
        second = server.insert(auth, "greeting", "again").json()
        assert read_frame(stream) == f'id:{second["id"]}\nevent:greeting\ndata:"again"\n\n'.encode()
    finally:
        stream.kill()
        stream.wait(5)

    # nginx writes the stream's log line once it sees curl go.
    log = tmp / "broker.access.log"
    deadline = time.monotonic() + 5
    while "/sse" not in read(log) and time.monotonic() < deadline:
        time.sleep(0.05)
    access = read(log)
    assert "GET /sse HTTP/2.0" in access, access
    assert token not in access and "access_token" not in access, access


def read_frame(stream: subprocess.Popen, timeout: float = 3) -> bytes:
    """One SSE frame from curl's stdout (curl -N passes bytes on as they come)."""
    deadline = time.monotonic() + timeout
    data = b""
    fd = stream.stdout.fileno()  # type: ignore[union-attr]
    os.set_blocking(fd, False)
    while not data.endswith(b"\n\n"):
        if time.monotonic() > deadline:
            raise AssertionError(f"no frame from curl within {timeout}s: {data!r}")
        try:
            chunk = os.read(fd, 1)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        if not chunk:
            raise AssertionError(f"curl ended: {stream.stderr.read()!r}")  # type: ignore
        data += chunk
    return data


# -- Caddy: docs/Caddyfile ------------------------------------------------------------------

@pytest.mark.skipif(CADDY is None, reason="caddy is not installed (apt-get install caddy)")
def test_events_pass_through_caddy_at_once_and_tokens_stay_out_of_its_log(
        make_server, tmp_path, proxies):
    # Caddy logs a stream when it ends, and notices a client has gone on its next write: a
    # 1 s heartbeat makes that prompt.
    server = make_server("--heartbeat", "1")
    port = free_port()
    log = tmp_path / "broker.access.log"
    config = CADDYFILE.read_text()
    config = substitute(config, "broker.example.com {", f"http://127.0.0.1:{port} {{")
    config = substitute(config, "reverse_proxy 127.0.0.1:8080",
                        f"reverse_proxy 127.0.0.1:{server.port}")
    config = substitute(config, "/var/log/caddy/broker.access.log", str(log))
    # No admin endpoint and no certificates in a test; HTTP on a loopback port instead.
    config = "{\n\tadmin off\n\tauto_https off\n}\n\n" + config
    (tmp_path / "Caddyfile").write_text(config)
    env = {**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data"),
           "XDG_CONFIG_HOME": str(tmp_path / "config")}
    output = tmp_path / "caddy.log"
    with output.open("w") as sink:
        proc = subprocess.Popen([CADDY, "run", "--config", str(tmp_path / "Caddyfile"),
                                 "--adapter", "caddyfile"], cwd=tmp_path, env=env,
                                stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT)
    proxies.append(Proxy(port, proc))
    wait_for_port(port, proc, output)
    via = through(server, proxies[-1])
    check_events_arrive_at_once(via)

    # A browser-style stream, token in the query.
    token = via.login(f"user{via.port}")
    stream = via.sse(path=f"/sse?access_token={token}")
    assert stream.status == 200
    stream.next(timeout=2)
    stream.close()
    # Two streams were opened: the one above (Bearer header) and this one.
    deadline = time.monotonic() + 5
    while read(log).count('"uri":"/sse') < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    access = read(log)
    assert access.count('"uri":"/sse') == 2, access
    assert token not in access and "access_token" not in access, access


SCALING = DOCS / "nginx-scaling.conf"


@needs_nginx
def test_several_processes_on_postgresql_behind_nginx(tmp_path, proxies, postgres):
    """docs/nginx-scaling.conf in front of three brokers on one database: streams spread over
    the processes, and each one gets every event inserted through nginx, in order."""
    url = postgres.new_database()
    brokers = [Server(tmp_path, db=url).start() for _ in range(3)]  # type: ignore[arg-type]
    try:
        upstream = SCALING.read_text()
        assert upstream.strip() in (DOCS / "scaling.md").read_text(), \
            "docs/scaling.md must show nginx-scaling.conf as is"
        for documented, broker in zip(("8081", "8082", "8083"), brokers):
            upstream = substitute(upstream, f"127.0.0.1:{documented};",
                                  f"127.0.0.1:{broker.port};")
        port = free_port()
        block = f"{upstream}\n    server {{ listen 127.0.0.1:{port};\n" \
                "        include snippets/broker-locations.conf; }"
        via = through(brokers[0], start_nginx(tmp_path / "nginx", block, locations(), port,
                                              proxies))
        auth = via.user("scaled")
        streams = [via.sse(auth) for _ in range(3)]
        warm = via.insert(auth, "warm", 0).json()["id"]  # each stream has read its sync
        assert all(stream.next().id == warm for stream in streams)
        ids = [via.insert(auth, "n", n).json()["id"] for n in range(20)]
        for stream in streams:
            assert [stream.next().id for _ in ids] == ids
            stream.close()
        # least_conn sent each open stream to another process.
        assert all("GET /sse 200" in broker.log for broker in brokers), \
            [broker.log.count("/sse") for broker in brokers]
    finally:
        for broker in brokers:
            broker.kill()
