"""Generate the reference source tables at scale, set-based in SQL, deterministic for a seed.

The shapes follow toolkit.reference.marketplace (skewed tutor popularity, cancellations, refunds, late
reviews, archived listings, unread messages), but the rows are made by the server with
generate_series and a seeded random(), so 100,000 users load in seconds. Each user takes part
in about `bookings_per_user` bookings (as tutor or client), so there are users × that / 2.
"""

import time

import psycopg

from toolkit.reference.marketplace import reference_schema_sql

# Executed in order with the same parameters: %(users)s, %(days)s, %(bookings)s, %(seed)s, %(first_day)s.
STATEMENTS = [
    "set max_parallel_workers_per_gather = 0",  # a serial plan keeps random() in the same order
    # Bulk load: the generator makes only valid references, so skip the per-row foreign-key triggers.
    "set session_replication_role = replica",
    "select setseed(%(seed)s)",
    """insert into profiles (id, role, created_at)
       select md5('user' || i)::uuid,
              case when i %% 10 < 4 then 'tutor' when i %% 20 = 19 then 'agent' else 'client' end,
              %(first_day)s::timestamptz + (random() * (%(days)s + 30) - 30) * interval '1 day'
       from generate_series(1, %(users)s) i""",
    """create temporary table tutor_numbers as
       select row_number() over (order by id) - 1 as n, id, created_at from profiles where role <> 'client'""",
    "alter table tutor_numbers add primary key (n)",
    """create temporary table client_numbers as
       select row_number() over (order by id) - 1 as n, id, created_at from profiles where role = 'client'""",
    """insert into listings (id, tutor_id, created_at, published_at, archived_at)
       select row_number() over (), t.id, c.created, p.published,
              case when p.published is not null and random() < 0.25 then p.published + random() * interval '40 days' end
       from tutor_numbers t
       cross join lateral generate_series(1, 1 + (t.n %% 3)::int) k
       cross join lateral (select t.created_at + random() * interval '10 days' as created) c
       cross join lateral (select case when random() < 0.8 then c.created + random() * interval '5 days' end as published) p""",
    """insert into listing_views (id, listing_id, viewer_id, viewed_at)
       select row_number() over (), l.id, null, l.created_at + random() * %(days)s * interval '1 day'
       from listings l cross join lateral generate_series(1, (random() * 12 + 0 * l.id)::int) k""",
    "alter table tutor_numbers add column first_listing bigint",
    """update tutor_numbers t set first_listing = l.first_listing
       from (select tutor_id, min(id) as first_listing from listings group by tutor_id) l where l.tutor_id = t.id""",
    "analyze tutor_numbers",
    """create temporary table booking_plan as
       select row_number() over () as id,
              (select count(*) from tutor_numbers) as tutors, c.id as client_id, c.created_at as client_created,
              floor(random() ^ 2 * (select count(*) from tutor_numbers))::bigint as tutor_n,
              random() as fate, random() as confirm, random() as r1, random() as r2, random() as r3
       from client_numbers c
       cross join lateral generate_series(1, greatest(1, round(
           %(bookings)s::numeric * %(users)s / 2 / (select count(*) from client_numbers) * (0.5 + random() + 0 * c.n)))::int) k""",
    """insert into bookings (id, listing_id, tutor_id, client_id, status, created_at, confirmed_at, cancelled_at,
                             completed_at, session_start, duration_minutes)
       select b.id, t.first_listing, t.id, b.client_id,
              case when b.fate < 0.2 then 'cancelled' when b.confirm < 0.8 and b.fate < 0.8 then 'completed'
                   when b.confirm < 0.8 then 'confirmed' else 'pending' end,
              s.created,
              case when b.confirm < 0.8 then s.created + b.r1 * interval '2 days' end,
              case when b.fate < 0.2 then s.created + b.r2 * interval '5 days' end,
              case when b.fate >= 0.2 and b.fate < 0.8 and b.confirm < 0.8
                   then s.created + b.r3 * interval '14 days' + (30 + 30 * (b.id %% 4)) * interval '1 minute' end,
              s.created + b.r3 * interval '14 days',
              30 + 30 * (b.id %% 4)
       from booking_plan b
       join tutor_numbers t on t.n = b.tutor_n
       cross join lateral (select greatest(b.client_created, t.created_at)
                                  + b.r1 * %(days)s / 2 * interval '1 day' as created) s""",
    """insert into transactions (id, user_id, booking_id, kind, amount, created_at, available_at)
       select row_number() over (), user_id, booking_id, kind, amount, created_at, available_at from (
           select client_id as user_id, id as booking_id, 'payment' as kind, duration_minutes * 0.8 as amount,
                  confirmed_at as created_at, null::timestamptz as available_at
           from bookings where confirmed_at is not null
           union all
           select client_id, id, 'refund', duration_minutes * 0.8, cancelled_at + interval '1 day', null
           from bookings where confirmed_at is not null and cancelled_at is not null
           union all
           select tutor_id, id, 'earning', duration_minutes * 0.64, completed_at,
                  case when id %% 5 <> 0 then completed_at + interval '7 days' end
           from bookings where completed_at is not null
       ) money""",
    """insert into reviews (id, booking_id, reviewer_id, reviewee_id, rating, created_at)
       select row_number() over (), id, client_id, tutor_id, 1 + least(4, floor(random() * 6))::int,
              completed_at + random() * interval '20 days'
       from bookings where completed_at is not null and random() < 0.6""",
    """insert into messages (id, conversation_id, sender_id, recipient_id, created_at, read_at)
       select row_number() over (), b.id,
              case when k %% 2 = 0 then b.client_id else b.tutor_id end,
              case when k %% 2 = 0 then b.tutor_id else b.client_id end,
              b.created_at + k * interval '1 day' * random(),
              case when random() < 0.7 then b.created_at + (k + 1) * interval '1 day' end
       from bookings b cross join lateral generate_series(0, (random() * 4 + 0 * b.id)::int) k""",
    """insert into referrals (id, referrer_id, referred_id, created_at, converted_at, commission)
       select row_number() over (), p.id, null, p.created_at + interval '3 days',
              case when random() < 0.5 then p.created_at + interval '10 days' end, 20
       from profiles p where random() < 0.4""",
    """insert into caas_scores (id, user_id, score, profile_completeness, computed_at)
       select row_number() over (), p.id, round((20 + random() * 80)::numeric, 2), round((10 + random() * 90)::numeric, 2),
              p.created_at + k * interval '9 days'
       from profiles p cross join lateral generate_series(1, (random() * 4 + 0 * length(p.role))::int) k""",
    "reset session_replication_role",
    "analyze",
]


def generate(conn: psycopg.Connection, users: int, days: int, bookings_per_user: int, seed: float, first_day) -> dict:
    """Create the source tables and fill them; return the row count of each table."""
    conn.execute(reference_schema_sql())
    timings = []
    params = {"users": users, "days": days, "bookings": bookings_per_user, "seed": seed, "first_day": first_day}
    for statement in STATEMENTS:
        started = time.monotonic()
        conn.execute(statement, params)
        timings.append((statement.split("\n")[0][:60], time.monotonic() - started))
    tables = ["profiles", "listings", "listing_views", "bookings", "transactions", "reviews", "messages",
              "referrals", "caas_scores"]
    generate.timings = timings
    return {t: conn.execute(f"select count(*) from {t}").fetchone()[0] for t in tables}
