"""The nightly step (change capture on): the row of D is the sums of D - 1 plus what changes on
D. Held to the literal spec day after day across month starts, the 30-day windows' ends and a
DST change; shown to read only what changes; safe against the change log, backfill, re-runs
and runs of older days."""

import shutil
from datetime import date, timedelta

import psycopg
import pytest

from conftest import SQL_DIR, deploy
from toolkit import deployment
from toolkit.catalog import load_catalog
from toolkit.settings import Settings
from spec_oracle import differences, expected_platform_row, expected_user_rows, stored_platform_row, stored_user_rows


def days(first, last):
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


def run_night(conn, day):
    return conn.execute("select aggregate_daily_statistics(%s), aggregate_user_statistics(null, %s)", [day, day]).fetchone()


def sums_days(conn):
    """How many users' sums are kept, by the day they are of (all of one day)."""
    return dict(conn.execute("select d.date, count(*) from statskit.user_statistics_daily_sums"
                             " cross join statskit.user_statistics_daily_sums_day d group by 1").fetchall())


def problems_on(conn, day, time_zone="UTC"):
    found = differences(expected_user_rows(conn, day, time_zone), stored_user_rows(conn, day))
    expected, stored = expected_platform_row(conn, day, time_zone), stored_platform_row(conn, day)
    return found + [f"platform {m}: spec {v!r}, stored {stored[m]!r}" for m, v in expected.items() if stored[m] != v]


def created_by(conn, day, time_zone="UTC"):
    return conn.execute("select count(*) from profiles where (created_at at time zone %s)::date <= %s",
                        [time_zone, day]).fetchone()[0]


def said_by_the_night(conn, day):
    """Run the night of `day`; what its user step says of where its users' sums come from."""
    said = []

    def hear(notice):
        said.append(notice.message_primary)

    conn.add_notice_handler(hear)
    conn.execute("set client_min_messages = debug1")
    run_night(conn, day)
    conn.execute("reset client_min_messages")
    conn.remove_notice_handler(hear)
    return [m for m in said if m.startswith("statskit: ")]


def stepped_nights_equal_the_spec(dsn, first, last, time_zone="UTC"):
    with psycopg.connect(dsn, autocommit=True) as conn:
        for day in days(first, last):
            stepped = said_by_the_night(conn, day)
            users = created_by(conn, day, time_zone)
            # every user's sums move to D, so the next night steps from them
            assert sums_days(conn) == {day: users}
            if day == first:
                assert stepped == ["statskit: no user from the sums of the day before, every user summed from history"]
            else:  # from the sums, but for the users created on D
                new = users - created_by(conn, day - timedelta(days=1), time_zone)
                assert stepped == [f"statskit: {users - new} users from the sums of the day before, "
                                   f"{new} users summed from history"]
            problems = problems_on(conn, day, time_zone)
            assert problems == [], f"{day}: {problems[:10]}"


# From mid-February: the 1st of March and of April (month windows end), the 30-day windows of
# February's views and completions ending in March, and days after all activity.
def test_day_after_day_the_step_equals_the_spec(migrated_dsn):
    stepped_nights_equal_the_spec(migrated_dsn, date(2026, 2, 20), date(2026, 4, 2))


