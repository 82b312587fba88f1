"""As on managed PostgreSQL (Supabase, RDS, Cloud SQL): a database owner with CREATEROLE and
the pg_cron grants of docs/managed.md, not superuser, deploys, backfills, verifies and rolls
back; a failure at any step leaves the database as it was; a restore without owners and
privileges fails verify by name and migrate repairs it.

A server of its own: pg_cron lives in `market` (as on Supabase, in the application's database);
`app` is a second database whose jobs are created from `market`."""

import re
import shutil
import subprocess
import time

import psycopg
import pytest

from conftest import SIDE_PORT, SQL_DIR
from test_migrate import objects
from toolkit.reference import marketplace
from toolkit.cluster import LocalCluster

pytestmark = pytest.mark.pg  # a server of its own

CRON_DB = "market"
OWNER = "deployer"
WINDOW = ["--from", "2026-03-28", "--to", "2026-03-31"]

# What a managed service grants the deploying role in pg_cron's database (docs/managed.md).
CRON_GRANTS = """
grant usage on schema cron to deployer;
grant execute on function cron.schedule_in_database(text, text, text, text, text, boolean) to deployer;
grant execute on function cron.alter_job(bigint, text, text, text, text, boolean) to deployer;
"""


@pytest.fixture(scope="module")
def server():
    cluster = LocalCluster(f"managed-{SIDE_PORT}", SIDE_PORT, durable=False, cron_database=CRON_DB)
    cluster.destroy()
    cluster.start()
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(f"create role {OWNER} login createrole")
        conn.execute(f"alter database {CRON_DB} owner to {OWNER}")
    with psycopg.connect(cluster.dsn(CRON_DB), autocommit=True) as conn:
        conn.execute(CRON_GRANTS)
    try:
        yield cluster
    finally:
        cluster.destroy()


def as_owner(cluster, dbname):
    return cluster.dsn(dbname).replace("user=postgres", f"user={OWNER}")


@pytest.fixture
def app_db(server, market, request):
    """A fresh database owned by the deployer, with the application's tables (theirs) and data."""
    name = request.param
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        if name != CRON_DB:
            conn.execute(f"drop database if exists {name}")
            conn.execute(f"create database {name} owner {OWNER}")
    with psycopg.connect(as_owner(server, name), autocommit=True) as conn:
        conn.execute("drop table if exists " + ", ".join(marketplace.TABLE_COLUMNS) + " cascade")
        marketplace.create_source_tables(conn)
        marketplace.load(conn, market)
    try:
        yield name
    finally:
        with psycopg.connect(server.dsn(CRON_DB), autocommit=True) as conn:
            conn.execute("select cron.unschedule(jobid) from cron.job where database = %s", [name])
        with psycopg.connect(server.dsn(name), autocommit=True) as conn:
            conn.execute("drop schema if exists statskit cascade")
            conn.execute("drop table if exists user_statistics_daily, platform_statistics_daily")


def cron_args(server, dbname):
    # The owner cannot read cron.database_name (superuser or pg_read_all_settings only): where
    # pg_cron lives in another database, it is named, once, by its name.
    return [] if dbname == CRON_DB else ["--cron-dsn", CRON_DB]


def jobs(server, dbname):
    with psycopg.connect(server.dsn(CRON_DB)) as conn:
        return conn.execute("select jobname, username, schedule from cron.job where database = %s order by 1",
                            [dbname]).fetchall()


def run_registered_jobs_under_pg_cron(server, dbname):
    """Let pg_cron run the registered jobs once, as their own user, by moving them to every minute."""
    with psycopg.connect(server.dsn(CRON_DB), autocommit=True) as conn:
        ids = [r[0] for r in conn.execute("select jobid from cron.job where database = %s", [dbname])]
        started = conn.execute("select now()").fetchone()[0]
        for jobid in ids:
            conn.execute("select cron.alter_job(%s, schedule => '* * * * *')", [jobid])
        try:
            deadline = time.monotonic() + 75
            while time.monotonic() < deadline:
                done = conn.execute(
                    "select distinct on (jobid) username, status, return_message from cron.job_run_details"
                    " where jobid = any(%s) and start_time >= %s and status in ('succeeded', 'failed')"
                    " order by jobid, runid", [ids, started]).fetchall()
                if len(done) == len(ids):
                    return done
                time.sleep(1)
            return done
        finally:
            for jobid, schedule in zip(ids, ["0 0 * * *", "0 1 * * *"]):
                conn.execute("select cron.alter_job(%s, schedule => %s)", [jobid, schedule])


