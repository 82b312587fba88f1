"""`statskit migrate`, `--status`, `--dry-run`, `rollback` and the pg_cron jobs, on a real server."""

import re
import shutil
import time
from pathlib import Path

import psycopg
import pytest

from conftest import SIDE_PORT, SQL_DIR, TEST_PORT, cron_connection, deploy
from toolkit import api
from toolkit.cron import registered_jobs
from toolkit.reference import marketplace
from toolkit.render import FUNCTIONS


def objects(dsn):
    """Every table, function and index outside the system schemas: a picture of the database."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "select n.nspname, c.relname, c.relkind from pg_class c join pg_namespace n on n.oid = c.relnamespace"
            " where n.nspname not in ('pg_catalog', 'information_schema', 'pg_toast')"
            " union all select n.nspname, p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')', 'f'"
            " from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
            " where n.nspname not in ('pg_catalog', 'information_schema') order by 1, 2"
        ).fetchall()


def jobs_for(dbname):
    with cron_connection() as conn:
        return {j.jobname: j for j in registered_jobs(conn, ["aggregate-platform-statistics", "aggregate-user-statistics"])
                if j.database == dbname}


def test_migrate_creates_everything_and_a_second_run_changes_nothing(dsn, run_cli):
    first = run_cli("migrate", "--dsn", dsn)
    assert first.exit_code == 0, first.output
    assert "applied migration 0001_statistics_tables" in first.output
    picture = objects(dsn)
    assert ("public", "user_statistics_daily", "p") in picture  # partitioned, by month of date
    assert ("public", "user_statistics_daily_date_idx", "I") in picture
    assert ("public", "user_statistics_daily_pkey", "I") in picture  # (user_id, date)
    assert ("public", "aggregate_user_statistics(p_user_id uuid, p_date date)", "f") in picture
    second = run_cli("migrate", "--dsn", dsn)
    assert second.exit_code == 0 and "up to date, nothing to do" in second.output
    assert objects(dsn) == picture


def test_cron_jobs_are_registered_for_the_target_database(dsn):
    deploy(dsn)
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    jobs = jobs_for(dbname)
    assert jobs["aggregate-platform-statistics"].schedule == "0 0 * * *"
    assert jobs["aggregate-platform-statistics"].command == (
        'select "public".aggregate_platform_changes(); select "public".aggregate_daily_statistics()')
    assert jobs["aggregate-user-statistics"].schedule == "0 1 * * *"
    # with change capture the log repairs late data: yesterday alone, no lookback days
    assert jobs["aggregate-user-statistics"].command == (
        'select "public".aggregate_user_changes(); select "public".aggregate_user_statistics()')
    assert all(j.active for j in jobs.values())
    # a job moved by hand is put back by the next migrate
    with cron_connection() as conn:
        conn.execute("update cron.job set schedule = '0 5 * * *' where jobid = %s", [jobs["aggregate-user-statistics"].jobid])
    assert [j.name for j in deploy(dsn).jobs] == ["aggregate-user-statistics"]
    assert jobs_for(dbname)["aggregate-user-statistics"].schedule == "0 1 * * *"


def test_without_capture_the_user_job_rewrites_three_lookback_days_by_default(dsn):
    deploy(dsn, capture=False)
    jobs = jobs_for(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])
    assert jobs["aggregate-user-statistics"].command == (
        'select "public".aggregate_user_statistics(); select "public".aggregate_user_statistics(null, '
        "(now() at time zone 'UTC')::date - n) from generate_series(2, 3) as n")


def test_without_capture_and_lookback_the_jobs_are_the_specs_literal_ones(dsn):
    deploy(dsn, lookback_days=1, capture=False)
    jobs = jobs_for(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])
    assert jobs["aggregate-user-statistics"].command == 'select "public".aggregate_user_statistics()'
    assert jobs["aggregate-platform-statistics"].command == 'select "public".aggregate_daily_statistics()'


def test_a_job_name_of_another_database_is_refused_and_nothing_changes(dsn, run_cli):
    with cron_connection() as conn:
        conn.execute("select cron.schedule_in_database('aggregate-user-statistics', '0 3 * * *', 'select 1', 'postgres')")
    try:
        before = objects(dsn)
        result = run_cli("migrate", "--dsn", dsn)
        assert result.exit_code == 1
        assert "already belongs to database 'postgres'" in result.output and "--job-suffix" in result.output
        assert objects(dsn) == before
        with cron_connection() as conn:
            assert conn.execute("select schedule, command, database from cron.job where jobname = 'aggregate-user-statistics'").fetchall() == [
                ("0 3 * * *", "select 1", "postgres")]
        # a suffix gives this database its own pair of jobs
        assert run_cli("migrate", "--dsn", dsn, "--job-suffix", "shop2").exit_code == 0
        with cron_connection() as conn:
            names = {r[0] for r in conn.execute("select jobname from cron.job where database <> 'postgres'")}
        assert names == {"aggregate-platform-statistics-shop2", "aggregate-user-statistics-shop2",
                         "statistics-partitions-shop2"}
    finally:
        with cron_connection() as conn:
            conn.execute("select cron.unschedule(jobid) from cron.job where database = 'postgres'")


def test_dry_run_prints_the_sql_and_changes_nothing(dsn, run_cli):
    before = objects(dsn)
    result = run_cli("migrate", "--dry-run", "--dsn", dsn)
    assert result.exit_code == 0
    assert 'create table "public".user_statistics_daily' in result.output
    assert 'create or replace function "public".aggregate_daily_statistics(' in result.output
    assert "cron.schedule_in_database('aggregate-user-statistics', '0 1 * * *'" in result.output
    assert objects(dsn) == before
    assert jobs_for(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]) == {}


def test_status_lists_applied_pending_and_jobs(dsn, run_cli):
    with cron_connection() as conn:  # another database's job of the same name is not this one's
        conn.execute("select cron.schedule_in_database('aggregate-user-statistics', '0 3 * * *', 'select 1', 'postgres')")
    try:
        with api.Project.open(SQL_DIR).deployment(dsn) as app:
            before = app.status()
    finally:
        with cron_connection() as conn:
            conn.execute("select cron.unschedule(jobid) from cron.job where database = 'postgres'")
    assert before.migrations == [("0001_statistics_tables", "pending")]
    assert {f.name: f.state for f in before.functions} == dict.fromkeys(FUNCTIONS, "missing")
    assert before.jobs == []  # the other database's job of the same name is not this one's
    deploy(dsn)
    with api.Project.open(SQL_DIR).deployment(dsn) as app:
        after = app.status()
    assert after.migrations == [("0001_statistics_tables", "applied")]
    assert {f.name: f.state for f in after.functions} == dict.fromkeys(FUNCTIONS, "current")
    assert {j.jobname: (j.schedule, j.active) for j in after.jobs} == {
        "aggregate-platform-statistics": ("0 0 * * *", True), "aggregate-user-statistics": ("0 1 * * *", True),
        "statistics-partitions": ("30 23 * * *", True)}
    printed = run_cli("migrate", "--status", "--dsn", dsn).output  # the same, as a table
    assert "0001_statistics_tables                   applied" in printed
    assert "aggregate-user-statistics                0 1 * * * active" in printed


def test_rollback_then_migrate_restores_the_deployment(dsn, run_cli):
    deploy(dsn)
    deployed = objects(dsn)
    result = run_cli("rollback", "--dsn", dsn)
    assert result.exit_code == 0, result.output
    assert "rolled back migration 0001_statistics_tables" in result.output
    assert "unscheduled pg_cron job aggregate-user-statistics" in result.output
    leftovers = [o for o in objects(dsn) if o[0] == "public" and "statistics" in o[1]]
    assert leftovers == []
    assert jobs_for(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]) == {}
    assert run_cli("migrate", "--dsn", dsn).exit_code == 0
    assert objects(dsn) == deployed


def test_a_changed_function_template_is_reapplied_and_only_that_one(dsn, tmp_path):
    deploy(dsn)
    sql_copy = tmp_path / "sql"
    shutil.copytree(SQL_DIR, sql_copy)
    template = sql_copy / "templates" / "functions" / "aggregate_daily_statistics.sql.j2"
    template.write_text(template.read_text().replace("Write the {{ platform.table }} row", "Write the platform row"))
    done = deploy(dsn, sql_copy)
    assert [name for name, _ in done.functions] == ["aggregate_daily_statistics"]
    assert done.migrations == [] and done.jobs == []
    with psycopg.connect(dsn) as conn:
        comment = conn.execute("select obj_description('aggregate_daily_statistics(date)'::regprocedure)").fetchone()[0]
    assert comment.startswith("Write the platform row")


def test_a_dropped_function_is_recreated(dsn):
    deploy(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("drop function aggregate_single_user_statistics(uuid, date)")
    assert [name for name, _ in deploy(dsn).functions] == ["aggregate_single_user_statistics"]


def test_every_source_mismatch_is_named_at_once_before_any_change(dsn, run_cli):
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("drop table caas_scores")
        conn.execute("alter table bookings drop column confirmed_at")
        # an application with integer ids where the contract has uuids, and days without a time zone
        conn.execute("alter table reviews drop column reviewee_id")
        conn.execute("alter table reviews add column reviewee_id bigint")
        conn.execute("alter table messages alter column read_at type timestamp")
        conn.execute("alter table transactions alter column kind type varchar(20)")  # compatible: not named
        conn.execute("alter table bookings drop column status")  # not read by statskit: not named
    before = objects(dsn)
    result = run_cli("migrate", "--dsn", dsn)
    assert result.exit_code == 1
    assert result.output.strip() == (
        "statskit: error: source tables in schema public do not match the contract (docs/contract.md): "
        "bookings.confirmed_at is missing; reviews.reviewee_id is bigint, expected uuid; "
        "messages.read_at is timestamp without time zone, expected timestamptz; table caas_scores is missing; "
        "nothing changed")
    assert objects(dsn) == before


def test_missing_lookup_indexes_are_advised_not_refused(dsn, run_cli):
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("drop index bookings_listing_id_idx")
    result = run_cli("migrate", "--dsn", dsn)
    assert result.exit_code == 0, result.output
    assert ("note: no index leads with public.bookings(listing_id): the one-user function and verify's sample "
            "look users up by it") in result.output
    assert "no index leads with public.bookings(tutor_id)" not in result.output
    # the nightly step's: each day's rows by their timestamps, the conversations by their key
    step = re.search(r"note: no index leads with (.*): the nightly step reads each day's rows through them", result.output)
    assert step and "public.messages(conversation_id)" in step[1] and "public.bookings(completed_at)" in step[1]
    assert "public.bookings(listing_id)" not in step[1]  # named once, with the one-user lookups
    # each advised as the statement to run, with what it costs the application's writes; partial
    # where the column is nullable (a booking's completion: only completed bookings enter it)
    assert ("\n  create index concurrently on public.bookings (completed_at) where completed_at is not null;  -- "
            "an entry for each row once it has a value; an UPDATE that sets or moves it is not HOT\n") in result.output
    assert ("\n  create index concurrently on public.messages (conversation_id);  -- an entry for each row inserted\n"
            in result.output)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("create index on bookings (completed_at) where completed_at is not null")
        conn.execute("create index on bookings (cancelled_at) where status = 'cancelled'")  # not the advised one
    again = run_cli("migrate", "--dsn", dsn).output
    assert "on public.bookings (completed_at)" not in again and "on public.bookings (cancelled_at)" in again
    assert run_cli("migrate", "--dsn", dsn, "--no-capture").output.count("nightly step") == 0  # no capture, no step


def test_rollup_and_sources_in_their_own_schemas(dsn, run_cli):
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("create schema app")
        for table in ["caas_scores", "referrals", "messages", "reviews", "transactions", "bookings",
                      "listing_views", "listings", "profiles"]:
            conn.execute(f"alter table public.{table} set schema app")
    result = run_cli("migrate", "--dsn", dsn, "--schema", "stats", "--source-schema", "app", "--job-suffix", "x")
    assert result.exit_code == 0, result.output
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("insert into app.profiles values (gen_random_uuid(), 'client', '2026-01-01')")
        # migrate made partitions from the first signup on, and there was none: a day by hand needs its own
        with pytest.raises(psycopg.errors.CheckViolation, match="no partition"):
            conn.execute("select stats.aggregate_user_statistics(null, '2026-01-02')")
        conn.execute("call stats.maintain_statistics_partitions('2026-01-02')")
        assert conn.execute("select stats.aggregate_user_statistics(null, '2026-01-02')").fetchone()[0] == 1
    moved = run_cli("migrate", "--dsn", dsn, "--schema", "public")
    assert moved.exit_code == 2 and "cannot move" in moved.output


def test_no_cron_leaves_pg_cron_alone(dsn, run_cli):
    assert run_cli("migrate", "--dsn", dsn, "--no-cron").exit_code == 0
    assert jobs_for(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]) == {}


@pytest.mark.parametrize("args, message", [
    (["migrate", "--dsn", "host=127.0.0.1 port=1 user=x password=hunter2 dbname=x"], "cannot connect to x@127.0.0.1:1/x"),
    (["migrate", "--dsn", "postgresql://x:hunter2@127.0.0.1:1/x"], "cannot connect to x@127.0.0.1:1/x"),
    (["migrate", "--dsn", "host=127.0.0.1 port='1 password=hunter2"], "invalid DSN"),
    (["rollback", "--dsn", "host=127.0.0.1 port=1 password=hunter2"], "cannot connect"),
])
def test_connection_problems_are_one_line_without_password(run_cli, args, message):
    result = run_cli(*args)
    assert result.exit_code == 2
    assert message in result.output
    assert "hunter2" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_rollback_of_an_empty_database_says_migrate_first(dsn, run_cli):
    result = run_cli("rollback", "--dsn", dsn)
    assert result.exit_code == 2 and "run statskit migrate first" in result.output


def test_unknown_time_zone_is_refused(dsn, run_cli):
    result = run_cli("migrate", "--dsn", dsn, "--time-zone", "Mars/Olympus")
    assert result.exit_code == 2 and "unknown time zone 'Mars/Olympus'" in result.output


@pytest.mark.pg  # a server of its own
def test_a_server_without_pg_cron_stops_migrate_unless_no_cron(run_cli, tmp_path):
    from toolkit.cluster import LocalCluster
    bare = LocalCluster(f"no-cron-{SIDE_PORT + 1}", SIDE_PORT + 1, durable=False, with_cron=False)
    bare.start()
    try:
        result = run_cli("migrate", "--dsn", bare.dsn("postgres"))
        assert result.exit_code == 1
        # checked before the source tables: nothing to change yet, and the message says what to do
        with psycopg.connect(bare.dsn("postgres"), autocommit=True) as conn:
            conn.execute(marketplace.reference_schema_sql())
        before = objects(bare.dsn("postgres"))
        result = run_cli("migrate", "--dsn", bare.dsn("postgres"))
        assert result.exit_code == 1 and "pg_cron is not loaded on this server" in result.output and "--no-cron" in result.output
        assert objects(bare.dsn("postgres")) == before
        assert run_cli("migrate", "--dsn", bare.dsn("postgres"), "--no-cron").exit_code == 0
    finally:
        bare.destroy()


def test_dsn_comes_from_the_environment(dsn, run_cli, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/wrong")
    monkeypatch.setenv("STATSKIT_DSN", dsn)
    assert run_cli("migrate", "--status").exit_code == 0
    monkeypatch.delenv("STATSKIT_DSN")
    result = run_cli("migrate", "--status")
    assert result.exit_code == 2 and "nobody@127.0.0.1:1/wrong" in result.output


@pytest.fixture
def password_role(dsn):
    """A role that must log in with a password (scram), on the otherwise trusting test server."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("drop role if exists pw_user")
        conn.execute("create role pw_user login password 'right-horse-battery'")
        hba = Path(conn.execute("show hba_file").fetchone()[0])
        original = hba.read_text()
        hba.write_text("host all pw_user 127.0.0.1/32 scram-sha-256\n" + original)
        conn.execute("select pg_reload_conf()")
    try:
        yield dsn.replace("user=postgres", "user=pw_user")
    finally:
        hba.write_text(original)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("select pg_reload_conf()")
            conn.execute("drop role pw_user")


