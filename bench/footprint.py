"""broker's footprint on a small machine (issue 10): startup time and memory, logins/s, and a
soak that looks for leaks. Writes docs/bench/footprint.md and footprint.json.

    python bench/footprint.py                       # everything (about 4 minutes)
    python bench/footprint.py --only startup,logins # a part
    python bench/footprint.py --soak-connects 5000 --soak-logins 500   # a short soak

- startup: broker as its console script starts it, from its modules installed with their
  compiled bytecode as `pip install .` leaves them, on a fresh database file, `--runs` times;
  the time from process start to the first `200` on `GET /`, and its RSS right then.
- layers: what that RSS is made of. A fresh interpreter imports, one layer at a time, what
  broker stands on (asyncio, sqlite3, h11, PyJWT) and then broker itself; its RSS after each.
- logins: `POST /login` as fast as the server answers, 8 clients for `--login-seconds`, with
  the default Argon2 parameters and, as the peer in the same run, the previous defaults
  (argon2-cffi's: m=65536 KiB, t=3, p=4).
- soak: one broker process; its RSS after a warm-up, after `--soak-connects` streams that each
  read a sync of 10 events and hang up (16 at a time), and after `--soak-logins` logins.
  Leak-free means back within 5 MB of where it started.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import loadgen
from loadgen import HttpClient, PublishPlan
from run import ROOT, machine, run_process
from servers import BROKER_LOOPS, HOST, Broker, free_port, proc_rss_kib

CONSOLE_SCRIPT = "import sys; sys.argv[0] = 'broker'; from broker import main; sys.exit(main())"
OLD_ARGON2 = ["--argon2_memory_kib", "65536", "--argon2_time_cost", "3",
              "--argon2_parallelism", "4"]


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


# -- startup ------------------------------------------------------------------------------------
def answers(port: int) -> bool:
    """One `GET /`; True on a 200."""
    import socket
    try:
        with socket.create_connection((HOST, port), timeout=1) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def install_modules(target: Path) -> Path:
    """broker's modules with their bytecode, as `pip install .` leaves them: a start then reads
    the .pyc files instead of compiling the sources, whatever PYTHONDONTWRITEBYTECODE says."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for module in pyproject["tool"]["setuptools"]["py-modules"]:
        shutil.copy2(ROOT / f"{module}.py", target)
    if not compileall.compile_dir(target, quiet=1):
        raise RuntimeError("broker's modules did not compile")
    return target


def startup_once(workdir: Path, loop: str) -> tuple[float, int]:
    """Seconds from process start to the first 200, and the RSS (KiB) at that moment. workdir
    holds the installed modules (install_modules)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    # What the `broker` console script runs; uvloop as broker picks it when it is installed,
    # asyncio forced.
    launch = ["-c", CONSOLE_SCRIPT if loop == "uvloop" else BROKER_LOOPS["asyncio"]]
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *launch, "--host", HOST, "--port", str(port),
                             "--db", str(workdir / f"{port}.db"), "--admin_token", "x" * 20,
                             "--log_level", "warning"], cwd=workdir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not answers(port):
            if proc.poll() is not None or time.perf_counter() - started > 20:
                proc.kill()
                raise RuntimeError(f"broker did not start: {proc.communicate()[1][-2000:]}")
            time.sleep(0.002)
        return time.perf_counter() - started, proc_rss_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)


def startup(runs: int) -> dict:
    result = {}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        installed = install_modules(Path(tmp))
        for loop in ("uvloop", "asyncio"):
            startup_once(installed, loop)  # warm the page cache
            samples = [startup_once(installed, loop) for _ in range(runs)]
            seconds = [s for s, _ in samples]
            rss = [r for _, r in samples]
            result[loop] = {"runs": runs, "ready_ms_median": round(statistics.median(seconds) * 1000),
                            "ready_ms_max": round(max(seconds) * 1000),
                            "rss_mib_median": round(statistics.median(rss) / 1024, 1),
                            "rss_mib_max": round(max(rss) / 1024, 1)}
            log(f"startup on {loop}: {result[loop]}")
    return result


# -- layers ------------------------------------------------------------------------------------
# Each layer imports what the ones before it did not; broker's own modules come last. The
# interpreter alone is the first row. asyncio imports ssl (so OpenSSL) whether or not TLS is
# used; PyJWT's package imports its key-set client, which imports urllib.request.
LAYERS = [("asyncio (with ssl and OpenSSL)", "asyncio"), ("sqlite3", "sqlite3"),
          ("h11", "h11"), ("hashlib and hmac (OpenSSL's digests)", "hmac"),
          ("urllib.request (for PyJWT's key-set client)", "urllib.request"),
          ("PyJWT", "jwt"), ("broker and store, and the rest of the stdlib they use", "broker")]
LAYERS_SCRIPT = """
import sys
def rss():
    with open('/proc/self/status') as status:
        return next(int(line.split()[1]) for line in status if line.startswith('VmRSS'))
