"""`statskit backfill`: exact rows, kill-safe, resumable, one-line errors for bad input."""

import dataclasses
import os
import re
import signal
import subprocess
import sys
from datetime import date, timedelta

import psycopg
import pytest
from click.testing import CliRunner

from conftest import SQL_DIR, deploy
from spec_oracle import differences, expected_user_rows, stored_user_rows
from toolkit import backfill as backfill_core
from toolkit.catalog import load_catalog
from toolkit.cli import cli
from toolkit.settings import Settings

FIRST, LAST = date(2026, 3, 1), date(2026, 3, 31)


def snapshot(dsn):
    """Every stored row without its identity and timestamp columns, for comparing whole runs."""
    with psycopg.connect(dsn) as conn:
        users = conn.execute(
            "select to_jsonb(s) - 'id' - 'updated_at' from user_statistics_daily s order by user_id, date").fetchall()
        platform = conn.execute(
            "select to_jsonb(s) - 'id' - 'updated_at' from platform_statistics_daily s order by date").fetchall()
    return users, platform


def clean_run_then_empty(dsn, first, last):
    """The rows one clean backfill writes; then an empty rollup and ledger for the run under test."""
    result = CliRunner().invoke(cli, ["backfill", "--from", str(first), "--to", str(last), "--quiet", "--dsn", dsn])
    assert result.exit_code == 0, result.output
    clean = snapshot(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("truncate user_statistics_daily, platform_statistics_daily, statskit.backfill_ledger")
    return clean


def day_by_day(dsn, first, last):
    """The rows the one-day functions write, called for every day of the range."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        day = first
        while day <= last:
            conn.execute("select aggregate_user_statistics(null, %s), aggregate_daily_statistics(%s)", [day, day])
            day += timedelta(days=1)
    rows = snapshot(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("truncate user_statistics_daily, platform_statistics_daily")
    return rows


def write_range(dsn, first, last, platform=True):
    with psycopg.connect(dsn, autocommit=True) as conn:
        users = conn.execute("select aggregate_user_statistics_range(%s, %s)", [first, last]).fetchone()[0]
        days = conn.execute("select aggregate_daily_statistics_range(%s, %s)", [first, last]).fetchone()[0] if platform else 0
    return users, days


# Month ends, days before any activity and after it, a range starting mid-history, one day.
RANGES = [(date(2026, 1, 25), date(2026, 4, 3)), (date(2026, 3, 10), date(2026, 3, 20)), (date(2026, 2, 28), date(2026, 2, 28))]


@pytest.mark.parametrize("first, last", RANGES, ids=str)
def test_range_functions_equal_the_one_day_functions_day_by_day(migrated_dsn, first, last):
    expected = day_by_day(migrated_dsn, first, last)
    assert write_range(migrated_dsn, first, last) == (len(expected[0]), len(expected[1]))
    assert snapshot(migrated_dsn) == expected
    assert write_range(migrated_dsn, first, last) == (0, 0)  # a re-run rewrites nothing


def test_chunks_written_side_by_side_add_up_to_the_whole(migrated_dsn):
    """Two connections of one backfill hold the writer lock shared: both chunks are in flight at
    once (neither waits for the other) and together they are the whole range."""
    first, last = RANGES[0]
    middle = first + (last - first) / 2
    expected = day_by_day(migrated_dsn, first, last)
    with psycopg.connect(migrated_dsn) as one, psycopg.connect(migrated_dsn) as other:
        for conn in (one, other):
            conn.execute("set lock_timeout = '2s'")  # a chunk waiting for its sibling would fail here
        written = [one.execute("select aggregate_user_statistics_range(%s, %s, p_shared => true)",
                               [first, middle]).fetchone()[0],
                   other.execute("select aggregate_user_statistics_range(%s, %s, p_shared => true)",
                                 [middle + timedelta(days=1), last]).fetchone()[0]]
        one.commit()
        other.commit()
    assert all(written) and sum(written) == len(expected[0])
    assert snapshot(migrated_dsn)[0] == expected[0]


def test_plan_cuts_a_range_into_a_chunk_per_job_and_skips_committed_days():
    request = backfill_core.Request(date(2026, 1, 1), date(2026, 1, 10), jobs=2)
    units = backfill_core.plan_units(request, {})
    assert [(u.table, u.chunk) for u in units] == [
        ("platform", (date(2026, 1, 1), date(2026, 1, 10))),
        ("users", (date(2026, 1, 1), date(2026, 1, 5))), ("users", (date(2026, 1, 6), date(2026, 1, 10)))]
    committed = {"users": {date(2026, 1, n) for n in range(1, 5)}, "platform": {date(2026, 1, n) for n in range(1, 11)}}
    resumed = backfill_core.plan_units(dataclasses.replace(request, chunk_days=2), committed)
    assert [(u.table, u.chunk) for u in resumed] == [
        ("users", (date(2026, 1, 5), date(2026, 1, 6))), ("users", (date(2026, 1, 7), date(2026, 1, 8))),
        ("users", (date(2026, 1, 9), date(2026, 1, 10)))]
    progress = backfill_core.Progress(request, committed)
    assert progress.summary() == "4 of 10 days committed, through 2026-01-04"
    progress.committed["users"].add(date(2026, 1, 7))
    assert progress.summary() == "5 of 10 days committed (2026-01-01..2026-01-04, 2026-01-07)"


def day_cost(first, last):
    """Day n of January costs n: users join over time."""
    return sum(range(first.day, last.day + 1))


def worst_of_two(cut, beside=0):
    """The costlier job when January 1..30 is cut after `cut` and the second chunk's job also
    writes something costing `beside`."""
    return max(day_cost(date(2026, 1, 1), date(2026, 1, cut)), day_cost(date(2026, 1, cut + 1), date(2026, 1, 30)) + beside)


def test_chunks_of_equal_cost_cut_a_range_where_its_later_days_cost_more():
    # the later chunk is shorter, and no cut would make the costlier of the two cheaper
    request = backfill_core.Request(date(2026, 1, 1), date(2026, 1, 30), jobs=2)
    units = backfill_core.plan_units(request, {}, backfill_core.ChunkCosts(day_cost))
    assert [(u.table, u.chunk) for u in units] == [
        ("platform", (date(2026, 1, 1), date(2026, 1, 30))),
        ("users", (date(2026, 1, 1), date(2026, 1, 21))), ("users", (date(2026, 1, 22), date(2026, 1, 30)))]
    assert all(worst_of_two(cut) >= worst_of_two(21) for cut in range(1, 30))
    # no chunk longer than --chunk-days, whatever the costs; the platform's chunks join the users'
    capped = backfill_core.plan_units(dataclasses.replace(request, chunk_days=12), {}, backfill_core.ChunkCosts(day_cost))
    assert [(u.table, u.chunk) for u in capped] == [
        ("platform", (date(2026, 1, 1), date(2026, 1, 12))), ("platform", (date(2026, 1, 13), date(2026, 1, 23))),
        ("platform", (date(2026, 1, 24), date(2026, 1, 30))),
        ("users", (date(2026, 1, 1), date(2026, 1, 12))), ("users", (date(2026, 1, 13), date(2026, 1, 23))),
        ("users", (date(2026, 1, 24), date(2026, 1, 30)))]


def test_the_platforms_one_chunk_is_written_beside_a_lighter_last_chunk_of_users():
    """The platform's pass costs as much whatever its days, so it is not cut for the jobs: the job
    that writes it first then writes the users' last chunk, lighter by as much, and neither job
    waits for the other at the end."""
    request = backfill_core.Request(date(2026, 1, 1), date(2026, 1, 30), jobs=2)
    costs = backfill_core.ChunkCosts(day_cost, platform=lambda first, last: 40.0)
    units = backfill_core.plan_units(request, {}, costs)
    assert [u.table for u in units] == ["platform", "users", "users"] and units[0].chunk == (request.first, request.last)
    cut = units[1].chunk[1].day
    assert cut > 21 and all(worst_of_two(other, 40) >= worst_of_two(cut, 40) for other in range(1, 30))
    # a platform of several chunks spreads over the jobs: nothing is set beside one chunk of users
    longer = dataclasses.replace(request, chunk_days=12)
    assert [u.chunk for u in backfill_core.plan_units(longer, {}, costs)] == [
        u.chunk for u in backfill_core.plan_units(longer, {}, backfill_core.ChunkCosts(day_cost))]


def test_a_chunks_cost_is_the_rows_it_writes_and_the_history_it_reads(loaded_dsn):
    """history_costs against a count made in SQL: a users' chunk costs the user-days of its own
    days, plus HISTORY_READ_COST of the user-days lived up to its last day (each day one more);
    a platform's chunk PLATFORM_READ_COST of them."""
    first, last = date(2026, 2, 10), date(2026, 2, 20)
    with psycopg.connect(loaded_dsn) as conn:
        costs = backfill_core.history_costs(conn, load_catalog(SQL_DIR / "catalog.toml"), Settings(), last)
        lived = """select coalesce(sum((select count(*) from profiles p where (p.created_at at time zone 'UTC')::date <= d)
                                      + 1), 0)::float
                   from generate_series((select min(created_at at time zone 'UTC')::date from profiles), %s::date,
                                        interval '1 day') d where d >= %s"""
        everything = conn.execute(lived, [last, date(1970, 1, 1)]).fetchone()[0]
        own = conn.execute(lived, [last, first]).fetchone()[0]
    assert own > 0 and everything > own
    assert costs.users(first, last) == pytest.approx(own + backfill_core.HISTORY_READ_COST * everything)
    assert costs.platform(first, last) == pytest.approx(backfill_core.PLATFORM_READ_COST * everything)


def test_range_functions_follow_the_configured_time_zone(loaded_dsn):
    deploy(loaded_dsn, time_zone="America/New_York")
    first, last = date(2026, 2, 26), date(2026, 3, 12)  # a month end and the 23-hour day of 2026-03-08
    expected = day_by_day(loaded_dsn, first, last)
    write_range(loaded_dsn, first, last)
    assert snapshot(loaded_dsn) == expected


def test_range_functions_refuse_a_reversed_range(migrated_dsn):
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="p_first 2026-03-02 is after p_last 2026-03-01"):
            conn.execute("select aggregate_user_statistics_range('2026-03-02', '2026-03-01')")
        with pytest.raises(psycopg.errors.NullValueNotAllowed):
            conn.execute("select aggregate_daily_statistics_range(null, '2026-03-01')")


