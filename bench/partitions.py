"""Benchmark the partitioned rollup against one plain table: `python -m bench.partitions`.

On a durable cluster (fsync, synchronous_commit and full_page_writes on, as production runs),
the same generated marketplace is deployed twice, partitioned by month and not, and backfilled:

- storage: bytes per user-day of each layout, heap and indexes, and the size a year takes;
- the dashboard: `user_kpis` under pgbench (16 clients), p50 and p99, on each layout, with
  user_metric's generic plan (as deployed), the plan PostgreSQL picks (auto) and custom plans;
- retention: one month dropped as the partitions job drops it (DETACH, DROP) against a DELETE of
  the same rows and the VACUUM after it: time, WAL, and how long the table is locked;
- a night at size (--night-users): one stepped night (users and platform) against a COPY of the
  rows it writes; the dashboard at size (--kpis-users, alone): user_kpis on 30 days of rows.
Every ratio compares numbers measured in the same run on the same machine.
"""

import argparse
import statistics
import subprocess
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import psycopg

from toolkit import api
from toolkit.cluster import LocalCluster

from .__main__ import REPO, copy_floor, machine, step_indexes, timed, wal_bytes
from .generate import generate

FIRST_DAY = date(2024, 9, 1)


def deployed(cluster, dbname, users, days, seed, partition_period, backfill_days=None):
    """A fresh database with the generated marketplace, migrated with this layout and backfilled
    over its days (or the first backfill_days of them); return its DSN and the backfill's seconds."""
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute(f"drop database if exists {dbname} with (force)")
        admin.execute(f"create database {dbname}")
    dsn = cluster.dsn(dbname)
    with psycopg.connect(dsn, autocommit=True) as conn:
        generate(conn, users, days, 20, seed, FIRST_DAY)
    project = api.Project.open(REPO / "sql")
    with project.deployment(dsn, cron=False, partition_period=partition_period) as app:
        app.migrate()
        started = time.perf_counter()
        app.backfill(FIRST_DAY, FIRST_DAY + timedelta(days=(backfill_days or days) - 1), jobs=2)
        seconds = time.perf_counter() - started
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("vacuum analyze")
    return dsn, seconds


