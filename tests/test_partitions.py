"""The partitioned rollup: a new deployment is partitioned by month of its statistics dates, every
writer gives the numbers it gives on one plain table, partitions are made ahead and for the
days a backfill needs without making a reader wait, retention drops whole partitions, and a
deployment converts between the layouts in place with its rows unchanged."""

import threading
import time
from datetime import date, timedelta

import psycopg
import pytest

from conftest import SQL_DIR, deploy
from spec_oracle import differences, expected_platform_row, expected_user_rows, stored_platform_row, stored_user_rows
from toolkit import api, partitions
from toolkit.settings import Settings

# Far from UTC, so a month's first day starts at 15:00 UTC of the day before it.
TIME_ZONE = "Asia/Tokyo"


def stored(dsn):
    """Every stored row as it is, ids and updated_at included."""
    with psycopg.connect(dsn) as conn:
        return [conn.execute(f"select to_jsonb(s) from {table} s order by 1").fetchall()
                for table in ("user_statistics_daily", "platform_statistics_daily")]


def dashboard(dsn, day):
    """What the dashboard reads of a sample of users and the platform around `day`."""
    with psycopg.connect(dsn) as conn:
        users = [u for u, in conn.execute("select id from profiles order by md5(id::text) limit 5")]
        return ([conn.execute("select * from user_kpis(%s, %s, %s)", [u, day, compare]).fetchall()
                 for u in users for compare in ("day", "week", "month")]
                + [conn.execute("select * from user_metric(%s, 'monthly_earnings', %s, 'month')", [u, day]).fetchall()
                   for u in users]
                + [conn.execute("select * from platform_metric('total_users', %s, 'month')", [day]).fetchall()])


def oracle_problems(dsn, time_zone="UTC"):
    with psycopg.connect(dsn) as conn:
        problems = []
        for day, in conn.execute("select distinct date from user_statistics_daily order by 1").fetchall():
            problems += [f"{day} {p}" for p in differences(expected_user_rows(conn, day, time_zone),
                                                           stored_user_rows(conn, day))]
        for day, in conn.execute("select date from platform_statistics_daily order by 1").fetchall():
            expected, got = expected_platform_row(conn, day, time_zone), stored_platform_row(conn, day)
            problems += [f"{day} platform {m}" for m, v in expected.items() if got[m] != v]
        return problems


def backfill(dsn, first, last):
    with api.Project.open(SQL_DIR).deployment(dsn) as app:
        return app.backfill(first, last)


def data_days(dsn):
    with psycopg.connect(dsn) as conn:
        return conn.execute(f"select min((created_at at time zone '{TIME_ZONE}')::date), "
                            f"(now() at time zone '{TIME_ZONE}')::date - 1 from profiles").fetchone()


