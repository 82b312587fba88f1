"""Late and corrected data: after any mix of inserts, updates and deletes at any age, the
registered nightly commands leave every stored row equal to the literal spec, for every stored
day; ordinary writes of today's events log nothing; a failing capture never fails a write."""

import uuid
from datetime import timedelta

import psycopg
import pytest

from conftest import SQL_DIR, cron_connection
from toolkit.catalog import load_catalog
from toolkit.render import CAPTURE_FILE, render_all
from toolkit.settings import Settings
from spec_oracle import (differences, expected_platform_row, expected_user_rows, stored_platform_row,
                         stored_user_rows)

WINDOW = ("2026-03-01", "2026-03-31")


@pytest.fixture
def rolled_up(migrated_dsn, run_cli):
    assert run_cli("backfill", "--from", WINDOW[0], "--to", WINDOW[1], "--quiet", "--dsn", migrated_dsn).exit_code == 0
    return migrated_dsn


def run_registered_jobs(dsn):
    """The registered commands, each as one simple query in its own transaction, as pg_cron runs them."""
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with cron_connection() as conn:
        jobs = conn.execute("select command, username from cron.job where database = %s order by schedule",
                            [dbname]).fetchall()
    assert len(jobs) == 3  # platform at 00:00, users at 01:00, partitions at 23:30 (a CALL: its own transaction)
    for command, username in jobs:
        with psycopg.connect(dsn.replace("user=postgres", f"user={username}"), autocommit=True) as conn:
            conn.execute(command)


def log_size(conn):
    return conn.execute("select (select count(*) from statskit.user_changes),"
                        " (select count(*) from statskit.platform_changes)").fetchone()


def every_stored_day_equals_the_spec(dsn):
    with psycopg.connect(dsn) as conn:
        days = [d for (d,) in conn.execute("select distinct date from user_statistics_daily order by 1")]
        platform_days = [d for (d,) in conn.execute("select date from platform_statistics_daily order by 1")]
        problems = []
        for day in days:
            problems += [f"{day} {p}" for p in differences(expected_user_rows(conn, day), stored_user_rows(conn, day))]
        for day in platform_days:
            expected, stored = expected_platform_row(conn, day), stored_platform_row(conn, day)
            problems += [f"{day} platform {m}: spec {v!r}, stored {stored[m]!r}" for m, v in expected.items() if stored[m] != v]
    return days, problems


def pick(conn, sql):
    row = conn.execute(sql).fetchone()
    assert row is not None, sql
    return row[0] if len(row) == 1 else row