def storage(dsn, table="user_statistics_daily"):
    """(rows, heap bytes, index bytes, partitions) of a table and its partitions."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            f"select (select count(*) from {table}), sum(pg_table_size(c.oid))::bigint, sum(pg_indexes_size(c.oid))::bigint,"
            f" count(*) filter (where c.relkind = 'r') from pg_class c"
            f" where c.oid = '{table}'::regclass or c.oid in (select relid from pg_partition_tree('{table}'))").fetchone()


def pgbench_kpis(dsn, users, clients, seconds, plan_cache_mode, day=date(2026, 10, 15)):
    """p50 and p99 latency (ms) and calls/s of user_kpis for random users, from pgbench's log,
    with user_metric (which it calls once per KPI) set to plan_cache_mode for the run."""
    parts = dict(item.split("=", 1) for item in dsn.split())
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "kpis.sql"
        script.write_text(f"\\set n random(1, {users})\n"
                          f"select * from user_kpis(md5('user' || :n)::uuid, '{day}', 'week');\n")
        with psycopg.connect(dsn, autocommit=True) as conn:  # the setting the function carries
            conn.execute(f"alter function user_metric(uuid, text, date, text) set plan_cache_mode = {plan_cache_mode}")
        done = subprocess.run(
            ["pgbench", "-n", "-h", parts["host"], "-p", parts["port"], "-U", parts["user"], "-c", str(clients),
             "-j", "2", "-T", str(seconds), "-f", str(script), "-l", "--log-prefix", f"{folder}/log", parts["dbname"]],
            capture_output=True, text=True, check=True)
        latencies = sorted(int(line.split()[2]) / 1000 for log in Path(folder).glob("log*")
                           for line in log.read_text().splitlines())
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("alter function user_metric(uuid, text, date, text) set plan_cache_mode = force_generic_plan")
    tps = float(next(line for line in done.stdout.splitlines() if line.startswith("tps")).split()[2])
    return {"p50_ms": statistics.median(latencies), "p99_ms": latencies[int(len(latencies) * 0.99)], "tps": tps}


def drop_a_month(partitioned, plain, month):
    """A month of rows removed from each layout: (seconds locked, WAL bytes, rows) each, and the
    VACUUM the DELETE needs after it. Each after a checkpoint: a month is removed long after
    its last write, so its first change of each page since writes the whole page to the WAL."""
    after = (month + timedelta(days=32)).replace(day=1)
    out = {}
    with psycopg.connect(partitioned, autocommit=True) as conn:
        rows = conn.execute("select count(*) from user_statistics_daily where date >= %s and date < %s",
                            [month, after]).fetchone()[0]
        conn.execute("checkpoint")
        start = conn.execute("select pg_current_wal_lsn()").fetchone()[0]
        started = time.perf_counter()
        with conn.transaction():  # as the partitions job runs it: the table is ACCESS EXCLUSIVE until commit
            conn.execute(f"alter table user_statistics_daily detach partition user_statistics_daily_{month:%Y%m%d}")
            conn.execute(f"drop table user_statistics_daily_{month:%Y%m%d}")
        out["drop_s"] = time.perf_counter() - started
        out["drop_wal"] = wal_bytes(conn, start, conn.execute("select pg_current_wal_lsn()").fetchone()[0])
        out["rows"] = rows
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute("checkpoint")
        start = conn.execute("select pg_current_wal_lsn()").fetchone()[0]
        out["delete_s"], _ = timed(conn, "with gone as (delete from user_statistics_daily where date >= %s and date < %s"
                                         " returning 1) select count(*) from gone", [month, after])
        out["delete_wal"] = wal_bytes(conn, start, conn.execute("select pg_current_wal_lsn()").fetchone()[0])
        start = conn.execute("select pg_current_wal_lsn()").fetchone()[0]
        started = time.perf_counter()
        conn.execute("vacuum user_statistics_daily")
        out["vacuum_s"] = time.perf_counter() - started
        out["vacuum_wal"] = wal_bytes(conn, start, conn.execute("select pg_current_wal_lsn()").fetchone()[0])
    return out


def night(cluster, users, days, seed):
    """A stepped night at size: history backfilled up to the day before the last two, one night
    from history, then the last two nights stepped (users and platform); against a COPY of a
    night's user rows."""
    dsn, backfill_s = deployed(cluster, f"bench_night_{users}", users, days, seed, "month", backfill_days=days - 3)
    last = FIRST_DAY + timedelta(days=days - 1)
    with psycopg.connect(dsn, autocommit=True) as conn:
        step_indexes(conn)
        conn.execute("select aggregate_daily_statistics(%s), aggregate_user_statistics(null, %s)", [last - timedelta(days=2)] * 2)
        steps = [(timed(conn, "select aggregate_daily_statistics(%s)", [day])[0],
                  timed(conn, "select aggregate_user_statistics(null, %s)", [day])[0])
                 for day in (last - timedelta(days=1), last)]
    copy_s, rows = copy_floor(dsn, last)
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute(f"drop database bench_night_{users} with (force)")
    step_s = statistics.median(user + platform for platform, user in steps)
    return {"users": users, "days": days, "backfill_s": backfill_s, "step_s": step_s, "copy_s": copy_s, "rows": rows}


