"""`statskit backfill`: write the rollup rows of a range of days, in chunks that each commit.

Each chunk of days is one transaction per table (and per slice of users), so a kill or a server
restart loses at most the work in flight, and a re-run rewrites the same numbers (the functions
upsert). Finished work is recorded in statskit.backfill_ledger; --resume skips it. The range
functions compute a whole chunk from one pass over the sources; slices of users let several
connections share a chunk, since PostgreSQL never runs a write in parallel itself.
"""

import dataclasses
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Callable

import psycopg

from . import db
from .deployment import mark_filled, require_deployment
from .errors import UsageError
from .render import LOCK_EPOCH, lock_name, quote_ident
from .settings import STATSKIT_SCHEMA

LEDGER_SQL = f"""
create table if not exists {STATSKIT_SCHEMA}.backfill_ledger (
    chunk_first date not null,
    chunk_last date not null,
    scope text not null,
    user_id uuid,
    rows_written bigint not null,
    finished_at timestamptz not null default now(),
    unique nulls not distinct (chunk_first, chunk_last, scope, user_id)
)
"""

SCOPES = ("both", "users", "platform")


@dataclass(frozen=True)
class Request:
    first: date
    last: date
    scope: str = "both"
    user_id: uuid.UUID | None = None
    resume: bool = False
    # Each chunk costs one pass over the whole history of the sources, so chunks are long.
    chunk_days: int = 120
    jobs: int = 2  # connections writing side by side, each its slice of the users


@dataclass(frozen=True)
class Unit:
    """One transaction of a backfill: a chunk of days of one table, for a slice of the users."""

    chunk: tuple[date, date]
    table: str  # "users" or "platform"
    users_from: uuid.UUID | None = None
    users_to: uuid.UUID | None = None

    @property
    def sliced(self) -> bool:
        return self.users_from is not None or self.users_to is not None

    @property
    def rollup_table(self) -> str:
        return "platform_statistics_daily" if self.table == "platform" else "user_statistics_daily"

    @property
    def scope(self) -> str:
        """What the ledger records, so --resume skips exactly this work."""
        if not self.sliced:
            return self.table
        return f"users {self.users_from or ''}..{self.users_to or ''}"


@dataclass
class Progress:
    days_total: int
    days_done: int = 0
    rows_written: int = 0
    chunks_skipped: int = 0
    started: float = 0.0

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started