def test_a_new_deployment_is_partitioned_and_both_layouts_store_the_spec(loaded_dsn, run_cli):
    deploy(loaded_dsn, time_zone=TIME_ZONE)
    settings = Settings(time_zone=TIME_ZONE)
    first, last = data_days(loaded_dsn)
    with psycopg.connect(loaded_dsn) as conn:
        assert partitions.is_partitioned(conn, settings, "user_statistics_daily")
        # a partition for every month from the first signup to two months after today's
        assert partitions.missing_periods(conn, settings, "user_statistics_daily", first) == []
        assert partitions.missing_periods(conn, settings, "platform_statistics_daily", first) == []
        assert partitions.partitions(conn, settings, "user_statistics_daily")[0].first_day == first.replace(day=1)
    backfill(loaded_dsn, first, date(2026, 4, 30))  # January to April: four months, three month ends
    assert oracle_problems(loaded_dsn, TIME_ZONE) == []
    with psycopg.connect(loaded_dsn) as conn:
        homes = dict(conn.execute("select date::text, tableoid::regclass::text from user_statistics_daily"
                                  " where date in ('2026-02-28', '2026-03-01') group by 1, 2").fetchall())
    assert homes == {"2026-02-28": "user_statistics_daily_20260201", "2026-03-01": "user_statistics_daily_20260301"}
    before, reads = stored(loaded_dsn), dashboard(loaded_dsn, date(2026, 3, 1))

    plain = run_cli("migrate", "--dsn", loaded_dsn, "--partition-period", "none")
    assert plain.exit_code == 0, plain.output
    assert "made public.user_statistics_daily one table again" in plain.output
    with psycopg.connect(loaded_dsn) as conn:
        assert not partitions.is_partitioned(conn, settings, "user_statistics_daily")
    assert stored(loaded_dsn) == before and dashboard(loaded_dsn, date(2026, 3, 1)) == reads
    assert run_cli("verify", "--dsn", loaded_dsn, "--from", "2026-03-01", "--to", "2026-03-07").exit_code == 0
    backfill(loaded_dsn, date(2026, 2, 20), date(2026, 3, 10))  # the range function on one table
    assert oracle_problems(loaded_dsn, TIME_ZONE) == [] and stored(loaded_dsn) == before

    planned = run_cli("migrate", "--dsn", loaded_dsn, "--partition-period", "month", "--dry-run")
    assert planned.exit_code == 0 and stored(loaded_dsn) == before
    assert "check (date < '" in planned.output and "validate constraint user_statistics_daily_partition_bound" in planned.output
    assert "-- user_statistics_daily: renamed, with its indexes; a table partitioned by date made in its place" in planned.output
    again = run_cli("migrate", "--dsn", loaded_dsn, "--partition-period", "month")
    assert again.exit_code == 0, again.output
    assert "partitioned public.user_statistics_daily by month (its rows stay where they are)" in again.output
    assert stored(loaded_dsn) == before and dashboard(loaded_dsn, date(2026, 3, 1)) == reads
    with psycopg.connect(loaded_dsn) as conn:
        held = conn.execute("select tableoid::regclass::text, count(*) from user_statistics_daily group by 1").fetchall()
    assert len(held) == 1 and held[0][0].startswith("user_statistics_daily_before_")  # attached, not rewritten
    assert run_cli("verify", "--dsn", loaded_dsn, "--from", "2026-03-01", "--to", "2026-03-07").exit_code == 0
    refused = run_cli("migrate", "--dsn", loaded_dsn, "--partition-period", "year")
    assert refused.exit_code == 2 and "partitioned by month" in refused.output and "\n" == refused.output[-1:]


def test_a_deployment_by_week_has_a_partition_per_week_and_converts_both_ways(loaded_dsn, run_cli):
    deploy(loaded_dsn, time_zone=TIME_ZONE, partition_period="week")
    settings = Settings(time_zone=TIME_ZONE, partition_period="week")
    first, _ = data_days(loaded_dsn)
    with psycopg.connect(loaded_dsn) as conn:
        assert partitions.missing_periods(conn, settings, "user_statistics_daily", first) == []
        assert partitions.missing_periods(conn, settings, "platform_statistics_daily", first) == []
        bounds = [(p.first_day, p.after_day) for p in partitions.partitions(conn, settings, "user_statistics_daily")]
    # Mondays (date_trunc's weeks), seven days each, one after another from the first signup's week
    assert bounds[0][0] == first - timedelta(days=first.weekday())
    assert all(start.weekday() == 0 and end - start == timedelta(days=7) for start, end in bounds)
    assert all(end == start for (_, end), (start, _) in zip(bounds, bounds[1:]))
    backfill(loaded_dsn, date(2026, 2, 20), date(2026, 3, 10))  # three week ends and a month end
    assert oracle_problems(loaded_dsn, TIME_ZONE) == []
    with psycopg.connect(loaded_dsn) as conn:
        homes = dict(conn.execute("select date::text, tableoid::regclass::text from user_statistics_daily"
                                  " where date in ('2026-03-01', '2026-03-02') group by 1, 2").fetchall())
    assert homes == {"2026-03-01": "user_statistics_daily_20260223", "2026-03-02": "user_statistics_daily_20260302"}
    assert run_cli("verify", "--dsn", loaded_dsn, "--from", "2026-02-20", "--to", "2026-03-10").exit_code == 0
    assert "nothing to do" in run_cli("migrate", "--dsn", loaded_dsn).output  # the stored period is kept
    refused = run_cli("migrate", "--dsn", loaded_dsn, "--partition-period", "month")
    assert refused.exit_code == 2 and "partitioned by week" in refused.output

    before, reads = stored(loaded_dsn), dashboard(loaded_dsn, date(2026, 3, 2))  # its week compares with the last
    plain = run_cli("migrate", "--dsn", loaded_dsn, "--partition-period", "none")
    assert plain.exit_code == 0, plain.output
    assert stored(loaded_dsn) == before and dashboard(loaded_dsn, date(2026, 3, 2)) == reads
    again = run_cli("migrate", "--dsn", loaded_dsn, "--partition-period", "week")
    assert again.exit_code == 0, again.output
    assert "partitioned public.user_statistics_daily by week (its rows stay where they are)" in again.output
    assert stored(loaded_dsn) == before and dashboard(loaded_dsn, date(2026, 3, 2)) == reads
    backfill(loaded_dsn, date(2026, 3, 11), date(2026, 3, 17))  # into the converted table, attached whole
    assert oracle_problems(loaded_dsn, TIME_ZONE) == []


