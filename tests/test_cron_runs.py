"""pg_cron really runs the nightly commands: both jobs' exact commands, scheduled every minute for
one run in the test database, must succeed and write yesterday (and the lookback days)."""

import time

import psycopg

from conftest import cron_connection
from toolkit.cron import wanted_jobs
from toolkit.settings import Settings


def test_pg_cron_runs_both_job_commands(migrated_dsn):
    dbname = psycopg.conninfo.conninfo_to_dict(migrated_dsn)["dbname"]
    with cron_connection() as conn:
        ids = [conn.execute("select cron.schedule_in_database(%s, '* * * * *', %s, %s)",
                            [f"test-run-{job.name}", job.command, dbname]).fetchone()[0]
               for job in wanted_jobs(Settings())]
        try:
            deadline = time.monotonic() + 75  # pg_cron starts jobs at the top of each minute
            while time.monotonic() < deadline:
                done = conn.execute(
                    "select jobid, status, return_message from cron.job_run_details"
                    " where jobid = any(%s) and status in ('succeeded', 'failed')", [ids]).fetchall()
                if len({jobid for jobid, _, _ in done}) == 2:
                    break
                time.sleep(1)
        finally:
            for jobid in ids:
                conn.execute("select cron.unschedule(%s::bigint)", [jobid])
            conn.execute("delete from cron.job_run_details where jobid = any(%s)", [ids])
    assert sorted(status for _, status, _ in done) == ["succeeded", "succeeded"], done
    with psycopg.connect(migrated_dsn) as conn:
        yesterday = conn.execute("select (now() at time zone 'UTC')::date - 1").fetchone()[0]
        user_days = conn.execute("select count(distinct date), max(date) from user_statistics_daily").fetchone()
        platform_days = conn.execute("select array_agg(date) from platform_statistics_daily").fetchone()[0]
    assert user_days == (3, yesterday)  # yesterday and two lookback days
    assert platform_days == [yesterday]
