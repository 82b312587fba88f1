"""A seeded synthetic marketplace in the reference source tables, for the demo, tests and benchmarks.

Deterministic for a seed. Realistic shapes (tutors with many students, clients who cancel,
late reviews, refunds, archived listings, unread messages) plus the edges the spec names:
events exactly at midnight, users created after the period, ties between caas_scores rows,
a regular student whose completions are exactly 30 and 31 days apart,
a tutor who books themselves, a user who messages themselves.
"""

import random
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from importlib import resources

import psycopg

TABLE_COLUMNS = {
    "profiles": ("id", "role", "created_at"),
    "listings": ("id", "tutor_id", "created_at", "published_at", "archived_at"),
    "listing_views": ("id", "listing_id", "viewer_id", "viewed_at"),
    "bookings": ("id", "listing_id", "tutor_id", "client_id", "status", "created_at", "confirmed_at",
                 "cancelled_at", "completed_at", "session_start", "duration_minutes"),
    "transactions": ("id", "user_id", "booking_id", "kind", "amount", "created_at", "available_at"),
    "reviews": ("id", "booking_id", "reviewer_id", "reviewee_id", "rating", "created_at"),
    "messages": ("id", "conversation_id", "sender_id", "recipient_id", "created_at", "read_at"),
    "referrals": ("id", "referrer_id", "referred_id", "created_at", "converted_at", "commission"),
    "caas_scores": ("id", "user_id", "score", "profile_completeness", "computed_at"),
}


def reference_schema_sql() -> str:
    """DDL of the reference source tables (the application brings its own in production)."""
    return resources.files("toolkit.reference").joinpath("schema.sql").read_text()


@dataclass
class Marketplace:
    """Rows per table, in TABLE_COLUMNS order, and the period they span."""

    first_day: date
    last_day: date
    rows: dict[str, list[tuple]] = field(default_factory=lambda: {t: [] for t in TABLE_COLUMNS})

    def count(self) -> int:
        return sum(len(r) for r in self.rows.values())

    @property
    def booked_until(self) -> date:
        """The latest session start: bookings are made ahead of the activity's end."""
        start = TABLE_COLUMNS["bookings"].index("session_start")
        return max(row[start] for row in self.rows["bookings"]).date()


class _Clock:
    """Random instants in the period; about one in eight falls exactly on a midnight."""

    def __init__(self, rng: random.Random, first_day: date):
        self.rng = rng
        self.origin = datetime.combine(first_day, time(), timezone.utc)

    def at_day(self, day_offset: float) -> datetime:
        if self.rng.random() < 0.125:
            return self.origin + timedelta(days=round(day_offset))
        return self.origin + timedelta(days=day_offset)

    def after(self, moment: datetime, max_days: float) -> datetime:
        if self.rng.random() < 0.125:
            return datetime.combine(moment.date() + timedelta(days=self.rng.randint(1, max(1, int(max_days)))),
                                    time(), timezone.utc)
        return moment + timedelta(days=self.rng.uniform(0.01, max_days))