@pytest.mark.parametrize("command", ["migrate", "verify", "rollback"])
def test_a_wrong_password_is_one_line_without_the_password(password_role, run_cli, command):
    time.sleep(0.2)  # the reload reaches new connections within milliseconds
    for form in (f"{password_role} password=Tr0ub4dor-wrong", f"postgresql://pw_user:Tr0ub4dor-wrong@127.0.0.1:{TEST_PORT}/statskit_test"):
        result = run_cli(command, "--dsn", form)
        assert result.exit_code == 2, result.output
        assert "password authentication failed for user \"pw_user\"" in result.output
        assert "Tr0ub4dor" not in result.output and len(result.output.strip().splitlines()) == 1


def test_rollback_leaves_nothing_a_later_resume_could_misread(migrated_dsn, run_cli):
    window = ["--from", "2026-03-30", "--to", "2026-03-31"]
    assert run_cli("backfill", *window, "--quiet", "--dsn", migrated_dsn).exit_code == 0
    assert run_cli("rollback", "--dsn", migrated_dsn).exit_code == 0
    with psycopg.connect(migrated_dsn) as conn:
        assert conn.execute("select to_regnamespace('statskit')").fetchone()[0] is None  # ledger, settings, yoyo's tables
    assert run_cli("migrate", "--dsn", migrated_dsn).exit_code == 0
    resumed = run_cli("backfill", *window, "--resume", "--dsn", migrated_dsn)
    assert resumed.exit_code == 0 and "skipped" not in resumed.output, resumed.output
    with psycopg.connect(migrated_dsn) as conn:
        users = conn.execute("select count(*) from profiles where created_at < '2026-04-01'").fetchone()[0]
        assert conn.execute("select count(*) from user_statistics_daily where date = '2026-03-31'").fetchone()[0] == users
        assert conn.execute("select count(*) from platform_statistics_daily").fetchone()[0] == 2
