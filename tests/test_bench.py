"""A tiny run of the benchmark, so bench/ keeps working; its numbers are not judged, its counts are."""

import re

from bench.__main__ import (UPDATE_SHAPES, backfill_markdown, bench_backfill, bench_capture, bench_history, bench_size,
                             bench_updates, capture_markdown, history_markdown, markdown, updates_markdown)
import pytest

from conftest import cluster

pytestmark = pytest.mark.pg  # the session's server, without its fixtures


def test_bench_smoke_run_and_rerun_rewrites_only_what_changed():
    row = bench_size(cluster, users=300, days=15, bookings_per_user=20, seed=0.5, loop_sample=40)
    try:
        assert row["rows_per_day"] > 0 and row["bookings"] > 1000
        assert row["loop_sampled"] and row["speedup"] > 0
        assert row["step_s"] > 0 and row["month_step_s"] > 0 and row["step_platform_s"] > 0 and row["step_copy_s"] > 0
        assert row["step_wal"] > 0 and row["first_write_wal"] > 0 and row["step_copy_temporary_s"] > 0
        # the nights (January 11th to 15th) append to a partition holding January's ten days before them
        assert row["period_rows_before"] >= 10 * 200
        assert (row["rerun_rows_written"], row["rerun_updated"], row["rerun_dead"]) == (0, 0, 0)
        assert row["late_rows_written"] == row["late_updated"] == row["late_users"] == 3

        class Args:
            users, days, bookings_per_user, loop_sample, fsync_off, partition_period = [300], 15, 20, 40, False, "month"
        table = markdown([row], Args, "15", 1.0)
        assert table.startswith("| users |") and "| 300 |" in table
        filled = bench_backfill(cluster, users=300, days=15)
        assert filled["rows"] > 0 and filled["copy_s"] > 0 and filled["jobs2_s"] > 0 and filled["day_by_day_s"] > 0
        assert "| 300 × 15 |" in backfill_markdown([filled])
        captured = bench_capture(cluster, users=300, rounds=1)
        assert captured["late100_logged"] == 100 and captured["late100_written"] > 0
        assert captured["bulk_0_on_s"] > 0 and captured["single_100_indexed_s"] > 0
        assert "| 300 | one insert of 50,000 rows | today |" in capture_markdown([captured])
        updated = bench_updates(cluster, users=300, count=40, rounds=1)
        assert {r["shape"] for r in updated} == set(UPDATE_SHAPES) and all(r["indexed_s"] > 0 for r in updated)
        # a status no index reads stays HOT; a completion is indexed once the step indexes are there
        status = next(r for r in updated if r["shape"] == "status only" and not r["single"])
        completion = next(r for r in updated if r["shape"] == "completion" and not r["single"])
        assert status["indexed_hot"] > 0.5 and completion["indexed_hot"] < 0.5 <= completion["on_hot"]
        assert "| 300 | read receipt (messages) | 40 single-row |" in updates_markdown(updated)
        history = bench_history(cluster, users=200, bookings_per_day=20 / 15, seed=0.5, histories=(15, 30))
        assert [h["days"] for h in history] == [15, 30]
        assert all(h["rows"] > 0 and h["history_s"] > 0 and h["step_s"] > 0 and h["indexed_s"] > 0 for h in history)
        assert all(h["stepped_users"] == h["rows"] for h in history)  # every user's row of the last night stepped
        assert history[1]["source_rows"] > 1.5 * history[0]["source_rows"]  # same daily activity, twice the days
        assert "| 200 | 30 |" in history_markdown(history)
    finally:
        import psycopg
        with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
            admin.execute("drop database if exists bench_300 with (force)")