def test_backfill_writes_every_day_with_the_specs_numbers(migrated_dsn, run_cli):
    result = run_cli("backfill", "--from", FIRST, "--to", LAST, "--dsn", migrated_dsn)
    assert result.exit_code == 0, result.output
    assert re.search(r"backfill done: 31 days, \d+ rows written", result.output)
    with psycopg.connect(migrated_dsn) as conn:
        assert conn.execute("select count(distinct date), min(date), max(date) from platform_statistics_daily").fetchone() == (31, FIRST, LAST)
        for day in (FIRST, date(2026, 3, 16), LAST):
            assert differences(expected_user_rows(conn, day), stored_user_rows(conn, day)) == []


def test_a_second_run_rewrites_the_same_numbers_and_leaves_other_days_alone(migrated_dsn, run_cli):
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        conn.execute("select aggregate_daily_statistics('2026-02-27')")
    run_cli("backfill", "--from", FIRST, "--to", LAST, "--dsn", migrated_dsn)
    first = snapshot(migrated_dsn)
    again = run_cli("backfill", "--from", FIRST, "--to", LAST, "--dsn", migrated_dsn)
    assert "0 rows written" in again.output
    assert snapshot(migrated_dsn) == first
    with psycopg.connect(migrated_dsn) as conn:
        assert conn.execute("select count(*) from platform_statistics_daily where date < %s", [FIRST]).fetchone()[0] == 1


