"""`statskit verify`: a clean deployment passes; each hand-made fault fails and is named."""

import json
import re
import xml.etree.ElementTree as ET
from datetime import date

import psycopg
import pytest
from click.testing import CliRunner

from conftest import SQL_DIR, cron_connection
from toolkit import api, deployment
from toolkit.catalog import load_catalog
from toolkit.cli import cli
from toolkit.render import FUNCTIONS
from toolkit.settings import Settings

WINDOW = ["--from", "2026-03-25", "--to", "2026-03-31"]


@pytest.fixture
def deployed(migrated_dsn, run_cli):
    """Migrated, backfilled over the window, and both jobs with a recent successful run."""
    assert run_cli("backfill", "--from", "2026-03-25", "--to", "2026-03-31", "--quiet", "--dsn", migrated_dsn).exit_code == 0
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        # the DBA followed migrate's advice: the nightly step's indexes
        for index in deployment.missing_step_indexes(conn, load_catalog(SQL_DIR / "catalog.toml"), Settings()):
            conn.execute(index.statement(f"{index.table}_{index.column}_idx"))
        conn.execute("select aggregate_daily_statistics(), aggregate_user_statistics()")  # what last night's jobs wrote
    dbname = psycopg.conninfo.conninfo_to_dict(migrated_dsn)["dbname"]
    with cron_connection() as conn:
        conn.execute(
            "insert into cron.job_run_details (jobid, runid, database, username, command, status, return_message, start_time, end_time)"
            " select jobid, nextval('cron.runid_seq'), database, username, command, 'succeeded', '1 row',"
            " now() - interval '2 hours', now() - interval '2 hours' from cron.job where database = %s",
            [dbname],
        )
    try:
        yield migrated_dsn
    finally:
        with cron_connection() as conn:
            conn.execute("delete from cron.job_run_details where database = %s", [dbname])


def verify(run_cli, dsn, *extra):
    return run_cli("verify", "--dsn", dsn, *WINDOW, *extra)


def test_a_clean_deployment_passes(deployed, run_cli):
    result = verify(run_cli, deployed)
    assert result.exit_code == 0, result.output
    names = [line.split("  ")[0].strip() for line in result.output.splitlines()[:-1]]
    assert names == [
        "schema user_statistics_daily", "keys user_statistics_daily", "schema platform_statistics_daily",
        "keys platform_statistics_daily", "partitions user_statistics_daily", "partitions platform_statistics_daily",
        "keys source tables",
        *[f"function {name}" for name in FUNCTIONS],
        "access roles", "migrations",
        *[f"cron {kind} {job}" for job in ("aggregate-platform-statistics", "aggregate-user-statistics", "statistics-partitions")
          for kind in ("job", "runs-as", "health")],
        "capture triggers", "capture backlog user", "capture backlog platform",
        "data user rows", "data platform rows", "data duplicates", "data new metrics", "data freshness", "sample"]
    assert f"verify: PASS — {len(names)} passed, 0 warnings, 0 failed" in result.output
    assert re.search(r"sample +pass  \d+ stored rows recomputed, every metric equal", result.output)


def in_target(statement):
    def apply(dsn):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(statement)
    return apply


def in_cron(statement):
    def apply(dsn):
        with cron_connection() as conn:
            conn.execute(statement, [psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]])
    return apply


