"""Deploying under live dashboard traffic: a long reader holds the rollup while migrate runs.
Readers never queue longer than --lock-timeout; migrate retries, then says why it stopped; a
re-run with nothing to change takes no lock that a reader would wait for."""

import shutil
import threading
import time

import psycopg
import pytest

from conftest import SQL_DIR
from toolkit.catalog import load_catalog
from test_catalog_growth import NEW_METRIC, add_migration

LOCK_TIMEOUT = 0.5


@pytest.fixture
def roles_deployment(loaded_dsn, run_cli):
    assert run_cli("migrate", "--dsn", loaded_dsn, "--roles").exit_code == 0
    assert run_cli("backfill", "--from", "2026-03-30", "--to", "2026-03-31", "--quiet", "--dsn", loaded_dsn).exit_code == 0
    try:
        yield loaded_dsn
    finally:
        with psycopg.connect(loaded_dsn, autocommit=True) as conn:
            conn.execute("drop owned by statskit_reader, statskit_writer")
            conn.execute("drop role statskit_reader")
            conn.execute("drop role statskit_writer")


class LongReader:
    """A report that keeps the rollup open (ACCESS SHARE) in a transaction until closed."""

    def __init__(self, dsn):
        self.conn = psycopg.connect(dsn)
        self.conn.execute("select count(*) from user_statistics_daily")

    def close(self):
        self.conn.rollback()
        self.conn.close()


class Dashboard(threading.Thread):
    """Calls user_metric every 50 ms and records how long each call took."""

    def __init__(self, dsn):
        super().__init__(daemon=True)
        self.dsn, self.latencies, self.stop = dsn, [], threading.Event()

    def run(self):
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            user = conn.execute("select user_id from user_statistics_daily limit 1").fetchone()[0]
            while not self.stop.is_set():
                started = time.monotonic()
                conn.execute("select * from user_metric(%s, 'total_reviews', '2026-03-31')", [user]).fetchone()
                self.latencies.append(time.monotonic() - started)
                time.sleep(0.05)


def test_a_rerun_with_nothing_to_change_never_waits_for_a_reader(roles_deployment, run_cli):
    dsn = roles_deployment
    with psycopg.connect(dsn, autocommit=True) as conn:  # a function to re-create: access.sql is re-applied
        conn.execute("drop function user_kpis(uuid, date, text)")
    reader = LongReader(dsn)
    try:
        result = run_cli("migrate", "--dsn", dsn, "--lock-timeout", LOCK_TIMEOUT, "--retries", 0)
    finally:
        reader.close()
    assert result.exit_code == 0, result.output
    assert "created function public.user_kpis" in result.output
    assert "applied roles and grants (access.sql)" in result.output


def test_a_change_that_needs_the_table_waits_at_most_the_lock_timeout_then_says_why(roles_deployment, run_cli, tmp_path):
    dsn = roles_deployment
    sql = tmp_path / "sql"
    shutil.copytree(SQL_DIR, sql)
    add_migration(sql / "catalog.toml", "0002_payments_made", "Add payments_made")
    (sql / "catalog.toml").write_text((sql / "catalog.toml").read_text() + NEW_METRIC)

    reader, dashboard = LongReader(dsn), Dashboard(dsn)
    dashboard.start()
    try:
        time.sleep(0.3)
        started = time.monotonic()
        result = run_cli("migrate", "--dsn", dsn, "--sql-dir", sql, "--lock-timeout", LOCK_TIMEOUT, "--retries", 2)
        took = time.monotonic() - started
    finally:
        dashboard.stop.set()
        dashboard.join()
        reader.close()
    assert result.exit_code == 1
    assert result.output.startswith(
        f"statskit: error: migrate {psycopg.conninfo.conninfo_to_dict(dsn)['dbname']}: a lock was not granted within "
        f"--lock-timeout {LOCK_TIMEOUT:g} s, 3 attempts (lock_timeout: canceling statement due to lock timeout"), result.output
    assert "nothing changed" in result.output
    assert 3 * LOCK_TIMEOUT <= took < 3 * LOCK_TIMEOUT + 1 + 2 + 10  # three waits and two back-offs (1 s, 2 s)
    # The dashboard kept answering: a call queued behind migrate's lock request at most lock_timeout.
    assert len(dashboard.latencies) > 10 and max(dashboard.latencies) < LOCK_TIMEOUT + 0.4, max(dashboard.latencies)
    with psycopg.connect(dsn) as conn:
        columns = [r[0] for r in conn.execute(
            "select attname from pg_attribute where attrelid = 'user_statistics_daily'::regclass and attnum > 0")]
        applied = [r[0] for r in conn.execute("select migration_id from statskit._yoyo_migration")]
    assert "payments_made" not in columns and applied == ["0001_statistics_tables"]

    done = run_cli("migrate", "--dsn", dsn, "--sql-dir", sql, "--lock-timeout", LOCK_TIMEOUT)
    assert done.exit_code == 0 and "applied migration 0002_payments_made" in done.output, done.output


def test_a_deadlock_with_another_session_is_tried_again(loaded_dsn, run_cli):
    """An application's transaction that locks a source table migrate is about to change, then
    one migrate has changed: PostgreSQL breaks the cycle by rolling migrate's attempt back, and
    migrate, one transaction, tries it again once that transaction is gone."""
    tables = list(load_catalog(SQL_DIR / "catalog.toml").source_tables)
    application = psycopg.connect(loaded_dsn)
    application.execute("set deadlock_timeout = '60s'")  # migrate, waiting first, finds the cycle
    held = {}

    def migrate():
        held["result"] = run_cli("migrate", "--dsn", loaded_dsn, "--lock-timeout", 20, "--no-cron")

    try:
        application.execute("lock table caas_scores in share mode")  # blocks migrate's capture trigger on it
        runner = threading.Thread(target=migrate, daemon=True)
        runner.start()
        with psycopg.connect(loaded_dsn, autocommit=True) as watcher:
            for _ in range(600):
                taken = watcher.execute(
                    "select c.relname from pg_locks l join pg_class c on c.oid = l.relation"
                    " where l.pid = (select pid from pg_locks w where w.relation = 'caas_scores'::regclass and not w.granted"
                    " limit 1) and l.granted and l.mode = 'ShareRowExclusiveLock' and c.relname = any (%s)",
                    [tables]).fetchall()
                if taken:
                    break
                time.sleep(0.05)
        assert taken, "migrate never waited for caas_scores while holding another source table"
        application.execute(f"lock table {taken[0][0]} in share mode")  # waits for migrate: the cycle
        application.commit()
        runner.join(120)
    finally:
        application.close()
    result = held["result"]
    assert result.exit_code == 0, result.output
    assert "installed change capture (capture.sql)" in result.output, result.output
