"""A private PostgreSQL cluster with pg_cron preloaded, for `statskit demo` and the tests.

It uses the installed server binaries, lives in a directory of its own, listens on
127.0.0.1 at a port of its own, and never touches the system's clusters. PostgreSQL
refuses to run as root, so as root every server command runs as the `postgres` user.
"""

import glob
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import psycopg

from .errors import StatskitError

# Ports of statskit's own servers sit below Linux's ephemeral range (32768-60999), where no
# client socket can hold them: the demo's, the benchmarks' (30916-30918) and the tests' (30329, 31329-31334).
DEMO_PORT = 30915
CRON_DATABASE = "postgres"
SUPERUSER = "postgres"

_SERVER_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    # TCP only: the default socket directory (/var/run/postgresql) is not writable by every user.
    "unix_socket_directories": "''",
    "shared_preload_libraries": "'pg_cron'",
    # Jobs run in background workers, so pg_cron needs no password or socket to reach a database.
    "cron.use_background_workers": "on",
    "max_worker_processes": "16",
    "timezone": "'UTC'",
}
# Throwaway clusters (tests, benchmarks) trade crash safety for speed.
_FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def default_base_dir() -> Path:
    """Where private clusters live: the postgres user's home as root, else the user's cache."""
    if os.geteuid() == 0:
        return Path("/var/lib/postgresql/statskit")
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "statskit"


def find_bindir() -> Path:
    """Locate pg_ctl: $STATSKIT_PG_BINDIR, else the newest /usr/lib/postgresql/*/bin, else PATH."""
    candidates = []
    if os.environ.get("STATSKIT_PG_BINDIR"):
        candidates.append(Path(os.environ["STATSKIT_PG_BINDIR"]))
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).parent)
    for bindir in candidates:
        if (bindir / "pg_ctl").exists() and (bindir / "initdb").exists():
            return bindir
    raise StatskitError(
        "no PostgreSQL server binaries found: install postgresql-15 and postgresql-15-cron "
        "(apt-get install postgresql-15 postgresql-15-cron) or set STATSKIT_PG_BINDIR"
    )


def _version_key(path: str) -> int:
    try:
        return int(Path(path).parent.name)
    except ValueError:
        return 0


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class LocalCluster:
    """One private cluster: <base>/<name>/data, its log beside it."""

    def __init__(self, name: str, port: int, base_dir: Path | None = None, durable: bool = True,
                 with_cron: bool = True, cron_database: str = CRON_DATABASE):
        self.cron_database = cron_database
        self.root = (base_dir or default_base_dir()) / name
        self.datadir = self.root / "data"
        self.logfile = self.root / "server.log"
        self.port = port
        self.durable = durable
        self.with_cron = with_cron
        self._bindir = None

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = find_bindir()
        return self._bindir

    def dsn(self, dbname: str = CRON_DATABASE) -> str:
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={dbname}"

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess:
        command = [str(self.bindir / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, cwd="/")

    def _check(self, result: subprocess.CompletedProcess, what: str) -> None:
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise StatskitError(f"{what} failed: {detail[-1] if detail else 'no output'} (log: {self.logfile})")

    def initialised(self) -> bool:
        return (self.datadir / "PG_VERSION").exists()

    def running(self) -> bool:
        return self.initialised() and self._run("pg_ctl", "status", "-D", str(self.datadir)).returncode == 0

    def init(self) -> None:
        """Create the data directory (first time only) with pg_cron preloaded."""
        if self.initialised():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(self.root.parent, "postgres", "postgres")
        result = self._run(
            "initdb", "-D", str(self.datadir), "--username", SUPERUSER, "--auth", "trust",
            "--encoding", "UTF8", "--locale", "C.UTF-8",
        )
        self._check(result, "initdb")
        settings = dict(_SERVER_SETTINGS, port=str(self.port), **{"cron.database_name": f"'{self.cron_database}'"})
        if not self.with_cron:
            settings = {k: v for k, v in settings.items() if k != "shared_preload_libraries" and not k.startswith("cron.")}
        if not self.durable:
            settings.update(_FAST_SETTINGS)
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write("\n# statskit private cluster\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def start(self) -> None:
        """Start the server (initialising it first) and create pg_cron in the cron database."""
        self.init()
        if not self.running():
            if port_in_use(self.port):
                raise StatskitError(f"port {self.port} is taken by another server; choose another with --port")
            # the port given, whatever the one a cluster made by an older release wrote in its postgresql.conf
            result = self._run("pg_ctl", "start", "-D", str(self.datadir), "-l", str(self.logfile), "-w", "-t", "60",
                               "-o", f"-p {self.port}")
            self._check(result, "starting PostgreSQL")
        self._wait_ready()
        if self.with_cron:
            with psycopg.connect(self.dsn(), autocommit=True) as conn:
                if not conn.execute("select 1 from pg_database where datname = %s", [self.cron_database]).fetchone():
                    conn.execute(f'create database "{self.cron_database}"')
            with psycopg.connect(self.dsn(self.cron_database), autocommit=True) as conn:
                conn.execute("create extension if not exists pg_cron")

    def _wait_ready(self, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                psycopg.connect(self.dsn(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise StatskitError(f"PostgreSQL on port {self.port} did not accept connections (log: {self.logfile})")
                time.sleep(0.2)

    def stop(self) -> None:
        if self.running():
            self._check(self._run("pg_ctl", "stop", "-D", str(self.datadir), "-m", "fast", "-w"), "stopping PostgreSQL")

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