def test_late_and_corrected_data_of_any_age_end_up_equal_to_the_spec(rolled_up):
    dsn = rolled_up
    with psycopg.connect(dsn, autocommit=True) as conn:
        client = pick(conn, "select client_id from bookings where completed_at < '2026-03-10' order by id limit 1")
        tutor = pick(conn, "select tutor_id from bookings where completed_at < '2026-03-10' order by id limit 1")
        other_tutor = pick(conn, f"select id from profiles where role = 'tutor' and id <> '{tutor}' order by id limit 1")
        # a refund imported a month late
        conn.execute("insert into transactions (id, user_id, kind, amount, created_at)"
                     " values (900001, %s, 'refund', 42.50, '2026-03-02 09:00+00')", [client])
        # a cancellation recorded after the fact
        conn.execute("update bookings set cancelled_at = '2026-03-10 12:00+00' where id = ("
                     " select id from bookings where cancelled_at is null and completed_at is null"
                     " and created_at < '2026-03-05' order by id limit 1)")
        # a completion moved to another day, and a read receipt corrected
        conn.execute("update bookings set completed_at = completed_at - interval '6 days' where id = ("
                     " select id from bookings where completed_at between '2026-03-15' and '2026-03-25' order by id limit 1)")
        conn.execute("update messages set read_at = created_at + interval '1 hour' where id = ("
                     " select id from messages where read_at is null and created_at < '2026-03-20' order by id limit 1)")
        # a corrected rating, and a review deleted
        conn.execute("update reviews set rating = case when rating = 1 then 5 else 1 end where id = ("
                     " select id from reviews where created_at between '2026-03-03' and '2026-03-28' order by id limit 1)")
        conn.execute("delete from reviews where id = (select id from reviews where created_at > '2026-03-20' order by id desc limit 1)")
        # a score computed last month, arriving now; a referral converted late
        conn.execute("insert into caas_scores (id, user_id, score, profile_completeness, computed_at)"
                     " values (900002, %s, 12.34, 56.78, '2026-03-15 08:00+00')", [tutor])
        conn.execute("update referrals set converted_at = '2026-03-18 10:00+00', commission = 9.99 where id = ("
                     " select id from referrals where converted_at is null order by id limit 1)")
        # a listing changes hands: its views and bookings now count for the other tutor
        conn.execute("update listings set tutor_id = %s where id = ("
                     " select b.listing_id from bookings b where b.listing_id is not null and b.created_at < '2026-03-01'"
                     " order by b.id limit 1)", [other_tutor])
        conn.execute("insert into listing_views (id, listing_id, viewed_at)"
                     " select 900003, id, '2026-03-07 07:07+00' from listings order by id limit 1")
        # a user migrated in from another system, created 70 days ago, with a completed booking
        migrated = uuid.UUID("00000000-0000-4000-8000-00000000abcd")
        conn.execute("insert into profiles (id, role, created_at) values (%s, 'client', '2026-01-20 10:00+00')", [migrated])
        conn.execute("insert into bookings (id, tutor_id, client_id, status, created_at, confirmed_at, completed_at,"
                     " session_start, duration_minutes) values (900004, %s, %s, 'completed', '2026-03-03 10:00+00',"
                     " '2026-03-03 11:00+00', '2026-03-12 15:00+00', '2026-03-12 14:00+00', 90)", [tutor, migrated])
        # a profile created by mistake, deleted; and one whose created_at is corrected to later
        idle = [uuid.UUID("00000000-0000-4000-8000-0000000000a1"), uuid.UUID("00000000-0000-4000-8000-0000000000a2")]
        conn.execute("insert into profiles (id, role, created_at) values (%s, 'client', '2026-02-10 10:00+00'),"
                     " (%s, 'agent', '2026-02-10 10:00+00')", idle)
        conn.execute("select aggregate_user_statistics_range(%s, %s)", WINDOW)  # their rows, as if stored long ago
        conn.execute("delete from profiles where id = %s", [idle[0]])
        conn.execute("update profiles set created_at = '2026-03-20 00:00+00' where id = %s", [idle[1]])
        # a change to a column statskit does not read logs nothing
        before = log_size(conn)
        conn.execute("update bookings set status = 'confirmed' where id = (select min(id) from bookings)")
        assert log_size(conn) == before
        assert before[0] > 10 and before[1] > 0

    days, stale = every_stored_day_equals_the_spec(dsn)
    assert stale, "the edits must have made stored rows wrong before the nightly run"
    run_registered_jobs(dsn)
    days, problems = every_stored_day_equals_the_spec(dsn)
    assert problems == [], problems[:10]
    assert len(days) == 31 + 1  # the window, plus yesterday the jobs wrote (capture on: no lookback days)
    with psycopg.connect(dsn) as conn:
        assert log_size(conn) == (0, 0)
        assert conn.execute("select min(date) from user_statistics_daily where user_id = %s", [migrated]).fetchone()[0] \
            == days[0]  # every stored day since its (past) creation
        assert conn.execute("select count(*) from user_statistics_daily where user_id = %s", [idle[0]]).fetchone()[0] == 0
        assert conn.execute("select min(date) from user_statistics_daily where user_id = %s", [idle[1]]).fetchone()[0] \
            == days[0] + timedelta(days=19)  # created_at moved to 03-20