def user_slices(conn: psycopg.Connection, settings, count: int) -> list[tuple[uuid.UUID | None, uuid.UUID | None]]:
    """Split the users into `count` slices of about equal size, by id: [(from, to)], open-ended
    at both ends so users created during the run belong to one."""
    profiles = f"{quote_ident(settings.source_schema)}.profiles"
    total = conn.execute(f"select count(*) from {profiles}").fetchone()[0]
    bounds = []
    for k in range(1, count):
        row = conn.execute(f"select id from {profiles} order by id offset %s limit 1", [k * total // count]).fetchone()
        if row and row[0] not in bounds:
            bounds.append(row[0])
    edges = [None, *bounds, None]
    return list(zip(edges, edges[1:]))


def plan_units(conn: psycopg.Connection, settings, request: Request) -> list[Unit]:
    slices = [(None, None)]
    if request.scope != "platform" and request.user_id is None and request.jobs > 1:
        slices = user_slices(conn, settings, request.jobs)
    units = []
    for chunk in chunks(request.first, request.last, request.chunk_days):
        if request.scope in ("both", "users") or request.user_id:
            units += [Unit(chunk, "users", lo, hi) for lo, hi in slices]
        if request.scope in ("both", "platform") and not request.user_id:
            units.append(Unit(chunk, "platform"))
    return units


def chunks(first: date, last: date, size: int) -> list[tuple[date, date]]:
    out, start = [], first
    while start <= last:
        end = min(last, start + timedelta(days=size - 1))
        out.append((start, end))
        start = end + timedelta(days=1)
    return out


def yesterday(conn: psycopg.Connection, time_zone: str) -> date:
    return conn.execute("select (now() at time zone %s)::date - 1", [time_zone]).fetchone()[0]


def check_request(conn: psycopg.Connection, request: Request) -> tuple[Request, str | None]:
    """Validate against the database; a --to after yesterday is clamped, with a note saying so."""
    settings = require_deployment(conn)
    if request.scope not in SCOPES:
        raise UsageError(f"--only {request.scope!r}: use users or platform")
    if request.user_id is not None:
        known = conn.execute(
            f"select 1 from {quote_ident(settings.source_schema)}.profiles where id = %s", [request.user_id]
        ).fetchone()
        if not known:
            raise UsageError(f"--user {request.user_id}: no such profile")
    last_complete = yesterday(conn, settings.time_zone)
    if request.last <= last_complete:
        return request, None
    if request.first > last_complete:
        raise UsageError(f"--from {request.first} is in the future: the last complete day is {last_complete}")
    note = f"--to {request.last} is after the last complete day; clamped to {last_complete}"
    return dataclasses.replace(request, last=last_complete), note


def backfill(dsn: str, request: Request,
             report: Callable[[Progress, tuple[date, date], bool], None] = lambda *a: None,
             report_wait: Callable[[str], None] = lambda message: None) -> Progress:
    """Write every day of the request with `request.jobs` connections; call report(progress,
    chunk, skipped) when all of a chunk's work is done, and report_wait(message) when another
    writer of the same days makes us wait. The first error stops every worker."""
    with db.connect(dsn, autocommit=True) as run_conn:
        settings = require_deployment(run_conn)
        with run_conn.transaction():
            run_conn.execute(LEDGER_SQL)
        _take_run_lock(run_conn, settings, report_wait)
        units = plan_units(run_conn, settings, request)
        progress = _run(dsn, settings, request, units, report, report_wait)
        if request.user_id is None:  # every user's rows of these days are now computed with every metric
            for table in dict.fromkeys(u.rollup_table for u in units):
                mark_filled(run_conn, table, request.first, request.last)
        return progress


def _run(dsn, settings, request: Request, units: list[Unit], report, report_wait) -> Progress:
    progress = Progress(days_total=(request.last - request.first).days + 1, started=time.monotonic())
    todo = list(units)
    left = {}  # chunk -> [units not yet done, all skipped so far]
    for unit in units:
        left.setdefault(unit.chunk, [0, True])[0] += 1
    guard = threading.Lock()
    failures: list[BaseException] = []

    def next_unit():
        with guard:
            return todo.pop(0) if todo and not failures else None

    def work():
        try:
            with db.connect(dsn, autocommit=True) as conn:
                while unit := next_unit():
                    skipped = request.resume and _finished(conn, unit, request.user_id)
                    written = 0 if skipped else _write_unit(conn, settings, request, unit, report_wait)
                    with guard:
                        progress.rows_written += written
                        state = left[unit.chunk]
                        state[0] -= 1
                        state[1] = state[1] and skipped
                        if state[0] == 0:
                            progress.days_done += (unit.chunk[1] - unit.chunk[0]).days + 1
                            progress.chunks_skipped += state[1]
                            report(progress, unit.chunk, state[1])
        except BaseException as exc:  # handed to the caller's thread below
            with guard:
                failures.append(exc)

    workers = [threading.Thread(target=work, daemon=True) for _ in range(max(1, min(request.jobs, len(todo))))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if failures:
        raise failures[0]
    return progress


def _write_unit(conn: psycopg.Connection, settings, request: Request, unit: Unit, report_wait) -> int:
    """One transaction: the unit's days, then its ledger row."""
    schema = quote_ident(settings.schema)
    first, last = unit.chunk
    with conn.transaction():
        _wait_for_other_writers(conn, settings, unit.rollup_table, unit, report_wait)
        if unit.table == "platform":
            written = conn.execute(f"select {schema}.aggregate_daily_statistics_range(%s, %s)", [first, last]).fetchone()[0]
        elif request.user_id:
            # One user's day is an index lookup: day by day beats a pass over the whole history.
            written = sum(
                conn.execute(f"select {schema}.aggregate_user_statistics(%s, %s)", [request.user_id, day]).fetchone()[0]
                for day in (first + timedelta(days=n) for n in range((last - first).days + 1)))
        else:
            written = conn.execute(f"select {schema}.aggregate_user_statistics_range(%s, %s, %s, %s)",
                                   [first, last, unit.users_from, unit.users_to]).fetchone()[0]
        conn.execute(
            f"insert into {STATSKIT_SCHEMA}.backfill_ledger (chunk_first, chunk_last, scope, user_id, rows_written)"
            " values (%s, %s, %s, %s, %s) on conflict (chunk_first, chunk_last, scope, user_id)"
            " do update set rows_written = excluded.rows_written, finished_at = now()",
            [first, last, unit.scope, request.user_id, written],
        )
    return written


def _holder(conn: psycopg.Connection, key: str, day_key: int) -> str:
    """Who holds an advisory lock, for the waiting message."""
    holder = conn.execute(
        "select a.pid, coalesce(nullif(a.application_name, ''), a.usename), left(a.query, 80) from pg_locks l"
        " join pg_stat_activity a on a.pid = l.pid where l.locktype = 'advisory' and l.granted"
        " and l.classid::int = hashtext(%s) and l.objid::int = %s and a.pid <> pg_backend_pid() limit 1",
        [key, day_key],
    ).fetchone()
    return f"pid {holder[0]} ({holder[1]}: {holder[2]})" if holder else "another session"


def _take_run_lock(conn: psycopg.Connection, settings, report_wait) -> None:
    """Held for the whole run (a session lock): two backfills never write at once, so the
    slices of one, which share the day locks, never meet another's."""
    key = f"{settings.schema}.backfill"
    if not conn.execute("select pg_try_advisory_lock(hashtext(%s), 0)", [key]).fetchone()[0]:
        report_wait(f"waiting for {_holder(conn, key, 0)}, another statskit backfill of this database")
        conn.execute("select pg_advisory_lock(hashtext(%s), 0)", [key])


def _wait_for_other_writers(conn: psycopg.Connection, settings, table: str, unit: Unit, report_wait) -> None:
    """Take the writer locks of the unit's days (the functions take the same), in day order so
    concurrent writers cannot deadlock; shared for a slice of users, whose sibling slices
    write other rows of the same days. Say whom we wait for, if anyone."""
    mode = "_shared" if unit.sliced else ""
    key = lock_name(settings, table)
    day = unit.chunk[0]
    while day <= unit.chunk[1]:
        day_key = (day - date.fromisoformat(LOCK_EPOCH)).days
        if not conn.execute(f"select pg_try_advisory_xact_lock{mode}(hashtext(%s), %s)", [key, day_key]).fetchone()[0]:
            report_wait(f"waiting for {_holder(conn, key, day_key)}, which is writing {table} for {day}")
            conn.execute(f"select pg_advisory_xact_lock{mode}(hashtext(%s), %s)", [key, day_key])
        day += timedelta(days=1)


def _finished(conn: psycopg.Connection, unit: Unit, user_id) -> bool:
    return conn.execute(
        f"select 1 from {STATSKIT_SCHEMA}.backfill_ledger"
        " where chunk_first = %s and chunk_last = %s and scope = %s and user_id is not distinct from %s",
        [unit.chunk[0], unit.chunk[1], unit.scope, user_id],
    ).fetchone() is not None