sizes = [rss()]
for module in sys.argv[1:]:
    __import__(module)
    sizes.append(rss())
print(sizes)  # a list of ints is JSON; json itself is not imported before the last reading
"""


def layers(runs: int) -> dict:
    """RSS (MiB, median of `runs` fresh interpreters) after each layer of imports."""
    with tempfile.TemporaryDirectory(prefix="bench-layers-") as tmp:
        installed = install_modules(Path(tmp))
        samples = [json.loads(subprocess.run(
            [sys.executable, "-c", LAYERS_SCRIPT, *(module for _, module in LAYERS)],
            cwd=installed, check=True, capture_output=True, text=True).stdout)
            for _ in range(runs)]
    names = ["the interpreter, nothing imported"] + [name for name, _ in LAYERS]
    result = {name: round(statistics.median(run[i] for run in samples) / 1024, 1)
              for i, name in enumerate(names)}
    log(f"layers: {result}")
    return {"runs": runs, "rss_mib_after": result}


# -- logins -------------------------------------------------------------------------------------
async def login_run(port: int, username: str, password: str, clients: int = 8,
                    seconds: float = 3600.0, total: int = 10**9) -> dict:
    """`clients` keep-alive connections logging in until `seconds` or `total` logins."""
    body = json.dumps({"username": username, "password": password}).encode()
    request = (f"POST /login HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json"
               f"\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    statuses: dict[int, int] = {}
    left = [total]
    deadline = time.monotonic() + seconds

    async def client() -> None:
        conn = HttpClient(HOST, port)
        while left[0] > 0 and time.monotonic() < deadline:
            left[0] -= 1
            status, _ = await conn.request(request)
            statuses[status] = statuses.get(status, 0) + 1
        conn.close()

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.monotonic() - started
    return {"logins_per_s": round(statuses.get(200, 0) / elapsed, 1), "statuses": statuses}


def logins(seconds: float) -> dict:
    result = {}
    for name, args in (("default (m=19456 KiB, t=2, p=1)", []),
                       ("previous (m=65536 KiB, t=3, p=4)", OLD_ARGON2)):
        server = Broker("broker", "uvloop", args).start()
        try:
            username, _ = server.new_user()
            server.post_json("/login", {"username": username, "password": server.password})
            cpu = server.cpu_seconds()
            row = asyncio.run(login_run(server.port, username, server.password, 8, seconds))
            row["server_cpu_ms_per_login"] = round(
                (server.cpu_seconds() - cpu) * 1000 / max(1, row["statuses"].get(200, 0)), 1)
            row["rss_mib_after"] = round(server.rss_kib() / 1024, 1)
        finally:
            server.stop()
        result[name] = row
        log(f"logins, {name}: {row}")
    return result


# -- soak ---------------------------------------------------------------------------------------
def soak(connects: int, login_count: int) -> dict:
    server = Broker("broker", "uvloop").start()
    try:
        channel = server.new_channel()
        run_process(loadgen.publisher_main, PublishPlan(channel, 10, 2, 0, 60, 48,
                                                        record_sends=False, distinct_events=True))
        username, _ = server.new_user()

        def storm(total: int) -> dict:
            return run_process(loadgen.storm_main, channel, total, 16, 10, 3600.0,
                               timeout=3600)

        def logins_done(total: int) -> dict:
            return asyncio.run(login_run(server.port, username, server.password, total=total))

        storm(1000)  # warm-up: every code path and pool has run once
        logins_done(50)
        time.sleep(1)
        rss = {"start": server.rss_kib()}
        log(f"soak: RSS at start {rss['start']} KiB; {connects} connects")
        streams = storm(connects)
        time.sleep(1)
        rss["after_connects"] = server.rss_kib()
        log(f"soak: {streams['completed']} completed, errors {streams['errors']}, RSS "
            f"{rss['after_connects']} KiB; {login_count} logins")
        done = logins_done(login_count)
        time.sleep(1)
        rss["after_logins"] = server.rss_kib()
        log(f"soak: logins {done}, RSS {rss['after_logins']} KiB")
        return {"connects": connects, "completed": streams["completed"],
                "connect_errors": streams["errors"],
                "connects_per_s": round(streams["connects_per_s"]),
                "logins": login_count, "login_statuses": done["statuses"],
                "logins_per_s": done["logins_per_s"],
                "rss_mib": {k: round(v / 1024, 1) for k, v in rss.items()},
                "growth_mib": round((rss["after_logins"] - rss["start"]) / 1024, 2)}
    finally:
        server.stop()


# -- report -------------------------------------------------------------------------------------
def markdown(results: dict) -> str:
    lines = ["# broker's footprint", "",
             (f"{results['cpu']} ({os.cpu_count()} cores, shared), Python "
              f"{sys.version.split()[0]}. Produced by `python bench/footprint.py` "
              "(bench/README.md); each part says when it ran."), ""]
    if "startup" in results:
        part = dict(results["startup"])
        lines += [f"## Startup: process start to the first 200 on `GET /` ({part.pop('ran')})",
                  "", "| loop | runs | median | max | RSS median | RSS max |",
                  "|---|---|---|---|---|---|"]
        for loop, row in part.items():
            lines.append(f"| {loop} | {row['runs']} | {row['ready_ms_median']} ms | "
                         f"{row['ready_ms_max']} ms | {row['rss_mib_median']} MiB | "
                         f"{row['rss_mib_max']} MiB |")
        lines.append("")
    if "layers" in results:
        part = results["layers"]
        lines += [f"## What the RSS at ready is made of ({part['ran']})", "",
                  (f"A fresh interpreter imports one layer at a time (median of {part['runs']} "
                   "runs); each row adds what the rows above did not import."), "",
                  "| after importing | RSS | added |", "|---|---|---|"]
        before = None
        for name, mib in part["rss_mib_after"].items():
            added = "" if before is None else f"+{mib - before:.1f} MiB"
            lines.append(f"| {name} | {mib} MiB | {added} |")
            before = mib
        lines.append("")
    if "logins" in results:
        part = dict(results["logins"])
        lines += [f"## Logins, 8 clients, one hashing thread ({part.pop('ran')})", "",
                  "| Argon2id parameters | logins/s | server CPU per login | RSS after |",
                  "|---|---|---|---|"]
        for name, row in part.items():
            lines.append(f"| {name} | {row['logins_per_s']} | {row['server_cpu_ms_per_login']} ms"
                         f" | {row['rss_mib_after']} MiB |")
        lines.append("")
    if "soak" in results:
        row = results["soak"]
        rss = row["rss_mib"]
        lines += [f"## Soak: streams opened and closed, then logins, one process ({row['ran']})",
                  "",
                  (f"{row['completed']:,} of {row['connects']:,} streams completed "
                   f"({row['connects_per_s']:,}/s, errors {row['connect_errors'] or 'none'}), "
                   f"then {row['logins']:,} logins ({row['login_statuses']}, "
                   f"{row.get('logins_per_s', '?')}/s)."), "",
                  "| RSS at start | after the streams | after the logins | growth |",
                  "|---|---|---|---|",
                  (f"| {rss['start']} MiB | {rss['after_connects']} MiB | "
                   f"{rss['after_logins']} MiB | {row['growth_mib']} MiB |"), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="startup,layers,logins,soak")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--login-seconds", type=float, default=10.0)
    parser.add_argument("--soak-connects", type=int, default=50_000)
    parser.add_argument("--soak-logins", type=int, default=5_000)
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench"))
    args = parser.parse_args()
    loadgen.raise_fd_limit()
    parts = args.only.split(",")
    out = Path(args.out)
    previous = out / "footprint.json"
    # Parts not run now are kept from the previous run (each part says when it ran).
    results: dict = json.loads(previous.read_text()) if previous.exists() else {}
    results.update({"cpu": machine()["cpu"], "args": " ".join(sys.argv[1:])})
    now = time.strftime("%Y-%m-%d %H:%M %Z")
    if "startup" in parts:
        results["startup"] = {"ran": now, **startup(args.runs)}
    if "layers" in parts:
        results["layers"] = {"ran": now, **layers(args.runs)}
    if "logins" in parts:
        results["logins"] = {"ran": now, **logins(args.login_seconds)}
    if "soak" in parts:
        results["soak"] = {"ran": now, **soak(args.soak_connects, args.soak_logins)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "footprint.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "footprint.md").write_text(markdown(results))
    log(f"wrote {out / 'footprint.md'}")


if __name__ == "__main__":
    main()