def test_resume_writes_only_the_days_no_finished_chunk_covers(migrated_dsn, run_cli):
    run_cli("backfill", "--from", FIRST, "--to", date(2026, 3, 14), "--chunk-days", 7, "--dsn", migrated_dsn)
    resumed = run_cli("backfill", "--from", FIRST, "--to", date(2026, 3, 21), "--chunk-days", 7, "--resume",
                      "--jobs", 1, "--dsn", migrated_dsn)
    chunks = [line.split(" committed")[0] for line in resumed.output.splitlines() if line.startswith("chunk ")]
    assert chunks == ["chunk 2026-03-15..2026-03-21"]
    assert "14 days committed earlier skipped" in resumed.output


def test_user_touches_only_that_users_rows(migrated_dsn, run_cli):
    with psycopg.connect(migrated_dsn) as conn:
        user = conn.execute("select id from profiles where created_at < '2026-03-01' order by id limit 1").fetchone()[0]
    result = run_cli("backfill", "--from", FIRST, "--to", LAST, "--user", user, "--dsn", migrated_dsn)
    assert result.exit_code == 0, result.output
    with psycopg.connect(migrated_dsn) as conn:
        assert conn.execute("select count(*), count(distinct user_id) from user_statistics_daily").fetchone() == (31, 1)
        assert conn.execute("select count(*) from platform_statistics_daily").fetchone()[0] == 0


