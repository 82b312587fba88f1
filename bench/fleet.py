"""The fleet against one server: `python -m bench.fleet --users 10000 --markdown docs/performance.md`.

The same synthetic marketplace on one server and split over four shards on two servers (durable
clusters, as PostgreSQL ships them). Measured in one run: a night on one server against the sum
of the four shards' nights (each shard's own, one after the other, so none shares a core); each
shard's night against its users; a dashboard call (user_kpis) through the PL/Proxy router and
through the dblink router against the same call on the shard, under pgbench with 16 clients, and
the CPU a call costs each backend on its way from one client; migrate of four shards with
--parallel 4 against one shard's migrate.
"""

import argparse
import dataclasses
import os
import re
import statistics
import subprocess
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import psycopg

from bench.__main__ import machine
from toolkit import api, fleet as fleet_core, render
from toolkit.cluster import LocalCluster
from toolkit.demo import create_advised_indexes, fresh_database
from toolkit.reference import marketplace, shards as reference_shards
from toolkit.settings import ROUTER_ROLE

SHARDS = 4
REPO = Path(__file__).resolve().parent.parent


def load(project, dsn, market, schema_sql):
    with psycopg.connect(dsn) as conn:
        conn.execute(schema_sql)
        marketplace.load(conn, market)
    with project.deployment(dsn) as app:
        create_advised_indexes(app.target)
        app.target.conn.execute("analyze")


def night(conn, catalog, day, stepped=False) -> tuple[float, float]:
    """One night of day D, (platform, users) seconds: as the first night after a backfill runs it
    (from history: the range functions keep no sums), or `stepped` from the sums of D - 1 as
    every night after that (D - 1 run first, untimed); the days' rows and every kept sum removed
    first and a checkpoint taken."""
    for rollup in (catalog.user, catalog.platform):
        conn.execute(f"delete from {rollup.table} where date between %s and %s", [day - timedelta(days=1), day])
        conn.execute(f"truncate statskit.{rollup.table}_sums, statskit.{rollup.table}_sums_day")
    if stepped:
        run_night(conn, day - timedelta(days=1))
    conn.execute("checkpoint")
    started = time.perf_counter()
    platform = run_night(conn, day)
    return platform, time.perf_counter() - started - platform


