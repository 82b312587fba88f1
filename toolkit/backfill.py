"""`statskit backfill`: write the rollup rows of a range of days, in chunks that each commit whole.

Each chunk of days of one table is one transaction that writes every user's rows of those days,
so a reader never sees a day with some users' rows and not others', whatever stops the run
(Ctrl-C, SIGTERM, SIGKILL, a lost connection): a day is committed whole or not at all. Several
connections (`jobs`) share the work by days: each writes other chunks, since PostgreSQL never
runs a write in parallel itself. Finished chunks are recorded in statskit.backfill_ledger;
--resume writes only the days no finished chunk covers. The range functions compute a whole
chunk from one pass over the sources; a re-run rewrites the same numbers (they upsert).
"""

import dataclasses
import math
import threading
import time
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Callable

import psycopg

from . import db, partitions
from .catalog import Catalog, UserKey
from .dates import check_range, yesterday
from .deployment import kept_sums_day, mark_filled, require_deployment, write_day_keeping_sums
from .errors import StatskitError, UsageError
from .migrate import Target
from .render import quote_ident, writer_lock
from .settings import STATSKIT_SCHEMA


def ledger_sql(key_type: str) -> str:
    """The finished chunks, for resume; a user's own chunks name the user (the catalog's key type)."""
    return f"""
create table if not exists {STATSKIT_SCHEMA}.backfill_ledger (
    chunk_first date not null,
    chunk_last date not null,
    scope text not null,
    user_id {key_type},
    rows_written bigint not null,
    finished_at timestamptz not null default now(),
    unique nulls not distinct (chunk_first, chunk_last, scope, user_id)
)
"""


SCOPES = ("both", "users", "platform")


def rollup_table(catalog: Catalog, scope: str) -> str:
    """The table a ledger scope ("users", "platform") writes, as the catalog names it."""
    return (catalog.user if scope == "users" else catalog.platform).table

# A unit that PostgreSQL chose as a deadlock victim (or failed to serialise) is simply tried
# again: it wrote nothing, since its transaction rolled back whole.
RETRIES = 3
RETRIED_ERRORS = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)


@dataclass(frozen=True)
class Request:
    first: date
    last: date
    scope: str = "both"
    user_id: UserKey | None = None
    resume: bool = False
    # Each chunk costs one pass over the whole history of the sources, so chunks are long.
    chunk_days: int = 120
    jobs: int = 2  # connections writing side by side, each its own chunks of days

    @property
    def tables(self) -> tuple[str, ...]:
        """The tables written, as the ledger names them ("users", "platform")."""
        if self.user_id is not None or self.scope == "users":
            return ("users",)
        return ("platform",) if self.scope == "platform" else ("users", "platform")


@dataclass(frozen=True)
class Unit:
    """One transaction of a backfill: a chunk of days of one table, every user's rows of them."""

    chunk: tuple[date, date]
    table: str  # "users" or "platform", as the ledger's scope says
    keeps_sums: bool = False  # the nightly step of a day already written, for its sums (sums_units)

    @property
    def days(self) -> list[date]:
        return days_between(*self.chunk)


@dataclass
class Progress:
    """What is committed so far, per table, and how fast it went."""

    request: Request
    committed: dict[str, set[date]] = field(default_factory=dict)  # table -> days committed
    days_skipped: int = 0  # committed by an earlier run (--resume)
    rows_written: int = 0
    started: float = field(default_factory=time.monotonic)
    sums_of: date | None = None  # the day whose sums the run left for the next night (sums_units)

    @property
    def days_total(self) -> int:
        return (self.request.last - self.request.first).days + 1

    @property
    def committed_days(self) -> list[date]:
        """Days committed in every table of the request, in order."""
        sets = [self.committed.get(table, set()) for table in self.request.tables]
        return sorted(set.intersection(*sets))

    @property
    def days_done(self) -> int:
        return len(self.committed_days)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def summary(self) -> str:
        """'N of M days committed, through D' (or the runs of days, when they have gaps)."""
        days = self.committed_days
        head = f"{len(days)} of {self.days_total} days committed"
        if not days:
            return head
        runs = day_runs(days)
        if runs[0][0] == self.request.first and len(runs) == 1:
            return f"{head}, through {runs[0][1]}"
        return f"{head} ({', '.join(f'{a}..{b}' if a != b else str(a) for a, b in runs)})"