def test_todays_ordinary_writes_log_nothing(rolled_up):
    with psycopg.connect(rolled_up, autocommit=True) as conn:
        tutor, client = pick(conn, "select tutor_id, client_id from bookings order by id limit 1")
        conn.execute("insert into bookings (id, tutor_id, client_id, status, created_at, session_start, duration_minutes)"
                     " select 900100 + n, %s, %s, 'pending', now(), now() + interval '3 days', 60"
                     " from generate_series(1, 500) n", [tutor, client])
        conn.execute("update bookings set confirmed_at = now() where id > 900100")
        conn.execute("insert into profiles (id, role, created_at) values (gen_random_uuid(), 'client', now())")
        assert log_size(conn) == (0, 0)
        # completing a booking created long ago changes nothing before today either
        conn.execute("update bookings set completed_at = now() where id = ("
                     " select id from bookings where completed_at is null and cancelled_at is null order by id limit 1)")
        assert log_size(conn) == (0, 0)


def test_updates_that_move_nothing_before_today_never_enter_the_handler(rolled_up):
    """A status change, a completion or a read receipt today of a row created long ago logs
    nothing, and calls no capture function at all (the update trigger's condition is false), so
    neither the exception handler (whose subtransaction would cost every statement) nor the owner
    lookups it guards run: with the table those lookups read gone, such updates raise no capture
    warning, while a backdated change still reaches the handler."""
    with psycopg.connect(rolled_up) as conn:  # a new session: the capture functions plan afresh
        notices = []
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary))
        booking = pick(conn, "select id from bookings where completed_at is null and cancelled_at is null"
                             " and listing_id is not null and created_at < '2026-03-01' order by id limit 1")
        message = pick(conn, "select id from messages where read_at is null and created_at < '2026-03-01' order by id limit 1")
        conn.execute("alter table listings rename to listings_away")  # rolled back below
        conn.execute("update bookings set status = 'confirmed' where id = %s", [booking])
        conn.execute("update bookings set completed_at = now() where id = %s", [booking])
        conn.execute("update messages set read_at = now() where id = %s", [message])
        assert notices == [] and log_size(conn) == (0, 0)
        conn.execute("update bookings set cancelled_at = '2026-03-10 12:00+00' where id = %s", [booking])
        assert any(n.startswith("statskit: change capture on public.bookings failed") for n in notices), notices
        conn.rollback()


def test_only_updates_that_move_a_statistic_before_today_call_the_capture_function(rolled_up):
    """The update trigger is a row trigger with a condition: counted by PostgreSQL's own function
    statistics, today's events call no function, each backdated row calls it once."""
    with psycopg.connect(rolled_up) as conn:
        conn.execute("set track_functions = 'pl'")
        calls = ("select coalesce(sum(calls), 0) from pg_stat_xact_user_functions"
                 " where schemaname = 'statskit' and funcname = 'capture_bookings'")
        pending = [r[0] for r in conn.execute("select id from bookings where completed_at is null and cancelled_at is null"
                                              " and created_at < '2026-03-01' order by id limit 3")]
        assert len(pending) == 3
        conn.execute("update bookings set status = 'confirmed' where id = any (%s)", [pending])
        conn.execute("update bookings set completed_at = now(), status = 'completed' where id = any (%s)", [pending])
        assert conn.execute(calls).fetchone()[0] == 0 and log_size(conn) == (0, 0)
        conn.execute("update bookings set completed_at = '2026-03-10 12:00+00' where id = any (%s)", [pending[:2]])
        assert conn.execute(calls).fetchone()[0] == 2 and log_size(conn)[0] > 0
        conn.rollback()


def test_the_update_trigger_is_made_again_only_when_its_condition_changes(rolled_up):
    def update_trigger(conn):
        return conn.execute("select t.oid, pg_get_triggerdef(t.oid) from pg_trigger t"
                            " where t.tgrelid = 'bookings'::regclass and t.tgname = 'statskit_capture_update'").fetchone()

    with psycopg.connect(rolled_up, autocommit=True) as conn:
        made, definition = update_trigger(conn)
        assert "FOR EACH ROW WHEN" in definition and "'UTC'" in definition
        conn.execute(render_all(SQL_DIR, Settings(), load_catalog(SQL_DIR / "catalog.toml"))[CAPTURE_FILE])
        assert update_trigger(conn)[0] == made  # the same condition: no lock taken on bookings
        conn.execute(render_all(SQL_DIR, Settings(time_zone="Europe/Paris"), load_catalog(SQL_DIR / "catalog.toml"))[CAPTURE_FILE])
        remade, definition = update_trigger(conn)
        assert remade != made and "'Europe/Paris'" in definition


