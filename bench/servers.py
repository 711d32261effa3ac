"""The servers under test: broker (two event loops), the Starlette peer and nginx + nchan.

Each is started as a fresh child process on a free loopback port, measured through /proc
(resident memory and CPU time of its processes) and stopped. `new_channel()` prepares an
empty stream to fan out on: a fresh tenant (broker), a fresh channel id (nchan); the peer has
a single global stream.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from loadgen import Channel, basic_header

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' throwaway PostgreSQL cluster
from pg_cluster import Postgres, postgres_bin

HOST = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")

# broker is started through these one-liners so that the event loop is chosen here, whatever
# broker does by default: `sys.modules["uvloop"] = None` makes `import uvloop` fail.
BROKER_LOOPS = {
    "uvloop": "import sys, uvloop; uvloop.install(); sys.argv[0] = 'broker'; "
              "import broker; broker.main()",
    "asyncio": "import sys; sys.modules['uvloop'] = None; sys.argv[0] = 'broker'; "
               "import broker; broker.main()",
}


def uvloop_installed() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == pid:
                found.append(int(entry))
    return found


class Server:
    """A server child process on a free loopback port."""

    name = "server"
    durable = False  # True when /insert answers only after the event is on disk
    code_dir = ROOT  # the working directory of the server process (broker: its code)

    def __init__(self) -> None:
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.workdir = Path()
        self.log_lines: list[str] = []

    # -- lifecycle ------------------------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 20.0) -> Server:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-"))
        self.port = free_port()
        return self.launch(timeout)

    def restart(self) -> float:
        """SIGTERM, wait for the exit, start again on the same files and port; returns the
        monotonic time at which the new process accepted a connection."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.launch()
        return time.monotonic()

    def launch(self, timeout: float = 20.0) -> Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        try:
            # The descriptor limit is inherited: run.py raised its soft limit to the hard one.
            self.proc = subprocess.Popen(self.command(), cwd=self.code_dir, env=env,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, text=True)
        except (OSError, ValueError, KeyError):
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        threading.Thread(target=self._drain_log, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                self.setup()
                return self
            except OSError:
                time.sleep(0.02)  # finely: restart() reports when the server was ready
        self.stop()
        raise RuntimeError(f"{self.name} did not start:\n" + "\n".join(self.log_lines[-20:]))

    def _drain_log(self) -> None:
        # Read the log continuously: a full pipe would block the server.
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log_lines.append(line.rstrip("\n"))
            del self.log_lines[:-200]

    def setup(self) -> None:
        """Runs once the port accepts connections."""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- measurement ----------------------------------------------------------------------------
    def pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid]

    def rss_kib(self) -> int:
        return sum(proc_rss_kib(pid) for pid in self.pids())

    def cpu_seconds(self) -> float:
        return sum(proc_cpu_seconds(pid) for pid in self.pids())

    def loop(self) -> str:
        """The event loop the server really runs, read from its memory map."""
        with open(f"/proc/{self.pids()[0]}/maps") as maps:
            return "uvloop" if "uvloop" in maps.read() else "asyncio"

    # -- HTTP -----------------------------------------------------------------------------------
    def post_json(self, path: str, body: dict, headers: dict | None = None) -> tuple[int, object]:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=30)
        try:
            conn.request("POST", path, json.dumps(body).encode(),
                         {"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            data = resp.read()
            try:
                return resp.status, json.loads(data)
            except ValueError:
                return resp.status, data
        finally:
            conn.close()

    def new_channel(self) -> Channel:
        raise NotImplementedError


class Broker(Server):
    """broker itself (`python -m broker` on a temporary SQLite file), on a chosen event loop."""

    durable = True
    password = "bench password 1"

    def __init__(self, name: str = "broker", loop: str = "uvloop",
                 extra_args: list[str] | None = None, code_dir: Path = ROOT) -> None:
        self.name = name
        self.loop_name = loop
        # `import broker` finds the modules of the working directory first (sys.path[0] of
        # `python -c` is ''): another checkout runs that checkout's code (broker-base).
        self.code_dir = code_dir
        self.extra_args = extra_args or []
        self.admin_token = secrets.token_hex(16)
        self.tenants = 0
        super().__init__()

    def command(self) -> list[str]:
        return [sys.executable, "-c", BROKER_LOOPS[self.loop_name], "--host", HOST,
                "--port", str(self.port), "--db", str(self.workdir / "broker.db"),
                "--admin_token", self.admin_token, "--log_level", "warning",
                # Room for 10,000 idle streams plus the publisher (nchan.conf does the same
                # with worker_connections), all of one user; flags in --broker-args come
                # later and win.
                "--max_connections", "19000", "--max_streams_per_user", "19000",
                *self.extra_args]

    def new_user(self, tenant: str | None = None,
                 scopes: list[str] | None = None) -> tuple[str, str]:
        """A user, by default in a tenant of its own; returns (username, jwt)."""
        if tenant is None:
            self.tenants += 1
            tenant = f"bench_tenant_{self.tenants}"
        username = f"bench{self.tenants}_{secrets.token_hex(4)}"
        status, body = self.post_json("/create_user", {
            "username": username, "password": self.password, "admin_token": self.admin_token,
            "tenant_name": tenant, "scopes": scopes or []})
        if status != 200:
            raise RuntimeError(f"create_user: {status} {body!r}")
        status, body = self.post_json("/login", {"username": username,
                                                 "password": self.password})
        if status != 200 or not isinstance(body, dict):
            raise RuntimeError(f"login: {status} {body!r}")
        return username, body["jwt"]

    def tenant_name(self) -> str:
        """The tenant of the newest channel."""
        return f"bench_tenant_{self.tenants}"

    def newest_id(self) -> int:
        return self._read_db("SELECT coalesce(max(id), 0) FROM events", ())

    def events_after(self, tenant: str, after: int) -> int:
        """How many events of the tenant the log holds after `after` (read from the file:
        the truth to count deliveries against)."""
        return self._read_db("SELECT count(*) FROM events WHERE tenant_name = ? AND id > ?",
                             (tenant, after))

    def _read_db(self, query: str, args: tuple) -> int:
        with contextlib.closing(sqlite3.connect(
                f"file:{self.workdir / 'broker.db'}?mode=ro", uri=True)) as db:
            return db.execute(query, args).fetchone()[0]

    def new_channel(self, auth: str = "bearer") -> Channel:
        username, jwt = self.new_user()
        bearer = ("Authorization", f"Bearer {jwt}")
        pub = basic_header(username, self.password) if auth == "basic" else bearer
        return Channel(HOST, self.port, "/sse", (bearer,), "/insert", (pub,), True)

    def scoped_channels(self, groups: list[list[str]]) -> tuple[Channel, tuple[Channel, ...]]:
        """One fresh tenant with a publisher that may post every event, and one subscriber
        user per scope list: (the publisher's channel, a channel per subscriber user)."""
        self.tenants += 1
        tenant = f"bench_tenant_{self.tenants}"
        bearer = ("Authorization", f"Bearer {self.new_user(tenant, ['*:post'])[1]}")
        publisher = Channel(HOST, self.port, "/sse", (bearer,), "/insert", (bearer,), True)
        return publisher, tuple(
            Channel(HOST, self.port, "/sse", (("Authorization", f"Bearer {jwt}"),))
            for _, jwt in (self.new_user(tenant, scopes) for scopes in groups))


class BrokerPg(Broker):
    """broker on PostgreSQL: `processes` broker processes sharing one port (--reuse_port) and
    one database of a throwaway cluster with fsync on (inserts are as durable as on SQLite).
    The server's CPU and memory include PostgreSQL's processes."""

    def __init__(self, name: str, loop: str, extra_args: list[str] | None,
                 processes: int = 1) -> None:
        super().__init__(name, loop, extra_args)
        self.processes = processes
        self.cluster: Postgres | None = None
        self.url = ""
        self.others: list[subprocess.Popen] = []

    @staticmethod
    def available() -> bool:
        try:
            import asyncpg  # noqa: F401
        except ImportError:
            return False
        return postgres_bin() is not None

    def command(self) -> list[str]:
        args = super().command()
        args[args.index("--db") + 1] = self.url
        return args + (["--reuse_port"] if self.processes > 1 else [])

    def start(self, timeout: float = 20.0) -> Server:
        self.cluster = Postgres(postgres_bin(), durable=True)  # type: ignore[arg-type]
        self.url = self.cluster.new_database()
        super().start(timeout)  # the first process; it creates the schema
        for _ in range(self.processes - 1):
            # --log_level info (the later flag wins) to see when it listens.
            env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
            proc = subprocess.Popen([*self.command(), "--log_level", "info"], cwd=ROOT, env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            self.others.append(proc)
            for line in proc.stderr:  # type: ignore[union-attr]
                if "listening on" in line:
                    break
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # type: ignore[union-attr]
        return self

    def pids(self) -> list[int]:
        pids = [*super().pids(), *(proc.pid for proc in self.others)]
        if self.cluster is not None:
            postmaster = int((self.cluster.data / "postmaster.pid").read_text().split()[0])
            pids += [postmaster, *children(postmaster)]
        return pids

    def stop(self) -> None:
        for proc in self.others:
            proc.terminate()
            proc.wait(10)
        super().stop()
        if self.cluster is not None:
            self.cluster.remove()


class StarlettePeer(Server):
    """bench/peer_starlette.py under uvicorn (library defaults)."""

    name = "starlette"

    def command(self) -> list[str]:
        return [sys.executable, str(BENCH / "peer_starlette.py"), "--host", HOST,
                "--port", str(self.port)]

    def new_channel(self) -> Channel:
        return Channel(HOST, self.port, "/sse", (), "/insert", (), True)


class Nchan(Server):
    """nginx with the nchan module (Debian: nginx, libnginx-mod-nchan), config bench/nchan.conf."""

    name = "nchan"

    def __init__(self, workers: int = 0) -> None:
        self.workers: int | str = workers or "auto"  # auto: one per core, nginx's (and Debian's) default
        self.channels = 0
        super().__init__()

    @staticmethod
    def available() -> bool:
        return shutil.which("nginx") is not None and NCHAN_MODULE.exists()

    def command(self) -> list[str]:
        self.workdir.chmod(0o755)  # nginx workers run as an unprivileged user
        conf = (BENCH / "nchan.conf").read_text().format(
            module=NCHAN_MODULE, workers=self.workers, prefix=self.workdir, port=self.port)
        path = self.workdir / "nginx.conf"
        path.write_text(conf)
        return [shutil.which("nginx") or "nginx", "-p", str(self.workdir), "-c", str(path)]

    def pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid, *children(self.proc.pid)]

    def loop(self) -> str:
        return f"epoll (C), {len(self.pids()) - 1} worker processes"

    def stop(self) -> None:
        # SIGTERM is nginx's fast shutdown; SIGQUIT would wait for the open streams.
        super().stop()

    def new_channel(self) -> Channel:
        self.channels += 1
        channel_id = f"bench{self.channels}"
        return Channel(HOST, self.port, f"/sse?id={channel_id}", (), f"/pub?id={channel_id}",
                       (("X-EventSource-Event", "bench"),), False)


def nginx_version() -> str:
    nginx = shutil.which("nginx")
    if not nginx:
        return "not installed"
    out = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False).stderr
    match = re.search(r"nginx/(\S+)", out)
    return match.group(1) if match else out.strip()


ALL_SERVERS = ["broker", "broker-asyncio", "starlette", "nchan"]
PG_SERVERS = ["broker-pg", "broker-pg2"]  # on request only (--servers): docs/scaling.md
BASE_SERVER = "broker-base"  # on request only, with --base-ref or --base-dir


def server_factories(names: list[str], nchan_workers: int = 0,
                     broker_args: list[str] | None = None,
                     base_dir: Path | None = None) -> dict[str, Callable[[], Server]]:
    """Name -> factory of a fresh (not started) server, skipping what is not installed.

    "broker" runs on uvloop when it is installed (what `pip install '.[fast]'` gives),
    "broker-asyncio" on the standard loop; without uvloop only "broker" (on asyncio) remains.
    "broker-pg" is one broker process on PostgreSQL, "broker-pg2" two processes on one port
    and one database (when PostgreSQL and asyncpg are installed). "broker-base" is broker
    run from the checkout `base_dir` on the same loop as "broker": older code, same run.
    """
    fast = uvloop_installed()
    kinds: dict[str, Callable[[], Server]] = {
        "broker": lambda: Broker("broker", "uvloop" if fast else "asyncio", broker_args),
        BASE_SERVER: lambda: Broker(BASE_SERVER, "uvloop" if fast else "asyncio", broker_args,
                                    base_dir or ROOT),
        "broker-asyncio": lambda: Broker("broker-asyncio", "asyncio", broker_args),
        "broker-pg": lambda: BrokerPg("broker-pg", "uvloop" if fast else "asyncio", broker_args),
        "broker-pg2": lambda: BrokerPg("broker-pg2", "uvloop" if fast else "asyncio",
                                       broker_args, processes=2),
        "starlette": StarlettePeer,
        "nchan": lambda: Nchan(nchan_workers),
    }
    available = {"broker-asyncio": fast, "nchan": Nchan.available(), BASE_SERVER: bool(base_dir),
                 "broker-pg": BrokerPg.available(), "broker-pg2": BrokerPg.available()}
    return {name: kinds[name] for name in names if available.get(name, True)}


@contextlib.contextmanager
def base_checkout(ref: str | None, directory: str | None) -> Iterator[dict]:
    """The code broker-base runs: an existing checkout (`directory`), or the tree of git `ref`
    of this repository exported into a temporary directory under $TMPDIR and removed at the
    end. `git archive` rather than `git worktree add`: nothing is registered in the shared
    repository, so a run that is killed leaves nothing to prune. Yields {"dir", "commit",
    "describe"}; {} when neither is given."""
    if directory:
        path = Path(directory).resolve()
        if not (path / "broker.py").exists():
            raise SystemExit(f"--base-dir {path}: no broker.py there")
        yield {"dir": path, "commit": git(path, "rev-parse", "HEAD"),
               "describe": f"{path} ({git(path, 'describe', '--always', '--dirty')})"}
        return
    if not ref:
        yield {}
        return
    commit = git(ROOT, "rev-parse", "--verify", f"{ref}^{{commit}}")
    if not commit:
        raise SystemExit(f"--base-ref {ref}: not a commit of {ROOT}")
    path = Path(tempfile.mkdtemp(prefix="bench-base-"))
    try:
        archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", commit],
                                   stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(path)], stdin=archive.stdout, check=True)
        if archive.wait() != 0 or not (path / "broker.py").exists():
            raise SystemExit(f"--base-ref {ref}: could not export its tree")
        yield {"dir": path, "commit": commit, "describe": f"{ref} ({commit[:10]})"}
    finally:
        shutil.rmtree(path, ignore_errors=True)


def git(directory: Path, *args: str) -> str:
    """Output of a git command in `directory`; "" when it fails (not a checkout...)."""
    done = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True,
                          check=False)
    return done.stdout.strip() if done.returncode == 0 else ""