def test_only_platform(migrated_dsn, run_cli):
    assert run_cli("backfill", "--from", FIRST, "--to", LAST, "--only", "platform", "--dsn", migrated_dsn).exit_code == 0
    with psycopg.connect(migrated_dsn) as conn:
        assert conn.execute("select count(*) from user_statistics_daily").fetchone()[0] == 0
        assert conn.execute("select count(*) from platform_statistics_daily").fetchone()[0] == 31


def test_output_without_a_terminal_has_no_control_characters(migrated_dsn, run_cli):
    output = run_cli("backfill", "--from", FIRST, "--to", LAST, "--chunk-days", 7, "--dsn", migrated_dsn).output
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", output)
    assert len([line for line in output.splitlines() if line.startswith("chunk ")]) == 5


def test_a_to_date_in_the_future_is_clamped_and_said(migrated_dsn, run_cli):
    with psycopg.connect(migrated_dsn) as conn:
        yesterday = conn.execute("select (now() at time zone 'UTC')::date - 1").fetchone()[0]
    result = run_cli("backfill", "--from", yesterday - timedelta(days=1), "--to", yesterday + timedelta(days=30), "--dsn", migrated_dsn)
    assert result.exit_code == 0
    assert f"clamped to {yesterday}" in result.output
    with psycopg.connect(migrated_dsn) as conn:
        assert conn.execute("select max(date) from platform_statistics_daily").fetchone()[0] == yesterday


BAD_INPUT = [
    ("impossible date", ["--from", "2026-02-30", "--to", "2026-03-01"], 2, "--from 2026-02-30: impossible date"),
    ("not a date", ["--from", "last week", "--to", "2026-03-01"], 2, "not a date, use YYYY-MM-DD"),
    ("reversed range", ["--from", "2026-03-05", "--to", "2026-03-01"], 2, "--from 2026-03-05 is after the last day 2026-03-01: a reversed range"),
    ("future range", ["--from", "2999-01-01", "--to", "2999-01-02"], 2, "--from 2999-01-01 is in the future"),
    ("bad uuid", ["--from", "2026-03-01", "--to", "2026-03-02", "--user", "bob"], 2, "--user 'bob' is not a user key: profiles.id is uuid"),
    ("unknown user", ["--from", "2026-03-01", "--to", "2026-03-02", "--user", "00000000-0000-4000-8000-000000000000"], 2, "--user 00000000-0000-4000-8000-000000000000: unknown user, not in profiles"),
    ("bad scope", ["--from", "2026-03-01", "--to", "2026-03-02", "--only", "everything"], 2, "Invalid value for '--only'"),
]


@pytest.mark.parametrize("args, code, message", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_line_and_writes_nothing(migrated_dsn, run_cli, args, code, message):
    result = run_cli("backfill", *args, "--dsn", migrated_dsn)
    assert result.exit_code == code
    assert message in result.output
    assert "Traceback" not in result.output
    assert snapshot(migrated_dsn) == ([], [])


def test_a_database_never_migrated_says_run_migrate_first(loaded_dsn, run_cli):
    result = run_cli("backfill", "--from", FIRST, "--to", LAST, "--dsn", loaded_dsn)
    assert result.exit_code == 2
    assert result.output.strip() == "statskit: error: database statskit_test has no statskit deployment: run statskit migrate first"


def test_sigkill_mid_run_then_rerun_equals_one_clean_run(migrated_dsn, run_cli):
    clean = clean_run_then_empty(migrated_dsn, FIRST, LAST)
    process = subprocess.Popen(
        [sys.executable, "-m", "toolkit", "backfill", "--from", str(FIRST), "--to", str(LAST), "--chunk-days", "1",
         "--dsn", migrated_dsn],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines = [process.stdout.readline() for _ in range(3)]  # three chunks committed, the fourth under way
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    assert all(line.startswith("chunk ") for line in lines)
    with psycopg.connect(migrated_dsn) as conn:  # the platform's days go first: it is the users' that stop
        user_days = conn.execute("select count(distinct date) from user_statistics_daily").fetchone()[0]
    assert 3 <= user_days < 31
    resumed = run_cli("backfill", "--from", FIRST, "--to", LAST, "--chunk-days", "1", "--resume", "--dsn", migrated_dsn)
    assert resumed.exit_code == 0 and "days committed earlier skipped" in resumed.output
    assert snapshot(migrated_dsn) == clean