@pytest.mark.parametrize("fault", ["log table gone", "log locked"])
def test_a_failing_capture_never_fails_the_applications_write(rolled_up, fault):
    with psycopg.connect(rolled_up, autocommit=True) as conn:
        holder = None
        if fault == "log table gone":
            conn.execute("drop table statskit.user_changes")
        else:
            holder = psycopg.connect(rolled_up)
            holder.execute("lock table statskit.user_changes in access exclusive mode")
        try:
            notices = []
            conn.add_notice_handler(lambda diag: notices.append(diag.message_primary))
            client = pick(conn, "select id from profiles where role = 'client' order by id limit 1")
            conn.execute("insert into transactions (id, user_id, kind, amount, created_at)"
                         " values (900200, %s, 'payment', 10, '2026-03-05 10:00+00')", [client])
            assert conn.execute("select count(*) from transactions where id = 900200").fetchone()[0] == 1
            assert any(n.startswith("statskit: change capture on public.transactions failed") for n in notices), notices
        finally:
            if holder:
                holder.close()


def test_no_capture_removes_the_triggers_and_rollback_leaves_none(rolled_up, run_cli):
    def triggers():
        with psycopg.connect(rolled_up) as conn:
            return conn.execute("select count(*) from pg_trigger where tgname like 'statskit%'").fetchone()[0]

    assert triggers() == 27
    off = run_cli("migrate", "--no-capture", "--dsn", rolled_up)
    assert off.exit_code == 0 and "removed change capture (capture.sql)" in off.output, off.output
    assert triggers() == 0
    verified = run_cli("verify", "--only", "capture", "--dsn", rolled_up)
    assert "capture" in verified.output and "off (--no-capture)" in verified.output
    on = run_cli("migrate", "--capture", "--dsn", rolled_up)
    assert on.exit_code == 0 and "installed change capture (capture.sql)" in on.output and triggers() == 27
    assert run_cli("migrate", "--dsn", rolled_up).output.endswith("up to date, nothing to do\n")
    assert run_cli("rollback", "--dsn", rolled_up).exit_code == 0
    assert triggers() == 0


def test_verify_reports_the_backlog_and_fails_when_the_nightly_job_fell_behind(rolled_up, run_cli):
    with psycopg.connect(rolled_up, autocommit=True) as conn:
        client = pick(conn, "select id from profiles where role = 'client' order by id limit 1")
        conn.execute("insert into transactions (id, user_id, kind, amount, created_at)"
                     " values (900300, %s, 'payment', 10, '2026-03-05 10:00+00')", [client])
    fresh = run_cli("verify", "--only", "capture", "--dsn", rolled_up)
    assert fresh.exit_code == 0 and "1 entries" in fresh.output and "touching 2026-03-05" in fresh.output, fresh.output
    with psycopg.connect(rolled_up, autocommit=True) as conn:
        conn.execute("update statskit.user_changes set logged_at = now() - interval '30 hours'")
    behind = run_cli("verify", "--only", "capture", "--dsn", rolled_up)
    assert behind.exit_code == 1 and "the nightly job has fallen behind" in behind.output


def test_the_oracle_covers_every_metric_of_the_catalog():
    from conftest import SQL_DIR
    from spec_oracle import PLATFORM_METRICS, USER_METRICS
    from toolkit.catalog import load_catalog
    catalog = load_catalog(SQL_DIR / "catalog.toml")
    assert list(USER_METRICS) == [m.name for m in catalog.user.metrics]
    assert list(PLATFORM_METRICS) == [m.name for m in catalog.platform.metrics]