def nights(databases, day, stepped, rounds=5) -> list[tuple[float, float]]:
    """Each database's (dsn, catalog) night, in rounds that visit every database in turn (so
    that whatever else the machine does falls on all alike): the median round of each."""
    times = [[] for _ in databases]
    connections = [psycopg.connect(dsn, autocommit=True) for dsn, _ in databases]
    try:
        for _ in range(rounds):
            for taken, conn, (_, catalog) in zip(times, connections, databases):
                taken.append(night(conn, catalog, day, stepped))
    finally:
        for conn in connections:
            conn.close()
    return [sorted(taken, key=sum)[len(taken) // 2] for taken in times]


def run_night(conn, day) -> float:
    """The platform's and the users' nightly functions of day; the platform's seconds."""
    started = time.perf_counter()
    conn.execute("select aggregate_daily_statistics(%s)", [day])
    platform = time.perf_counter() - started
    conn.execute("select aggregate_user_statistics(null, %s)", [day])
    return platform


def pgbench(server, dbname, count, day, seconds):
    """user_kpis of a random one of `count` users (table bench_users) from 16 clients: (tps, failed)."""
    script = Path(tempfile.mkdtemp()) / "kpis.sql"
    script.write_text(f"\\set n random(1, {count})\n"
                      f"select * from user_kpis((select id from bench_users where n = :n), '{day}');\n")
    done = subprocess.run(["pgbench", "-n", "-c", "16", "-j", "2", "-T", str(seconds), "-f", str(script),
                           "-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres", dbname],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    tps = float(re.search(r"tps = ([\d.]+) \(without initial connection time\)", done.stdout).group(1))
    failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
    return tps, int(failed.group(1)) if failed else 0


def cpu_seconds(pid: int) -> float:
    """A local backend's CPU time so far (user and system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_per_call(server, dbname, shard_dbname, count, day, calls=2000) -> tuple[float, float]:
    """user_kpis of `calls` users in turn from one client: the CPU µs a call costs the backend
    it is made on, and the shard's backends that serve that backend (none for a call made on the
    shard itself). Unlike a rate under load, what else the machine does hardly moves it."""
    query = "select * from user_kpis((select id from bench_users where n = %s), %s)"
    with psycopg.connect(server.dsn(dbname), autocommit=True) as conn, \
            psycopg.connect(server.dsn(shard_dbname), autocommit=True) as shard:
        conn.execute(query, [1, day]).fetchall()  # a router's connection to the shard is open
        serving = [pid for (pid,) in shard.execute(
            "select pid from pg_stat_activity where datname = current_database() and usename = %s", [ROUTER_ROLE])]
        before = cpu_seconds(conn.info.backend_pid), sum(map(cpu_seconds, serving))
        for i in range(calls):
            conn.execute(query, [i % count + 1, day]).fetchall()
        after = cpu_seconds(conn.info.backend_pid), sum(map(cpu_seconds, serving))
    return tuple((b - a) / calls * 1e6 for a, b in zip(before, after))


def measure(servers, users: int, days: int, seconds: int, prefix: str = "bench_fleet",
            rounds: int = 5) -> tuple[list, int]:
    """Everything the table shows, on `servers` (two; shard i on server i % 2): (rows of
    (what, measured, ratio), source rows); each dashboard call's rate from `rounds` pgbench runs
    of `seconds`."""
    project = api.Project.open(REPO / "sql")
    last = date(2026, 10, 31)
    market = marketplace.generate(users=users, days=days, seed=11, last_day=last)
    night_day, filled_to = last, last - timedelta(days=1)

    # one server, all the data
    whole = fresh_database(servers[0], f"{prefix}_whole")
    load(project, whole, market, marketplace.reference_schema_sql())
    with project.deployment(whole) as app:
        app.migrate()
        app.backfill(market.first_day, filled_to)

    # four shards on two servers, and a router
    dsns = [fresh_database(servers[i % 2], f"{prefix}_shard{i}") for i in range(SHARDS)]
    router = fresh_database(servers[0], f"{prefix}_router")
    fleet = fleet_core.Fleet(None, tuple(fleet_core.Shard(i, f"shard{i}", dsn) for i, dsn in enumerate(dsns)),
                             router=router)
    with psycopg.connect(whole) as conn:
        shard_of = fleet_core.placements(conn, fleet, [row[0] for row in market.rows["profiles"]], "uuid")
    parts = reference_shards.split(market, project.catalog, shard_of, SHARDS)
    for dsn, part in zip(dsns, parts):
        load(project, dsn, part, reference_shards.shard_schema_sql())
    # migrate as the command runs it (each shard opened, its SQL rendered, applied): a fleet of one
    # shard (a copy of shard 0), then the four at once; then the router
    alone = fresh_database(servers[0], f"{prefix}_alone")
    load(project, alone, parts[0], reference_shards.shard_schema_sql())
    render._RENDERED.clear()  # each timing renders afresh, as a command does
    began = time.perf_counter()
    migrated = project.fleet(fleet_core.Fleet(None, (fleet_core.Shard(0, "alone", alone),))).migrate(parallel=1)
    one_migrate = time.perf_counter() - began
    render._RENDERED.clear()
    began = time.perf_counter()
    migrated += project.fleet(dataclasses.replace(fleet, router=None)).migrate(parallel=4)
    fleet_migrate = time.perf_counter() - began
    shards = project.fleet(fleet)
    began = time.perf_counter()
    migrated += shards.migrate(parallel=4)
    router_migrate = time.perf_counter() - began
    assert all(o.ok for o in migrated), [str(o.error) for o in migrated if not o.ok]
    filled = shards.backfill(market.first_day, filled_to, parallel=4)
    assert all(o.ok for o in filled), [str(o.error) for o in filled if not o.ok]
    databases = [(whole, project.catalog)] + [(dsn, project.catalog.for_shard()) for dsn in dsns]
    for dsn, _ in databases:  # nothing left for autovacuum to do while the nights are timed
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("vacuum analyze")
    one_night, *shard_nights = nights(databases, night_day, stepped=False)
    one_step, *shard_steps = nights(databases, night_day, stepped=True)
    shard_users = [len(part.rows["profiles"]) for part in parts]

    # the same fleet behind a dblink router, as on a managed service
    dblink_router = fresh_database(servers[0], f"{prefix}_router_dblink")
    with psycopg.connect(dblink_router, autocommit=True) as conn:
        conn.execute("create extension dblink")
    routed = project.fleet(dataclasses.replace(fleet, router=dblink_router, router_engine="dblink")).migrate(parallel=4)
    assert all(o.ok for o in routed), [str(o.error) for o in routed if not o.ok]

    # a dashboard call through each router, against the same call on the shard
    users0 = [row[0] for row in parts[0].rows["profiles"] if row[2].date() <= filled_to]
    routers = {"PL/Proxy": f"{prefix}_router", "dblink": f"{prefix}_router_dblink"}
    for dbname in [f"{prefix}_shard0", *routers.values()]:
        with psycopg.connect(servers[0].dsn(dbname), autocommit=True) as conn:
            conn.execute("drop table if exists bench_users")
            conn.execute("create table bench_users (n integer primary key, id uuid not null)")
            with conn.cursor().copy("copy bench_users (n, id) from stdin") as copy:
                for n, user in enumerate(users0, 1):
                    copy.write_row((n, user))
    # rounds of the three in turn (what else the machine does falls on all alike): the median rate
    # of each, and every failed call
    targets = {"direct": f"{prefix}_shard0", **routers}
    runs = {name: [] for name in targets}
    for _ in range(rounds):
        for name, dbname in targets.items():
            runs[name].append(pgbench(servers[0], dbname, len(users0), filled_to, seconds))
    rates = {name: (statistics.median(tps for tps, _ in taken), sum(failed for _, failed in taken))
             for name, taken in runs.items()}
    (direct_tps, direct_failed), routed = rates.pop("direct"), rates
    cpu = {name: cpu_per_call(servers[0], dbname, targets["direct"], len(users0), filled_to)
           for name, dbname in targets.items()}
    direct_cpu = cpu.pop("direct")[0]

    def split(platform, user):
        return f"platform {platform:.3f} s + users {user:.3f} s"

    def against(one, shards, what, plural):
        summed = [sum(n[0] for n in shards), sum(n[1] for n in shards)]
        return [(f"{what}, one server (all users)", f"{sum(one):.3f} s", split(*one)),
                (f"the four shards' {plural}, summed", f"{sum(summed):.3f} s",
                 f"{sum(summed) / sum(one):.2f}× one server (goal ≤ 1.3×): {split(*summed)}, "
                 f"{summed[0] / one[0]:.2f}× and {summed[1] / one[1]:.2f}×")]

    total = sum(map(sum, shard_steps))
    rows = against(one_step, shard_steps, "stepped night", "stepped nights") + against(
        one_night, shard_nights, "night from history", "nights from history") + [
        (f"shard{i}'s stepped night ({count:,} users, {count / users:.0%})", f"{sum(took):.3f} s",
         f"{sum(took) / total:.0%} of the fleet's work")
        for i, (count, took) in enumerate(zip(shard_users, shard_steps))] + [
        ("user_kpis on shard0, 16 clients", f"{direct_tps:,.0f} calls/s", f"{direct_failed} failed"),
    ] + [(f"user_kpis through the {engine} router", f"{tps:,.0f} calls/s",
          f"{tps / direct_tps:.2f}× direct (goal ≥ 0.5×), {failed} failed")
         for engine, (tps, failed) in routed.items()] + [
        ("user_kpis on shard0, one client: CPU per call", f"{direct_cpu:.0f} µs", ""),
    ] + [(f"user_kpis through the {engine} router, one client: CPU per call",
          f"{router:.0f} µs + {shard:.0f} µs on the shard",
          f"{direct_cpu / (router + shard):.2f}× direct's (what a rate on shared cores can be)")
         for engine, (router, shard) in cpu.items()] + [
        ("migrate of one shard", f"{one_migrate:.2f} s", ""),
        ("migrate --fleet of four, --parallel 4", f"{fleet_migrate:.2f} s",
         f"{fleet_migrate / one_migrate:.2f}× one shard (goal ≤ 2×)"),
        ("then migrate --fleet with the router (shards up to date)", f"{router_migrate:.2f} s", ""),
    ]
    return rows, market.count()


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--seconds", type=int, default=5, help="each pgbench run")
    parser.add_argument("--rounds", type=int, default=5, help="pgbench runs of each dashboard target, in turn")
    parser.add_argument("--ports", type=int, nargs=2, default=[31916, 31918])
    parser.add_argument("--markdown", type=Path, help="write the table here, between the FLEET markers")
    args = parser.parse_args()
    started = time.perf_counter()
    servers = [LocalCluster(f"bench-fleet-{port}", port, durable=True) for port in args.ports]
    for server in servers:
        server.start()
    rows, source_rows = measure(servers, args.users, args.days, args.seconds, rounds=args.rounds)
    table = (f"{args.users:,} users × {args.days} days ({source_rows:,} source rows), four shards on two "
             f"durable servers of this machine ({machine()}), run in {time.perf_counter() - started:.0f} s:\n\n"
             "| what | measured | ratio |\n|---|---:|---|\n" + "".join(f"| {a} | {b} | {c} |\n" for a, b, c in rows))
    print(table)
    if args.markdown:
        text = args.markdown.read_text()
        head, rest = text.split("<!-- FLEET:START -->", 1)
        _, tail = rest.split("<!-- FLEET:END -->", 1)
        args.markdown.write_text(f"{head}<!-- FLEET:START -->\n{table}<!-- FLEET:END -->{tail}")


if __name__ == "__main__":
    main()
