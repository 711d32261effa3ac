"""Operations: /metrics, structured logs, trusted proxies, TLS. The systemd units:
test_units.py."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from conftest import basic, bearer


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} missing from:\n{text}"
    return float(match.group(1))


def test_metrics_needs_the_admin_token(server):
    assert server.get("/metrics").status == 401
    assert server.get("/metrics", headers=bearer("wrong")).status == 401
    assert server.get("/metrics", headers=basic("admin", server.admin_token)).status == 401
    resp = server.get("/metrics", headers=bearer(server.admin_token))
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("text/plain")


def test_metrics_count_what_happened(server):
    admin = bearer(server.admin_token)
    alice = server.user("alice", tenant="red")
    bob = server.user("bob", tenant="blue")
    streams = [server.sse(alice), server.sse(alice), server.sse(bob)]
    for i in range(3):
        assert server.insert(alice, "tick", i).status == 200
    for stream in streams[:2]:
        assert [f.data for f in stream.take(3)] == ["0", "1", "2"]
    server.get("/no-such-page")

    text = server.get("/metrics", headers=admin).body.decode()
    assert metric(text, "broker_sse_subscribers") == 3
    assert metric(text, "broker_sse_tenants") == 2
    assert metric(text, 'broker_sse_tenant_subscribers{tenant="red"}') == 2
    assert metric(text, 'broker_sse_tenant_subscribers{tenant="blue"}') == 1
    assert metric(text, "broker_events_inserted_total") == 3
    assert metric(text, "broker_frames_delivered_total") == 6  # 3 events x 2 red streams
    assert metric(text, 'broker_requests_total{route="/insert",status="200"}') == 3
    assert metric(text, 'broker_requests_total{route="other",status="404"}') == 1
    assert metric(text, 'broker_insert_duration_seconds_bucket{le="+Inf"}') == 3
    assert metric(text, "broker_insert_duration_seconds_count") == 3
    assert metric(text, "broker_open_connections") >= 3
    assert metric(text, "broker_slow_consumer_disconnects_total") == 0
    for stream in streams:
        stream.close()


def test_json_logs_are_one_object_per_line_without_secrets(make_server):
    srv = make_server("--log_format", "json")
    auth = srv.user("carol", password="s3cret-passw0rd")
    srv.insert(auth, "e", {"x": 1})
    stream = srv.sse(path="/sse?access_token=" + auth["Authorization"][7:])
    assert stream.status == 200 and stream.next().event == "e"
    stream.close()
    srv.stop()
    records = [json.loads(line) for line in srv.log_lines]
    requests = [r for r in records if "status" in r]
    assert {"method", "path", "status", "ms", "time", "level", "message"} <= set(requests[0])
    assert {(r["method"], r["path"], r["status"]) for r in requests} >= {
        ("POST", "/create_user", 200), ("POST", "/login", 200), ("POST", "/insert", 200)}
    assert "s3cret-passw0rd" not in srv.log
    assert auth["Authorization"][7:] not in srv.log
    assert srv.admin_token not in srv.log


def failed_logins(srv, count: int, forwarded_for: str) -> list[int]:
    headers = {"X-Forwarded-For": f"203.0.113.9, {forwarded_for}"}
    return [srv.post("/login", {"username": f"nobody{i}", "password": "wrong-password"},
                     headers=headers).status for i in range(count)]


def test_trusted_proxy_address_is_used_for_throttling_and_logs(make_server):
    srv = make_server("--trusted_proxies", "127.0.0.1", "--auth_failures", "2",
                      "--log_format", "json")
    # Three times --auth_failures per address, each with a new username.
    assert failed_logins(srv, 7, "198.51.100.1") == [401] * 6 + [429]
    assert failed_logins(srv, 1, "198.51.100.2") == [401]  # another client is not blocked
    srv.stop()
    clients = {json.loads(line).get("client") for line in srv.log_lines}
    assert {"198.51.100.1", "198.51.100.2"} <= clients
    assert "203.0.113.9" not in clients  # what the client claimed, ahead of the proxy


def test_forwarded_for_is_ignored_from_untrusted_peers(make_server):
    srv = make_server("--auth_failures", "2")
    assert failed_logins(srv, 6, "198.51.100.1") == [401] * 6
    # Spoofing another address does not escape the limit on the real peer.
    assert failed_logins(srv, 1, "198.51.100.2") == [429]


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed, so no certificate can be made for the TLS test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_tls_serves_the_api_and_the_stream(make_server, certificate):
    cert, key = certificate
    srv = make_server("--cert_path", str(cert), "--key_path", str(key))
    assert "https" in srv.log
    context = ssl.create_default_context(cafile=str(cert))

    def call(method: str, path: str, body=None, headers=None) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=context, timeout=10)
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=payload, headers=headers or {})
        resp = conn.getresponse()
        if path != "/sse":
            return resp.status, resp.read()
        first = b""  # the stream's first frames: the retry field, then the sync
        while b"\n\nid:" not in first:
            first += resp.read1(65536)
        return resp.status, first

    assert call("GET", "/") == (200, b'{"status":"ok"}')
    assert call("POST", "/create_user", {"username": "tls", "password": "password-tls",
                                         "admin_token": srv.admin_token, "tenant_name": "t",
                                         "scopes": []})[0] == 200
    status, body = call("POST", "/login", {"username": "tls", "password": "password-tls"})
    auth = bearer(json.loads(body)["jwt"])
    assert call("POST", "/insert", {"event": "secure", "data": [1]}, auth)[0] == 200
    status, first = call("GET", "/sse", headers=auth)
    assert status == 200 and b"event:secure\ndata:[1]\n\n" in first
    # Plain HTTP on the TLS port gets no answer in clear text.
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            reply = plain.recv(4096)
        except ConnectionResetError:
            reply = b""
        assert b"200 OK" not in reply


def test_tls_clients_that_close_their_side_cause_no_warning(make_server, certificate):
    """A TLS client that ends its side after the request (curl does, and an ssl socket's
    unwrap sends close_notify) made asyncio log a warning about eof_received for every
    connection. Not any more, and the answers still come."""
    cert, key = certificate
    srv = make_server("--cert_path", str(cert), "--key_path", str(key))
    context = ssl.create_default_context(cafile=str(cert))
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while b'{"status":"ok"}' not in answer:
                answer += tls.recv(4096)
            tls.unwrap()  # close_notify: the end of our side
    if shutil.which("curl"):
        for _ in range(3):
            result = subprocess.run(["curl", "-sS", "--cacert", str(cert),
                                     f"https://127.0.0.1:{srv.port}/"],
                                    capture_output=True, text=True, timeout=30, check=False)
            assert result.stdout == '{"status":"ok"}', result.stderr
    srv.stop()  # every connection's log is written
    assert "GET / 200" in srv.log
    assert "eof_received" not in srv.log, srv.log
