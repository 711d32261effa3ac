"""Files that hold password hashes and the JWT secret are private (issue 17): under umask 022
the SQLite database and its -wal/-shm are created 0600, and so are a `broker backup` copy
and a `broker migrate` SQLite target; a copy is never less strict than its source. Each
process is started with the umask (Popen's umask), not the test run."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, Server
from stream_support import unique
from test_resume import insert

UMASK = 0o022


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def broker(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    return subprocess.run([sys.executable, "-m", "broker", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False,
                          umask=UMASK)


def test_the_database_its_wal_and_shm_are_created_private(tmp_path):
    server = Server(tmp_path, umask=UMASK).start()
    try:
        insert(server, server.user(unique("writer"), tenant=unique("private")), "e", 1)
        files = [server.db, Path(f"{server.db}-wal"), Path(f"{server.db}-shm")]
        assert {path.name: mode(path) for path in files} == \
            {path.name: 0o600 for path in files}
        # A file made public by its owner stays as it is: the server does not change modes.
        server.stop()
        server.db.chmod(0o640)
        server.start()
        assert mode(server.db) == 0o640
    finally:
        server.kill()


def test_backup_and_migrate_copies_are_never_less_strict_than_their_source(tmp_path):
    server = Server(tmp_path, umask=UMASK).start()
    try:
        insert(server, server.user(unique("writer"), tenant=unique("copied")), "e", 1)
        for source_mode, copy_mode in ((0o600, 0o600), (0o644, 0o600), (0o400, 0o400)):
            server.db.chmod(source_mode)
            copy = tmp_path / f"backup-{source_mode:o}.db"
            result = broker("backup", str(copy), "--db", str(server.db))
            assert result.returncode == 0, result.stderr
            assert mode(copy) == copy_mode, (oct(source_mode), oct(mode(copy)))
        server.db.chmod(0o600)
    finally:
        server.kill()
    source = tmp_path / "backup-644.db"
    source.chmod(0o644)
    target = tmp_path / "migrated.db"
    result = broker("migrate", str(source), str(target))
    assert result.returncode == 0, result.stderr
    assert mode(target) == 0o600
    assert not Path(f"{target}-wal").exists()
