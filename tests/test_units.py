"""The shipped systemd units run broker, and the README's install recipe works as written.

`systemd-analyze verify` checks a unit's syntax; it cannot see that a system call filter kills
the server at its first password hash. So each unit's sandbox is applied here as systemd
applies it, read from the unit file itself: its SystemCallFilter= lines in order (groups
expanded by `systemd-analyze syscall-filter`, the first line deciding allow list or deny list),
SystemCallErrorNumber=, SystemCallArchitectures=native, MemoryDenyWriteExecute=,
RestrictAddressFamilies=, LimitNOFILE=, NoNewPrivileges, an unprivileged user (nobody, when the
tests run as root), StateDirectory=, WorkingDirectory=, Environment= and ExecStart=. The
filters are loaded by tests/unit_sandbox.py under Debian's /usr/bin/python3 (python3-seccomp),
which then execs the unit's own ExecStart= with /opt/broker replaced by the scratch prefix that
the README's recipe installed into. The mount namespaces (ProtectSystem= and friends) need
root and systemd, and are not applied.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from functools import cache, partial
from pathlib import Path

import pytest
from conftest import ROOT, Server, bearer

PREFIX = "/opt/broker"  # where the README installs broker, and where the units run it
SANDBOX = ROOT / "tests" / "unit_sandbox.py"
SYSTEM_PYTHON = "/usr/bin/python3"
# What `sudo` searches on a stock Debian or Ubuntu (its secure_path, nothing in /usr/local):
# `python3` is the system's, whatever venv runs the tests.
SUDO_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"  # systemd's PATH
NOBODY = 65534
SECRETS = {"BROKER_ADMIN_TOKEN": "unit-admin-token", "BROKER_JWT_SECRET": "u" * 64}
# What the tests add to /etc/broker/broker.env: loopback, a free port, and more connections
# than LimitNOFILE= holds, so that broker's own raise of the open file limit runs under the
# filter too.
ENV_FILE = {**SECRETS, "BROKER_HOST": "127.0.0.1", "BROKER_PORT": "0",
            "BROKER_MAX_CONNECTIONS": "100000"}


def sandbox_missing() -> str | None:
    if not shutil.which("systemd-analyze"):
        return "systemd-analyze is not installed (Debian: apt-get install systemd)"
    for module, package in (("seccomp", "python3-seccomp"), ("ensurepip", "python3-venv")):
        if not Path(SYSTEM_PYTHON).exists() or subprocess.run(
                [SYSTEM_PYTHON, "-c", f"import {module}"], capture_output=True, check=False,
                timeout=60).returncode != 0:
            return f"{package} is not installed for /usr/bin/python3 (apt-get install " \
                   f"{package}; .ci/integration-deps.sh does)"
    return None


@pytest.fixture(scope="module", autouse=True)
def sandbox_tools() -> None:
    missing = sandbox_missing()
    if missing and os.environ.get("CI") == "true":
        pytest.fail(missing + "; CI must run the unit tests")
    if missing:
        pytest.skip(missing)


# -- reading a unit ---------------------------------------------------------------------------

def service_settings(unit: str) -> list[tuple[str, str]]:
    """The [Service] section's `Key=value` lines, in file order."""
    settings: list[tuple[str, str]] = []
    section = ""
    for line in (ROOT / unit).read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            settings.append((key.strip(), value.strip()))
    return settings


def values(settings: list[tuple[str, str]], key: str) -> list[str]:
    return [value for name, value in settings if name == key]


def last(settings: list[tuple[str, str]], key: str, default: str = "") -> str:
    found = values(settings, key)
    return found[-1] if found else default


@cache
def syscall_groups() -> dict[str, tuple[str, ...]]:
    """Every group `systemd-analyze syscall-filter` knows: its calls and nested @groups."""
    listing = subprocess.run(["systemd-analyze", "syscall-filter"], check=True,
                             capture_output=True, text=True, timeout=60).stdout
    groups: dict[str, list[str]] = {}
    members: list[str] | None = None
    for line in listing.splitlines():
        if line.startswith("@"):
            members = groups.setdefault(line.strip(), [])
        elif line.startswith(" ") and members is not None and not line.strip().startswith("#"):
            members.append(line.strip())
        elif not line.strip():
            members = None
    assert "@system-service" in groups and "setpriority" in groups["@resources"], listing
    return {name: tuple(calls) for name, calls in groups.items()}


def expand(name: str) -> list[str]:
    if not name.startswith("@"):
        return [name]
    return [call for member in syscall_groups()[name] for call in expand(member)]


