"""A slow, literal reading of the contract (docs/contract.md, docs/metrics.md): one subquery per metric.

Written from the spec's tables line by line, without the catalog, so that a differential
test can hold the set-based functions against it. Window bounds are computed by the
server for the statistics time zone:
  %(end)s = end(D), %(start)s = start(D), %(month_start)s, %(window30_start)s.
"""

import psycopg

BOUNDS_SQL = """
select (%(d)s::date + 1)::timestamp at time zone %(tz)s as end,
       %(d)s::date::timestamp at time zone %(tz)s as start,
       date_trunc('month', %(d)s::date)::date::timestamp at time zone %(tz)s as month_start,
       (%(d)s::date - 29)::timestamp at time zone %(tz)s as window30_start
"""

_MONTH = "{col} >= %(month_start)s and {col} < %(end)s"
_NOT_CANCELLED = "not coalesce(b.cancelled_at < %(end)s, false)"
_NOT_COMPLETED = "not coalesce(b.completed_at < %(end)s, false)"
_USERS_BOOKINGS = "(b.tutor_id = p.id or b.client_id = p.id)"

USER_METRICS = {
    "total_earnings": "select coalesce(sum(amount), 0) from transactions t where t.user_id = p.id and t.kind = 'earning' and t.created_at < %(end)s",
    "monthly_earnings": "select coalesce(sum(amount), 0) from transactions t where t.user_id = p.id and t.kind = 'earning' and " + _MONTH.format(col="t.created_at"),
    "pending_earnings": "select coalesce(sum(amount), 0) from transactions t where t.user_id = p.id and t.kind = 'earning' and t.created_at < %(end)s and (t.available_at is null or t.available_at >= %(end)s)",
    "total_spent": "select coalesce(sum(amount) filter (where kind = 'payment'), 0) - coalesce(sum(amount) filter (where kind = 'refund'), 0) from transactions t where t.user_id = p.id and t.created_at < %(end)s",
    "monthly_spent": "select coalesce(sum(amount) filter (where kind = 'payment'), 0) - coalesce(sum(amount) filter (where kind = 'refund'), 0) from transactions t where t.user_id = p.id and " + _MONTH.format(col="t.created_at"),
    "completed_sessions": f"select count(*) from bookings b where {_USERS_BOOKINGS} and b.completed_at < %(end)s",
    "monthly_sessions": f"select count(*) from bookings b where {_USERS_BOOKINGS} and " + _MONTH.format(col="b.completed_at"),
    "upcoming_sessions": f"select count(*) from bookings b where {_USERS_BOOKINGS} and b.confirmed_at < %(end)s and b.session_start >= %(end)s and {_NOT_CANCELLED} and {_NOT_COMPLETED}",
    "active_bookings": f"select count(*) from bookings b where {_USERS_BOOKINGS} and b.created_at < %(end)s and {_NOT_CANCELLED} and {_NOT_COMPLETED}",
    "cancelled_sessions": f"select count(*) from bookings b where {_USERS_BOOKINGS} and b.cancelled_at < %(end)s",
    "total_hours": f"select round(coalesce(sum(duration_minutes), 0) / 60.0, 2) from bookings b where {_USERS_BOOKINGS} and b.completed_at < %(end)s",
    "monthly_hours": f"select round(coalesce(sum(duration_minutes), 0) / 60.0, 2) from bookings b where {_USERS_BOOKINGS} and " + _MONTH.format(col="b.completed_at"),
    "total_students": "select count(distinct client_id) from bookings b where b.tutor_id = p.id and b.completed_at < %(end)s",
    "active_students": "select count(distinct client_id) from bookings b where b.tutor_id = p.id and b.completed_at >= %(window30_start)s and b.completed_at < %(end)s",
    "new_students": "select count(*) from (select min(b.completed_at) as earliest from bookings b where b.tutor_id = p.id and b.completed_at is not null group by b.client_id) first where " + _MONTH.format(col="first.earliest"),
    "returning_students": "select count(*) from (select b.client_id from bookings b where b.tutor_id = p.id and b.completed_at < %(end)s group by b.client_id having count(*) >= 2) repeat_clients",
    "average_rating": "select round(avg(rating), 2) from reviews r where r.reviewee_id = p.id and r.created_at < %(end)s",
    "total_reviews": "select count(*) from reviews r where r.reviewee_id = p.id and r.created_at < %(end)s",
    "five_star_reviews": "select count(*) from reviews r where r.reviewee_id = p.id and r.created_at < %(end)s and r.rating = 5",
    "active_listings": "select count(*) from listings l where l.tutor_id = p.id and l.published_at < %(end)s and (l.archived_at is null or l.archived_at >= %(end)s)",
    "total_listings": "select count(*) from listings l where l.tutor_id = p.id and l.created_at < %(end)s",
    "listing_views": "select count(*) from listing_views v join listings l on l.id = v.listing_id where l.tutor_id = p.id and v.viewed_at >= %(window30_start)s and v.viewed_at < %(end)s",
    "listing_bookings": "select count(*) from bookings b join listings l on l.id = b.listing_id where l.tutor_id = p.id and b.created_at < %(end)s",
    "unread_messages": "select count(*) from messages m where m.recipient_id = p.id and m.created_at < %(end)s and (m.read_at is null or m.read_at >= %(end)s)",
    "conversations": "select count(distinct conversation_id) from messages m where (m.sender_id = p.id or m.recipient_id = p.id) and m.created_at < %(end)s",
    "referrals_made": "select count(*) from referrals r where r.referrer_id = p.id and r.created_at < %(end)s",
    "referrals_converted": "select count(*) from referrals r where r.referrer_id = p.id and r.created_at < %(end)s and r.converted_at < %(end)s",
    "referral_earnings": "select coalesce(sum(commission), 0) from referrals r where r.referrer_id = p.id and r.converted_at < %(end)s",
    "caas_score": "select score from caas_scores c where c.user_id = p.id and c.computed_at < %(end)s order by c.computed_at desc, c.id desc limit 1",
    "profile_completeness": "select profile_completeness from caas_scores c where c.user_id = p.id and c.computed_at < %(end)s order by c.computed_at desc, c.id desc limit 1",
}

