"""Benchmark the aggregation functions: `python -m bench --users 10000 100000 --markdown docs/performance.md`.

For each size: generate the source tables (set-based, seeded), migrate, then time the set-based
day, the same day user by user through aggregate_single_user_statistics (sampled and scaled
when large, and said so), the platform day, and a re-run of a stored day with the rows and WAL
it rewrote. Every ratio compares numbers measured in the same run on the same data.
"""

import argparse
import os
import platform
import statistics
import time
from datetime import date, timedelta
from pathlib import Path

import psycopg

from toolkit import deployment, partitions
from toolkit.catalog import load_catalog
from toolkit.cluster import LocalCluster
from toolkit.migrate import Target, migrate
from toolkit.settings import Settings

from .generate import generate

REPO = Path(__file__).resolve().parent.parent


def timed(conn, query, params=()):
    started = time.perf_counter()
    result = conn.execute(query, params).fetchone()
    return time.perf_counter() - started, result


def flush_statistics(conn):
    """Make this backend's table statistics visible to its next read of them."""
    conn.execute("select pg_stat_force_next_flush()")
    conn.execute("select pg_stat_clear_snapshot()")


def table_writes(conn, table):
    """(rows updated, dead tuples, WAL position) of a table and its partitions, with this backend's
    statistics flushed."""
    flush_statistics(conn)
    updated, dead = conn.execute(
        "select coalesce(sum(n_tup_upd), 0), coalesce(sum(n_dead_tup), 0) from pg_stat_user_tables"
        " where relid = %s::regclass or relid in (select relid from pg_partition_tree(%s::regclass))", [table, table]).fetchone()
    return updated, dead, conn.execute("select pg_current_wal_lsn()").fetchone()[0]


def wal_bytes(conn, start, end):
    return conn.execute("select pg_wal_lsn_diff(%s, %s)", [end, start]).fetchone()[0]


def generated_database(cluster, dbname, users, days, bookings_per_user, seed, first_day, partition_period="month"):
    """Create `dbname` afresh with the generated source tables and migrate it; return its DSN, the
    row count of each source table and the seconds the generation took."""
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute(f"drop database if exists {dbname} with (force)")
        admin.execute(f"create database {dbname}")
    dsn = cluster.dsn(dbname)
    with psycopg.connect(dsn, autocommit=True) as conn:
        started = time.perf_counter()
        counts = generate(conn, users, days, bookings_per_user, seed, first_day)
        seconds = time.perf_counter() - started
    with Target.open(dsn, REPO / "sql", dict(cron=False, partition_period=partition_period)) as target:
        migrate(target)
    return dsn, counts, seconds


def step_indexes(conn, tables=None):
    """Create the indexes migrate advises for the nightly step (of `tables`, or all), as it advises
    them: those no index leads with yet. Return their names."""
    names = []
    for index in deployment.missing_step_indexes(conn, load_catalog(REPO / "sql" / "catalog.toml"), Settings()):
        if tables is None or index.table in tables:
            names.append(f"{index.table}_{index.column}_step_idx")
            conn.execute(index.statement(names[-1], concurrently=False))
    conn.execute("analyze" if tables is None else f"analyze {', '.join(tables)}")
    return names


def copy_floor(dsn, day=None, rounds=1, logged=True):
    """(seconds, user rows) to COPY the stored rows of both rollups, of `day` or of all days, into
    identical empty tables with their indexes: the physical cost of writing them at all, durably
    (logged tables, after a checkpoint as each night; `logged=False`: temporary tables, which
    write no WAL, the floor of the runs before issue 25's last measurements). The median of
    `rounds`, each into tables made afresh."""
    tables = ("user_statistics_daily", "platform_statistics_daily")
    persistence = "" if logged else "temporary"
    with psycopg.connect(dsn) as conn:
        data = {}
        for table in tables:
            with conn.cursor().copy(f"copy (select * from {table} where %s::date is null or date = %s)"
                                    " to stdout", [day, day]) as copy:
                data[table] = [bytes(block) for block in copy]
        times = []
        for _ in range(rounds):
            for table in tables:
                conn.execute(f"drop table if exists {table}_floor")
                conn.execute(f"create {persistence} table {table}_floor (like {table} including all)")
            conn.commit()
            conn.execute("checkpoint")
            conn.commit()
            started = time.perf_counter()
            for table in tables:
                with conn.cursor().copy(f"copy {table}_floor from stdin") as copy:
                    for block in data[table]:
                        copy.write(block)
            conn.commit()
            times.append(time.perf_counter() - started)
        rows = conn.execute("select count(*) from user_statistics_daily_floor").fetchone()[0]
        for table in tables:
            conn.execute(f"drop table {table}_floor")
        conn.commit()
        return statistics.median(times), rows