@pytest.mark.parametrize("app_db", [CRON_DB, "app"], indirect=True)
def test_the_whole_life_cycle_as_a_database_owner(server, app_db, run_cli):
    dsn = as_owner(server, app_db)
    before = objects(dsn)
    with psycopg.connect(dsn) as conn:
        assert not conn.execute("select rolsuper from pg_roles where rolname = current_user").fetchone()[0]

    if app_db != CRON_DB:
        refused = run_cli("migrate", "--dsn", dsn, "--roles")
        assert refused.exit_code == 1 and "--cron-dsn" in refused.output and "pg_read_all_settings" in refused.output
        assert objects(dsn) == before

    # pg_cron's database named once, by name alone (the target's server and login): migrate records it
    deployed = run_cli("migrate", "--dsn", dsn, "--roles", *cron_args(server, app_db))
    assert deployed.exit_code == 0, deployed.output
    assert "scheduled pg_cron job aggregate-user-statistics" in deployed.output
    # not a superuser: the jobs are the owner's own (pg_cron 1.4 refuses any other username)
    assert jobs(server, app_db) == [("aggregate-platform-statistics", OWNER, "0 0 * * *"),
                                    ("aggregate-user-statistics", OWNER, "0 1 * * *"),
                                    ("statistics-partitions", OWNER, "30 23 * * *")]
    again = run_cli("migrate", "--dsn", dsn)
    assert again.exit_code == 0 and "up to date, nothing to do" in again.output, again.output
    status = run_cli("migrate", "--status", "--dsn", dsn)
    assert status.exit_code == 0 and "aggregate-user-statistics" in status.output, status.output

    assert run_cli("backfill", *WINDOW, "--quiet", "--dsn", dsn).exit_code == 0
    verified = run_cli("verify", "--dsn", dsn, *WINDOW)
    assert verified.exit_code == 0, verified.output
    assert "not visible" not in verified.output and "  fail  " not in verified.output
    assert re.search(r"cron runs-as aggregate-user-statistics +pass  deployer can run it", verified.output)

    if app_db == CRON_DB:  # once: pg_cron starts jobs on the minute
        runs = run_registered_jobs_under_pg_cron(server, app_db)
        assert [(user, status) for user, status, _ in runs] == [(OWNER, "succeeded")] * 3, runs

    rolled = run_cli("rollback", "--dsn", dsn)
    assert rolled.exit_code == 0, rolled.output
    assert objects(dsn) == before  # statskit's own schema included
    assert jobs(server, app_db) == []


@pytest.mark.parametrize("app_db", ["app"], indirect=True)
def test_plain_verify_fails_a_job_that_is_really_missing_or_disabled(server, app_db, run_cli):
    dsn = as_owner(server, app_db)
    assert run_cli("migrate", "--dsn", dsn, "--cron-dsn", f"dbname={CRON_DB}").exit_code == 0
    assert run_cli("verify", "--dsn", dsn, "--only", "cron").exit_code == 0
    with psycopg.connect(as_owner(server, CRON_DB), autocommit=True) as conn:
        platform, user, _ = [row[0] for row in conn.execute(
            "select jobid from cron.job where database = %s order by jobname", [app_db])]
        conn.execute("select cron.alter_job(%s, active => false)", [user])
        conn.execute("select cron.unschedule(%s)", [platform])
    result = run_cli("verify", "--dsn", dsn, "--only", "cron")
    assert result.exit_code == 1, result.output
    assert re.search(r"cron job aggregate-platform-statistics +fail  not registered", result.output), result.output
    assert re.search(r"cron job aggregate-user-statistics +fail .*inactive", result.output), result.output


@pytest.mark.parametrize("app_db", ["app"], indirect=True)
def test_the_cron_dsn_variable_overrides_the_recorded_database(server, app_db, run_cli, monkeypatch):
    dsn = as_owner(server, app_db)
    assert run_cli("migrate", "--dsn", dsn, "--cron-dsn", CRON_DB).exit_code == 0
    monkeypatch.setenv("STATSKIT_CRON_DSN", "dbname=no_such_database")
    result = run_cli("verify", "--dsn", dsn, "--only", "cron")
    assert result.exit_code == 1 and 'database "no_such_database" does not exist' in result.output, result.output
    monkeypatch.delenv("STATSKIT_CRON_DSN")
    assert run_cli("verify", "--dsn", dsn, "--only", "cron").exit_code == 0


