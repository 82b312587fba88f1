"""The aggregation functions against a literal reading of the spec, on data full of edge cases."""

from datetime import date, timedelta

import psycopg
import pytest

from spec_oracle import (
    differences, expected_platform_row, expected_user_rows, stored_platform_row, stored_user_rows,
)
from conftest import deploy

# The market spans 2026-01-31 .. 2026-03-31: its first day, a month end (February has 28 days),
# a month start, a mid-month day, its last day, and a day after all activity.
DATES = [date(2026, 1, 31), date(2026, 2, 28), date(2026, 3, 1), date(2026, 3, 17), date(2026, 3, 31), date(2026, 4, 3)]


def test_the_data_exercises_the_edges(migrated_dsn, market):
    """Guard for the tests below: the generated data holds the edge cases they claim to cover."""
    with psycopg.connect(migrated_dsn) as conn:
        midnight_events = conn.execute(
            "select count(*) from bookings where completed_at = date_trunc('day', completed_at)"
        ).fetchone()[0]
        caas_ties = conn.execute(
            "select count(*) from (select user_id, computed_at from caas_scores group by 1, 2 having count(*) > 1) t"
        ).fetchone()[0]
        later_users = conn.execute("select count(*) from profiles where created_at >= '2026-03-01'").fetchone()[0]
        refunds = conn.execute("select count(*) from transactions where kind = 'refund'").fetchone()[0]
        completion_gaps = {row[0] for row in conn.execute(
            "select completed_at::date - lag(completed_at::date) over (partition by tutor_id, client_id order by completed_at)"
            " from bookings where completed_at is not null")}
    assert midnight_events > 0 and caas_ties > 0 and later_users > 0 and refunds > 0
    assert {30, 31} <= completion_gaps  # where the 30-day windows of one pair touch, and where they part


@pytest.mark.parametrize("day", DATES, ids=str)
def test_set_based_user_rows_equal_the_spec(migrated_dsn, day):
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        written = conn.execute("select aggregate_user_statistics(null, %s)", [day]).fetchone()[0]
        expected = expected_user_rows(conn, day)
        assert written == len(expected)
        assert differences(expected, stored_user_rows(conn, day)) == []


@pytest.mark.parametrize("day", DATES, ids=str)
def test_platform_row_equals_the_spec(migrated_dsn, day):
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        assert conn.execute("select aggregate_daily_statistics(%s)", [day]).fetchone()[0] == 1
        assert stored_platform_row(conn, day) == expected_platform_row(conn, day)


def test_single_user_path_equals_set_based(migrated_dsn):
    day = date(2026, 3, 1)
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        conn.execute("select aggregate_user_statistics(null, %s)", [day])
        set_based = stored_user_rows(conn, day)
        conn.execute("truncate user_statistics_daily")
        users = [r[0] for r in conn.execute("select id from profiles order by id").fetchall()]
        written = sum(
            conn.execute("select aggregate_single_user_statistics(%s, %s)", [u, day]).fetchone()[0] for u in users
        )
        assert written == len(set_based)  # users created after D get no row and count 0
        assert differences(set_based, stored_user_rows(conn, day)) == []
        # aggregate_user_statistics with a user id takes the same one-user path
        some_user = next(iter(set_based))
        conn.execute("delete from user_statistics_daily where user_id = %s", [some_user])
        assert conn.execute("select aggregate_user_statistics(%s, %s)", [some_user, day]).fetchone()[0] == 1
        assert stored_user_rows(conn, day, some_user) == {some_user: set_based[some_user]}