def period_written_before(conn, first_night):
    """Empty the partition of `first_night` in both rollups and write its days before
    `first_night` as backfill writes them; return the user rows it holds then. The nights then
    append to a partition holding its period's earlier days, as mid-period in production (a
    partition emptied by DELETE would have them refill its vacuumed pages, each page's first
    change after a checkpoint a full page in the WAL, which an append-only partition never pays)."""
    for table in ("user_statistics_daily", "platform_statistics_daily"):
        holding = next(p for p in partitions.partitions(conn, Settings(), table)
                       if (p.first_day or first_night) <= first_night
                       and (p.after_day is None or first_night < p.after_day))
        conn.execute(f"truncate {holding.name}")
    first = holding.first_day
    if first < first_night:
        last = first_night - timedelta(days=1)
        conn.execute("select aggregate_daily_statistics_range(%s, %s), aggregate_user_statistics_range(%s, %s)",
                     [first, last, first, last])
    for table in ("user_statistics_daily", "platform_statistics_daily"):
        conn.execute(f"vacuum analyze {table}")
    return conn.execute("select count(*) from user_statistics_daily where date >= %s", [first]).fetchone()[0]


def job_seconds(conn, query, params=()):
    """Seconds of `query` on a new connection to `conn`'s database, as pg_cron runs each job: the
    function compiled and the catalog entries it names loaded afresh, where a second call on one
    connection finds them cached."""
    with psycopg.connect(conn.info.dsn, autocommit=True) as job:
        return timed(job, query, params)[0]


def night(conn, day):
    """One night as the two jobs run it, platform then users, each on its own connection, after a
    checkpoint (on a server the nights are a day apart, so checkpoints have come between them and
    each night's first write of a page writes the whole page to the WAL): (platform seconds, user
    seconds, WAL bytes)."""
    conn.execute("checkpoint")
    start = conn.execute("select pg_current_wal_lsn()").fetchone()[0]
    platform_s = job_seconds(conn, "select aggregate_daily_statistics(%s)", [day])
    user_s = job_seconds(conn, "select aggregate_user_statistics(null, %s)", [day])
    return platform_s, user_s, wal_bytes(conn, start, conn.execute("select pg_current_wal_lsn()").fetchone()[0])