def errno_value(name: str) -> int:
    return int(name) if name.isdigit() else getattr(errno, name)


def syscall_filter(settings: list[tuple[str, str]]) -> tuple[bool, dict[str, int]]:
    """SystemCallFilter= as systemd's config_parse_syscall_filter reads it: the first line
    decides allow list (starting from @default) or deny list (`~`); a later line of the other
    kind takes its calls out again; `name:ERRNO` in a `~` line fails that call with ERRNO.
    Returns (allow list?, {call: errno, -1 for the list's own action})."""
    allow_list: bool | None = None
    calls: dict[str, int] = {}
    for line in values(settings, "SystemCallFilter"):
        if not line:  # an empty assignment resets the list
            allow_list, calls = None, {}
            continue
        invert = line.startswith("~")
        if allow_list is None:
            allow_list = not invert
            calls = dict.fromkeys(expand("@default"), -1) if allow_list else {}
        for word in line.lstrip("~").split():
            name, _, error = word.partition(":")
            number = errno_value(error) if error else -1
            for call in expand(name):
                if invert != allow_list or (invert and number >= 0):
                    calls[call] = number
                else:
                    calls.pop(call, None)
    assert allow_list is not None, "the unit has no SystemCallFilter="
    return allow_list, calls


def nofile_limit(settings: list[tuple[str, str]]) -> list[int] | None:
    value = last(settings, "LimitNOFILE")
    if not value:
        return None
    soft, _, hard = value.partition(":")
    return [int(soft), int(hard or soft)]


def address_families(settings: list[tuple[str, str]]) -> list[int] | None:
    lines = values(settings, "RestrictAddressFamilies")
    if not lines:
        return None
    assert not any(line.startswith("~") for line in lines), "deny lists are not emulated"
    return sorted(int(socket.AddressFamily[name]) for line in lines for name in line.split())


def sandbox_spec(unit: str) -> dict:
    settings = service_settings(unit)
    allow_list, calls = syscall_filter(settings)
    error = last(settings, "SystemCallErrorNumber")
    assert last(settings, "NoNewPrivileges") == "yes", unit
    assert last(settings, "SystemCallArchitectures") == "native", unit
    return {"user": NOBODY, "nofile": nofile_limit(settings), "allow_list": allow_list,
            "syscalls": calls,
            "default_errno": None if error in ("", "kill") else errno_value(error),
            "memory_deny_write_execute": last(settings, "MemoryDenyWriteExecute") == "yes",
            "address_families": address_families(settings)}


# -- running a unit ---------------------------------------------------------------------------

def specifiers(text: str, state: Path, instance: str = "") -> str:
    """%S (the state directory root), %i (the instance), %% (a percent sign)."""
    known = {"S": str(state), "i": instance, "%": "%"}
    return re.sub(r"%(.)", lambda m: known[m.group(1)], text)