@pytest.mark.parametrize("app_db", ["app"], indirect=True)
def test_no_cron_is_recorded_and_every_command_follows_it(server, app_db, run_cli):
    dsn = as_owner(server, app_db)
    before = objects(dsn)
    deployed = run_cli("migrate", "--dsn", dsn, "--no-cron")
    assert deployed.exit_code == 0 and "pg_cron" not in deployed.output, deployed.output
    assert "nothing to do" in run_cli("migrate", "--dsn", dsn).output
    assert "pg_cron    no jobs (--no-cron)" in run_cli("migrate", "--status", "--dsn", dsn).output
    assert run_cli("backfill", *WINDOW, "--quiet", "--dsn", dsn).exit_code == 0
    verified = run_cli("verify", "--dsn", dsn, *WINDOW)
    assert verified.exit_code == 0, verified.output
    assert re.search(r"cron +pass  no pg_cron jobs to check: deployed with --no-cron", verified.output)
    assert "not visible" not in verified.output
    assert jobs(server, app_db) == []
    assert run_cli("rollback", "--dsn", dsn).exit_code == 0
    assert objects(dsn) == before


def sabotage(tmp_path, step):
    """A copy of sql/ whose rendering fails at one step of the deployment's transaction."""
    sql = tmp_path / "sql"
    shutil.copytree(SQL_DIR, sql)
    template = {
        "migration": "migrations/0001_statistics_tables.sql.j2",
        "last function": "functions/user_kpis.sql.j2",
        "access": "access/access.sql.j2",
    }[step]
    path = sql / "templates" / template
    path.write_text(path.read_text() + "\nselect no_such_function();\n")
    return sql


@pytest.mark.parametrize("step", ["migration", "last function", "access"])
@pytest.mark.parametrize("app_db", [CRON_DB], indirect=True)
def test_a_failure_at_any_step_leaves_the_database_as_it_was(server, app_db, run_cli, tmp_path, step):
    dsn = as_owner(server, app_db)
    before = objects(dsn)
    failed = run_cli("migrate", "--dsn", dsn, "--roles", "--sql-dir", sabotage(tmp_path, step))
    assert failed.exit_code == 1
    assert failed.output.startswith("statskit: error: function no_such_function() does not exist"), failed.output
    assert objects(dsn) == before
    assert jobs(server, app_db) == []


@pytest.mark.parametrize("revoked, missing", [
    ("execute on function cron.schedule_in_database(text, text, text, text, text, boolean)",
     "EXECUTE on cron.schedule_in_database"),
    ("usage on schema cron", "USAGE on schema cron"),
])
@pytest.mark.parametrize("app_db", ["app"], indirect=True)
def test_missing_cron_grants_are_named_before_anything_changes(server, app_db, run_cli, revoked, missing):
    dsn = as_owner(server, app_db)
    before = objects(dsn)
    with psycopg.connect(server.dsn(CRON_DB), autocommit=True) as conn:
        conn.execute(f"revoke {revoked} from {OWNER}")
    try:
        result = run_cli("migrate", "--dsn", dsn, *cron_args(server, app_db))
    finally:
        with psycopg.connect(server.dsn(CRON_DB), autocommit=True) as conn:
            conn.execute(CRON_GRANTS)
    assert result.exit_code == 1
    assert result.output.strip() == (f"statskit: error: deployer cannot schedule pg_cron jobs in market: it lacks "
                                     f"{missing} (grant them there, see docs/managed.md); nothing changed")
    assert objects(dsn) == before


@pytest.mark.parametrize("app_db", ["app"], indirect=True)
def test_a_restore_without_owners_or_privileges_fails_verify_and_migrate_repairs_it(server, app_db, run_cli, tmp_path):
    """Deployed with roles by a superuser, dumped, restored by the owner with --no-owner --no-privileges."""
    source = server.dsn(app_db)
    assert run_cli("migrate", "--dsn", source, "--roles", "--row-security", "current_setting('app.user_id', true)::uuid",
                   "--no-cron").exit_code == 0
    assert run_cli("backfill", *WINDOW, "--quiet", "--dsn", source).exit_code == 0
    dump = tmp_path / "app.dump"
    subprocess.run([server.bindir / "pg_dump", "-Fc", "-f", dump, "-d", source], check=True)
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("drop database if exists restored")
        conn.execute(f"create database restored owner {OWNER}")
    try:
        restored = as_owner(server, "restored")
        subprocess.run([server.bindir / "pg_restore", "--no-owner", "--no-privileges", "-d", restored, dump],
                       check=True, capture_output=True)
        broken = run_cli("verify", "--dsn", restored, *WINDOW, "--only", "schema,functions,access,migrations")
        assert broken.exit_code == 1, broken.output
        line = next(l for l in broken.output.splitlines() if l.startswith("access roles"))
        assert "  fail  " in line
        assert 'statskit_writer lacks ownership of "public".user_statistics_daily' in line
        assert 'statskit_writer (runs the nightly user job) lacks INSERT on "public".user_statistics_daily' in line
        assert 'statskit_reader (reads the rollup) lacks SELECT on "public".platform_statistics_daily' in line
        assert "run statskit migrate to restore them" in line

        repaired = run_cli("migrate", "--dsn", restored, *cron_args(server, "restored"))
        assert repaired.exit_code == 0, repaired.output
        assert "applied roles and grants (access.sql)" in repaired.output
        fixed = run_cli("verify", "--dsn", restored, *WINDOW, *cron_args(server, "restored"))
        assert fixed.exit_code == 0 and "  fail  " not in fixed.output, fixed.output
    finally:
        with psycopg.connect(server.dsn(CRON_DB), autocommit=True) as conn:
            conn.execute("select cron.unschedule(jobid) from cron.job where database = 'restored'")
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("drop database if exists restored")


