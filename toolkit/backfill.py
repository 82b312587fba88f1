"""`statskit backfill`: write the rollup rows of a range of days, in chunks that each commit.

Each chunk of days is one transaction, so a kill or a server restart loses at most the
chunk in flight, and a re-run rewrites the same numbers (the functions upsert). Finished
chunks are recorded in statskit.backfill_ledger; --resume skips them.
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
from .deployment import require_deployment
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
    chunk_days: int = 7
    jobs: int = 2  # connections writing chunks side by side (PostgreSQL runs no write in parallel itself)


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
    """Write every day of the request with `request.jobs` connections, one chunk of days per
    transaction; call report(progress, chunk, skipped) after each chunk, and report_wait(message)
    when another writer of the same days makes a chunk wait. The first error stops every worker."""
    with db.connect(dsn, autocommit=True) as conn:
        settings = require_deployment(conn)
        with conn.transaction():
            conn.execute(LEDGER_SQL)
    progress = Progress(days_total=(request.last - request.first).days + 1, started=time.monotonic())
    scope = "users" if request.user_id else request.scope
    todo = chunks(request.first, request.last, request.chunk_days)
    guard = threading.Lock()
    failures: list[BaseException] = []

    def next_chunk():
        with guard:
            return todo.pop(0) if todo and not failures else None

    def work():
        try:
            with db.connect(dsn, autocommit=True) as conn:
                while chunk := next_chunk():
                    skipped = request.resume and _finished(conn, chunk, scope, request.user_id)
                    written = 0 if skipped else _write_chunk(conn, settings, request, scope, chunk, report_wait)
                    with guard:
                        progress.days_done += (chunk[1] - chunk[0]).days + 1
                        progress.rows_written += written
                        progress.chunks_skipped += skipped
                        report(progress, chunk, skipped)
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


def _write_chunk(conn: psycopg.Connection, settings, request: Request, scope: str, chunk, report_wait) -> int:
    """One transaction: the chunk's days, then its ledger row."""
    schema = quote_ident(settings.schema)
    with conn.transaction():
        _wait_for_other_writers(conn, settings, scope, chunk, report_wait)
        written = 0
        day = chunk[0]
        while day <= chunk[1]:
            if scope in ("both", "platform"):
                written += conn.execute(f"select {schema}.aggregate_daily_statistics(%s)", [day]).fetchone()[0]
            if scope in ("both", "users"):
                written += conn.execute(
                    f"select {schema}.aggregate_user_statistics(%s, %s)", [request.user_id, day]
                ).fetchone()[0]
            day += timedelta(days=1)
        conn.execute(
            f"insert into {STATSKIT_SCHEMA}.backfill_ledger (chunk_first, chunk_last, scope, user_id, rows_written)"
            " values (%s, %s, %s, %s, %s) on conflict (chunk_first, chunk_last, scope, user_id)"
            " do update set rows_written = excluded.rows_written, finished_at = now()",
            [chunk[0], chunk[1], scope, request.user_id, written],
        )
    return written


def _wait_for_other_writers(conn: psycopg.Connection, settings, scope: str, chunk, report_wait) -> None:
    """Take the writer locks of the chunk's days (the functions take the same), in day order so
    concurrent writers cannot deadlock; say whom we wait for, if anyone."""
    tables = {"users": ["user_statistics_daily"], "platform": ["platform_statistics_daily"]}.get(
        scope, ["platform_statistics_daily", "user_statistics_daily"])
    day = chunk[0]
    while day <= chunk[1]:
        for table in tables:
            key = (lock_name(settings, table), day, LOCK_EPOCH)
            taken = conn.execute(
                "select pg_try_advisory_xact_lock(hashtext(%s), %s::date - %s::date)", key).fetchone()[0]
            if taken:
                continue
            holder = conn.execute(
                "select a.pid, coalesce(nullif(a.application_name, ''), a.usename), left(a.query, 80) from pg_locks l"
                " join pg_stat_activity a on a.pid = l.pid where l.locktype = 'advisory' and l.granted"
                " and l.classid::int = hashtext(%s) and l.objid::int = %s::date - %s::date limit 1",
                key,
            ).fetchone()
            who = f"pid {holder[0]} ({holder[1]}: {holder[2]})" if holder else "another session"
            report_wait(f"waiting for {who}, which is writing {table} for {day}")
            conn.execute("select pg_advisory_xact_lock(hashtext(%s), %s::date - %s::date)", key)
        day += timedelta(days=1)


def _finished(conn: psycopg.Connection, chunk: tuple[date, date], scope: str, user_id) -> bool:
    return conn.execute(
        f"select 1 from {STATSKIT_SCHEMA}.backfill_ledger"
        " where chunk_first = %s and chunk_last = %s and scope = %s and user_id is not distinct from %s",
        [chunk[0], chunk[1], scope, user_id],
    ).fetchone() is not None