def test_the_step_reads_through_every_index_migrate_advises_partial_ones_included(migrated_dsn):
    """The advised indexes as a DBA creates them from migrate's note (on a nullable timestamp,
    partial: only the rows that have one). Each must be one the step's plans can use, so with
    sequential scans priced out every one is scanned, and the nights stay exact."""
    catalog = load_catalog(SQL_DIR / "catalog.toml")
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        advised = deployment.missing_step_indexes(conn, catalog, Settings())
        assert {str(index) for index in advised if index.nullable} >= {"public.bookings(completed_at)",
                                                                        "public.messages(read_at)"}
        assert "public.bookings(created_at)" in map(str, advised)
        names = []
        for index in advised:
            names.append(f"{index.table}_{index.column}_advised")
            conn.execute(index.statement(names[-1]))
        assert deployment.missing_step_indexes(conn, catalog, Settings()) == []  # the partial ones count
        conn.execute("analyze")
        conn.execute("select aggregate_daily_statistics('2026-03-09'), aggregate_user_statistics(null, '2026-03-09')")
        conn.execute("select pg_stat_force_next_flush()")
        scans = "select indexrelname, idx_scan from pg_stat_user_indexes where indexrelname = any (%s)"
        before = dict(conn.execute(scans, [names]).fetchall())
    with psycopg.connect(migrated_dsn, autocommit=True, options="-c enable_seqscan=off") as conn:
        for day in days(date(2026, 3, 10), date(2026, 3, 12)):
            run_night(conn, day)
            assert problems_on(conn, day) == []
        conn.execute("select pg_stat_force_next_flush()")
        after = dict(conn.execute(scans, [names]).fetchall())
    assert [name for name in names if after[name] == before[name]] == []


def test_the_step_follows_the_configured_time_zone_across_dst(loaded_dsn):
    deploy(loaded_dsn, time_zone="America/New_York")
    stepped_nights_equal_the_spec(loaded_dsn, date(2026, 2, 26), date(2026, 3, 10), "America/New_York")


def a_reviewed_user(conn):
    return conn.execute("select reviewee_id from reviews where created_at < '2026-03-01' order by id limit 1").fetchone()[0]


def add_old_review(conn, user, id_):
    conn.execute("insert into reviews (id, reviewer_id, reviewee_id, rating, created_at)"
                 " values (%s, %s, %s, 5, '2026-02-15 10:00+00')", [id_, user, user])


def test_the_step_reads_only_what_changes_on_the_day(migrated_dsn, run_cli):
    """A row written behind capture's back (triggers off) on an old day is not reread by the
    step: proof that it starts from the sums. statskit backfill, the documented repair, discards
    the sums of the users it rewrites and sums them again from history for its last day, and the
    next night is right again."""
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        for day in days(date(2026, 3, 10), date(2026, 3, 12)):
            run_night(conn, day)
        user = a_reviewed_user(conn)
        conn.execute("set session_replication_role = replica")  # no triggers: nothing is logged
        add_old_review(conn, user, 990001)
        conn.execute("reset session_replication_role")
        assert conn.execute("select count(*) from statskit.user_changes").fetchone()[0] == 0
        run_night(conn, date(2026, 3, 13))
        stale = problems_on(conn, date(2026, 3, 13))
        assert stale and all(p.startswith(str(user)) for p in stale if not p.startswith("platform")), stale

    assert run_cli("backfill", "--from", "2026-03-13", "--to", "2026-03-13", "--quiet", "--dsn", migrated_dsn).exit_code == 0
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        assert problems_on(conn, date(2026, 3, 13)) == []
        # summed again from history for the backfill's last day, the stale user's too
        assert sums_days(conn) == {date(2026, 3, 13): created_by(conn, date(2026, 3, 13))}
        for day in days(date(2026, 3, 14), date(2026, 3, 15)):
            run_night(conn, day)
            assert problems_on(conn, day) == []