def kpis_at_size(cluster, users, seed, seconds):
    """user_kpis under pgbench at size: 30 days partitioned by month (the partitions migrate makes
    from the first signup to two months after today's: 31 on 2026-12-01, as many as 26 months of
    history would have), then the same rows as one table (migrate --partition-period none: the
    partition with the rows becomes the table)."""
    dsn, _ = deployed(cluster, f"bench_kpis_{users}", users, 30, seed, "month")
    with psycopg.connect(dsn, autocommit=True) as conn:
        parts = conn.execute("select count(*) from pg_partition_tree('user_statistics_daily') where isleaf").fetchone()[0]
    results = {}
    for period in ("month", "none"):
        if period == "none":
            with api.Project.open(REPO / "sql").deployment(dsn, cron=False, partition_period="none") as app:
                app.migrate()
        for mode in ("force_generic_plan", "auto", "force_custom_plan"):
            results[period, mode] = pgbench_kpis(dsn, users, 16, seconds, mode, day=FIRST_DAY + timedelta(days=20))
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute(f"drop database bench_kpis_{users} with (force)")
    return parts, results


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.partitions", description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20000)
    parser.add_argument("--days", type=int, default=790, help="of history: 790 days fill 26 monthly partitions")
    parser.add_argument("--seconds", type=int, default=30, help="of pgbench per variant")
    parser.add_argument("--night-users", type=int, nargs="*", default=[], help="sizes of the night at size (30 days)")
    parser.add_argument("--kpis-users", type=int, nargs="*", default=[],
                        help="sizes of the dashboard at size (30 days, 31 partitions); skips the other measurements")
    parser.add_argument("--seed", type=float, default=0.42)
    parser.add_argument("--port", type=int, default=30918)
    args = parser.parse_args()
    cluster = LocalCluster("bench-durable", args.port, durable=True)
    cluster.start()
    print(f"machine: {machine()}", flush=True)
    for users in args.kpis_users:
        parts, results = kpis_at_size(cluster, users, args.seed, args.seconds)
        for (period, mode), result in results.items():
            print(f"user_kpis at {users:,} users, {period if period == 'none' else f'{parts} partitions'}, user_metric's "
                  f"plan_cache_mode {mode}: p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, "
                  f"{result['tps']:.0f} calls/s", flush=True)
    if args.kpis_users:
        return
    layouts = {}
    for period in ("month", "none"):
        dsn, seconds = deployed(cluster, f"bench_layout_{period}", args.users, args.days, args.seed, period)
        rows, heap, indexes, parts = storage(dsn)
        layouts[period] = dsn
        print(f"layout {period}: {rows:,} rows in {parts} tables, backfill {seconds:.1f} s; "
              f"per user-day {heap / rows:.0f} B heap + {indexes / rows:.0f} B indexes = {(heap + indexes) / rows:.0f} B; "
              f"a year: {(heap + indexes) / rows * 365 * 1e5 / 1e9:.1f} GB at 100K users, "
              f"{(heap + indexes) / rows * 365 * 1e6 / 1e9:.0f} GB at 1M, {(heap + indexes) / rows * 365 * 1e7 / 1e12:.2f} TB at 10M",
              flush=True)
    for period, dsn in layouts.items():
        for mode in ("force_generic_plan", "auto", "force_custom_plan"):  # as deployed first
            result = pgbench_kpis(dsn, args.users, 16, args.seconds, mode)
            print(f"user_kpis, {period}, user_metric's plan_cache_mode {mode}: p50 {result['p50_ms']:.2f} ms, "
                  f"p99 {result['p99_ms']:.2f} ms, {result['tps']:.0f} calls/s", flush=True)
    dropped = drop_a_month(layouts["month"], layouts["none"], date(FIRST_DAY.year + 1, FIRST_DAY.month, 1))  # a year in
    print(f"one month ({dropped['rows']:,} rows): DETACH + DROP {dropped['drop_s'] * 1000:.0f} ms locked, "
          f"{dropped['drop_wal'] / 1024:.0f} KiB WAL; DELETE {dropped['delete_s']:.1f} s, {dropped['delete_wal'] / 2**20:.0f} MiB WAL, "
          f"then VACUUM {dropped['vacuum_s']:.1f} s, {dropped['vacuum_wal'] / 2**20:.0f} MiB WAL", flush=True)
    for users in args.night_users:
        row = night(cluster, users, 30, args.seed)
        print(f"night at {users:,} users: backfill {row['backfill_s']:.0f} s; stepped night {row['step_s']:.2f} s, "
              f"COPY of its {row['rows']:,} rows {row['copy_s']:.2f} s: {row['step_s'] / row['copy_s']:.1f}×", flush=True)


if __name__ == "__main__":
    main()
