"""`statskit demo`: a private PostgreSQL with a synthetic marketplace, migrated, backfilled and verified."""

from dataclasses import dataclass, field
from datetime import timedelta

import psycopg
from psycopg import sql

from . import backfill, cron, dashboard, db, demo_data, migrate, verify
from .cluster import DEMO_PORT, LocalCluster
from .errors import StatskitError

DEMO_DATABASE = "statskit_demo"

def demo_cluster(port: int = DEMO_PORT) -> LocalCluster:
    return LocalCluster("demo", port)


@dataclass
class DemoStory:
    dsn: str
    rows_loaded: int
    first_day: object
    last_day: object
    applied: migrate.MigratePlan
    backfilled: backfill.Progress
    checks: list
    jobs: list
    kpis: dict = field(default_factory=dict)  # role -> (user_id, [dashboard.MetricValue])
    metric_units: dict = field(default_factory=dict)


def fresh_private_database(cluster: LocalCluster) -> str:
    """Start the private cluster and (re)create the demo database in it, with no jobs left behind."""
    cluster.start()
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute("select cron.unschedule(jobid) from cron.job where database = %s", [DEMO_DATABASE])
        admin.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(DEMO_DATABASE)))
        admin.execute(sql.SQL("create database {}").format(sql.Identifier(DEMO_DATABASE)))
    return cluster.dsn(DEMO_DATABASE)


def _refuse_existing_sources(conn: psycopg.Connection) -> None:
    if conn.execute("select to_regclass('public.profiles') is not null").fetchone()[0]:
        raise StatskitError(
            f"database {conn.info.dbname} already has a profiles table: the demo needs an empty database"
        )


def run(dsn: str, users: int, days: int, seed: int, sql_dir) -> DemoStory:
    """Load a synthetic marketplace into dsn, then migrate, backfill its whole period and verify."""
    with db.connect(dsn, autocommit=True) as conn:
        _refuse_existing_sources(conn)
        last_day = backfill.yesterday(conn, "UTC")
        market = demo_data.generate(users=users, days=days, seed=seed, last_day=last_day)
        with conn.transaction():
            demo_data.create_source_tables(conn)
        demo_data.load(conn, market)
        conn.execute("analyze")

    target = migrate.Target.open(dsn, sql_dir)
    try:
        applied = migrate.migrate(target)
        progress = backfill.backfill(dsn, backfill.Request(market.first_day, market.last_day))
        first, last = market.last_day - timedelta(days=6), market.last_day
        checks = verify.run_checks(target, None, verify.CHECK_GROUPS, first, last, 20)
        with cron.connect_cron(dsn, target.conn, None) as cron_conn:
            jobs = cron.registered_jobs(cron_conn, [j.name for j in cron.wanted_jobs(target.settings)])
        story = DemoStory(dsn, market.count(), market.first_day, market.last_day, applied, progress, checks, jobs)
        story.kpis = _kpis(target, market.last_day)
        story.metric_units = dashboard.metric_units(target)
    finally:
        target.close()
    return story


def _kpis(target: migrate.Target, day) -> dict:
    """The KPI sets of the busiest tutor and the busiest client on the last day, against the week before."""
    out = {}
    for role, busiest_by in (("tutor", "completed_sessions"), ("client", "active_bookings + completed_sessions")):
        row = target.conn.execute(
            f"select s.user_id from user_statistics_daily s join profiles p on p.id = s.user_id"
            f" where s.date = %s and p.role = %s order by {busiest_by} desc, s.user_id limit 1",
            [day, role],
        ).fetchone()
        if row:
            out[role] = (row[0], dashboard.user_kpis(target, row[0], day, "week")[2])
    return out