class Stopped(StatskitError):
    """The run stopped before every day was written; every committed day is whole and stays.
    `then` says how to write the rest (the CLI names its flag)."""

    then = "a resumed run writes the rest"

    def __init__(self, reason: str, progress: Progress, cancelled: bool, exit_code: int = 1,
                 field: str | None = None):
        self.progress, self.cancelled, self.exit_code = progress, cancelled, exit_code
        super().__init__(f"{reason}; {progress.summary()}", field)

    def named(self, names: dict[str, str]) -> str:
        return f"{super().named(names)}; {self.then}"


def day_runs(days: list[date]) -> list[tuple[date, date]]:
    """Sorted days as runs of consecutive days: [(first, last)]."""
    runs: list[list[date]] = []
    for day in days:
        if runs and day - runs[-1][1] == timedelta(days=1):
            runs[-1][1] = day
        else:
            runs.append([day, day])
    return [(a, b) for a, b in runs]


# What a chunk of days costs, in rows of the user table written: its own rows, plus one pass over
# the sources' history up to its last day, which grows with the user-days lived by then. On the
# bench (10,000 users, 120 days) a user-day of history read costs about 0.4 of a row written: a
# chunk of the first 60 days took 3.0 s, one of the last 60 days 7.5 s, all 120 days 9.9 s.
HISTORY_READ_COST = 0.4
# The platform's chunk is its pass over the history (it writes a row a day): on the same bench
# 0.55 s for all 120 days, about 0.08 of the user table's cost for a user-day lived.
PLATFORM_READ_COST = 0.08

ChunkCost = Callable[[date, date], float]


def equal_days(first: date, last: date) -> float:
    """The cost of a chunk when nothing tells the days apart (one user's rows): its days."""
    return (last - first).days + 1


def no_cost(first: date, last: date) -> float:
    return 0.0


@dataclass(frozen=True)
class ChunkCosts:
    """What a chunk of days costs each table, in one unit. Without an estimate the users' days
    cost alike and the platform's nothing beside them."""

    users: ChunkCost = equal_days
    platform: ChunkCost = no_cost


def history_costs(conn: psycopg.Connection, catalog: Catalog, settings, last_day: date) -> ChunkCosts:
    """What each chunk of days up to `last_day` costs to write, estimated from the users the user
    table had on each day (the rows a day holds, and the activity its history holds), so that
    chunks of equal cost, not of equal days, keep every job busy to the end: users join over
    time, and a later chunk both writes more rows and reads more history."""
    users = catalog.users
    joined = dict(conn.execute(
        f"select (u.{users.created_at} at time zone %s)::date as day, count(*)"
        f" from {quote_ident(settings.source_schema)}.{users.name} u group by 1", [settings.time_zone]).fetchall())
    start = min((day for day in joined if day <= last_day), default=last_day)
    lived_by, lived, users_then = {}, 0.0, 0  # user-days lived from the first user's day up to each day
    for n in range((last_day - start).days + 1):
        day = start + timedelta(days=n)
        users_then += joined.get(day, 0)
        lived += users_then + 1  # a day costs a little even without users (its platform row, a statement)
        lived_by[day] = lived

    def user_cost(first: date, last: date) -> float:
        written = lived_by.get(last, 0.0) - lived_by.get(first - timedelta(days=1), 0.0)
        return written + HISTORY_READ_COST * lived_by.get(last, 0.0)

    def platform_cost(first: date, last: date) -> float:
        return PLATFORM_READ_COST * lived_by.get(last, 0.0)
    return ChunkCosts(user_cost, platform_cost)