def bench_size(cluster, users, days, bookings_per_user, seed, loop_sample, partition_period="month"):
    first_day = date(2026, 1, 1)
    last_day = first_day + timedelta(days=days - 1)
    dsn, counts, generate_s = generated_database(cluster, f"bench_{users}", users, days, bookings_per_user, seed,
                                                 first_day, partition_period)
    row = {"users": users, "generate_s": generate_s, "source_rows": sum(counts.values()), "bookings": counts["bookings"]}

    with psycopg.connect(dsn, autocommit=True) as conn:
        fresh_days = [last_day - timedelta(days=i) for i in range(3)]
        runs = [timed(conn, "select aggregate_user_statistics(null, %s)", [d]) for d in fresh_days]
        row["set_based_s"] = statistics.median(t for t, _ in runs)
        row["rows_per_day"] = runs[0][1][0]

        loop_day = last_day - timedelta(days=3)
        eligible = conn.execute("select count(*) from profiles where created_at < %s::date + 1", [loop_day]).fetchone()[0]
        sample = min(loop_sample, eligible)
        seconds, _ = timed(
            conn,
            "select count(aggregate_single_user_statistics(id, %s)) from"
            " (select id from profiles where created_at < %s::date + 1 order by md5(id::text) limit %s) sampled",
            [loop_day, loop_day, sample])
        row["one_user_ms"] = seconds / sample * 1000
        row["loop_sampled"] = sample < eligible
        row["loop_s"] = seconds / sample * eligible
        row["speedup"] = row["loop_s"] / row["set_based_s"]

        platform_runs = [timed(conn, "select aggregate_daily_statistics(%s)", [d])[0] for d in fresh_days]
        row["platform_s"] = statistics.median(platform_runs)

        before = table_writes(conn, "user_statistics_daily")
        row["rerun_s"], rerun = timed(conn, "select aggregate_user_statistics(null, %s)", [last_day])
        after = table_writes(conn, "user_statistics_daily")
        row["rerun_rows_written"] = rerun[0]
        row["rerun_updated"] = after[0] - before[0]
        row["rerun_dead"] = after[1] - before[1]
        row["rerun_wal"] = wal_bytes(conn, before[2], after[2])

        # Nights as the jobs run them (change capture on), through the indexes migrate advises for
        # the step (dropped again below: the write benches run without them): a night from history,
        # then steps from the day before, the last of them onto the 1st of a month (month windows end).
        created = step_indexes(conn)
        nights = [last_day - timedelta(days=n) for n in range(4, -1, -1)]
        row["period_rows_before"] = period_written_before(conn, nights[0])  # each night writes its rows afresh
        conn.execute("truncate statskit.user_statistics_daily_sums, statskit.user_statistics_daily_sums_day,"
                     " statskit.platform_statistics_daily_sums, statskit.platform_statistics_daily_sums_day")
        conn.execute("select aggregate_daily_statistics(%s), aggregate_user_statistics(null, %s)", [nights[0]] * 2)
        steps = [night(conn, day) for day in nights[1:]]
        row["step_platform_s"] = statistics.median(platform for platform, _, _ in steps)
        row["step_s"] = statistics.median(user for _, user, _ in steps)
        row["step_wal"] = statistics.median(wal for _, _, wal in steps)
        unwritten_day = last_day + timedelta(days=1)  # May 1st at 120 days; also for the WAL of a first write
        row["month_step_platform_s"], row["month_step_s"], row["first_write_wal"] = night(conn, unwritten_day)

        # Late data for 1% of users: a re-run rewrites about that many rows, not the whole day.
        late = max(1, users // 100)
        conn.execute(
            "insert into reviews (id, booking_id, reviewer_id, reviewee_id, rating, created_at)"
            " select 900000000 + row_number() over (), null, id, id, 5, %s::date + interval '12 hours'"
            " from (select id from profiles where created_at < %s::date order by id limit %s) p",
            [last_day, last_day, late])
        before = table_writes(conn, "user_statistics_daily")
        row["late_s"], late_written = timed(conn, "select aggregate_user_statistics(null, %s)", [last_day])
        after = table_writes(conn, "user_statistics_daily")
        row["late_users"] = late
        row["late_rows_written"] = late_written[0]
        row["late_updated"] = after[0] - before[0]
        row["late_wal"] = wal_bytes(conn, before[2], after[2])
        for name in created:
            conn.execute(f"drop index {name}")
    row["step_copy_s"], _ = copy_floor(dsn, unwritten_day, rounds=3)
    row["step_copy_temporary_s"], _ = copy_floor(dsn, unwritten_day, rounds=3, logged=False)
    return row


def bench_backfill(cluster, users, days, day_by_day=True, rounds=3):
    """Fill the whole period of bench_size's database three ways: the one-day functions called day
    by day on one connection (the baseline; skipped with day_by_day=False), statskit backfill on
    one connection and with its default two (`rounds` of each in turn, medians); and the floor:
    COPY of the same rows into an identical empty table."""
    from toolkit import api, backfill

    project = api.Project.open(REPO / "sql")
    dsn = cluster.dsn(f"bench_{users}")
    first_day = date(2026, 1, 1)
    last_day = first_day + timedelta(days=days - 1)
    row = {"users": users, "days": days}

    def reset():
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(backfill.ledger_sql(project.catalog.users.key_type))
            conn.execute("truncate user_statistics_daily, platform_statistics_daily, statskit.backfill_ledger")
            conn.execute("vacuum analyze user_statistics_daily")
            conn.execute("checkpoint")  # no run pays for the WAL of the one before

    if day_by_day:
        reset()
        started = time.perf_counter()
        with psycopg.connect(dsn, autocommit=True) as conn:
            for n in range(days):
                day = first_day + timedelta(days=n)
                conn.execute("select aggregate_daily_statistics(%s), aggregate_user_statistics(null, %s)", [day, day])
        row["day_by_day_s"] = time.perf_counter() - started
    seconds = {1: [], 2: []}
    for _ in range(rounds):  # in turn, medians: one run of each varies by ±10% on this machine
        for jobs in seconds:
            reset()
            with project.deployment(dsn) as app:
                started = time.perf_counter()
                done = app.backfill(first_day, last_day, jobs=jobs)
                seconds[jobs].append(time.perf_counter() - started)
    for jobs, runs in seconds.items():
        row[f"jobs{jobs}_s"] = statistics.median(runs)
    row["rows"] = done.rows_written
    row["copy_s"], _ = copy_floor(dsn)
    return row


# The footprint's states, in the order each slice runs them: capture off and no step indexes,
# capture on, capture on with the step indexes migrate advises for the table.
FOOTPRINT_STATES = ("off", "on", "indexed")
SINGLE_ROW_SLICES = 20  # single-row statements run in this many slices per state, the states in turn


def footprint(conn, table, slices, measure):
    """{state: [seconds of each slice]} of `measure(slice)` in each of FOOTPRINT_STATES, the states
    in turn within each slice, each slice starting one state further (the indexes made before the
    slice and dropped after it). A durable commit is most of a single-row statement, and this
    disk's commit latency drifts by ±20% from one tenth of a second to the next, and a checkpoint
    slows a second of them: slices short, interleaved and rotated weigh the drift, and whatever a
    state's predecessor leaves, on each alike, and the median slice (state_seconds) leaves
    a slow second out."""
    timings = {state: [] for state in FOOTPRINT_STATES}
    for number in range(slices):
        turn = number % len(FOOTPRINT_STATES)
        for state in FOOTPRINT_STATES[turn:] + FOOTPRINT_STATES[:turn]:
            conn.execute(f"alter table {table} {'disable' if state == 'off' else 'enable'} trigger user")
            created = step_indexes(conn, [table]) if state == "indexed" else []
            timings[state].append(measure(number))
            for name in created:
                conn.execute(f"drop index {name}")
    conn.execute(f"alter table {table} enable trigger user")
    return timings


def state_seconds(timings, single):
    """A state's time: of single-row statements, all the slices' from the median slice; of bulk
    ones, the median round."""
    return statistics.median(timings) * (len(timings) if single else 1)


def bench_capture(cluster, users, rounds=3):
    """Change capture on the filled database of bench_backfill: what the triggers and the step's
    indexes cost the application's writes (against neither, interleaved), and what a late import
    costs the next nightly run (aggregate_*_changes) against recomputing every user over the
    same days."""
    dsn = cluster.dsn(f"bench_{users}")
    row = {"users": users}
    with psycopg.connect(dsn, autocommit=True) as conn:
        people = [r[0] for r in conn.execute("select id from profiles order by md5(id::text) limit 200")]
        next_id = conn.execute("select max(id) + 1 from bookings").fetchone()[0]

        def insert_bookings(count, days_back, single):
            nonlocal next_id
            created = f"now() - interval '{days_back} days'"
            values = (f"(%s, %s, %s, 'pending', {created}, {created} + interval '2 days', 60)")
            started = time.perf_counter()
            if single:
                for n in range(count):
                    conn.execute(f"insert into bookings (id, tutor_id, client_id, status, created_at, session_start,"
                                 f" duration_minutes) values {values}",
                                 [next_id + n, people[n % 200], people[(n + 1) % 200]])
            else:
                conn.execute("insert into bookings (id, tutor_id, client_id, status, created_at, session_start,"
                             " duration_minutes) select %s + n, (%s::uuid[])[1 + n %% 200], (%s::uuid[])[1 + (n + 1) %% 200],"
                             f" 'pending', {created}, {created} + interval '2 days', 60 from generate_series(0, %s - 1) n",
                             [next_id, people, people, count])
            seconds = time.perf_counter() - started
            conn.execute("alter table bookings disable trigger user")  # clean up without logging it
            conn.execute("delete from bookings where id >= %s", [next_id])
            conn.execute("alter table bookings enable trigger user")
            conn.execute("truncate statskit.user_changes, statskit.platform_changes")
            next_id += count
            return seconds

        # The nightly step's advised indexes on bookings (five timestamps, three of them partial),
        # with capture on, against the same writes with neither: what following migrate's advice
        # costs the application. Single-row: 2,000 statements in slices; bulk: the median of rounds.
        for label, count, single in (("single", 2000, True), ("bulk", 50000, False)):
            for days_back in (0, 100):
                per_slice = count // SINGLE_ROW_SLICES if single else count
                timings = footprint(conn, "bookings", SINGLE_ROW_SLICES if single else rounds,
                                    lambda _: insert_bookings(per_slice, days_back, single))
                for state, seconds in timings.items():
                    row[f"{label}_{days_back}_{state}_s"] = state_seconds(seconds, single)

        first, last = conn.execute("select min(date), max(date) from user_statistics_daily").fetchone()
        late_first = max(first, last - timedelta(days=89))
        late_days = (last - late_first).days + 1
        for affected in (100, 1000):
            conn.execute("truncate statskit.user_changes, statskit.platform_changes")
            conn.execute(
                "insert into transactions (id, user_id, kind, amount, created_at)"
                " select (select max(id) from transactions) + n, u.ids[1 + n %% cardinality(u.ids)], 'refund', 5,"
                " %s::date + (n %% %s) + interval '12 hours'"
                " from generate_series(1, 10000) n,"
                " (select array(select id from profiles order by md5(id::text) limit %s) as ids) u",
                [late_first, late_days, affected])
            logged = conn.execute("select count(distinct user_id) from statskit.user_changes").fetchone()[0]
            started = time.perf_counter()
            written = conn.execute("select aggregate_user_changes()").fetchone()[0]
            row[f"late{affected}_user_s"] = time.perf_counter() - started
            started = time.perf_counter()
            conn.execute("select aggregate_platform_changes()")
            row[f"late{affected}_platform_s"] = time.perf_counter() - started
            row[f"late{affected}_logged"], row[f"late{affected}_written"] = logged, written
        started = time.perf_counter()
        conn.execute("select aggregate_user_statistics_range(%s, %s)", [late_first, last])
        row["recompute_all_s"] = time.perf_counter() - started
        row["late_days"] = late_days
    return row


# The application's UPDATEs of rows created before today, as a marketplace makes them: (table,
# the change, which rows can take it, how it is undone between rounds).
UPDATE_SHAPES = {
    "read receipt": ("messages", "read_at = now()", "read_at is null", "read_at = null"),
    "completion": ("bookings", "completed_at = now(), status = 'completed'",
                   "status = 'pending' and completed_at is null and cancelled_at is null",
                   "completed_at = null, status = 'pending'"),
    "cancellation": ("bookings", "cancelled_at = now(), status = 'cancelled'",
                     "status = 'pending' and completed_at is null and cancelled_at is null",
                     "cancelled_at = null, status = 'pending'"),
    "status only": ("bookings", "status = 'confirmed'", "status = 'pending' and completed_at is null and cancelled_at is null",
                    "status = 'pending'"),
}


def bench_updates(cluster, users, count=2000, rounds=3):
    """What the application's updates of old rows (created over 30 days before today) cost with
    statskit's footprint: capture off and no step indexes, capture on, capture on with the step
    indexes of the table; each shape as `count` single-row statements (in slices, interleaved: see
    footprint) and as one statement of `count` rows (the median of `rounds`), and the share of the
    table's updates that were HOT."""
    dsn = cluster.dsn(f"bench_{users}")
    rows = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for shape, (table, change, free, undo) in UPDATE_SHAPES.items():
            ids = [r[0] for r in conn.execute(
                f"select id from {table} where {free} and created_at < now() - interval '30 days'"
                f" order by md5(id::text) limit %s", [count])]

            def updates():
                flush_statistics(conn)
                return conn.execute("select n_tup_upd, n_tup_hot_upd from pg_stat_user_tables where relid = %s::regclass",
                                    [table]).fetchone()

            def run(keys, single):
                before = updates()
                started = time.perf_counter()
                if single:
                    for key in keys:
                        conn.execute(f"update {table} set {change} where id = %s", [key])
                else:
                    conn.execute(f"update {table} set {change} where id = any (%s)", [keys])
                seconds = time.perf_counter() - started
                after = updates()
                conn.execute("set session_replication_role = replica")  # undone without logging it
                conn.execute(f"update {table} set {undo} where id = any (%s)", [keys])
                conn.execute("reset session_replication_role")
                conn.execute(f"vacuum {table}")
                conn.execute("truncate statskit.user_changes, statskit.platform_changes")
                return seconds, after[1] - before[1], after[0] - before[0]

            for single in (True, False):
                row = {"users": users, "shape": shape, "table": table, "single": single, "count": len(ids)}
                run(ids, single)  # a first round leaves free space on the pages, as a table in use has
                if single:  # each slice its own rows, the same in every state
                    size = len(ids) // SINGLE_ROW_SLICES
                    row["count"] = size * SINGLE_ROW_SLICES
                    timings = footprint(conn, table, SINGLE_ROW_SLICES,
                                        lambda n: run(ids[n * size:(n + 1) * size], True))
                else:
                    timings = footprint(conn, table, rounds, lambda _: run(ids, False))
                for state, measured in timings.items():
                    seconds = [t for t, _, _ in measured]
                    row[f"{state}_s"] = state_seconds(seconds, single)
                    row[f"{state}_hot"] = sum(hot for _, hot, _ in measured) / max(1, sum(n for _, _, n in measured))
                rows.append(row)
                print(row, flush=True)
    return rows


def updates_markdown(rows) -> str:
    out = ["| users | update of rows created over 30 days ago | statements | capture off, no step indexes | capture on | ÷ off "
           "| capture on, step indexes | ÷ off | HOT: off / on / step indexes |",
           "|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        statements = f"{r['count']:,} single-row" if r["single"] else f"one of {r['count']:,} rows"
        out.append(f"| {r['users']:,} | {r['shape']} ({r['table']}) | {statements} | {r['off_s']:.3f} s "
                   f"| {r['on_s']:.3f} s | {r['on_s'] / r['off_s']:.2f}× | {r['indexed_s']:.3f} s "
                   f"| {r['indexed_s'] / r['off_s']:.2f}× "
                   f"| {r['off_hot']:.0%} / {r['on_hot']:.0%} / {r['indexed_hot']:.0%} |")
    return "\n".join(out) + "\n"


def bench_history(cluster, users, bookings_per_day, seed, histories=(120, 720), last_day=date(2026, 10, 31)):
    """The nightly day (aggregate_daily_statistics and aggregate_user_statistics of one day, both
    jobs' work) on the same users with the same daily activity and a longer history, all ending
    on `last_day` (a past day: sums are kept only for days before today). A first night sums
    every user from history; the nights after it step from the sums, without and then with the
    indexes migrate advises for the step. The floor: a COPY of the rows one day writes."""
    rows = []
    for days in histories:
        dbname = f"bench_history_{users}_{days}"
        first_day = last_day - timedelta(days=days - 1)
        dsn, counts, _ = generated_database(cluster, dbname, users, days, round(bookings_per_day * days), seed,
                                            first_day)
        row = {"users": users, "days": days, "source_rows": sum(counts.values())}
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("vacuum analyze")

            # the generated activity runs on past last_day (sessions, reviews): the nights are its last days
            nights = [last_day - timedelta(days=n) for n in range(6, -1, -1)]
            row["history_s"] = sum(night(conn, nights[0])[:2])
            row["step_s"] = statistics.median(sum(night(conn, day)[:2]) for day in nights[1:4])
            step_indexes(conn)
            indexed = [night(conn, day) for day in nights[4:]]
            row["indexed_s"] = statistics.median(platform + user for platform, user, _ in indexed)
            row["indexed_wal"] = statistics.median(wal for _, _, wal in indexed)
            # the activity of those nights (rows created, completed or viewed on them), which the
            # generator keeps only roughly equal between histories
            row["day_rows"] = conn.execute(
                "select (select count(*) from bookings where created_at >= %(f)s and created_at < %(t)s)"
                " + (select count(*) from bookings where completed_at >= %(f)s and completed_at < %(t)s)"
                " + (select count(*) from transactions where created_at >= %(f)s and created_at < %(t)s)"
                " + (select count(*) from messages where created_at >= %(f)s and created_at < %(t)s)"
                " + (select count(*) from reviews where created_at >= %(f)s and created_at < %(t)s)"
                " + (select count(*) from listing_views where viewed_at >= %(f)s and viewed_at < %(t)s)",
                {"f": nights[4], "t": last_day + timedelta(days=1)}).fetchone()[0] / 3
            # the nights stepped: every user's sums are of the last one
            row["stepped_users"] = conn.execute("select count(*) from statskit.user_statistics_daily_sums"
                                                " cross join statskit.user_statistics_daily_sums_day d"
                                                " where d.date = %s", [last_day]).fetchone()[0]
        row["copy_s"], row["rows"] = copy_floor(dsn, last_day, rounds=3)
        with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
            admin.execute(f"drop database {dbname} with (force)")
        rows.append(row)
        print(row, flush=True)
    return rows


def history_markdown(rows) -> str:
    base = rows[0]
    out = ["| users | days of history | source rows | a day's new rows | first night (from history) | step "
           "| step, advised indexes | ÷ shortest history | WAL | user rows written | COPY of the day's rows "
           "| step ÷ COPY |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['users']:,} | {r['days']} | {r['source_rows']:,} | {r['day_rows']:,.0f} "
                   f"| {r['history_s']:.2f} s | {r['step_s']:.2f} s | {r['indexed_s']:.2f} s "
                   f"| {r['indexed_s'] / base['indexed_s']:.2f}× | {r['indexed_wal'] / 2**20:.1f} MiB "
                   f"| {r['rows']:,} | {r['copy_s']:.3f} s | {r['indexed_s'] / r['copy_s']:.1f}× |")
    return "\n".join(out) + "\n"


def capture_markdown(rows) -> str:
    out = ["| users | writes of bookings | dated | capture off | capture on | on ÷ off "
           "| capture on, step indexes | ÷ off |", "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        for label, text in (("single", "2,000 single-row inserts"), ("bulk", "one insert of 50,000 rows")):
            for days_back, dated in ((0, "today"), (100, "100 days back")):
                key = f"{label}_{days_back}"
                off, on, indexed = r[f"{key}_off_s"], r[f"{key}_on_s"], r[f"{key}_indexed_s"]
                out.append(f"| {r['users']:,} | {text} | {dated} | {off:.3f} s | {on:.3f} s | {on / off:.2f}× "
                           f"| {indexed:.3f} s | {indexed / off:.2f}× |")
    out += ["", "| users | late import | users logged | nightly catch-up (users) | platform | rows written "
            "| every user, same days | catch-up ÷ every user |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for affected in (100, 1000):
            user_s = r[f"late{affected}_user_s"]
            out.append(f"| {r['users']:,} | 10,000 refunds over {r['late_days']} days, {affected:,} users "
                       f"| {r[f'late{affected}_logged']:,} | {user_s:.2f} s | {r[f'late{affected}_platform_s']:.2f} s "
                       f"| {r[f'late{affected}_written']:,} | {r['recompute_all_s']:.2f} s "
                       f"| {user_s / r['recompute_all_s']:.2f}× |")
    return "\n".join(out) + "\n"


def backfill_markdown(rows) -> str:
    out = [
        "| users × days | rows | one-day functions, day by day | backfill --jobs 1 | backfill --jobs 2 | rows/s "
        "| COPY floor | backfill ÷ COPY floor | day by day ÷ backfill |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['users']:,} × {r['days']} | {r['rows']:,} | {r['day_by_day_s']:.1f} s | {r['jobs1_s']:.1f} s "
            f"| {r['jobs2_s']:.1f} s | {r['rows'] / r['jobs2_s']:,.0f} | {r['copy_s']:.1f} s "
            f"| {r['jobs2_s'] / r['copy_s']:.1f}× | {r['day_by_day_s'] / r['jobs2_s']:.1f}× |")
    return "\n".join(out) + "\n"


def cpu_seconds() -> float:
    """A Python loop of 10 million additions: the machine's speed, so runs on machines of the same
    description but not the same speed can be told apart."""
    started = time.perf_counter()
    total = 0
    for n in range(10_000_000):
        total += n
    return time.perf_counter() - started


def machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.machine()}, {os.cpu_count()} cores, {memory:.0f} GiB, {platform.system()} {platform.release()}"
            f" (a Python loop of 10 million additions: {cpu_seconds():.1f} s)")


def markdown(rows, args, server_version, seconds) -> str:
    mib = 1024 * 1024
    durability = (" but fsync, synchronous_commit and full_page_writes off (--fsync-off)" if args.fsync_off else
                  " (fsync, synchronous_commit and full_page_writes on, shared_buffers 128 MB)")
    out = [
        "| users | source rows | generate | set-based day | rows/s | one user | user-by-user day | speed-up | platform day |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        loop = f"{r['loop_s']:.1f} s" + (" (scaled)" if r["loop_sampled"] else "")
        out.append(
            f"| {r['users']:,} | {r['source_rows']:,} | {r['generate_s']:.1f} s | {r['set_based_s']:.2f} s "
            f"| {r['rows_per_day'] / r['set_based_s']:,.0f} | {r['one_user_ms']:.2f} ms | {loop} "
            f"| {r['speedup']:.0f}× | {r['platform_s']:.3f} s |")
    out += [
        "",
        "Nights as the jobs run them (change capture on): a step from the day before, with the indexes "
        "migrate advises for it, each job on its own connection as pg_cron runs it, each night after a "
        "checkpoint (median of four nights, and the WAL they wrote; then "
        "the night after, May 1st at 120 days: the month windows end; the nights append to a "
        f"{args.partition_period} partition holding the {args.partition_period}'s earlier days), against a COPY "
        "of the rows a night writes (user and platform, into "
        "empty logged tables with the same indexes, after a checkpoint; median of three; and into temporary "
        "tables, which write no WAL, as the runs before measured it):",
        "",
        "| users | user step | platform step | WAL | COPY of the day's rows | both ÷ COPY | COPY, temporary tables "
        "| both ÷ it | next night: user step | platform step |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        night_s = r['step_s'] + r['step_platform_s']
        out.append(
            f"| {r['users']:,} | {r['step_s']:.2f} s | {r['step_platform_s']:.3f} s | {r['step_wal'] / mib:.1f} MiB "
            f"| {r['step_copy_s']:.3f} s | {night_s / r['step_copy_s']:.1f}× "
            f"| {r['step_copy_temporary_s']:.3f} s | {night_s / r['step_copy_temporary_s']:.1f}× "
            f"| {r['month_step_s']:.2f} s | {r['month_step_platform_s']:.3f} s |")
    out += [
        "",
        "Re-running a stored day (rows whose numbers did not change are not rewritten):",
        "",
        "| users | re-run | rows written | tuples updated | WAL | WAL of a first write | late data for 1% of users: rows written | tuples updated | WAL |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['users']:,} | {r['rerun_s']:.2f} s | {r['rerun_rows_written']} | {r['rerun_updated']} "
            f"| {r['rerun_wal'] / mib:.2f} MiB | {r['first_write_wal'] / mib:.1f} MiB "
            f"| {r['late_rows_written']:,} ({r['late_users']:,} users) | {r['late_updated']:,} | {r['late_wal'] / mib:.2f} MiB |")
    out += [
        "",
        f"Command: `python -m bench --users {' '.join(str(u) for u in args.users)} --days {args.days} "
        f"--bookings-per-user {args.bookings_per_user} --loop-sample {args.loop_sample}"
        f"{'' if args.partition_period == 'month' else ' --partition-period ' + args.partition_period}` "
        f"{'--fsync-off ' if args.fsync_off else ''}({seconds:.0f} s in all). Machine: {machine()}; PostgreSQL "
        f"{server_version} with default settings{durability}. Set-based and platform times are the median of three "
        f"days; the user-by-user day is {args.loop_sample:,} users through aggregate_single_user_statistics "
        f"in one statement, scaled to all users where marked.",
    ]
    return "\n".join(out) + "\n"


def main():
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--days", type=int, default=120)
    parser.add_argument("--bookings-per-user", type=int, default=20)
    parser.add_argument("--seed", type=float, default=0.42)
    parser.add_argument("--loop-sample", type=int, default=2000, help="users timed one by one, then scaled")
    parser.add_argument("--port", type=int, default=30916)
    parser.add_argument("--backfill-users", type=int, nargs="*", default=[10000],
                        help="sizes (among --users) whose whole period is also backfilled and timed")
    parser.add_argument("--history-users", type=int, default=10000,
                        help="users of the history-length bench (120 and 720 days, same daily activity); 0 skips it")
    parser.add_argument("--partition-period", default="month",
                        help="the rollup's partitions of the first table's databases (migrate's option)")
    parser.add_argument("--markdown", type=Path, help="write the tables here, between the BENCH markers")
    parser.add_argument("--fsync-off", action="store_true",
                        help="a cluster with fsync, synchronous_commit and full_page_writes off (faster, unlike production)")
    parser.add_argument("--backfill-only", action="store_true",
                        help="only backfill --jobs 1 and 2 against the COPY floor, on --backfill-users; print, write nothing")
    args = parser.parse_args()

    # durable unless asked: what a night costs is largely what its WAL costs
    cluster = LocalCluster("bench-fast" if args.fsync_off else "bench-durable", args.port, durable=not args.fsync_off)
    cluster.start()
    if args.backfill_only:
        for users in args.backfill_users:
            generated_database(cluster, f"bench_{users}", users, args.days, args.bookings_per_user, args.seed,
                               date(2026, 1, 1))
            row = bench_backfill(cluster, users, args.days, day_by_day=False)
            print(f"{row}; jobs 1 ÷ jobs 2 = {row['jobs1_s'] / row['jobs2_s']:.2f}×, "
                  f"jobs 2 ÷ COPY = {row['jobs2_s'] / row['copy_s']:.2f}×", flush=True)
        return
    started = time.perf_counter()
    rows, backfills, captures, updates = [], [], [], []
    for users in args.users:
        rows.append(bench_size(cluster, users, args.days, args.bookings_per_user, args.seed, args.loop_sample,
                               args.partition_period))
        print(rows[-1], flush=True)
        if users in args.backfill_users:
            backfills.append(bench_backfill(cluster, users, args.days))
            print(backfills[-1], flush=True)
            captures.append(bench_capture(cluster, users))
            print(captures[-1], flush=True)
            updates += bench_updates(cluster, users)
    history = (bench_history(cluster, args.history_users, args.bookings_per_user / args.days, args.seed)
               if args.history_users else [])
    with psycopg.connect(cluster.dsn()) as conn:
        version = conn.execute("show server_version").fetchone()[0].split()[0]
    table = markdown(rows, args, version, time.perf_counter() - started)
    print(table)
    backfill_table = backfill_markdown(backfills) if backfills else ""
    capture_table = capture_markdown(captures) if captures else ""
    update_table = updates_markdown(updates) if updates else ""
    print(backfill_table)
    print(capture_table)
    print(update_table)
    history_table = history_markdown(history) if history else ""
    print(history_table)
    if args.markdown:
        text = args.markdown.read_text()
        for marker, content in (("BENCH", table), ("BACKFILL", backfill_table), ("CAPTURE", capture_table),
                                ("UPDATES", update_table), ("HISTORY", history_table)):
            head, rest = text.split(f"<!-- {marker}:START -->", 1)
            _, tail = rest.split(f"<!-- {marker}:END -->", 1)
            text = f"{head}<!-- {marker}:START -->\n{content}<!-- {marker}:END -->{tail}"
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