def test_retention_drops_whole_partitions_and_no_writer_goes_past_its_edge(migrated_dsn, run_cli):
    backfill(migrated_dsn, date(2026, 1, 1), date(2026, 4, 30))
    with psycopg.connect(migrated_dsn) as conn:
        today = conn.execute("select (now() at time zone 'UTC')::date").fetchone()[0]
        stored_before = conn.execute("select count(*) from user_statistics_daily where date >= '2026-02-01'").fetchone()[0]
    edge = date(2026, 2, 15)
    retention = f"{(today - edge).days} days"
    kept = run_cli("migrate", "--dsn", migrated_dsn, "--retention", retention)
    assert kept.exit_code == 0, kept.output
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        # January's partition (every day past retention) is dropped whole; February's keeps its days
        assert conn.execute("select min(date), count(*) from user_statistics_daily").fetchone() == (date(2026, 2, 1), stored_before)
        assert conn.execute("select to_regclass('user_statistics_daily_20260101')").fetchone()[0] is None
        assert conn.execute("select min(date) from platform_statistics_daily").fetchone()[0] == date(2026, 2, 1)
        frozen = conn.execute("select to_jsonb(s) from user_statistics_daily s where date = '2026-02-10' order by 1").fetchall()
        # a late edit older than the edge: no writer changes a day before it, verify says so
        changed = conn.execute("update bookings set duration_minutes = duration_minutes + 60 where id = (select min(id)"
                               " from bookings where completed_at between '2026-02-05' and '2026-02-06') returning tutor_id").fetchone()
        assert changed
        # a range that starts past retention writes only the days from the edge
        conn.execute("select aggregate_user_statistics_range('2026-02-01', '2026-02-20')")
        assert conn.execute("select to_jsonb(s) from user_statistics_daily s where date = '2026-02-10' order by 1").fetchall() == frozen
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="past retention"):
            conn.execute("select aggregate_user_statistics(null, '2026-02-10')")
    report = run_cli("verify", "--dsn", migrated_dsn, "--only", "capture")
    assert "past retention: days before 2026-02-15 are not kept" in report.output, report.output
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        conn.execute("select aggregate_user_changes()")
        assert conn.execute("select to_jsonb(s) from user_statistics_daily s where date = '2026-02-10' order by 1").fetchall() == frozen
        for day in (edge, date(2026, 3, 31)):
            assert differences(expected_user_rows(conn, day), stored_user_rows(conn, day)) == []
        # at the edge: a month's comparison whose earlier day is gone has no previous value
        user = changed[0]
        value, previous, change, change_pct, _ = conn.execute(
            "select * from user_metric(%s, 'total_earnings', '2026-02-20', 'month')", [user]).fetchone()
        assert value is not None and (previous, change, change_pct) == (None, None, None)
    refused = run_cli("backfill", "--dsn", migrated_dsn, "--from", "2026-02-10", "--to", "2026-02-20")
    assert refused.exit_code == 2
    assert refused.output == (f"statskit: error: --from 2026-02-10 is past retention ({retention}): days before 2026-02-15 "
                              f"are not kept; start at 2026-02-15 or later\n")
    assert run_cli("verify", "--dsn", migrated_dsn, "--only", "schema").exit_code == 0
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:  # a partition past retention, made by hand
        conn.execute("create table user_statistics_daily_old partition of user_statistics_daily"
                     " for values from ('2025-12-01') to ('2026-01-01')")
    failed = run_cli("verify", "--dsn", migrated_dsn, "--only", "schema")
    assert failed.exit_code == 1 and "1 partitions past retention" in failed.output, failed.output
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:  # as the partitions job runs it
        conn.execute("call maintain_statistics_partitions()")
        assert conn.execute("select to_regclass('user_statistics_daily_old')").fetchone()[0] is None