_DAY = "{col} >= %(start)s and {col} < %(end)s"

PLATFORM_METRICS = {
    "total_users": "select count(*) from profiles where created_at < %(end)s",
    "new_users": "select count(*) from profiles where " + _DAY.format(col="created_at"),
    "total_tutors": "select count(*) from profiles where created_at < %(end)s and role = 'tutor'",
    "total_clients": "select count(*) from profiles where created_at < %(end)s and role = 'client'",
    "total_agents": "select count(*) from profiles where created_at < %(end)s and role = 'agent'",
    "active_listings": "select count(*) from listings where published_at < %(end)s and not coalesce(archived_at < %(end)s, false)",
    "bookings_created": "select count(*) from bookings where " + _DAY.format(col="created_at"),
    "sessions_completed": "select count(*) from bookings where " + _DAY.format(col="completed_at"),
    "sessions_cancelled": "select count(*) from bookings where " + _DAY.format(col="cancelled_at"),
    "hours_completed": "select round(coalesce(sum(duration_minutes), 0) / 60.0, 2) from bookings where " + _DAY.format(col="completed_at"),
    "gross_revenue": "select coalesce(sum(amount) filter (where kind = 'payment'), 0) - coalesce(sum(amount) filter (where kind = 'refund'), 0) from transactions where " + _DAY.format(col="created_at"),
    "tutor_earnings": "select coalesce(sum(amount), 0) from transactions where kind = 'earning' and " + _DAY.format(col="created_at"),
    "reviews_created": "select count(*) from reviews where " + _DAY.format(col="created_at"),
    "average_rating": "select round(avg(rating), 2) from reviews where created_at < %(end)s",
    "messages_sent": "select count(*) from messages where " + _DAY.format(col="created_at"),
    "referrals_converted": "select count(*) from referrals where " + _DAY.format(col="converted_at"),
}


def _bounds(conn: psycopg.Connection, day, time_zone: str) -> dict:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute(BOUNDS_SQL, {"d": day, "tz": time_zone}).fetchone()


def expected_user_rows(conn: psycopg.Connection, day, time_zone: str = "UTC", rename=lambda sql: sql) -> dict:
    """{user_id: {metric: value}} for every profile created as of D, straight from the spec;
    `rename` rewrites the query for an application that names its tables and columns otherwise."""
    columns = ",\n".join(f"({sql}) as {name}" for name, sql in USER_METRICS.items())
    query = f"select p.id as user_id, {columns} from profiles p where p.created_at < %(end)s"
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    rows = cur.execute(rename(query), _bounds(conn, day, time_zone)).fetchall()
    return {row.pop("user_id"): row for row in rows}


def expected_platform_row(conn: psycopg.Connection, day, time_zone: str = "UTC", rename=lambda sql: sql) -> dict:
    columns = ",\n".join(f"({sql}) as {name}" for name, sql in PLATFORM_METRICS.items())
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute(rename(f"select {columns}"), _bounds(conn, day, time_zone)).fetchone()


def stored_user_rows(conn: psycopg.Connection, day, user_id=None) -> dict:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    rows = cur.execute(
        f"select user_id, {', '.join(USER_METRICS)} from user_statistics_daily"
        " where date = %s and (%s::uuid is null or user_id = %s::uuid)",
        [day, user_id, user_id],
    ).fetchall()
    return {row.pop("user_id"): row for row in rows}


def stored_platform_row(conn: psycopg.Connection, day) -> dict | None:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute(
        f"select {', '.join(PLATFORM_METRICS)} from platform_statistics_daily where date = %s", [day]
    ).fetchone()


def differences(expected: dict, got: dict) -> list[str]:
    """Readable mismatches between {user: {metric: value}} maps (missing and extra users too)."""
    out = []
    for user in sorted(set(expected) | set(got), key=str):
        if user not in got:
            out.append(f"{user}: row missing")
        elif user not in expected:
            out.append(f"{user}: row should not exist")
        else:
            out += [f"{user} {m}: spec {v!r}, stored {got[user][m]!r}"
                    for m, v in expected[user].items() if got[user][m] != v]
    return out