def test_compare_finds_the_same_rows_and_plans_and_names_a_changed_number(monkeypatch):
    """bench.compare, which judges a change of the generated SQL: the committed functions against
    themselves are identical in rows and plan shapes; a range function that counts a cancelled
    session twice is named."""
    from datetime import date

    from bench import compare
    from bench.__main__ import generated_database
    dsn, _, _ = generated_database(cluster, "compare_test", 300, 15, 20, 0.5, date(2026, 1, 1))
    tree = compare.function_files(None)
    monkeypatch.setattr(compare, "function_files", lambda revision: tree)  # the working tree's, both sides
    same = compare.compare(dsn, date(2026, 1, 15), "base", rounds=1)
    assert [(r["call"], r["rows"], r["plans"].split(" (")[0]) for r in same] == [
        (call, "identical", "same") for call in compare.CALLS]
    doubled = [text.replace("then 1 end)::integer as cancelled_sessions", "then 2 end)::integer as cancelled_sessions")
               for text in tree]
    monkeypatch.setattr(compare, "function_files", lambda revision: tree if revision else doubled)
    changed = {r["call"]: r["rows"] for r in compare.compare(dsn, date(2026, 1, 15), "base", rounds=1)}
    assert changed["user range"] == "DIFFER" and changed["user one-day"] == "identical"


def test_partitions_bench_measures_both_layouts():
    """bench.partitions on a tiny marketplace: both layouts hold the same rows, the partitioned
    one in monthly partitions; pgbench's log gives latencies; a dropped month and a DELETE take
    the same rows away."""
    from datetime import timedelta

    import psycopg

    from bench import partitions as bench

    layouts = {}
    try:
        for period in ("month", "none"):
            layouts[period] = bench.deployed(cluster, f"bench_layout_{period}", 200, 70, 0.5, period)[0]
        (rows, heap, indexes, tables), (plain_rows, _, _, plain_tables) = map(bench.storage, layouts.values())
        assert rows == plain_rows > 0 and heap > 0 and indexes > 0 and tables > 3 and plain_tables == 1
        result = bench.pgbench_kpis(layouts["month"], 200, 2, 1, "auto", day=bench.FIRST_DAY + timedelta(days=40))
        assert 0 < result["p50_ms"] <= result["p99_ms"] and result["tps"] > 0
        with psycopg.connect(layouts["month"]) as conn:  # the function's own setting is back after the run
            assert conn.execute("select proconfig from pg_proc where proname = 'user_metric'").fetchone()[0][-1] \
                == "plan_cache_mode=force_generic_plan"
        dropped = bench.drop_a_month(layouts["month"], layouts["none"], bench.FIRST_DAY)
        # (which writes less WAL shows at size, in docs/performance.md: at 2,761 rows on this cluster,
        # whose full_page_writes are off, the DROP's catalog records can outweigh the DELETE's)
        assert dropped["rows"] > 0 and dropped["drop_wal"] > 0 and dropped["delete_wal"] > 0 and dropped["vacuum_wal"] > 0
        for dsn in layouts.values():
            with psycopg.connect(dsn) as conn:
                assert conn.execute("select count(*) from user_statistics_daily where date < %s",
                                    [bench.FIRST_DAY + timedelta(days=30)]).fetchone()[0] == 0
    finally:
        with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
            for period in layouts:
                admin.execute(f"drop database if exists bench_layout_{period} with (force)")


def test_the_fleet_bench_measures_every_row_it_reports():
    """bench.fleet at a tiny size, its four shards and two routers on the session's server."""
    import psycopg

    from bench import fleet
    try:
        rows, source_rows = fleet.measure([cluster, cluster], users=200, days=10, seconds=1, prefix="smoke_fleet", rounds=1)
        measured = {what: (value, ratio) for what, value, ratio in rows}
        assert source_rows > 0 and len(rows) == 17
        assert float(measured["the four shards' stepped nights, summed"][0].split()[0]) > 0
        for engine in ("PL/Proxy", "dblink"):  # every call answered through each router
            value, ratio = measured[f"user_kpis through the {engine} router"]
            assert float(value.split()[0].replace(",", "")) > 0 and ratio.endswith(", 0 failed"), (engine, ratio)
            # the CPU of a call through it: the router's backend's and the shard's that serves it
            router, shard = re.fullmatch(r"(\d+) µs \+ (\d+) µs on the shard", measured[
                f"user_kpis through the {engine} router, one client: CPU per call"][0]).groups()
            assert int(router) > 0 and int(shard) > 0, (engine, router, shard)
    finally:
        with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
            names = [name for (name,) in admin.execute(
                "select datname from pg_database where datname like 'smoke\\_fleet\\_%'").fetchall()]
            admin.execute("select cron.unschedule(jobid) from cron.job where database = any(%s)", [names])
            for name in names:
                admin.execute(f"drop database {name} with (force)")
