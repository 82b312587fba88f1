"""`statskit demo --fleet`: the demo as a fleet. Two private PostgreSQL servers each hold a shard
database, the first also the router; the synthetic marketplace is split by the layout of
docs/contract.md ("Sharding"), then the fleet is migrated, backfilled and verified as one, and the
dashboard's numbers are read through the router."""

from dataclasses import dataclass, field
from datetime import timedelta

import psycopg
from psycopg.rows import class_row

from . import api, fleet as fleet_core
from .cluster import DEMO_PORT, LocalCluster
from .dashboard import MetricValue
from .dates import yesterday
from .demo import busiest_users, create_advised_indexes, demo_cluster, fresh_database
from .reference import marketplace, shards as reference_shards

SHARDS = 2
DATABASES = [f"statskit_demo_shard{i}" for i in range(SHARDS)]
ROUTER_DATABASE = "statskit_demo_router"


def clusters(port: int) -> list[LocalCluster]:
    """The demo's own server, and a second one two ports up: shard i lives on server i % 2."""
    return [demo_cluster(port), demo_cluster(port, "demo-fleet") if port == DEMO_PORT else
            LocalCluster(f"demo-fleet-{port}", port + 2)]


@dataclass
class FleetStory:
    fleet_file: object
    rows_loaded: int
    first_day: object
    last_day: object
    migrated: list
    backfilled: list
    report: api.FleetReport
    kpis: dict = field(default_factory=dict)  # role -> (user_id, [MetricValue]) read through the router
    platform: list = field(default_factory=list)  # [MetricValue] of the platform, through the router
    metric_units: dict = field(default_factory=dict)


def run(port: int, users: int, days: int, seed: int, sql_dir, say=lambda message: None) -> FleetStory:
    servers = clusters(port)
    for server in servers:
        server.start()
    project = api.Project.open(sql_dir)
    dsns = [fresh_database(servers[i % 2], name) for i, name in enumerate(DATABASES)]
    router = fresh_database(servers[0], ROUTER_DATABASE)
    lines = [line for dsn in dsns for line in ("[[shards]]", f'dsn = "{dsn}"')]
    path = servers[0].root / "fleet.toml"
    path.write_text("\n".join(lines + ["[router]", f'dsn = "{router}"']) + "\n")
    fleet = fleet_core.load(path)

    say(f"loading a synthetic marketplace split over {SHARDS} shards: {users} users, {days} days, seed {seed} ...")
    with psycopg.connect(dsns[0]) as conn:
        last_day = yesterday(conn, "UTC")
        market = marketplace.generate(users=users, days=days, seed=seed, last_day=last_day)
        users_table = project.catalog.users
        shard_of = fleet_core.placements(conn, fleet, [row[0] for row in market.rows[users_table.name]],
                                         users_table.key_type)
    for dsn, part in zip(dsns, reference_shards.split(market, project.catalog, shard_of, SHARDS)):
        with psycopg.connect(dsn) as conn:
            conn.execute(reference_shards.shard_schema_sql())
            marketplace.load(conn, part)
        with project.deployment(dsn) as app:
            create_advised_indexes(app.target)
            app.target.conn.execute("analyze")

    shards = project.fleet(fleet)
    migrated = shards.migrate()
    backfilled = shards.backfill(market.first_day, market.last_day)
    report = shards.verify(market.last_day - timedelta(days=6), market.last_day)
    story = FleetStory(path, market.count(), market.first_day, market.last_day, migrated, backfilled, report)
    with psycopg.connect(router) as conn, project.deployment(dsns[0]) as app:
        story.kpis = _kpis(conn, app, market.last_day)
        story.platform = conn.cursor(row_factory=class_row(MetricValue)).execute(
            "select name as metric, m.* from unnest(%s::text[]) with ordinality as k (name, position)"
            " cross join lateral platform_metric(k.name, %s, 'week') m order by k.position",
            [[m.name for m in project.catalog.platform.metrics], market.last_day]).fetchall()
    # one server's units: a shard's platform table holds sums, not the metrics the router serves
    story.metric_units = {m.name: m.unit for m in project.catalog.user.metrics + project.catalog.platform.metrics}
    return story


def _kpis(router: psycopg.Connection, app: api.Deployment, day) -> dict:
    """The KPI sets of shard0's busiest tutor and client, read through the router."""
    return {role: (user, router.cursor(row_factory=class_row(MetricValue)).execute(
        "select * from user_kpis(%s, %s, 'week')", [user, day]).fetchall())
        for role, user in busiest_users(app, day).items()}