def logged(conn):
    users = set(conn.execute("select user_id, first_day::text from statskit.user_changes").fetchall())
    platform = conn.execute("select min(first_day)::text from statskit.platform_changes").fetchone()[0]
    conn.execute("delete from statskit.user_changes")
    conn.execute("delete from statskit.platform_changes")
    return users, platform


def day(conn, expression, row_sql, params=()):
    return conn.execute(f"select ({expression} at time zone 'UTC')::date::text from ({row_sql}) r", params).fetchone()[0]


def test_each_change_logs_exactly_the_users_it_counts_for_from_its_first_day(rolled_up):
    with psycopg.connect(rolled_up, autocommit=True) as conn:
        logged(conn)
        booking = "select * from bookings where cancelled_at is null and completed_at is null and listing_id is not null" \
                  " and created_at < '2026-03-05' order by id limit 1"
        b = conn.execute(f"select b.id, b.tutor_id, b.client_id, l.tutor_id from ({booking}) b"
                         " join listings l on l.id = b.listing_id").fetchone()
        conn.execute("update bookings set cancelled_at = '2026-03-10 12:00+00' where id = %s", [b[0]])
        assert logged(conn) == ({(b[1], "2026-03-10"), (b[2], "2026-03-10"), (b[3], "2026-03-10")}, "2026-03-10"), \
            "a cancellation counts for tutor, client and the listing's owner from its own day"

        r = conn.execute("select id, reviewee_id, (created_at at time zone 'UTC')::date::text from reviews"
                         " where created_at between '2026-03-03' and '2026-03-28' order by id limit 1").fetchone()
        conn.execute("update reviews set rating = case when rating = 1 then 5 else 1 end where id = %s", [r[0]])
        assert logged(conn) == ({(r[1], r[2])}, r[2]), "a corrected rating counts from the review's day"

        conn.execute("update bookings set status = 'confirmed' where id = %s", [b[0]])
        assert logged(conn) == (set(), None), "a column statskit does not read logs nothing"

        listing = conn.execute("select l.id, l.tutor_id, (least(l.created_at, l.published_at, l.archived_at)"
                               " at time zone 'UTC')::date::text from listings l order by l.id limit 1").fetchone()
        new_owner = pick(conn, f"select id from profiles where role = 'tutor' and id <> '{listing[1]}' order by id limit 1")
        conn.execute("update listings set tutor_id = %s where id = %s", [new_owner, listing[0]])
        assert logged(conn) == ({(listing[1], listing[2]), (new_owner, listing[2])}, listing[2]), \
            "a listing changing hands counts for both owners"

        view_day = "2026-03-07"
        conn.execute("insert into listing_views (id, listing_id, viewed_at) values (900400, %s, '2026-03-07 07:00+00')",
                     [listing[0]])
        assert logged(conn) == ({(new_owner, view_day)}, view_day), "a view counts for the listing's owner"

        m = conn.execute("select id, sender_id, recipient_id, (created_at at time zone 'UTC')::date::text from messages"
                         " where read_at is null and created_at < '2026-03-20' order by id limit 1").fetchone()
        conn.execute("update messages set read_at = created_at + interval '1 hour' where id = %s", [m[0]])
        read_day = day(conn, "r.read_at", "select read_at from messages where id = %s", [m[0]])
        assert logged(conn) == ({(m[1], read_day), (m[2], read_day)}, read_day)

        c = conn.execute("select id, user_id, (computed_at at time zone 'UTC')::date::text from caas_scores"
                         " order by id limit 1").fetchone()
        conn.execute("delete from caas_scores where id = %s", [c[0]])
        assert logged(conn) == ({(c[1], c[2])}, c[2]), "a deleted score counts from its computation"

        migrated = uuid.UUID("00000000-0000-4000-8000-00000000beef")
        conn.execute("insert into profiles (id, role, created_at) values (%s, 'agent', '2026-01-20 10:00+00')", [migrated])
        assert logged(conn) == ({(migrated, "2026-01-20")}, "2026-01-20"), "a user created in the past counts from then"
