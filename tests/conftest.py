"""Fixtures: one private PostgreSQL 15 cluster with pg_cron for the session (the same code that
serves `statskit demo`), and a fresh database per test with the reference source tables,
made by pytest-postgresql from a template."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner, Result
from pytest_postgresql import factories

from toolkit.reference import marketplace
from toolkit.cli import cli
from toolkit.cluster import CRON_DATABASE, LocalCluster
from toolkit.migrate import Target, migrate

REPO = Path(__file__).resolve().parent.parent
SQL_DIR = REPO / "sql"
TEST_PORT = int(os.environ.get("STATSKIT_TEST_PORT", "30329"))
# Servers some tests start mid-session, after thousands of client connections, listen below
# Linux's ephemeral range (32768-60999): a client socket that just used their port would hold
# it in TIME_WAIT for 60 s and the server could not bind it.
SIDE_PORT = 31000 + TEST_PORT % 1000

cluster = LocalCluster(f"test-cluster-{TEST_PORT}", TEST_PORT, durable=False)
# Tests that need the session's server, by the fixtures that reach it; tests that start servers
# of their own carry the `pg` marker themselves. `pytest -m "not pg"` runs the rest in seconds.
SHARED_SERVER_FIXTURES = {"source_db", "empty_dsn"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SHARED_SERVER_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.pg)


_started = []


def pytest_runtest_setup(item):
    """Start the session's server before the first test that needs PostgreSQL, not before any."""
    if item.get_closest_marker("pg") and not _started:
        cluster.destroy()  # a cluster left by a killed run would carry its databases and jobs
        cluster.start()
        _started.append(True)


def pytest_sessionfinish(session, exitstatus):
    if _started:
        cluster.destroy()


pg_server = factories.postgresql_noproc(
    host="127.0.0.1", port=TEST_PORT, user="postgres", dbname="statskit_test",
    load=[REPO / "toolkit" / "reference" / "schema.sql"],
)
source_db = factories.postgresql("pg_server")


def cron_connection() -> psycopg.Connection:
    return psycopg.connect(cluster.dsn(CRON_DATABASE), autocommit=True)


@pytest.fixture
def dsn(source_db):
    """DSN of this test's database (reference source tables, no data); its cron jobs go at teardown."""
    dbname = source_db.info.dbname
    try:
        yield cluster.dsn(dbname)
    finally:
        with cron_connection() as conn:
            conn.execute("select cron.unschedule(jobid) from cron.job where database = %s", [dbname])


@pytest.fixture
def empty_dsn():
    """A database with nothing in it (no source tables); its cron jobs and itself go at teardown."""
    name = "statskit_empty_test"
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute(f"drop database if exists {name} with (force)")
        admin.execute(f"create database {name}")
    try:
        yield cluster.dsn(name)
    finally:
        with cron_connection() as conn:
            conn.execute("select cron.unschedule(jobid) from cron.job where database = %s", [name])
        with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
            admin.execute(f"drop database if exists {name} with (force)")


@pytest.fixture(scope="session")
def market():
    return marketplace.generate(users=160, days=60, seed=7)


@pytest.fixture
def loaded_dsn(dsn, market):
    with psycopg.connect(dsn) as conn:
        marketplace.load(conn, market)
    return dsn


def deploy(dsn, sql_dir=SQL_DIR, **overrides):
    """Run the core migrate with the repository's sql/ (or another) and return what it applied."""
    with Target.open(dsn, sql_dir, overrides) as target:
        return migrate(target)


@pytest.fixture
def migrated_dsn(loaded_dsn):
    deploy(loaded_dsn)
    return loaded_dsn


class CliResult(Result):
    """A CLI result whose repr carries the command's output, so that a bare
    `assert run_cli(...).exit_code == 0` that fails shows why."""

    def __repr__(self):
        return f"<exit {self.exit_code}: {self.output[-2000:]!r}>"


def invoke_cli(runner: CliRunner, *args) -> CliResult:
    result = runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
    result.__class__ = CliResult
    return result


@pytest.fixture
def run_cli():
    runner = CliRunner()
    return lambda *args: invoke_cli(runner, *args)


def extract_release(revision: str, folder: Path) -> Path:
    """A previous release's toolkit/ and sql/, from git, in `folder`, runnable beside this one;
    the test is skipped in a clone without that commit (a shallow one)."""
    if subprocess.run(["git", "-C", REPO, "cat-file", "-e", f"{revision}^{{commit}}"], capture_output=True).returncode:
        pytest.skip(f"this clone lacks commit {revision} (a shallow clone): no previous release to upgrade from")
    archive = folder / "release.tar"
    subprocess.run(["git", "-C", REPO, "archive", "-o", archive, revision, "toolkit", "sql"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder)
    return folder


def run_previous(release: Path, *args, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The previous release's CLI, as its users ran it (with only `env` beside PATH)."""
    code = f"import sys; sys.path.insert(0, {str(release)!r}); from toolkit.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=release, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", **(env or {})})


def npm_install(folder: Path) -> None:
    """Install a folder's pinned npm tools once. `npm install --no-save`, not `npm ci`: the lock
    npm writes keeps only this platform's optional packages (squawk ships one per platform),
    and `npm ci` refuses such a lock."""
    if (folder / "node_modules" / ".package-lock.json").exists():
        return
    result = subprocess.run(["npm", "install", "--no-save", "--no-audit", "--no-fund"], cwd=folder,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"npm install in {folder}:\n{result.stderr[-3000:]}"
