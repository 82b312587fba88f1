"""Least privilege: the reader cannot write; with row security a user sees only their own rows,
while the nightly job still writes every row."""

import psycopg
import pytest

from conftest import cron_connection
from test_cron_runs import run_once_under_pg_cron


EXPRESSION = "current_setting('app.user_id', true)::uuid"


@pytest.fixture
def secured(loaded_dsn, run_cli):
    result = run_cli("migrate", "--dsn", loaded_dsn, "--roles", "--row-security", EXPRESSION)
    assert result.exit_code == 0, result.output
    assert "applied roles and grants (access.sql)" in result.output
    assert run_cli("backfill", "--from", "2026-03-30", "--to", "2026-03-31", "--quiet", "--dsn", loaded_dsn).exit_code == 0
    with psycopg.connect(loaded_dsn, autocommit=True) as conn:
        conn.execute("drop role if exists dashboard_app")
        conn.execute("create role dashboard_app login in role statskit_reader")
        users = [r[0] for r in conn.execute(
            "select user_id from user_statistics_daily where date = '2026-03-31' order by user_id limit 2").fetchall()]
    try:
        yield loaded_dsn, users
    finally:
        with psycopg.connect(loaded_dsn, autocommit=True) as conn:
            conn.execute("drop owned by dashboard_app")
            conn.execute("drop role dashboard_app")
            conn.execute("drop owned by statskit_reader, statskit_writer")
            conn.execute("drop role statskit_reader")
            conn.execute("drop role statskit_writer")


def as_app(dsn, user_id=None):
    conn = psycopg.connect(dsn.replace("user=postgres", "user=dashboard_app"), autocommit=True)
    if user_id:
        conn.execute("select set_config('app.user_id', %s, false)", [str(user_id)])
    return conn


def test_a_user_sees_only_their_own_rows(secured):
    dsn, (alice, bob) = secured
    with as_app(dsn, alice) as conn:
        assert conn.execute("select distinct user_id from user_statistics_daily").fetchall() == [(alice,)]
        assert conn.execute("select count(*) from user_statistics_daily").fetchone()[0] == 2
        assert conn.execute("select value is not null from user_metric(%s, 'total_reviews', '2026-03-31')", [alice]).fetchone()[0]
        assert conn.execute("select value from user_metric(%s, 'total_reviews', '2026-03-31')", [bob]).fetchone()[0] is None
        assert conn.execute("select count(*) from platform_statistics_daily").fetchone()[0] == 2
    with as_app(dsn) as conn:  # no user set: no rows
        assert conn.execute("select count(*) from user_statistics_daily").fetchone()[0] == 0


@pytest.mark.parametrize("statement", [
    "insert into user_statistics_daily (user_id, date) values (gen_random_uuid(), '2026-01-01')",
    "update user_statistics_daily set total_reviews = 1",
    "delete from platform_statistics_daily",
    "select aggregate_user_statistics(null, '2026-03-31')",
    "select aggregate_daily_statistics('2026-03-31')",
    "select count(*) from transactions",
])
def test_the_reader_cannot_write_or_read_the_sources(secured, statement):
    dsn, (alice, _) = secured
    with as_app(dsn, alice) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(statement)


def test_the_nightly_job_still_writes_every_row(secured):
    dsn, _ = secured
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("delete from user_statistics_daily where date = '2026-03-31'")
        written = conn.execute("select aggregate_user_statistics(null, '2026-03-31')").fetchone()[0]
        assert written == conn.execute("select count(*) from profiles where created_at < '2026-04-01'").fetchone()[0]
        owner = conn.execute("select tableowner from pg_tables where tablename = 'user_statistics_daily'").fetchone()[0]
        assert owner == "statskit_writer"


def test_the_writer_runs_the_nightly_jobs_under_pg_cron(secured):
    dsn, _ = secured
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with cron_connection() as conn:
        users = conn.execute("select jobname, username from cron.job where database = %s order by 1", [dbname]).fetchall()
    assert users == [("aggregate-platform-statistics", "statskit_writer"), ("aggregate-user-statistics", "statskit_writer"),
                     ("statistics-partitions", "statskit_writer")]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("truncate user_statistics_daily, platform_statistics_daily")
    done = run_once_under_pg_cron(dbname, "statskit_writer")
    assert [status for status, _ in done] == ["succeeded"] * 3, done
    with psycopg.connect(dsn) as conn:  # as the owner, row security does not hide rows from the job
        assert conn.execute("select count(distinct date) from user_statistics_daily").fetchone()[0] == 1


def test_roles_survive_a_re_migrate_and_verify_passes(secured, run_cli):
    dsn, _ = secured
    again = run_cli("migrate", "--dsn", dsn)
    assert again.exit_code == 0 and "nothing to do" in again.output
    result = run_cli("verify", "--dsn", dsn, "--from", "2026-03-30", "--to", "2026-03-31", "--only", "schema,functions,migrations,sample")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("expression", ["auth.uid(); drop table profiles", "x -- comment", "a /* b */"])
def test_an_unsafe_row_security_expression_is_refused_before_any_sql(dsn, run_cli, expression):
    result = run_cli("migrate", "--dsn", dsn, "--roles", "--row-security", expression)
    assert result.exit_code == 2 and "invalid row security expression" in result.output


def test_row_security_without_roles_is_refused(dsn, run_cli):
    result = run_cli("migrate", "--dsn", dsn, "--row-security", EXPRESSION)
    assert result.exit_code == 2 and "--row-security needs the statskit roles (--roles)" in result.output
