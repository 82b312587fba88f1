"""pg_cron really runs the nightly commands: the jobs' exact commands, scheduled every minute for
one run in the test database, must succeed, write yesterday and make the partitions ahead."""

import time

import psycopg

from conftest import cron_connection
from toolkit import partitions
from toolkit.cron import wanted_jobs
from toolkit.settings import Settings


def run_once_under_pg_cron(dbname, username=None):
    """Schedule every job command every minute as `username`, wait for one run each, remove them;
    return [(status, return_message)] in the order of the jobs."""
    with cron_connection() as conn:
        ids = [conn.execute("select cron.schedule_in_database(%s, '* * * * *', %s, %s, coalesce(%s, current_user))",
                            [f"test-run-{job.name}", job.command, dbname, username]).fetchone()[0]
               for job in wanted_jobs(Settings())]
        try:
            deadline = time.monotonic() + 75  # pg_cron starts jobs at the top of each minute
            while time.monotonic() < deadline:
                done = conn.execute(
                    "select distinct on (jobid) status, return_message from cron.job_run_details"
                    " where jobid = any(%s) and status in ('succeeded', 'failed') order by jobid", [ids]).fetchall()
                if len(done) == len(ids):
                    return done
                time.sleep(1)
            return done
        finally:
            for jobid in ids:
                conn.execute("select cron.unschedule(%s::bigint)", [jobid])
            conn.execute("delete from cron.job_run_details where jobid = any(%s)", [ids])


def test_pg_cron_runs_every_job_command(migrated_dsn):
    settings = Settings()
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        ahead = partitions.partitions(conn, settings, "user_statistics_daily")[-1].name
        conn.execute(f"drop table {ahead}")  # the partitions job makes it again, committing alone
    done = run_once_under_pg_cron(psycopg.conninfo.conninfo_to_dict(migrated_dsn)["dbname"])
    assert [status for status, _ in done] == ["succeeded"] * 3, done
    with psycopg.connect(migrated_dsn) as conn:
        assert partitions.missing_periods(conn, settings, "user_statistics_daily") == []
    with psycopg.connect(migrated_dsn) as conn:
        yesterday = conn.execute("select (now() at time zone 'UTC')::date - 1").fetchone()[0]
        user_days = conn.execute("select count(distinct date), max(date) from user_statistics_daily").fetchone()
        platform_days = conn.execute("select array_agg(date) from platform_statistics_daily").fetchone()[0]
    assert user_days == (1, yesterday)  # with change capture the user job writes yesterday only
    assert platform_days == [yesterday]