@pytest.fixture
def state_root() -> Iterator[Path]:
    """Plays /var/lib: a directory the unprivileged user may enter (pytest's tmp_path,
    under a root-only directory, is not)."""
    root = Path(tempfile.mkdtemp(prefix="broker-state-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def state_directories(settings: list[tuple[str, str]], state: Path) -> None:
    """StateDirectory=: created for the service's user, mode 700."""
    for name in " ".join(values(settings, "StateDirectory")).split():
        path = state / name
        path.mkdir(mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(path, NOBODY, NOBODY)


def unit_process(unit: str, prefix: Path, state: Path, env_file: dict[str, str],
                 instance: str = "", spec: dict | None = None
                 ) -> tuple[list[str], dict[str, str], Path]:
    """The command, environment and working directory systemd would run the unit's
    ExecStart= with, inside the unit's sandbox (or `spec`, a variation of it)."""
    settings = service_settings(unit)
    exec_start = last(settings, "ExecStart")
    assert f"{PREFIX}/bin/broker" in exec_start, f"{unit} does not run the recipe's broker"
    state_directories(settings, state)
    expand_here = partial(specifiers, state=state, instance=instance)
    command = shlex.split(expand_here(exec_start.replace(PREFIX, str(prefix))))
    env = {"PATH": SERVICE_PATH}
    for word in shlex.split(expand_here(" ".join(values(settings, "Environment")))):
        name, _, value = word.partition("=")
        env[name] = value
    env.update(env_file)
    cwd = Path(expand_here(last(settings, "WorkingDirectory", "/")))
    spec = spec or sandbox_spec(unit)
    return [SYSTEM_PYTHON, str(SANDBOX), json.dumps(spec), *command], env, cwd


STARTED: list[Server] = []  # killed after each test, failed or not


@pytest.fixture(autouse=True)
def no_server_left() -> Iterator[None]:
    yield
    while STARTED:
        STARTED.pop().kill()


class CommandServer(Server):
    """A broker started by a given command line, environment and working directory (a unit's
    ExecStart= in the unit's sandbox, or the installed broker as is)."""

    command: list[str]
    env: dict[str, str]
    cwd: Path

    def start(self, timeout: float = 30.0) -> CommandServer:
        self.proc = subprocess.Popen(self.command, cwd=self.cwd, env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        STARTED.append(self)
        ready = threading.Event()
        threading.Thread(target=self._drain_log, args=(self.proc, ready), daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"broker did not start in its unit's sandbox ({ended(self)}):"
                                   "\n" + self.log)
        return self


def start_unit(unit: str, prefix: Path, state: Path, env_file: dict[str, str],
               instance: str = "", spec: dict | None = None) -> CommandServer:
    srv = CommandServer(state)
    srv.command, srv.env, srv.cwd = unit_process(unit, prefix, state, env_file, instance, spec)
    srv.admin_token = env_file["BROKER_ADMIN_TOKEN"]
    return srv.start()


def ended(srv: Server) -> str:
    """How the process ended, for a failure message."""
    assert srv.proc is not None
    code = srv.proc.poll()
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name} (shell status {128 - code})"
    return f"exit status {code}"


def thread_nice_values(pid: int) -> list[int]:
    """The nice value of each of the process's threads (field 19 of /proc/PID/task/TID/stat)."""
    found = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        found.append(int(stat.read_text().rsplit(")", 1)[1].split()[16]))
    return found


def exercise(srv: Server) -> None:
    """What a front end does first: create a user (an Argon2 hash), log in (another), open a
    stream, insert an event and receive it on the stream."""
    try:
        resp = srv.create_user("unit_user", tenant="unit_tenant")
        assert resp.status == 200, resp.body
        auth = bearer(srv.login("unit_user"))
        stream = srv.sse(auth)
        assert stream.status == 200
        assert srv.insert(auth, "unit_event", {"sandboxed": True}).status == 200
        frame = stream.next()
        while frame.event is None:  # the stream's opening frames
            frame = stream.next()
    except (OSError, AssertionError) as exc:
        assert srv.proc is not None
        time.sleep(0.5)  # let a dying process finish dying
        pytest.fail(f"{exc!r}; broker: {ended(srv)}\n" + srv.log)
    assert (frame.event, frame.json()) == ("unit_event", {"sandboxed": True})
    stream.close()


def stop_cleanly(srv: Server) -> None:
    code = srv.stop(signal.SIGTERM)
    assert code == 0, f"broker: {ended(srv)} after SIGTERM\n" + srv.log


# -- the README's recipe ----------------------------------------------------------------------

def section(path: Path, heading: str) -> str:
    text = path.read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end >= 0 else None]


def install_commands(path: Path, heading: str, block: int = 0) -> list[str]:
    """The lines that mention /opt/broker in one of the section's sh code blocks."""
    blocks = re.findall(r"```sh\n(.*?)```", section(path, heading), re.DOTALL)
    assert len(blocks) > block, f"no sh code block {block} under {heading!r} in {path.name}"
    return [line for line in blocks[block].splitlines() if PREFIX in line]


def run_as_written(commands: list[str], prefix: Path) -> None:
    """Each command as a root shell runs it (sudo dropped: the tests are root or the prefix is
    theirs), with the scratch prefix for /opt/broker, from the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = SUDO_PATH
    for command in commands:
        line = re.sub(r"\bsudo\s+", "", command.replace(PREFIX, str(prefix)))
        done = subprocess.run(line, shell=True, cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300, check=False)
        assert done.returncode == 0, f"{command!r} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def installed(sandbox_tools) -> Iterator[Path]:
    """broker installed by the README's recipe, into a scratch directory for /opt/broker."""
    prefix = Path(tempfile.mkdtemp(prefix="broker-opt-"))
    prefix.chmod(0o755)
    try:
        commands = install_commands(ROOT / "README.md", "## Running in production")
        assert len(commands) >= 2, commands
        run_as_written(commands, prefix)
        yield prefix
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


def test_the_readme_recipe_installs_a_broker_that_serves(installed: Path, state_root: Path):
    [site] = installed.glob("lib/python3*/site-packages")
    for module in ("broker.py", "store.py", "tools.py"):  # this checkout's, not PyPI's
        assert (site / module).read_bytes() == (ROOT / module).read_bytes(), module
    srv = CommandServer(state_root)
    srv.command = [str(installed / "bin" / "broker"), "--db", str(state_root / "b.db")]
    srv.env = {"PATH": SERVICE_PATH, **ENV_FILE}
    srv.cwd = state_root
    srv.start()
    resp = srv.get("/")
    assert (resp.status, resp.body) == (200, b'{"status":"ok"}')
    stop_cleanly(srv)


def test_the_readme_upgrade_replaces_the_installed_broker(installed: Path):
    [site] = installed.glob("lib/python3*/site-packages")
    (site / "broker.py").write_text("raise SystemExit('the old broker')\n")
    commands = install_commands(ROOT / "README.md", "## Running in production", block=1)
    assert any("pip install" in line for line in commands), commands
    run_as_written(commands, installed)
    assert (site / "broker.py").read_bytes() == (ROOT / "broker.py").read_bytes()


def test_every_unit_runs_and_documents_the_recipes_install(installed: Path):
    for unit in ("broker.service", "broker@.service", "broker-backup.service"):
        text = (ROOT / unit).read_text()
        assert "pypi.org" not in text, unit
        [doc] = re.findall(r"^Documentation=file:(\S+)$", text, re.MULTILINE)
        assert doc.startswith(PREFIX + "/"), unit
        assert Path(doc.replace(PREFIX, str(installed))).is_file(), f"{unit}: {doc}"
        settings = service_settings(unit)
        assert f"{PREFIX}/bin/broker" in last(settings, "ExecStart"), unit


# -- each unit's sandbox ----------------------------------------------------------------------

def test_broker_service_serves_and_stops_cleanly_in_its_sandbox(installed, state_root):
    srv = start_unit("broker.service", installed, state_root, ENV_FILE)
    assert srv.get("/").status == 200
    exercise(srv)
    # The Argon2 thread niced itself: the unit lets broker lower its own priority.
    assert 10 in thread_nice_values(srv.proc.pid), srv.log  # type: ignore[union-attr]
    assert "open files" in srv.log  # raise_open_file_limit ran, and was answered
    stop_cleanly(srv)
    assert (state_root / "broker" / "broker.db").is_file()


def test_broker_template_serves_postgres_in_its_sandbox(installed, state_root, postgres):
    # The template's database is PostgreSQL: docs/scaling.md adds the extra to the install.
    commands = [line for line in install_commands(ROOT / "docs" / "scaling.md",
                                                  "## Running on PostgreSQL")
                if "[postgres]" in line]
    assert commands, "docs/scaling.md does not install the postgres extra into /opt/broker"
    run_as_written(commands, installed)
    env_file = {**ENV_FILE, "BROKER_DB": postgres.new_database()}
    srv = start_unit("broker@.service", installed, state_root, env_file, instance="1")
    exercise(srv)
    assert 10 in thread_nice_values(srv.proc.pid), srv.log  # type: ignore[union-attr]
    stop_cleanly(srv)


def test_backup_unit_copies_the_live_database_in_its_sandbox(installed, state_root):
    srv = start_unit("broker.service", installed, state_root, ENV_FILE)
    exercise(srv)
    command, env, cwd = unit_process("broker-backup.service", installed, state_root, {})
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, (done.returncode, done.stderr)
    [copy] = (state_root / "broker-backup").glob("broker-*.db")
    assert copy.stat().st_uid == (NOBODY if os.geteuid() == 0 else os.geteuid())
    conn = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
    try:
        assert conn.execute("SELECT event, data FROM events").fetchall() == [
            ("unit_event", '{"sandboxed":true}')]
        assert conn.execute("SELECT username FROM users").fetchall() == [("unit_user",)]
    finally:
        conn.close()
    stop_cleanly(srv)


def test_the_sandbox_is_the_units():
    """The emulation denies what broker.service denies, the way it denies it (a check that
    the sandbox of the tests above is not a no-op)."""
    probe = """if True:
        import ctypes, errno, mmap, os, socket
        def refused(call, *args):
            try:
                call(*args)
            except OSError as exc:
                return exc.errno
        print(os.getuid(), open("/proc/self/status").read().split("NoNewPrivs:")[1].split()[0])
        print(refused(mmap.mmap, -1, 4096, mmap.MAP_PRIVATE,
                      mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC))
        page = mmap.mmap(-1, 4096, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect(ctypes.c_void_p(ctypes.addressof(ctypes.c_char.from_buffer(page))),
                      4096, mmap.PROT_READ | mmap.PROT_EXEC)
        print(ctypes.get_errno())
        print(refused(socket.socket, socket.AF_NETLINK, socket.SOCK_RAW))
        print(refused(os.sched_setaffinity, 0, {0}))
        print(refused(os.setpriority, os.PRIO_PROCESS, 0, 10))
        print(ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 7)())
    """
    spec = sandbox_spec("broker.service")
    done = subprocess.run([SYSTEM_PYTHON, str(SANDBOX), json.dumps(spec), SYSTEM_PYTHON, "-c",
                           probe], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    user = NOBODY if os.geteuid() == 0 else os.geteuid()
    assert done.stdout.split() == [
        str(user), "1",                    # unprivileged, no_new_privs
        str(errno.EPERM),                  # MemoryDenyWriteExecute=: no W+X memory,
        str(errno.EPERM),                  # nor memory made executable later
        str(errno.EAFNOSUPPORT),           # RestrictAddressFamilies=: no netlink
        str(errno.EPERM),                  # @resources denied, with SystemCallErrorNumber=
        "None",                            # setpriority allowed again
        "7"], done.stdout                  # libffi closures (ctypes) work without W+X


def test_broker_survives_a_sandbox_that_refuses_its_nice_and_file_limit(installed, state_root):
    """Both are best effort: refused with EPERM, broker serves with what it has."""
    spec = sandbox_spec("broker.service")
    spec["syscalls"].pop("setpriority", None)
    spec["syscalls"].pop("prlimit64")
    spec["refuse_new_limits"] = True
    spec["default_errno"] = errno.EPERM
    spec["nofile"] = [1024, spec["nofile"][1]]  # systemd's default soft limit
    srv = start_unit("broker.service", installed, state_root, ENV_FILE, spec=spec)
    exercise(srv)
    assert set(thread_nice_values(srv.proc.pid)) == {0}  # type: ignore[union-attr]
    assert "only 1024 open files allowed" in srv.log
    stop_cleanly(srv)


def test_the_readme_shows_the_backup_units_as_they_are():
    """Every line of the README's abridged backup units is a line of the unit files."""
    block = re.search(r"```ini\n(# broker-backup.timer\n.*?)```", section(
        ROOT / "README.md", "## Backups"), re.DOTALL)
    assert block, "the README's Backups section shows no broker-backup units"
    unit = ""
    for line in block.group(1).splitlines():
        if line.startswith("# "):
            unit = line.split()[1]
        elif line.strip():
            assert line in (ROOT / unit).read_text().splitlines(), (unit, line)


def verify(unit_dir: Path, quiet_about: str, *names: str) -> None:
    """systemd-analyze verify passes, with no warning that names `quiet_about`."""
    result = subprocess.run(["systemd-analyze", "verify", *(str(unit_dir / n) for n in names)],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert quiet_about not in result.stderr, result.stderr


def copy_unit(unit: str, tmp_path: Path) -> str:
    """The unit, its ExecStart= pointed at this environment's broker script (verify checks
    that the program exists)."""
    script = Path(sys.executable).parent / "broker"
    assert script.exists(), "the broker console script is not installed in this environment"
    text = (ROOT / unit).read_text()
    (tmp_path / unit).write_text(text.replace(f"{PREFIX}/bin/broker", str(script)))
    return text


def test_systemd_unit_verifies(tmp_path: Path):
    unit = copy_unit("broker.service", tmp_path)
    assert "DynamicUser=yes" in unit and "StateDirectory=broker" in unit
    assert "EnvironmentFile=" in unit and "Restart=on-failure" in unit
    verify(tmp_path, "broker.service", "broker.service")


def test_backup_units_verify(tmp_path: Path):
    service = copy_unit("broker-backup.service", tmp_path)
    assert "User=broker" in service and "broker backup" in service
    (tmp_path / "broker-backup.timer").write_text((ROOT / "broker-backup.timer").read_text())
    verify(tmp_path, "broker-backup", "broker-backup.timer", "broker-backup.service")


def test_systemd_template_for_several_processes_verifies(tmp_path: Path):
    unit = copy_unit("broker@.service", tmp_path)
    assert "Environment=BROKER_REUSE_PORT=1" in unit and "StateDirectory" not in unit
    for name in ("broker@.service", "broker@1.service", "broker@3.service"):
        verify(tmp_path, "broker@", name)
