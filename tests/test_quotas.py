"""Per-tenant quotas (issue 17): --max_event_names and --max_tenant_bytes, on both engines.
An insert that would take a tenant past a limit gets 409 and is stored and delivered
nowhere; a new value under an existing name is fine while the total fits; other tenants
are not affected; the counts survive restarts; a database already over a lowered limit keeps
serving without growing; inserts racing at the limit (one group commit, or several
processes on PostgreSQL) never pass it. Real servers, real databases."""

from __future__ import annotations

import json
import re
import threading

import pytest
from api_support import assert_error
from conftest import ENGINES, Server, bearer, execute, rows
from stream_support import unique
from test_resume import insert, received

pytestmark = pytest.mark.parametrize("engine", ENGINES, indirect=True)


def size(event: str, data: object) -> int:
    """A value's size, as the README defines it: the name's length plus the data's, as
    compact JSON."""
    return len(event) + len(json.dumps(data, separators=(",", ":")))


def refused(server: Server, auth: dict[str, str], event: str, data: object, flag: str) -> None:
    resp = server.insert(auth, event, data)
    assert_error(resp, 409)
    assert f"--{flag}" in resp.json()["error"], resp.body


def refusals(server: Server) -> int:
    text = server.get("/metrics", headers=bearer(server.admin_token)).body.decode()
    return int(re.search(r"^broker_quota_refusals_total (\d+)$", text, re.MULTILINE).group(1))


def stored(server: Server, tenant: str) -> list[tuple]:
    """The tenant's (event, data) in the log, and its usage row."""
    log = rows(server.db, "SELECT event, data FROM events WHERE tenant_name = ? ORDER BY id",
               (tenant,))
    usage = rows(server.db, "SELECT names, bytes FROM tenant_usage WHERE tenant_name = ?",
                 (tenant,))
    return [*log, *usage]


def test_the_name_limit(make_server):
    server = make_server("--max_event_names", "3")
    tenant, other_tenant = unique("names"), unique("names_other")
    auth = server.user(unique("writer"), tenant=tenant)
    other = server.user(unique("writer"), tenant=other_tenant)
    state = [insert(server, auth, name, 1) for name in ("a", "b", "c")]
    stream = server.sse(auth)
    assert received(stream, 3) == state
    refused(server, auth, "d", "one too many", "max_event_names")
    # A new value under a name the tenant has is fine; another tenant has its own count.
    newer_a = insert(server, auth, "a", 2)
    assert [insert(server, other, name, 1)[1] for name in ("d", "e", "f")] == ["d", "e", "f"]
    refused(server, other, "g", 1, "max_event_names")
    # The refused insert reached no stream and no table.
    assert received(stream, 1) == [newer_a]
    assert stream.nothing_within(0.3)
    stream.close()
    assert [event for event, _ in stored(server, tenant)[:-1]] == ["a", "b", "c", "a"]
    assert stored(server, tenant)[-1] == (3, 3 * size("a", 1))
    assert refusals(server) == 2

    server.restart()  # the counts are in the database
    refused(server, auth, "d", "still one too many", "max_event_names")
    insert(server, auth, "b", 2)
    assert refusals(server) == 1  # the counter is this process's


def test_the_byte_limit(make_server):
    limit = 100
    server = make_server("--max_tenant_bytes", str(limit))
    tenant = unique("bytes")
    auth = server.user(unique("writer"), tenant=tenant)
    other = server.user(unique("writer"), tenant=unique("bytes_other"))
    insert(server, auth, "a", "x" * 40)
    insert(server, auth, "b", "x" * 40)
    used = size("a", "x" * 40) + size("b", "x" * 40)
    # Up to the limit exactly, then not one byte more: as a new name, or a bigger value.
    fits = "y" * (limit - used - len("c") - 2)
    insert(server, auth, "c", fits)
    refused(server, auth, "d", 1, "max_tenant_bytes")
    refused(server, auth, "a", "x" * 41, "max_tenant_bytes")
    # A value of the same size or smaller under an existing name is fine, and frees bytes.
    insert(server, auth, "a", "z" * 40)
    insert(server, auth, "b", "")
    insert(server, auth, "d", "x" * 37)  # 1 + 39 + 2 quotes = the 40 that b gave back
    refused(server, auth, "d", "x" * 38, "max_tenant_bytes")
    insert(server, other, "big", "x" * (limit - 5))  # its own 100 bytes
    assert stored(server, tenant)[-1] == (4, limit)
    assert refusals(server) == 3

    server.restart()
    refused(server, auth, "e", 1, "max_tenant_bytes")
    stream = server.sse(auth)
    assert {event: data for _, event, data in received(stream, 4)} == \
        {"a": "z" * 40, "b": "", "c": fits, "d": "x" * 37}
    stream.close()


def test_a_database_over_a_lowered_limit_keeps_serving_without_growing(make_server):
    server = make_server("--max_event_names", "0", "--max_tenant_bytes", "0")  # no limits
    tenant = unique("over")
    auth = server.user(unique("writer"), tenant=tenant)
    for name in "abcde":
        insert(server, auth, name, "x" * 10)
    server.stop()
    # Also: a database made before tenant_usage existed has its usage counted at the open.
    execute(server.db, "DELETE FROM tenant_usage")
    server.extra_args = ["--max_event_names", "3", "--max_tenant_bytes", "20"]
    server.start()
    stream = server.sse(auth)
    assert sorted(event for _, event, _ in received(stream, 5)) == list("abcde")
    refused(server, auth, "f", 1, "max_event_names")
    refused(server, auth, "a", "x" * 11, "max_tenant_bytes")  # 60 bytes, over 20: no growth
    same = insert(server, auth, "a", "y" * 10)
    smaller = insert(server, auth, "b", "")
    assert received(stream, 2) == [same, smaller]
    stream.close()
    assert stored(server, tenant)[-1] == (5, 5 * size("a", "x" * 10) - 10)


def test_inserts_racing_at_the_limit_never_pass_it(make_server, engine):
    limit, writers = 20, 60
    servers = [make_server("--max_event_names", str(limit))]
    if engine == "postgres":  # and several processes on one database agree
        servers.append(make_server("--max_event_names", str(limit)))
    tenant = unique("race")
    auths = [servers[0].user(unique("writer"), tenant=tenant) for _ in range(4)]
    statuses: list[int] = []
    start = threading.Barrier(writers)

    def write(index: int) -> None:
        start.wait()
        resp = servers[index % len(servers)].insert(auths[index % 4], f"name_{index}", index)
        statuses.append(resp.status)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(statuses) == [200] * limit + [409] * (writers - limit)
    assert len(rows(servers[0].db, "SELECT event FROM latest WHERE tenant_name = ?",
                    (tenant,))) == limit
    assert stored(servers[0], tenant)[-1][0] == limit
    assert sum(refusals(server) for server in servers) == writers - limit