def test_users_created_later_get_no_row_and_idle_users_get_zeros(migrated_dsn):
    day = date(2026, 2, 10)
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        conn.execute("select aggregate_user_statistics(null, %s)", [day])
        late = conn.execute(
            "select count(*) from user_statistics_daily s join profiles p on p.id = s.user_id"
            " where s.date = %s and p.created_at >= %s::date + 1", [day, day]
        ).fetchone()[0]
        assert late == 0
        idle = conn.execute(
            "insert into profiles values (gen_random_uuid(), 'client', '2026-01-01') returning id"
        ).fetchone()[0]
        conn.execute("select aggregate_user_statistics(null, %s)", [day])
        row = stored_user_rows(conn, day, idle)[idle]
        assert all(v == 0 for k, v in row.items() if k not in ("average_rating", "caas_score", "profile_completeness"))
        assert (row["average_rating"], row["caas_score"], row["profile_completeness"]) == (None, None, None)


def test_an_event_at_midnight_belongs_to_the_next_day(migrated_dsn):
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        user = conn.execute("insert into profiles values (gen_random_uuid(), 'tutor', '2026-01-01') returning id").fetchone()[0]
        conn.execute("insert into transactions values (999001, %s, null, 'earning', 10, '2026-03-02 00:00:00+00', null)", [user])
        conn.execute("select aggregate_user_statistics(null, '2026-03-01'), aggregate_user_statistics(null, '2026-03-02')")
        assert stored_user_rows(conn, "2026-03-01", user)[user]["total_earnings"] == 0
        assert stored_user_rows(conn, "2026-03-02", user)[user]["total_earnings"] == 10


def test_rerun_rewrites_nothing_and_late_data_is_picked_up(migrated_dsn):
    day = date(2026, 3, 17)
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        first = conn.execute("select aggregate_user_statistics(null, %s)", [day]).fetchone()[0]
        ids_before = conn.execute("select array_agg(id order by id) from user_statistics_daily").fetchone()[0]
        assert conn.execute("select aggregate_user_statistics(null, %s)", [day]).fetchone()[0] == 0
        assert conn.execute("select aggregate_daily_statistics(%s)", [day]).fetchone()[0] == 1
        assert conn.execute("select aggregate_daily_statistics(%s)", [day]).fetchone()[0] == 0
        assert conn.execute("select count(*) from user_statistics_daily").fetchone()[0] == first
        assert conn.execute("select array_agg(id order by id) from user_statistics_daily").fetchone()[0] == ids_before
        # a late review for one tutor changes exactly that tutor's row
        tutor = conn.execute("select id from profiles where role = 'tutor' and created_at < %s order by id limit 1", [day]).fetchone()[0]
        conn.execute("insert into reviews values (999002, null, %s, %s, 1, %s)", [tutor, tutor, day])
        assert conn.execute("select aggregate_user_statistics(null, %s)", [day]).fetchone()[0] == 1
        assert differences(expected_user_rows(conn, day), stored_user_rows(conn, day)) == []


def test_default_date_is_yesterday(migrated_dsn):
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        conn.execute("select aggregate_user_statistics(), aggregate_daily_statistics()")
        yesterday = conn.execute("select (now() at time zone 'UTC')::date - 1").fetchone()[0]
        dates = conn.execute("select distinct date from user_statistics_daily union select date from platform_statistics_daily").fetchall()
        assert dates == [(yesterday,)]


def test_null_date_is_refused(migrated_dsn):
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.NullValueNotAllowed):
            conn.execute("select aggregate_user_statistics(null, null)")


def test_day_boundaries_follow_the_configured_time_zone(loaded_dsn):
    tz = "America/New_York"
    deploy(loaded_dsn, time_zone=tz)
    day = date(2026, 3, 8)  # the day New York moves to summer time: a 23-hour day
    with psycopg.connect(loaded_dsn, autocommit=True) as conn:
        conn.execute("select aggregate_user_statistics(null, %s), aggregate_daily_statistics(%s)", [day, day])
        assert differences(expected_user_rows(conn, day, tz), stored_user_rows(conn, day)) == []
        assert stored_platform_row(conn, day) == expected_platform_row(conn, day, tz)
        next_day = day + timedelta(days=1)
        conn.execute("select aggregate_user_statistics(null, %s)", [next_day])
        assert differences(expected_user_rows(conn, next_day, tz), stored_user_rows(conn, next_day)) == []