def plan_units(request: Request, committed: dict[str, set[date]], costs: ChunkCosts = ChunkCosts()) -> list[Unit]:
    """Chunks of the days not yet committed: the platform's first, then the users'.

    The users' days are cut into at least one chunk per job, of about equal cost (days, without
    an estimate): a range of 120 days with 2 jobs is two chunks, written at once, the later one
    shorter. The platform's chunk is a pass over the history whatever its days, so cutting it
    for the jobs would only read the history again: its chunks join the users' chunks up to
    chunk_days (a chunk is reported once committed in both tables). When it is one chunk, the
    job that writes it then writes the users' last chunk, made lighter by as much. No chunk is
    longer than chunk_days.
    """
    todo = {table: [d for d in days_between(request.first, request.last) if d not in committed.get(table, set())]
            for table in request.tables}
    users, platform = todo.get("users", []), todo.get("platform", [])
    size = max(1, min(request.chunk_days, math.ceil(len(users) / max(1, request.jobs))))
    runs = day_runs(users)
    one_platform_chunk = platform == users and len(runs) == 1 and len(users) <= request.chunk_days
    beside = costs.platform(*runs[0]) if one_platform_chunk else 0.0
    user_chunks = [chunk for run in runs
                   for chunk in balanced_chunks(*run, math.ceil(equal_days(*run) / size), request.chunk_days,
                                                costs.users, beside)]
    if platform == users:
        platform_chunks = joined_chunks(user_chunks, request.chunk_days)
    else:  # resumed where the tables stopped apart, or the platform alone
        platform_chunks = [chunk for run in day_runs(platform)
                           for chunk in balanced_chunks(*run, math.ceil(equal_days(*run) / request.chunk_days),
                                                        request.chunk_days, costs.platform)]
    return [Unit(chunk, "platform") for chunk in platform_chunks] + [Unit(chunk, "users") for chunk in user_chunks]


def sums_units(conn: psycopg.Connection, catalog: Catalog, settings, request: Request) -> list[Unit]:
    """The nightly step of the request's last day, once every chunk is committed. A range function
    discards the kept sums of the users it rewrites (they may be older than a row the change log
    missed), so the next night would sum every user from history; the step of the last day sums
    them from history now and keeps them, rewriting none of that day's rows (its numbers are the
    range's), and the next night steps. None without capture (no sums), for one user (the step
    writes its days itself), or where the sums kept are of a later day (they never move back:
    the next night sums from history)."""
    if not settings.capture or request.user_id is not None:
        return []
    return [Unit((request.last, request.last), table, keeps_sums=True) for table in request.tables
            if (kept := kept_sums_day(conn, rollup_table(catalog, table))) is None or kept <= request.last]


def joined_chunks(chunks: list[tuple[date, date]], longest: int) -> list[tuple[date, date]]:
    """Consecutive chunks joined, in order, while the whole stays within `longest` days."""
    out: list[tuple[date, date]] = []
    for first, last in chunks:
        if out and out[-1][1] + timedelta(days=1) == first and equal_days(out[-1][0], last) <= longest:
            out[-1] = (out[-1][0], last)
        else:
            out.append((first, last))
    return out


def days_between(first: date, last: date) -> list[date]:
    """Every day from first to last, both included."""
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


def balanced_chunks(first: date, last: date, count: int, longest: int, cost: ChunkCost,
                    beside_last: float = 0.0) -> list[tuple[date, date]]:
    """[first, last] in `count` chunks of consecutive days, none longer than `longest` days,
    the costliest (the last with `beside_last` added, what its job also writes) as cheap as it
    can be: the smallest cost limit for which chunks filled up to it, from the last day back,
    number no more than `count`."""
    def filled(limit: float) -> list[tuple[date, date]]:
        out, end, allowed = [], last, limit - beside_last
        while end >= first:
            start = end
            while (start > first and (end - start).days + 1 < longest
                   and cost(start - timedelta(days=1), end) <= allowed):
                start -= timedelta(days=1)
            out.insert(0, (start, end))
            end, allowed = start - timedelta(days=1), limit
        return out

    low, high = 0.0, cost(first, last) + beside_last
    for _ in range(60):  # halvings: the limit ends closer to the best than any one day costs
        middle = (low + high) / 2
        low, high = (low, middle) if len(filled(middle)) <= count else (middle, high)
    return filled(high)


