"""Any mix of late inserts, updates and deletes: seeded random edits across every source table,
at any age, then the registered nightly commands, then the literal oracle over every stored day."""

import random
import uuid
from datetime import date, timedelta

import psycopg
import pytest

from test_capture import WINDOW, every_stored_day_equals_the_spec, run_registered_jobs

DAYS = ("2026-01-15", "2026-03-31")  # edits land before and inside the stored window


def moment(rng):
    """A random timestamp in DAYS, now and then exactly at a midnight."""
    day = rng.randint(0, 75)
    seconds = 0 if rng.random() < 0.1 else rng.randint(0, 86399)
    return f"'{DAYS[0]}'::timestamptz + interval '{day} days {seconds} seconds'"


def any_id(conn, rng, table, where="true"):
    count = conn.execute(f"select count(*) from {table} where {where}").fetchone()[0]
    if not count:
        return None
    return conn.execute(f"select id from {table} where {where} order by id offset %s limit 1",
                        [rng.randrange(count)]).fetchone()[0]


UNREFERENCED = {
    "bookings": "not exists (select from transactions t where t.booking_id = bookings.id)"
                " and not exists (select from reviews r where r.booking_id = bookings.id)",
    "listings": "not exists (select from bookings b where b.listing_id = listings.id)"
                " and not exists (select from listing_views v where v.listing_id = listings.id)",
}