FAULTS = [
    ("dropped column", in_target("alter table user_statistics_daily drop column five_star_reviews"),
     "schema user_statistics_daily", "column five_star_reviews is missing"),
    ("retyped column", in_target("alter table user_statistics_daily alter column total_hours type numeric(12,4)"),
     "schema user_statistics_daily", "column total_hours is numeric(12,4), expected numeric(10,2)"),
    ("missing unique key", in_target("alter table platform_statistics_daily drop constraint platform_statistics_daily_pkey"),
     "keys platform_statistics_daily", "no unique key on (date)"),
    ("missing partition ahead", in_target(
        "do $$ begin execute format('drop table %s', 'user_statistics_daily_' ||"
        " to_char(date_trunc('month', now() at time zone 'UTC') + interval '2 months', 'YYYYMMDD')); end $$"),
     "partitions user_statistics_daily", "no partition for the month from"),
    ("partition without the table's grants", in_target("grant select on platform_statistics_daily to public"),
     "partitions platform_statistics_daily", "grant SELECT on "),
    ("partitions job unscheduled", in_cron(
        "select cron.unschedule(jobid) from cron.job where database = %s and jobname = 'statistics-partitions'"),
     "cron job statistics-partitions", "not registered"),
    ("dropped function", in_target("drop function aggregate_daily_statistics(date)"),
     "function aggregate_daily_statistics", "does not exist"),
    ("function edited by hand", in_target(
        "do $$ begin execute replace(pg_get_functiondef('aggregate_single_user_statistics(uuid,date)'::regprocedure),"
        " 'r.rating = 5', 'r.rating >= 4'); end $$"),
     "function aggregate_single_user_statistics", "deployed body differs from the rendered one"),
    ("job moved to another hour", in_cron("update cron.job set schedule = '0 4 * * *' where database = %s and jobname = 'aggregate-user-statistics'"),
     "cron job aggregate-user-statistics", "schedule '0 4 * * *', expected '0 1 * * *'"),
    ("job unscheduled", in_cron("select cron.unschedule(jobid) from cron.job where database = %s and jobname = 'aggregate-platform-statistics'"),
     "cron job aggregate-platform-statistics", "not registered"),
    ("last run failed", in_cron(
        "insert into cron.job_run_details (jobid, runid, database, username, command, status, return_message, start_time, end_time)"
        " select jobid, nextval('cron.runid_seq'), database, username, command, 'failed',"
        " E'ERROR:  division by zero\\nCONTEXT:  PL/pgSQL function aggregate_user_statistics(uuid,date) line 9',"
        " now() - interval '1 hour', now() - interval '1 hour' from cron.job where database = %s and jobname = 'aggregate-user-statistics'"),
     "cron health aggregate-user-statistics", "ERROR:  division by zero"),
    ("trigger with other transition tables", in_target(
        "drop trigger statskit_capture_insert on bookings;"
        " create trigger statskit_capture_insert after insert on bookings referencing new table as new_rows"
        " for each statement execute function statskit.capture_bookings()"),
     "capture triggers", "26 of 27 triggers on the source tables: run statskit migrate"),
    ("missing day of rows", in_target("delete from user_statistics_daily where date = '2026-03-27'"),
     "data user rows", "missing on 2026-03-27"),
    ("missing platform day", in_target("delete from platform_statistics_daily where date = '2026-03-26'"),
     "data platform rows", "no row for 2026-03-26"),
    ("missing source index", in_target("drop index bookings_listing_id_idx"),
     "keys source tables", "no index leads with public.bookings(listing_id)"),
    ("missing step index", in_target("drop index messages_conversation_id_idx"),
     "keys source tables", "no index leads with public.messages(conversation_id): the nightly step scans whole tables"),
    ("stored metric changed by hand", in_target(
        "update user_statistics_daily set total_earnings = total_earnings + 1"
        " where date = '2026-03-31' and user_id = (select user_id from user_statistics_daily where date = '2026-03-31' order by md5(user_id::text) limit 1)"),
     "sample", "total_earnings of"),
]


# Checks that advise rather than fail: the deployment works, only slower.
ADVICE = {"keys source tables"}


@pytest.mark.parametrize("apply, check, detail", [f[1:] for f in FAULTS], ids=[f[0] for f in FAULTS])
def test_each_fault_fails_verify_and_is_named(deployed, apply, check, detail):
    apply(deployed)
    with api.Project.open(SQL_DIR).deployment(deployed) as app:
        report = app.verify(date(2026, 3, 25), date(2026, 3, 31))
    status = "warn" if check in ADVICE else "fail"
    named = {c.check: c for c in report.checks}
    assert named[check].status == status and detail in named[check].detail, named[check]
    assert report.status == status and report.ok == (status == "warn")
    assert all("\n" not in c.detail and "CONTEXT" not in c.detail for c in report.checks)  # one line per check


def test_json_and_junit_carry_the_same_verdicts(deployed, run_cli):
    in_target("delete from user_statistics_daily where date = '2026-03-27'")(deployed)
    as_json = json.loads(verify(run_cli, deployed, "--format", "json").output)
    suite = ET.fromstring(verify(run_cli, deployed, "--format", "junit").output).find("testsuite")
    assert as_json["status"] == "fail" and as_json["summary"]["fail"] == 1
    failed_json = {c["check"] for c in as_json["checks"] if c["status"] == "fail"}
    failed_junit = {case.get("name") for case in suite.iter("testcase") if case.find("failure") is not None}
    assert failed_json == failed_junit == {"data user rows"}
    assert int(suite.get("tests")) == len(as_json["checks"]) and suite.get("failures") == "1"
    assert set(as_json["checks"][0]) == {"check", "status", "detail"}