def check_request(target: Target, request: Request) -> tuple[Request, str | None]:
    """Validate against the database; a last day after yesterday is clamped, with a note saying so."""
    conn, users, settings = target.conn, target.catalog.users, target.settings
    require_deployment(conn)
    check_range(request.first, request.last)
    if request.scope not in SCOPES:
        raise UsageError(f"{request.scope!r}: use users or platform", field="scope")
    if request.user_id is not None:
        known = conn.execute(
            f"select 1 from {quote_ident(settings.source_schema)}.{users.name}"
            f" where {users.key} = %s::{users.key_type}", [request.user_id]
        ).fetchone()
        if not known:
            raise UsageError(f"{request.user_id}: unknown user, not in {users.name}", field="user_id")
    kept_from = partitions.retention_edge(conn, settings)
    if kept_from and request.first < kept_from:
        raise UsageError(f"{request.first} is past retention ({settings.retention}): days before {kept_from} are not kept; "
                         f"start at {kept_from} or later", field="first")
    last_complete = yesterday(conn, settings.time_zone)
    if request.last <= last_complete:
        return request, None
    if request.first > last_complete:
        raise UsageError(f"{request.first} is in the future: the last complete day is {last_complete}", field="first")
    note = f"the last day {request.last} is after the last complete day; clamped to {last_complete}"
    return dataclasses.replace(request, last=last_complete), note


def backfill(target: Target, request: Request,
             report: Callable[[Progress, tuple[date, date]], None] = lambda *a: None,
             notify: Callable[[str], None] = lambda message: None,
             cancel: threading.Event | None = None) -> Progress:
    """Write every day of the request with `request.jobs` connections (one job writes on the
    target's own connection, more open one each).

    report(progress, days) is called with each run of days (first, last) once it is committed in
    every table; notify(message) with what a careful operator wants to hear on the way: a range
    clamped to yesterday, another writer making us wait, a unit retried. Setting `cancel` (from a
    signal handler, an orchestrator's worker thread) cancels the statements in flight. The first
    error, or the cancel, stops every connection and raises Stopped, which says what is committed.
    """
    cancel = cancel or threading.Event()
    request, note = check_request(target, request)
    if note:
        notify(note)
    run_conn, settings = target.conn, target.settings
    with run_conn.transaction():
        run_conn.execute(ledger_sql(target.catalog.users.key_type))
    _take_run_lock(run_conn, settings, notify)
    try:
        if settings.partitioned:  # each partition the days need, made before any writer's transaction
            try:
                partitions.maintain(run_conn, settings, request.first, request.last)
            except psycopg.Error as exc:
                raise StatskitError(f"could not make the partitions of {request.first}..{request.last} "
                                    f"({db.describe_error(exc)}); nothing written") from None
        progress = Progress(request)
        if request.resume:
            progress.committed = _finished_days(run_conn, request)
            progress.days_skipped = progress.days_done
        costs = ChunkCosts() if request.user_id is not None else history_costs(
            run_conn, target.catalog, settings, request.last)
        units = plan_units(request, progress.committed, costs)
        _run(target, request, units, progress, report, notify, cancel)
        _settle(run_conn)
        sums = sums_units(run_conn, target.catalog, settings, request)
        # on the target's own connection: each step takes the writer lock whole
        _run(target, dataclasses.replace(request, jobs=1), sums, progress, report, notify, cancel)
        if sums:
            progress.sums_of = request.last
        if request.user_id is None:  # every user's rows of these days are now computed with every metric
            for table in request.tables:
                mark_filled(run_conn, rollup_table(target.catalog, table), request.first, request.last)
        return progress
    finally:
        if not run_conn.broken:  # else the lock went with the session
            _settle(run_conn)
            run_conn.execute("select pg_advisory_unlock(hashtext(%s), 0)", [_run_lock_key(settings)])