def edit(conn, rng, serial):
    """One random statement; returns a short description for the failure message."""
    user = lambda role="": any_id(conn, rng, "profiles", f"role = '{role}'" if role else "true")  # noqa: E731
    new_id = 950000 + serial
    kind = rng.choice(["transaction", "booking", "review", "message", "referral", "caas", "listing", "view", "profile"])
    op = rng.choice(["insert", "update", "delete"])
    if kind == "transaction":
        if op == "insert":
            conn.execute(f"insert into transactions (id, user_id, kind, amount, created_at, available_at)"
                         f" values (%s, %s, %s, %s, {moment(rng)}, case when %s then {moment(rng)} end)",
                         [new_id, user(), rng.choice(["earning", "payment", "refund", "referral_commission"]),
                          rng.randint(1, 500), rng.random() < 0.5])
        elif op == "update":
            column, value = rng.choice([("amount", str(rng.randint(1, 900))), ("created_at", moment(rng)),
                                        ("available_at", moment(rng)), ("kind", "'refund'"), ("user_id", f"'{user()}'")])
            conn.execute(f"update transactions set {column} = {value} where id = %s", [any_id(conn, rng, "transactions")])
        else:
            conn.execute("delete from transactions where id = %s", [any_id(conn, rng, "transactions")])
    elif kind == "booking":
        if op == "insert":
            start = moment(rng)
            done = rng.choice(["completed_at", "cancelled_at", None])
            conn.execute(
                f"insert into bookings (id, listing_id, tutor_id, client_id, status, created_at, confirmed_at,"
                f" {done or 'completed_at'}, session_start, duration_minutes) values (%s, %s, %s, %s, 'pending',"
                f" {start}, {start} + interval '2 hours', {start + ' + interval ' + repr('3 days') if done else 'null'},"
                f" {start} + interval '3 days', %s)",
                [new_id, any_id(conn, rng, "listings") if rng.random() < 0.7 else None, user("tutor"), user("client"),
                 rng.choice([30, 60, 90])])
        elif op == "update":
            column, value = rng.choice([("cancelled_at", moment(rng)), ("completed_at", moment(rng)),
                                        ("confirmed_at", moment(rng)), ("session_start", moment(rng)),
                                        ("duration_minutes", str(rng.randint(15, 180))), ("tutor_id", f"'{user('tutor')}'"),
                                        ("completed_at", "null"), ("status", "'completed'")])
            conn.execute(f"update bookings set {column} = {value} where id = %s", [any_id(conn, rng, "bookings")])
        else:
            conn.execute("delete from bookings where id = %s", [any_id(conn, rng, "bookings", UNREFERENCED["bookings"])])
    elif kind == "review":
        if op == "insert":
            conn.execute(f"insert into reviews (id, reviewer_id, reviewee_id, rating, created_at)"
                         f" values (%s, %s, %s, %s, {moment(rng)})", [new_id, user(), user(), rng.randint(1, 5)])
        elif op == "update":
            conn.execute("update reviews set rating = %s where id = %s", [rng.randint(1, 5), any_id(conn, rng, "reviews")])
        else:
            conn.execute("delete from reviews where id = %s", [any_id(conn, rng, "reviews")])
    elif kind == "message":
        if op == "insert":
            conn.execute(f"insert into messages (id, conversation_id, sender_id, recipient_id, created_at, read_at)"
                         f" values (%s, %s, %s, %s, {moment(rng)}, case when %s then {moment(rng)} end)",
                         [new_id, rng.randint(1, 50), user(), user(), rng.random() < 0.5])
        elif op == "update":
            conn.execute(f"update messages set read_at = {rng.choice([moment(rng), 'null'])} where id = %s",
                         [any_id(conn, rng, "messages")])
        else:
            conn.execute("delete from messages where id = %s", [any_id(conn, rng, "messages")])
    elif kind == "referral":
        if op == "insert":
            conn.execute(f"insert into referrals (id, referrer_id, created_at, converted_at, commission)"
                         f" values (%s, %s, {moment(rng)}, case when %s then {moment(rng)} end, %s)",
                         [new_id, user(), rng.random() < 0.5, rng.randint(0, 50)])
        elif op == "update":
            conn.execute(f"update referrals set converted_at = {moment(rng)}, commission = %s where id = %s",
                         [rng.randint(0, 80), any_id(conn, rng, "referrals")])
        else:
            conn.execute("delete from referrals where id = %s", [any_id(conn, rng, "referrals")])
    elif kind == "caas":
        if op == "insert":
            conn.execute(f"insert into caas_scores (id, user_id, score, profile_completeness, computed_at)"
                         f" values (%s, %s, %s, %s, {moment(rng)})", [new_id, user(), rng.randint(0, 100), rng.randint(0, 100)])
        elif op == "update":
            conn.execute(f"update caas_scores set computed_at = {moment(rng)} where id = %s", [any_id(conn, rng, "caas_scores")])
        else:
            conn.execute("delete from caas_scores where id = %s", [any_id(conn, rng, "caas_scores")])
    elif kind == "listing":
        if op == "insert":
            conn.execute(f"insert into listings (id, tutor_id, created_at, published_at)"
                         f" values (%s, %s, {moment(rng)}, {moment(rng)})", [new_id, user("tutor")])
        elif op == "update":
            column, value = rng.choice([("archived_at", moment(rng)), ("published_at", moment(rng)),
                                        ("tutor_id", f"'{user('tutor')}'")])
            conn.execute(f"update listings set {column} = {value} where id = %s", [any_id(conn, rng, "listings")])
        else:
            conn.execute("delete from listings where id = %s", [any_id(conn, rng, "listings", UNREFERENCED["listings"])])
    elif kind == "view":
        if op == "delete":
            conn.execute("delete from listing_views where id = %s", [any_id(conn, rng, "listing_views")])
        else:
            conn.execute(f"insert into listing_views (id, listing_id, viewed_at) values (%s, %s, {moment(rng)})",
                         [new_id, any_id(conn, rng, "listings")])
    else:
        if op == "insert":
            conn.execute(f"insert into profiles (id, role, created_at) values (%s, %s, {moment(rng)})",
                         [uuid.UUID(int=new_id), rng.choice(["tutor", "client", "agent"])])
        elif op == "update":
            column, value = rng.choice([("created_at", moment(rng)), ("role", "'agent'")])
            conn.execute(f"update profiles set {column} = {value} where id = %s", [user()])
        else:  # only a profile nothing refers to can go
            conn.execute("delete from profiles p where p.id = %s", [any_id(conn, rng, "profiles",
                         "not exists (select from bookings b where profiles.id in (b.tutor_id, b.client_id))"
                         " and not exists (select from transactions t where t.user_id = profiles.id)"
                         " and not exists (select from reviews r where profiles.id in (r.reviewer_id, r.reviewee_id))"
                         " and not exists (select from messages m where profiles.id in (m.sender_id, m.recipient_id))"
                         " and not exists (select from referrals f where profiles.id in (f.referrer_id, f.referred_id))"
                         " and not exists (select from caas_scores c where c.user_id = profiles.id)"
                         " and not exists (select from listings l where l.tutor_id = profiles.id)"
                         " and not exists (select from listing_views v where v.viewer_id = profiles.id)")])
    return f"{op} {kind}"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_random_mix_of_late_edits_ends_up_equal_to_the_spec(migrated_dsn, run_cli, seed):
    assert run_cli("backfill", "--from", WINDOW[0], "--to", WINDOW[1], "--quiet", "--dsn", migrated_dsn).exit_code == 0
    rng = random.Random(seed)
    done = []
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        for serial in range(40):
            done.append(edit(conn, rng, serial))
    _, stale = every_stored_day_equals_the_spec(migrated_dsn)
    assert len(stale) > 20, "the edits must have made stored rows wrong"
    run_registered_jobs(migrated_dsn)
    days, problems = every_stored_day_equals_the_spec(migrated_dsn)
    assert problems == [], f"after {done}: {problems[:8]}"


@pytest.mark.parametrize("seed", [4, 5])
def test_random_late_edits_between_stepped_nights_keep_every_stored_day_equal_to_the_spec(migrated_dsn, seed):
    """The nightly step starts each day from the sums of the day before: late edits between the
    nights, at any age, must reach those sums through the log (the catch-up discards the sums of
    the users it rewrites), night after night."""
    rng = random.Random(seed)
    first = date(2026, 3, 20)
    done = []
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        for n in range(7):
            day = first + timedelta(days=n)
            if n:
                done += [edit(conn, rng, 10 * n + k) for k in range(8)]
            # the registered commands' order, for the night of `day`
            conn.execute("select aggregate_platform_changes()")
            conn.execute("select aggregate_daily_statistics(%s)", [day])
            conn.execute("select aggregate_user_changes()")
            conn.execute("select aggregate_user_statistics(null, %s)", [day])
        assert conn.execute("select date from statskit.user_statistics_daily_sums_day").fetchall() == [(day,)]
    days, problems = every_stored_day_equals_the_spec(migrated_dsn)
    assert len(days) == 7 and problems == [], f"after {done}: {problems[:8]}"
