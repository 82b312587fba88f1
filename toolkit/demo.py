"""`statskit demo`: a private PostgreSQL with a synthetic marketplace, migrated, backfilled and verified."""

from dataclasses import dataclass, field
from datetime import timedelta

import psycopg
from psycopg import sql

from . import api, backfill, cron, deployment, migrate
from .cluster import DEMO_PORT, LocalCluster
from .dates import yesterday
from .errors import StatskitError
from .reference import marketplace

DEMO_DATABASE = "statskit_demo"


def demo_cluster(port: int = DEMO_PORT, name: str = "demo") -> LocalCluster:
    """The demo's private cluster; on another port than the default, a cluster of its own (a
    cluster keeps the port it was made with)."""
    return LocalCluster(name if port == DEMO_PORT else f"{name}-{port}", port)


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
    booked_until: object = None  # the latest session start: the demo books sessions ahead of its last day


def create_advised_indexes(target: migrate.Target) -> None:
    """The demo's tables are its own: it creates the indexes migrate advises (the one-user lookups,
    the nightly step's timestamps), as a DBA who accepts them would."""
    advised = deployment.missing_lookup_indexes(target.conn, target.catalog, target.settings)
    advised += deployment.missing_step_indexes(target.conn, target.catalog, target.settings)
    for index in advised:
        target.conn.execute(index.statement(concurrently=False))


def fresh_database(cluster: LocalCluster, name: str) -> str:
    """(Re)create a database of a private cluster, with no jobs of its left behind; its DSN."""
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute("select cron.unschedule(jobid) from cron.job where database = %s", [name])
        admin.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))
        admin.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    return cluster.dsn(name)


def fresh_private_database(cluster: LocalCluster) -> str:
    """Start the private cluster and (re)create the demo database in it."""
    cluster.start()
    return fresh_database(cluster, DEMO_DATABASE)


def check_database(target: migrate.Target, cron_dsn: str | None) -> None:
    """Everything the demo needs of a given database, before it loads a row: empty of the
    marketplace's tables, this login may create tables, and (unless --no-cron) pg_cron is
    reachable and this login may schedule the jobs there."""
    conn, users = target.conn, target.catalog.users.name
    if conn.execute("select to_regclass(%s) is not null", [f"public.{users}"]).fetchone()[0]:
        raise StatskitError(f"database {conn.info.dbname} already has a {users} table: the demo needs an empty database")
    user, can_create = conn.execute("select current_user, has_schema_privilege('public', 'create')"
                                    " and has_database_privilege(current_database(), 'create')").fetchone()
    if not can_create:
        raise StatskitError(f"{user} may not create tables in {conn.info.dbname} (CREATE on the database and on "
                            f"schema public); nothing loaded")
    cron_conn = migrate.open_cron(target, cron_dsn)
    if cron_conn is not None:
        with cron_conn:
            cron.check_can_schedule(cron_conn, cron.wanted_jobs(target.settings))


def run(dsn: str, users: int, days: int, seed: int, sql_dir, cron_dsn: str | None = None,
        use_cron: bool = True, say=lambda message: None) -> DemoStory:
    """Check the database, load a synthetic marketplace into it with the indexes statskit advises,
    then migrate, backfill its whole period and verify, through the API as any caller would;
    say() what it loads, once it may."""
    with api.Project.open(sql_dir).deployment(dsn, cron=use_cron) as app:
        target = app.target
        check_database(target, cron_dsn)
        say(f"loading a synthetic marketplace: {users} users, {days} days, seed {seed} ...")
        conn = target.conn
        last_day = yesterday(conn, "UTC")
        market = marketplace.generate(users=users, days=days, seed=seed, last_day=last_day)
        with conn.transaction():
            marketplace.create_source_tables(conn)
        marketplace.load(conn, market)
        create_advised_indexes(target)
        conn.execute("analyze")

        applied = app.migrate(cron_dsn)
        progress = app.backfill(market.first_day, market.last_day)
        report = app.verify(market.last_day - timedelta(days=6), market.last_day, cron_dsn=cron_dsn)
        jobs = []
        cron_conn = migrate.open_cron(target, cron_dsn)
        if cron_conn is not None:
            with cron_conn:
                jobs = cron.registered_jobs(cron_conn, [j.name for j in cron.wanted_jobs(target.settings)])
        story = DemoStory(dsn, market.count(), market.first_day, market.last_day, applied, progress, report.checks,
                          jobs)
        story.booked_until = market.booked_until
        story.kpis = _kpis(app, market.last_day)
        story.metric_units = app.metric_units()
    return story


def busiest_users(app: api.Deployment, day) -> dict:
    """{role: user} of the busiest tutor and the busiest client on the day."""
    out, users, rollup = {}, app.catalog.users, app.catalog.user.table
    for role, busiest_by in (("tutor", "completed_sessions"), ("client", "active_bookings + completed_sessions")):
        row = app.target.conn.execute(
            f"select s.user_id from {rollup} s join {users.name} p on p.{users.key} = s.user_id"
            f" where s.date = %s and p.{users.role} = %s order by {busiest_by} desc, s.user_id limit 1",
            [day, role],
        ).fetchone()
        if row:
            out[role] = row[0]
    return out


def _kpis(app: api.Deployment, day) -> dict:
    """The KPI sets of the busiest tutor and the busiest client on the last day, against the week before."""
    return {role: (user, app.user_kpis(user, day, "week")[2]) for role, user in busiest_users(app, day).items()}