def _settle(conn: psycopg.Connection) -> None:
    """End what a job left open on the target's own connection: a cancel of ours that reached it
    during its rollback leaves the transaction failed, and the next statement would be refused."""
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        conn.rollback()


def _run(target: Target, request: Request, units: list[Unit], progress: Progress, report, notify,
         cancel: threading.Event) -> None:
    settings = target.settings
    todo = list(units)
    guard = threading.Lock()
    failures: list[BaseException] = []
    connections: list[psycopg.Connection] = []

    def next_unit():
        with guard:
            return todo.pop(0) if todo and not failures and not cancel.is_set() else None

    def write_units(conn: psycopg.Connection) -> None:
        with guard:
            connections.append(conn)
        try:
            while unit := next_unit():
                written = _write_with_retries(conn, settings, target.catalog.users.key_type, request, unit, notify)
                with guard:
                    progress.rows_written += written
                    if unit.keeps_sums:  # its day was committed and reported by its chunk
                        continue
                    progress.committed.setdefault(unit.table, set()).update(unit.days)
                    whole = set(progress.committed_days)  # of the unit's days, none was whole before it
                    for run in day_runs([day for day in unit.days if day in whole]):
                        report(progress, run)
        finally:
            with guard:  # no cancel for a connection whose job is over (the target's goes on being used)
                connections.remove(conn)

    def work(own_connection: bool):
        try:
            if not own_connection:
                write_units(target.conn)
                return
            with db.connect(target.dsn, autocommit=True) as conn:
                write_units(conn)
        except BaseException as exc:  # handed to the caller's thread below
            with guard:
                failures.append(exc)

    jobs = max(1, min(request.jobs, len(todo)))
    workers = [threading.Thread(target=work, args=(n > 0,), daemon=True) for n in range(jobs)]
    for worker in workers:
        worker.start()
    _wait(workers, connections, guard, cancel)
    if cancel.is_set() and (todo or failures):
        raise Stopped("cancelled", progress, cancelled=True)
    if failures:
        exc = failures[0]
        if isinstance(exc, StatskitError):
            raise Stopped(exc.message, progress, cancelled=False, exit_code=exc.exit_code, field=exc.field) from None
        if isinstance(exc, psycopg.Error):
            raise Stopped(db.mask_secrets(db.describe_error(exc), target.dsn), progress, cancelled=False) from None
        raise exc


def _wait(workers, connections, guard, cancel: threading.Event) -> None:
    """Join the workers; once cancelled, cancel their statements in flight (the server goes on
    running a statement whose client is gone unless told), again every half second, since a
    cancel that reaches a connection between two statements is ignored. After a failure the
    others finish the unit they are writing and take no other."""
    while any(worker.is_alive() for worker in workers):
        for worker in workers:
            worker.join(0.1)
        if cancel.is_set():
            with guard:
                alive = [conn for conn in connections if not conn.closed]
            for conn in alive:
                try:
                    conn.cancel_safe(timeout=2)
                except (psycopg.Error, OSError):
                    pass  # the connection is gone: nothing runs there any more
            time.sleep(0.4)


def _write_with_retries(conn: psycopg.Connection, settings, key_type: str, request: Request, unit: Unit,
                        notify) -> int:
    for attempt in range(2, RETRIES + 1):
        try:
            return _write_unit(conn, settings, key_type, request, unit, notify)
        except RETRIED_ERRORS as exc:
            notify(f"{unit.table} {unit.chunk[0]}..{unit.chunk[1]}: {db.first_line(exc)}; nothing of it was "
                        f"committed, trying it again ({attempt} of {RETRIES})")
    return _write_unit(conn, settings, key_type, request, unit, notify)