@pytest.mark.parametrize("app_db", ["app"], indirect=True)
def test_verify_never_calls_a_job_it_cannot_see_missing(server, app_db, run_cli):
    """The owner deployed; a CI login that is a member of the owner verifies. cron.job's row
    security shows it none of the owner's jobs: verify says so, and does not call them missing."""
    dsn = as_owner(server, app_db)
    assert run_cli("migrate", "--dsn", dsn, *cron_args(server, app_db)).exit_code == 0
    assert run_cli("backfill", *WINDOW, "--quiet", "--dsn", dsn).exit_code == 0
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("drop role if exists ci")
        conn.execute(f"create role ci login in role {OWNER}")
        conn.execute("drop role if exists outsider")
        conn.execute("create role outsider login")  # no grant in pg_cron's database at all
    ci = server.dsn(app_db).replace("user=postgres", "user=ci")
    try:
        no_usage = run_cli("verify", "--dsn", ci, *WINDOW,
                           "--cron-dsn", server.dsn(CRON_DB).replace("user=postgres", "user=outsider"))
        assert no_usage.exit_code == 0, no_usage.output
        assert re.search(r"cron +warn  cannot see pg_cron's jobs as outsider: permission denied for schema cron",
                         no_usage.output)
        seen = run_cli("verify", "--dsn", ci, *WINDOW, "--cron-dsn", server.dsn(CRON_DB).replace("user=postgres", "user=ci"))
        assert seen.exit_code == 0, seen.output
        assert re.search(r"cron job aggregate-user-statistics +warn  not visible to ci: pg_cron shows each role "
                         r"only its own jobs", seen.output)
        assert "not registered" not in seen.output
    finally:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("drop role ci")
            conn.execute("drop role outsider")


@pytest.fixture
def empty_db(server):
    """An empty database owned by the deployer, for statskit demo --dsn."""
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("drop database if exists demo_here with (force)")
        conn.execute(f"create database demo_here owner {OWNER}")
    try:
        yield as_owner(server, "demo_here")
    finally:
        with psycopg.connect(server.dsn(CRON_DB), autocommit=True) as conn:
            conn.execute("select cron.unschedule(jobid) from cron.job where database = 'demo_here'")
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("drop database demo_here with (force)")


def test_demo_into_a_given_database_checks_everything_before_loading_a_row(server, empty_db, run_cli):
    small = ["--users", 60, "--days", 14, "--dsn", empty_db]
    refused = run_cli("demo", *small)  # pg_cron elsewhere, its database not named
    assert refused.exit_code == 1 and "--cron-dsn" in refused.output, refused.output
    assert "loading" not in refused.output
    with psycopg.connect(server.dsn(CRON_DB), autocommit=True) as conn:
        conn.execute(f"revoke usage on schema cron from {OWNER}")
    try:
        no_grant = run_cli("demo", *small, "--cron-dsn", CRON_DB)
    finally:
        with psycopg.connect(server.dsn(CRON_DB), autocommit=True) as conn:
            conn.execute(CRON_GRANTS)
    assert no_grant.exit_code == 1 and "lacks USAGE on schema cron" in no_grant.output, no_grant.output
    assert "nothing changed" in no_grant.output
    with psycopg.connect(empty_db) as conn:
        assert conn.execute("select count(*) from pg_tables where schemaname = 'public'").fetchone()[0] == 0

    shown = run_cli("demo", *small, "--no-cron")
    assert shown.exit_code == 0, shown.output
    assert "verify: PASS" in shown.output and "keeps running" not in shown.output, shown.output
    assert jobs(server, "demo_here") == []