def test_a_backfill_leaves_the_sums_of_its_last_day_so_the_next_night_steps(migrated_dsn, run_cli):
    """The range functions discard the sums of the users they rewrite; backfill ends with the
    nightly step of its last day, which sums them from history and keeps them (rewriting none of
    that day's rows), so the night after it steps instead of summing every user from history.
    A backfill of days before the sums' day leaves none (they never move back)."""
    result = run_cli("backfill", "--from", "2026-03-01", "--to", "2026-03-10", "--dsn", migrated_dsn)
    assert result.exit_code == 0, result.output
    assert "the sums of 2026-03-10 kept, the next night steps from them" in result.output
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        users = created_by(conn, date(2026, 3, 10))
        assert sums_days(conn) == {date(2026, 3, 10): users}
        assert conn.execute("select date from statskit.platform_statistics_daily_sums_day").fetchone()[0] == date(2026, 3, 10)
        new = created_by(conn, date(2026, 3, 11)) - users
        assert said_by_the_night(conn, date(2026, 3, 11)) == [
            f"statskit: {users} users from the sums of the day before, {new} users summed from history"]
        assert problems_on(conn, date(2026, 3, 11)) == []
        night = stored_user_rows(conn, date(2026, 3, 11))

    result = run_cli("backfill", "--from", "2026-03-01", "--to", "2026-03-05", "--dsn", migrated_dsn)
    assert result.exit_code == 0 and "kept" not in result.output, result.output
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        assert sums_days(conn) == {}  # the sums of 2026-03-11 are not moved back to the 5th
        assert stored_user_rows(conn, date(2026, 3, 11)) == night
        assert problems_on(conn, date(2026, 3, 5)) == []


def test_a_profile_deleted_behind_captures_back_gets_no_row_the_next_night(migrated_dsn):
    idle = "00000000-0000-4000-8000-0000000000b1"
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        conn.execute("set session_replication_role = replica")  # no triggers: nothing is logged
        conn.execute("insert into profiles (id, role, created_at) values (%s, 'client', '2026-02-01 10:00+00')", [idle])
        conn.execute("reset session_replication_role")
        for day in days(date(2026, 3, 10), date(2026, 3, 12)):
            run_night(conn, day)
        assert conn.execute("select count(*) from statskit.user_statistics_daily_sums where user_id = %s",
                            [idle]).fetchone()[0] == 1
        conn.execute("set session_replication_role = replica")
        conn.execute("delete from profiles where id = %s", [idle])
        conn.execute("reset session_replication_role")
        run_night(conn, date(2026, 3, 13))
        # the users' rows (the platform's total is a sum, and stays stale until a backfill)
        day = date(2026, 3, 13)
        assert differences(expected_user_rows(conn, day), stored_user_rows(conn, day)) == []
        assert conn.execute("select count(*) from user_statistics_daily where user_id = %s and date = '2026-03-13'",
                            [idle]).fetchone()[0] == 0


def test_a_logged_change_is_summed_from_history_before_the_catch_up_runs(migrated_dsn):
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        for day in days(date(2026, 3, 10), date(2026, 3, 12)):
            run_night(conn, day)
        user = a_reviewed_user(conn)
        add_old_review(conn, user, 990002)  # capture logs it
        assert conn.execute("select count(*) from statskit.user_changes").fetchone()[0] == 1
        run_night(conn, date(2026, 3, 13))
        assert problems_on(conn, date(2026, 3, 13)) == []
        # the entry stays for aggregate_user_changes, which rewrites the older stored days
        assert conn.execute("select count(*) from statskit.user_changes").fetchone()[0] == 1
        run_night(conn, date(2026, 3, 14))
        assert problems_on(conn, date(2026, 3, 14)) == []


def test_reruns_and_older_days_leave_the_sums_right(migrated_dsn):
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        for day in days(date(2026, 3, 10), date(2026, 3, 12)):
            run_night(conn, day)
        assert run_night(conn, date(2026, 3, 12)) == (0, 0)  # from the sums of D: nothing to rewrite
        kept = sums_days(conn)
        run_night(conn, date(2026, 3, 2))  # an older day is summed from history and moves no sums back
        assert problems_on(conn, date(2026, 3, 2)) == []
        assert sums_days(conn) == kept
        run_night(conn, date(2026, 3, 13))
        assert problems_on(conn, date(2026, 3, 13)) == []
        # today's rows are not final (today's writes are not logged): no sums are kept for them
        today = conn.execute("select current_date").fetchone()[0]
        run_night(conn, today)
        assert max(sums_days(conn)) == date(2026, 3, 13)