def _write_unit(conn: psycopg.Connection, settings, key_type: str, request: Request, unit: Unit, notify) -> int:
    """One transaction: the unit's days for every user (or the one user), then its ledger row; or
    the nightly step of a unit that keeps sums (no ledger row: its day is the chunk's)."""
    schema = quote_ident(settings.schema)
    first, last = unit.chunk
    shared = request.user_id is None and not unit.keeps_sums
    with conn.transaction():
        _wait_for_other_writers(conn, settings, shared, notify)
        if unit.keeps_sums:
            return write_day_keeping_sums(conn, settings, "platform" if unit.table == "platform" else "user", last)
        if unit.table == "platform":
            written = conn.execute(f"select {schema}.aggregate_daily_statistics_range(%s, %s, p_shared => true)",
                                   [first, last]).fetchone()[0]
        elif request.user_id is not None:
            # One user's day is an index lookup: day by day beats a pass over the whole history.
            function = f"{schema}.aggregate_user_statistics(%s::{key_type}, %s)"
            written = sum(conn.execute(f"select {function}", [request.user_id, day]).fetchone()[0] for day in unit.days)
        else:
            written = conn.execute(f"select {schema}.aggregate_user_statistics_range(%s, %s, p_shared => true)",
                                   [first, last]).fetchone()[0]
        conn.execute(
            f"insert into {STATSKIT_SCHEMA}.backfill_ledger (chunk_first, chunk_last, scope, user_id, rows_written)"
            " values (%s, %s, %s, %s, %s) on conflict (chunk_first, chunk_last, scope, user_id)"
            " do update set rows_written = excluded.rows_written, finished_at = now()",
            [first, last, unit.table, request.user_id, written],
        )
    return written


def _holder(conn: psycopg.Connection, key: str) -> str:
    """Who holds an advisory lock, for the waiting message."""
    holder = conn.execute(
        "select a.pid, coalesce(nullif(a.application_name, ''), a.usename), left(a.query, 80) from pg_locks l"
        " join pg_stat_activity a on a.pid = l.pid where l.locktype = 'advisory' and l.granted"
        " and l.classid::int = hashtext(%s) and l.objid = 0 and a.pid <> pg_backend_pid() limit 1",
        [key],
    ).fetchone()
    return f"pid {holder[0]} ({holder[1]}: {holder[2]})" if holder else "another session"


def _run_lock_key(settings) -> str:
    return f"{settings.schema}.backfill"


def _take_run_lock(conn: psycopg.Connection, settings, notify) -> None:
    """Held for the whole run (a session lock): two backfills never write at once, so the
    chunks that share the writer lock are all of one run, and write different days."""
    key = _run_lock_key(settings)
    if not conn.execute("select pg_try_advisory_lock(hashtext(%s), 0)", [key]).fetchone()[0]:
        notify(f"waiting for {_holder(conn, key)}, another statskit backfill of this database")
        conn.execute("select pg_advisory_lock(hashtext(%s), 0)", [key])


def _wait_for_other_writers(conn: psycopg.Connection, settings, shared: bool, notify) -> None:
    """Take the rollup's writer lock as the functions will (shared beside this run's other chunks,
    exclusive for one user's days), first, so no writer waits on us in another order; say whom
    we wait for, if anyone."""
    mode = "_shared" if shared else ""
    key = writer_lock(settings)
    if not conn.execute(f"select pg_try_advisory_xact_lock{mode}(hashtext(%s), 0)", [key]).fetchone()[0]:
        notify(f"waiting for {_holder(conn, key)}, another writer of the rollup")
        conn.execute(f"select pg_advisory_xact_lock{mode}(hashtext(%s), 0)", [key])


def _finished_days(conn: psycopg.Connection, request: Request) -> dict[str, set[date]]:
    """Per table, the request's days that finished chunks of earlier runs cover."""
    rows = conn.execute(
        f"select l.scope, d::date from {STATSKIT_SCHEMA}.backfill_ledger l"
        " cross join generate_series(greatest(l.chunk_first, %s), least(l.chunk_last, %s), interval '1 day') d"
        " where l.scope = any(%s) and l.user_id is not distinct from %s",
        [request.first, request.last, list(request.tables), request.user_id],
    ).fetchall()
    out: dict[str, set[date]] = {}
    for table, day in rows:
        out.setdefault(table, set()).add(day)
    return out