class Reader(threading.Thread):
    """The dashboard reading all along: every call timed."""

    def __init__(self, dsn, user):
        super().__init__(daemon=True)
        self.dsn, self.user, self.done, self.calls, self.errors, self.slowest = dsn, user, threading.Event(), 0, [], 0.0

    def run(self):
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.done.is_set():
                started = time.monotonic()
                try:
                    conn.execute("select * from user_kpis(%s, '2026-03-31')", [self.user]).fetchall()
                except psycopg.Error as exc:
                    self.errors.append(str(exc))
                self.slowest = max(self.slowest, time.monotonic() - started)
                self.calls += 1


def test_backfill_makes_the_partitions_it_needs_while_readers_go_on(migrated_dsn, run_cli):
    settings = Settings()
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        for part in partitions.partitions(conn, settings, "user_statistics_daily"):
            if part.first_day < date(2026, 4, 1):
                conn.execute(f"drop table {part.name}")
        user = conn.execute("select id from profiles order by id limit 1").fetchone()[0]
    reader = Reader(migrated_dsn, user)
    reader.start()
    # another session holds the lock ATTACH PARTITION needs for longer than the lock timeout: the
    # procedure waits 2 s at most per attempt, and tries again
    holder = psycopg.connect(migrated_dsn)
    holder.execute("lock table user_statistics_daily in share update exclusive mode")
    threading.Timer(3.0, holder.rollback).start()
    try:
        filled = run_cli("backfill", "--dsn", migrated_dsn, "--from", "2026-01-20", "--to", "2026-03-31", "--quiet")
    finally:
        reader.done.set()
        reader.join()
        holder.close()
    assert filled.exit_code == 0, filled.output
    assert reader.calls > 0 and reader.errors == [] and reader.slowest < 2.0
    with psycopg.connect(migrated_dsn) as conn:
        assert partitions.missing_periods(conn, settings, "user_statistics_daily", date(2026, 1, 20)) == []
        for day in (date(2026, 1, 31), date(2026, 2, 1), date(2026, 3, 31)):
            assert differences(expected_user_rows(conn, day), stored_user_rows(conn, day)) == []


def test_two_maintainers_at_once_make_each_partition_once(migrated_dsn):
    """The nightly partitions job, a migrate and a backfill may all make partitions at once (two
    migrates at once did): one waits for the other and finds the partition it made, where both
    would otherwise create it and the second fail on a duplicate name."""
    settings = Settings()
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        january = next(p for p in partitions.partitions(conn, settings, "user_statistics_daily")
                       if p.first_day == date(2026, 1, 1))
        conn.execute(f"drop table {january.name}")
    other = psycopg.connect(migrated_dsn)  # another maintainer, half-way through making it
    other.execute("select pg_advisory_xact_lock(hashtext('public.statistics partitions'), 0)")
    other.execute(f"create table {january.name} (like user_statistics_daily including defaults including constraints)")
    other.execute(f"alter table user_statistics_daily attach partition {january.name}"
                  " for values from ('2026-01-01') to ('2026-02-01')")
    errors = []

    def maintain():
        with psycopg.connect(migrated_dsn, autocommit=True) as conn:
            try:
                partitions.maintain(conn, settings, date(2026, 1, 15))
            except psycopg.Error as exc:
                errors.append(exc)

    second = threading.Thread(target=maintain)
    second.start()
    with psycopg.connect(migrated_dsn, autocommit=True) as watcher:
        for _ in range(100):  # until the second waits for the first
            if watcher.execute("select count(*) from pg_locks where locktype = 'advisory' and not granted").fetchone()[0]:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the second maintainer did not wait for the first")
    other.commit()
    other.close()
    second.join(timeout=30)
    assert errors == []
    with psycopg.connect(migrated_dsn) as conn:
        assert partitions.missing_periods(conn, settings, "user_statistics_daily", date(2026, 1, 15)) == []