def generate(users: int = 200, days: int = 60, seed: int = 42, last_day: date = date(2026, 3, 31),
             bookings_per_client: float = 6.0) -> Marketplace:
    """Build a marketplace of `users` profiles whose activity spans the `days` days up to last_day."""
    rng = random.Random(seed)
    first_day = last_day - timedelta(days=days - 1)
    clock = _Clock(rng, first_day)
    market = Marketplace(first_day, last_day)
    rows = market.rows
    ids = {t: 0 for t in TABLE_COLUMNS}

    def next_id(table):
        ids[table] += 1
        return ids[table]

    def new_uuid():
        return uuid.UUID(int=rng.getrandbits(128), version=4)

    # Profiles: most exist before the period, some join during it, a few only after it ends.
    tutors, clients, everyone = [], [], []
    for i in range(users):
        role = "tutor" if i % 10 < 4 else "agent" if i % 20 == 19 else "client"
        joined = clock.at_day(rng.uniform(-30, days + 2))
        profile = (new_uuid(), role, joined)
        rows["profiles"].append(profile)
        everyone.append(profile)
        (tutors if role in ("tutor", "agent") else clients).append(profile)
    if not tutors or not clients:
        return market

    # Listings: one to three per tutor; some never published, some archived.
    listings_of = {}
    for tutor_id, _, joined in tutors:
        for _ in range(rng.randint(1, 3)):
            created = clock.after(joined, 10)
            published = clock.after(created, 5) if rng.random() < 0.8 else None
            archived = clock.after(published, 40) if published and rng.random() < 0.25 else None
            listing = (next_id("listings"), tutor_id, created, published, archived)
            rows["listings"].append(listing)
            listings_of.setdefault(tutor_id, []).append(listing)
            for _ in range(rng.randint(0, 12)):
                viewer = rng.choice(everyone)[0] if rng.random() < 0.7 else None
                rows["listing_views"].append((next_id("listing_views"), listing[0], viewer,
                                              clock.after(created, days)))

    # A few popular tutors get most bookings: tutors with many students.
    weights = [1 + 20 * (rng.random() < 0.15) for _ in tutors]
    conversation = 0
    for client_id, _, client_joined in clients:
        for _ in range(max(0, round(rng.gauss(bookings_per_client, bookings_per_client / 2)))):
            tutor_id, _, tutor_joined = rng.choices(tutors, weights)[0]
            if rng.random() < 0.01:
                client_id_for_booking = tutor_id  # a tutor booking their own session
            else:
                client_id_for_booking = client_id
            created = clock.after(max(client_joined, tutor_joined), days / 2)
            listing = rng.choice(listings_of[tutor_id]) if rng.random() < 0.85 else None
            session_start = clock.after(created, 14)
            duration = rng.choice([30, 45, 60, 60, 90, 120])
            confirmed = clock.after(created, 2) if rng.random() < 0.8 else None
            fate = rng.random()
            cancelled = completed = None
            if fate < 0.2:
                cancelled = clock.after(created, 5)
                status = "cancelled"
            elif confirmed and fate < 0.8:
                completed = clock.after(session_start + timedelta(minutes=duration), 1)
                status = "completed"
            else:
                status = "confirmed" if confirmed else "pending"
            booking_id = next_id("bookings")
            rows["bookings"].append((booking_id, listing[0] if listing else None, tutor_id, client_id_for_booking,
                                     status, created, confirmed, cancelled, completed, session_start, duration))
            price = round(duration * rng.uniform(0.4, 1.2), 2)
            if confirmed:
                rows["transactions"].append((next_id("transactions"), client_id_for_booking, booking_id, "payment",
                                             price, confirmed, None))
                if cancelled:
                    rows["transactions"].append((next_id("transactions"), client_id_for_booking, booking_id,
                                                 "refund", price, clock.after(cancelled, 3), None))
            if completed:
                available = clock.after(completed, 10) if rng.random() < 0.8 else None
                rows["transactions"].append((next_id("transactions"), tutor_id, booking_id, "earning",
                                             round(price * 0.8, 2), completed, available))
                if rng.random() < 0.6:  # reviews often arrive late
                    rating = rng.choices([1, 2, 3, 4, 5], [1, 1, 3, 8, 12])[0]
                    rows["reviews"].append((next_id("reviews"), booking_id, client_id_for_booking, tutor_id,
                                            rating, clock.after(completed, 20)))
            conversation += 1
            sent = created
            for turn in range(rng.randint(0, 5)):
                sender, recipient = (client_id_for_booking, tutor_id) if turn % 2 == 0 else (tutor_id, client_id_for_booking)
                sent = clock.after(sent, 3)
                read = clock.after(sent, 4) if rng.random() < 0.7 else None
                rows["messages"].append((next_id("messages"), conversation, sender, recipient, sent, read))

    # A note to self: sender and recipient are the same user.
    note_taker = everyone[0][0]
    conversation += 1
    rows["messages"].append((next_id("messages"), conversation, note_taker, note_taker, clock.at_day(days / 2), None))

    for referrer_id, _, joined in everyone:
        for _ in range(rng.choice([0, 0, 0, 1, 2])):
            created = clock.after(joined, days / 2)
            converted = clock.after(created, 20) if rng.random() < 0.5 else None
            referred = rng.choice(everyone)[0] if converted or rng.random() < 0.3 else None
            commission = round(rng.uniform(5, 50), 2) if converted else 0
            rows["referrals"].append((next_id("referrals"), referrer_id, referred, created, converted, commission))

    for user_id, _, joined in everyone:
        computed = joined
        for _ in range(rng.randint(0, 4)):
            if rng.random() >= 0.15:  # otherwise: a tie with the previous computation
                computed = clock.after(computed, 15)
            rows["caas_scores"].append((next_id("caas_scores"), user_id, round(rng.uniform(20, 100), 2),
                                        round(rng.uniform(10, 100), 2), computed))

    # A regular student: completions 30 days apart (the 30-day windows touch), then 31 (a day between).
    tutor_id, client_id = tutors[0][0], clients[0][0]
    completed = clock.at_day(-20)
    for gap in (0, 30, 31):
        completed += timedelta(days=gap)
        session_start = completed - timedelta(hours=1)
        rows["bookings"].append((next_id("bookings"), None, tutor_id, client_id, "completed",
                                 session_start - timedelta(days=3), session_start - timedelta(days=2), None,
                                 completed, session_start, 60))
    return market


def create_source_tables(conn: psycopg.Connection) -> None:
    conn.execute(reference_schema_sql())


def load(conn: psycopg.Connection, market: Marketplace) -> None:
    """COPY every table's rows (in foreign-key order) in one transaction."""
    with conn.transaction(), conn.cursor() as cur:
        for table, columns in TABLE_COLUMNS.items():
            with cur.copy(f"copy {table} ({', '.join(columns)}) from stdin") as copy:
                for row in market.rows[table]:
                    copy.write_row(row)
