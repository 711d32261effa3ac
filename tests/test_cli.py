"""The command line, environment variables and the log: flags, spellings, warnings, secrets."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jwt
import pytest
from api_support import launch, unique, wait_for_log
from conftest import ROOT, Server, basic, bearer

FLAGS = ["--host", "--port", "--db", "--admin_token", "--jwt_secret", "--jwt_expiry", "--origin",
         "--cert_path", "--key_path", "--log_level"]
PASSWORD = "correct horse 1"


def admin_warnings(srv: Server) -> list[str]:
    """Log lines that warn about the admin token. The temporary directory is cut out first:
    pytest names it after the test, which may itself say "admin" and "warn"."""
    lines = srv.log.replace(str(srv.tmp), "<tmp>").splitlines()
    return [line for line in lines if "warn" in line.lower() and "admin" in line.lower()]


def test_help_lists_every_flag() -> None:
    result = subprocess.run([sys.executable, "-m", "broker", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    for flag in FLAGS:
        assert flag in result.stdout or flag.replace("_", "-") in result.stdout, flag


def test_default_admin_token_warns_loudly(tmp_path) -> None:
    srv = Server(tmp_path, admin_token="letmein").start()
    try:
        assert admin_warnings(srv), srv.log
        assert srv.create_user(unique("dflt")).status == 200  # the default does work
    finally:
        srv.kill()


@pytest.mark.parametrize(("flags", "env"), [
    (["--admin_token", ""], {}),
    (["--admin_token", "  "], {}),
    ([], {"BROKER_ADMIN_TOKEN": ""}),  # `$(openssl rand -hex 24)` without openssl
    ([], {"BROKER_ADMIN_TOKEN": " \t"}),
], ids=["empty flag", "blank flag", "empty env", "blank env"])
def test_empty_admin_token_refuses_to_start(tmp_path, flags: list[str],
                                            env: dict[str, str]) -> None:
    db = tmp_path / "broker.db"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    result = subprocess.run([sys.executable, "-m", "broker", "--port", "0", "--db", str(db),
                             *flags], cwd=ROOT, env={**clean, **env}, capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode != 0
    assert "admin token" in result.stderr and "empty" in result.stderr, result.stderr
    assert "listening" not in result.stderr
    assert not db.exists()  # refused before anything was opened


def test_custom_admin_token_does_not_warn(server: Server) -> None:
    assert server.get("/").status == 200
    assert not admin_warnings(server), server.log


def check_token_settings(srv: Server, secret: str, expiry: int) -> None:
    name = unique("cfg")
    assert srv.create_user(name).status == 200
    token = srv.login(name)
    # pyjwt cannot match an empty audience, so the signature and issuer are checked here and
    # the (empty) aud by hand.
    claims = jwt.decode(token, secret, algorithms=["HS256"], issuer="Broker",
                        options={"verify_aud": False})
    assert claims["aud"] == ""
    assert claims["exp"] == claims["iat"] + expiry


def test_hyphenated_flags(tmp_path) -> None:
    srv = launch(Server(tmp_path), ["--admin-token", "hyphen-token", "--jwt-secret",
                                    "hyphen-secret-0123456789abcdef0123", "--jwt-expiry", "77"])
    try:
        srv.admin_token = "letmein"
        assert srv.create_user(unique("dflt")).status == 401
        srv.admin_token = "hyphen-token"
        check_token_settings(srv, "hyphen-secret-0123456789abcdef0123", 77)
    finally:
        srv.kill()


def test_environment_variables(tmp_path) -> None:
    env = {"BROKER_ADMIN_TOKEN": "env-token",
           "BROKER_JWT_SECRET": "env-secret-0123456789abcdef0123456789",
           "BROKER_JWT_EXPIRY": "99"}
    srv = launch(Server(tmp_path), [], env)
    try:
        assert not admin_warnings(srv), srv.log
        srv.admin_token = "letmein"
        assert srv.create_user(unique("dflt")).status == 401
        srv.admin_token = "env-token"
        check_token_settings(srv, "env-secret-0123456789abcdef0123456789", 99)
    finally:
        srv.kill()


# -- the log -------------------------------------------------------------------------------

LOG_SECRET = "log-test-jwt-secret-0123456789abcdef"


@pytest.fixture
def logged(tmp_path) -> Server:
    srv = Server(tmp_path, ["--jwt_secret", LOG_SECRET]).start()
    yield srv
    srv.kill()


def test_log_has_one_line_per_request_and_no_secrets(logged: Server) -> None:
    srv = logged
    name, password = unique("logger"), "pw-" + unique("secret")
    assert srv.create_user(name, password, email="logger@example.com").status == 200
    token = srv.login(name, password)
    basic_auth = basic(name, password)
    assert srv.insert(bearer(token), "ev", 1).status == 200
    assert srv.insert(basic_auth, "ev", 2).status == 200
    assert srv.get("/verify?access_token=" + token, headers=bearer(token)).status == 200
    assert srv.post("/login", {"username": name, "password": password + "-wrong"}).status == 401
    wrong_admin = "wrong-admin-" + unique("tok")
    assert srv.post("/list_users", {"admin_token": wrong_admin}).status == 401
    assert srv.post("/get_user", {"admin_token": srv.admin_token, "username": name}).status == 200
    stream = srv.sse(basic_auth)
    stream.next()
    stream.close()
    assert srv.get("/log-sentinel").status == 404
    wait_for_log(srv, "/log-sentinel")
    log = srv.log
    for secret in [srv.admin_token, wrong_admin, password, token, LOG_SECRET,
                   basic_auth["Authorization"].split()[1], token.split(".")[2]]:
        assert secret not in log, f"secret {secret[:12]}... found in the log"
    for method, path, status in [("POST", "/create_user", 200), ("POST", "/login", 200),
                                 ("POST", "/insert", 200), ("GET", "/verify", 200),
                                 ("POST", "/login", 401), ("POST", "/list_users", 401),
                                 ("GET", "/log-sentinel", 404)]:
        pattern = rf"\b{method}\b.*{re.escape(path)}\b.*\b{status}\b"
        assert any(re.search(pattern, line) for line in log.splitlines()), (method, path, status)