def test_partitions_carry_their_tables_owner_grants_and_policies(loaded_dsn, run_cli):
    deployed = run_cli("migrate", "--dsn", loaded_dsn, "--roles",
                       "--row-security", "nullif(current_setting('app.user_id', true), '')::uuid")
    assert deployed.exit_code == 0, deployed.output
    settings = Settings(roles=True)
    with psycopg.connect(loaded_dsn, autocommit=True) as conn:
        parts = partitions.partitions(conn, settings, "user_statistics_daily")
        assert len(parts) > 3 and all(partitions.differences(conn, settings, t) == []
                                      for t in ("user_statistics_daily", "platform_statistics_daily"))
        part = parts[0].name
        assert conn.execute("select relowner::regrole::text, relrowsecurity from pg_class where oid = %s::regclass",
                            [part]).fetchone() == ("statskit_writer", True)
        assert conn.execute("select has_table_privilege('statskit_reader', %s, 'select')", [part]).fetchone()[0]
        assert conn.execute("select count(*) from pg_policy where polrelid = %s::regclass", [part]).fetchone()[0] == 1
        conn.execute(f"revoke select on {part} from statskit_reader")  # as a restore without privileges leaves it
    failed = run_cli("verify", "--dsn", loaded_dsn, "--only", "schema")
    assert failed.exit_code == 1 and f"grant SELECT on {part} to statskit_reader" in failed.output, failed.output
    fixed = run_cli("migrate", "--dsn", loaded_dsn)
    assert fixed.exit_code == 0 and "gave partitions their table's owner, grants and policies (1 changes)" in fixed.output
    assert run_cli("verify", "--dsn", loaded_dsn, "--only", "schema").exit_code == 0


def test_the_layout_settings_are_checked_and_read_from_the_project_file(tmp_path, run_cli, loaded_dsn):
    from toolkit import project
    from toolkit.errors import UsageError
    with pytest.raises(UsageError, match="needs a partitioned rollup"):
        Settings(partition_period="none", retention="2 years")
    with pytest.raises(UsageError, match="use a number of days, months or years"):
        Settings(retention="forever")
    run_cli("init", tmp_path / "shop")
    config = tmp_path / "shop" / "statskit.toml"
    config.write_text(config.read_text() + '\n[deployment]\npartition_period = "quarter"\nretention = "3 years"\n')
    assert project.deployment_settings(tmp_path / "shop" / "sql") == {"partition_period": "quarter", "retention": "3 years"}
    deployed = run_cli("migrate", "--dsn", loaded_dsn, "--sql-dir", tmp_path / "shop" / "sql")
    assert deployed.exit_code == 0, deployed.output
    with psycopg.connect(loaded_dsn) as conn:
        bounds = [(p.first_day, p.after_day) for p in partitions.partitions(conn, Settings(), "user_statistics_daily")]
    assert all(first.month in (1, 4, 7, 10) and (after - first) > timedelta(days=88) for first, after in bounds)
    config.write_text(config.read_text() + 'colour = "blue"\n')
    bad = run_cli("migrate", "--dsn", loaded_dsn, "--sql-dir", tmp_path / "shop" / "sql")
    assert bad.exit_code == 2 and "[deployment] has no setting 'colour'" in bad.output