def test_verify_changes_nothing(deployed, run_cli):
    in_target("update user_statistics_daily set total_reviews = 99 where date = '2026-03-31'")(deployed)
    with psycopg.connect(deployed) as conn:
        before = conn.execute("select sum(total_reviews), count(*) from user_statistics_daily").fetchone()
    assert verify(run_cli, deployed).exit_code == 1
    with psycopg.connect(deployed) as conn:
        assert conn.execute("select sum(total_reviews), count(*) from user_statistics_daily").fetchone() == before
        assert conn.execute("select to_regclass('pg_temp.statskit_sample')").fetchone()[0] is None


def test_no_run_yet_passes_before_the_first_night_and_fails_after_it(migrated_dsn, run_cli):
    run_cli("backfill", "--from", "2026-03-25", "--to", "2026-03-31", "--quiet", "--dsn", migrated_dsn)
    result = verify(run_cli, migrated_dsn)
    assert result.exit_code == 0
    assert re.search(r"cron health aggregate-user-statistics +pass  no run yet: scheduled ", result.output)
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:  # as if scheduled two days ago
        conn.execute("update statskit.settings set value = (value::timestamptz - interval '2 days')::text"
                     " where key = 'jobs_scheduled_at'")
    late = verify(run_cli, migrated_dsn)
    assert late.exit_code == 1
    assert re.search(r"cron health aggregate-user-statistics +fail  no run since it was scheduled .* more than 26 h",
                     late.output)


def test_only_runs_the_named_groups(deployed, run_cli):
    result = verify(run_cli, deployed, "--only", "schema,migrations")
    assert result.exit_code == 0
    assert {line.split()[0] for line in result.output.splitlines()[:-1]} == {"schema", "keys", "partitions", "migrations"}
    bad = verify(run_cli, deployed, "--only", "schema,vibes")
    assert bad.exit_code == 2 and "unknown check group" in bad.output


@pytest.mark.parametrize("args, message", [
    (["--dsn", "host=127.0.0.1 port=1 password=hunter2"], "cannot connect"),
])
def test_verify_that_cannot_run_exits_2(run_cli, args, message):
    result = run_cli("verify", *args)
    assert result.exit_code == 2 and message in result.output and "hunter2" not in result.output


@pytest.mark.parametrize("fmt", ["junit", "json"])
def test_a_verify_that_cannot_run_still_writes_a_failing_report(run_cli, fmt):
    result = CliRunner().invoke(
        cli, ["verify", "--dsn", "host=127.0.0.1 port=1 dbname=shop password=hunter2", "--format", fmt])
    assert result.exit_code == 2 and result.stderr.startswith("statskit: error: cannot connect to")
    assert "hunter2" not in result.stdout + result.stderr
    if fmt == "junit":
        suite = ET.fromstring(result.stdout).find("testsuite")
        assert suite.get("failures") == "1"
        assert suite.find("testcase/failure").get("message").startswith("could not run: cannot connect to")
    else:
        report = json.loads(result.stdout)
        assert report["status"] == "fail" and report["checks"][0]["detail"].startswith("could not run: cannot connect")


def test_verify_of_a_database_never_migrated_exits_2(loaded_dsn, run_cli):
    result = run_cli("verify", "--dsn", loaded_dsn)
    assert result.exit_code == 2 and "run statskit migrate first" in result.output


def test_permission_denied_means_verify_cannot_run(deployed, run_cli):
    with psycopg.connect(deployed, autocommit=True) as conn:
        conn.execute("drop role if exists outsider")
        conn.execute("create role outsider login")
    try:
        outsider = deployed.replace("user=postgres", "user=outsider")
        result = run_cli("verify", "--dsn", outsider, *WINDOW)
        assert result.exit_code == 2, result.output
        assert "permission denied" in result.output
    finally:
        with psycopg.connect(deployed, autocommit=True) as conn:
            conn.execute("drop role outsider")