def test_without_capture_there_are_no_sums(loaded_dsn):
    deploy(loaded_dsn, capture=False)
    with psycopg.connect(loaded_dsn, autocommit=True) as conn:
        assert conn.execute("select to_regclass('statskit.user_statistics_daily_sums'),"
                            " to_regclass('statskit.platform_statistics_daily_sums')").fetchone() == (None, None)
        for day in days(date(2026, 3, 1), date(2026, 3, 2)):
            run_night(conn, day)
            assert problems_on(conn, day) == []


@pytest.mark.parametrize("capture", [True, False], ids=["capture", "no-capture"])
def test_the_sums_stay_across_an_unchanged_deploy_and_go_with_capture(loaded_dsn, capture):
    """The sums live in the function file's table, which a changed file re-creates empty (a
    changed catalog starts them again); a deploy that changes nothing keeps them."""
    deploy(loaded_dsn)
    with psycopg.connect(loaded_dsn, autocommit=True) as conn:
        run_night(conn, date(2026, 3, 1))
        assert sums_days(conn)
    deploy(loaded_dsn, capture=capture)
    with psycopg.connect(loaded_dsn, autocommit=True) as conn:
        exists = conn.execute("select to_regclass('statskit.user_statistics_daily_sums') is not null").fetchone()[0]
        assert exists == capture
        if capture:
            assert sums_days(conn)


def test_a_re_applied_function_file_keeps_the_sums_unless_what_defines_them_changed(loaded_dsn, tmp_path):
    """An upgrade re-creates the step's function (its text changed) but not its sums: the table's
    comment names what defines them. A changed span re-creates them, and migrate rebuilds them
    as of the last stored day, that day's rows left as stored: the next night steps from them to
    the new definition's numbers."""
    sql = tmp_path / "sql"
    shutil.copytree(SQL_DIR, sql)

    deploy(loaded_dsn, sql)
    with psycopg.connect(loaded_dsn, autocommit=True) as conn:
        run_night(conn, date(2026, 3, 1))
        kept = sums_days(conn)
    template = sql / "templates" / "functions" / "aggregate_user_statistics.sql.j2"
    template.write_text(template.read_text().replace("begin\n", "begin\n    -- a comment an upgrade adds\n", 1))
    assert "aggregate_user_statistics" in [name for name, _ in deploy(loaded_dsn, sql).functions]
    with psycopg.connect(loaded_dsn, autocommit=True) as conn:
        assert sums_days(conn) == kept and kept
    catalog = sql / "catalog.toml"
    text = catalog.read_text()
    marker = 'name = "cancelled_sessions"'
    head, tail = text.split(marker, 1)
    catalog.write_text(head + marker + tail.replace('value = "1"', 'value = "2"', 1))
    with psycopg.connect(loaded_dsn) as conn:
        stored = conn.execute("select to_jsonb(s) from user_statistics_daily s order by 1").fetchall()
    assert any("sums of user_statistics_daily are defined otherwise now" in note and "as of 2026-03-01" in note
               for note in deploy(loaded_dsn, sql).notes)
    with psycopg.connect(loaded_dsn, autocommit=True) as conn:
        assert sums_days(conn) == kept
        assert conn.execute("select to_jsonb(s) from user_statistics_daily s order by 1").fetchall() == stored
        run_night(conn, date(2026, 3, 2))
        doubled = conn.execute("select sum(cancelled_sessions) from user_statistics_daily where date = '2026-03-02'").fetchone()[0]
        conn.execute("truncate statskit.user_statistics_daily_sums")  # the same day, summed from history
        conn.execute("select aggregate_user_statistics(null, '2026-03-02')")
        assert conn.execute("select sum(cancelled_sessions) from user_statistics_daily where date = '2026-03-02'").fetchone()[0] == doubled
        assert doubled and doubled % 2 == 0
