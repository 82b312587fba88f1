"""`statskit migrate` and `statskit rollback`: plan what a deployment lacks, then apply it.

yoyo applies the table migrations (identified by file name). Functions are kept like
Flyway's repeatable migrations: statskit stores a checksum of each rendered function
and re-creates exactly the ones whose text changed or that went missing.
"""

import dataclasses
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from yoyo import read_migrations
from yoyo.backends.core.postgresql import PostgresqlPsycopgBackend
from yoyo.connections import parse_uri
from yoyo.exceptions import LockTimeout

from . import access, cron, db, deployment, partitions
from .catalog import Catalog, load_catalog
from .deployment import YOYO_MIGRATION_TABLE
from .errors import StatskitError, UsageError
from .render import ACCESS_FILE, CAPTURE_FILE, FUNCTIONS, SHARD_FILE, quote_ident, render_all, signature, writer_lock
from .settings import STATSKIT_SCHEMA, Settings


@dataclass
class MigratePlan:
    """What migrate would do; `script()` is the exact SQL, for --dry-run."""

    settings: Settings
    database: str
    migrations: list[tuple[str, str]] = field(default_factory=list)  # (id, sql) not yet applied
    functions: list[tuple[str, str]] = field(default_factory=list)  # (name, sql) to create or replace
    drops: list[str] = field(default_factory=list)  # stale overloads of our functions, to drop
    jobs: list[cron.Job] = field(default_factory=list)  # to (re)schedule
    cron_database: str | None = None  # None: --no-cron
    notes: list[str] = field(default_factory=list)  # things done on the way that the user should hear of
    sums_rebuilt: list[deployment.SumsRebuild] = field(default_factory=list)  # re-created, then rebuilt as of a day
    unfilled: list[deployment.Unfilled] = field(default_factory=list)  # days where new metrics hold defaults
    conversions: list[tuple[str, str]] = field(default_factory=list)  # (table, "partition" | "unpartition")
    preparations: list[str] = field(default_factory=list)  # committed one by one before the conversions
    partitions_due: list[str] = field(default_factory=list)  # "table from day": periods ahead not made yet
    partition_fixes: list[str] = field(default_factory=list)  # owners, grants, policies a partition lacks

    @property
    def empty(self) -> bool:
        return not (self.migrations or self.functions or self.jobs or self.drops or self.conversions
                    or self.partitions_due or self.partition_fixes)

    @property
    def created_functions(self) -> list[str]:
        """The functions among `functions` (the rest are the repeatable access and capture SQL)."""
        return [name for name, _ in self.functions if name in FUNCTIONS]

    def script(self) -> str:
        parts = [f"-- converting to partitioned tables (docs/operations.md), first each alone:\n{statement};\n"
                 for statement in self.preparations]
        parts += [f"-- migration {mid}\n{text}" for mid, text in self.migrations]
        parts += [f"-- {table}: {_CONVERSIONS[change]}\n" for table, change in self.conversions]
        parts += [f"drop routine {signature};\n" for signature in self.drops]
        parts += [f"-- function {name}\n{text}" for name, text in self.functions]
        parts += [
            f"-- pg_cron job {job.name}, run in database {self.cron_database}\n"
            f"{cron.schedule_statement(job, self.database).as_string(None)};\n"
            for job in self.jobs
        ]
        if self.settings.partitioned and not self.empty:
            parts.append(f"-- after it commits, each change alone:\ncall {quote_ident(self.settings.schema)}"
                         f".maintain_statistics_partitions();\n")
        return "\n".join(parts) if parts else "-- nothing to do: the deployment is up to date\n"


_CONVERSIONS = {
    "partition": "renamed, with its indexes; a table partitioned by date made in its place, with the same columns, "
                 "comment, owner, grants and policies; the old table attached as the partition of every day before its "
                 "bound check's (an empty one dropped instead)",
    "unpartition": "its largest partition detached and given the table's name; the other partitions' rows copied into "
                   "it and the partitions dropped",
}


@dataclass
class Target:
    """A database to deploy into, with the catalog and rendering for its settings."""

    dsn: str
    conn: psycopg.Connection
    sql_dir: Path
    settings: Settings
    rendered: dict[str, str]
    catalog: Catalog
    stored: Settings | None = None  # as the last migrate left them; None: never deployed here

    @property
    def migration_ids(self) -> list[str]:
        return [m.id for m in self.catalog.migrations]

    @classmethod
    def open(cls, dsn: str, sql_dir: Path, overrides: dict | None = None) -> "Target":
        conn = db.connect(dsn, autocommit=True)
        try:
            deployment.check_server(conn)
            stored = deployment.stored_settings(conn)
            settings = (stored or Settings()).merged(**(overrides or {}))
            if stored and stored.roles and not settings.roles:
                raise UsageError("this deployment has statskit roles; turning them off is not supported")
            if stored and stored.schema != settings.schema:
                raise UsageError(
                    f"this database's rollup lives in schema {stored.schema!r}; it cannot move to {settings.schema!r}"
                )
            if stored and stored.shard != settings.shard:
                raise UsageError(
                    f"this database is {'shard ' + repr(stored.shard) + ' of a fleet' if stored.shard else 'one server'}"
                    f" and cannot become {'shard ' + repr(settings.shard) if settings.shard else 'one server'}: a shard's "
                    f"platform table keeps sums for the fleet's router, one server's the platform's numbers")
            catalog = load_catalog(sql_dir / "catalog.toml")
            if settings.shard:
                catalog = catalog.for_shard()
            if (stored and settings.partitioned and settings.partition_period != stored.partition_period
                    and partitions.is_partitioned(conn, settings, catalog.user.table)):
                raise UsageError(
                    f"{settings.partition_period!r}: this deployment's rollup is partitioned by {stored.partition_period}; "
                    f"to change the period, migrate with partition_period 'none' first (its partitions become one table)",
                    field="partition_period")
            if stored:
                deployment.check_catalog_fits(conn, settings, catalog)
            rendered = render_all(sql_dir, settings, catalog)
            deployment.check_time_zone(conn, settings)
            return cls(dsn, conn, sql_dir, settings, rendered, catalog, stored)
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Target":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def plan(target: Target, cron_conn: psycopg.Connection | None) -> MigratePlan:
    """Read-only: compare the database with the rendering."""
    conn, settings = target.conn, target.settings
    applied = set(deployment.applied_migrations(conn))
    result = MigratePlan(settings, conn.info.dbname)
    result.migrations = [
        (mid, target.rendered[f"migrations/{mid}.sql"]) for mid in target.migration_ids if mid not in applied
    ]
    result.functions = [
        (state.name, target.rendered[f"functions/{state.name}.sql"])
        for state in deployment.function_states(conn, settings, target.rendered, target.catalog.users.key_type)
        if state.state != "current"
    ]
    # An older signature of a function of ours (an argument added since) would linger as an overload.
    result.drops = deployment.stale_overloads(conn, settings, target.catalog.users.key_type)
    # the sums are re-created by their function's file: only when it is applied again
    result.sums_rebuilt = [r for r in deployment.sums_to_rebuild(conn, settings, target.catalog)
                           if deployment.ONE_DAY[r.rollup] in result.created_functions]
    applied_checksums = deployment.function_checksums(conn)
    access_sql = target.rendered[ACCESS_FILE]
    # After any re-created function too (CREATE OR REPLACE keeps the owner, but not when it
    # creates), and whenever an owner, grant or policy is not as it says: a restore with
    # --no-owner --no-privileges brings the checksum back without them.
    if settings.roles and (result.functions
                           or applied_checksums.get("access") != deployment.checksum(access_sql)
                           or access.problems(conn, access.role_needs(settings, target.catalog))):
        result.functions.append(("access", access_sql))
    capture_sql = target.rendered[CAPTURE_FILE]
    triggers = 3 * len(target.catalog.source_tables) if settings.capture else 0
    if (applied_checksums.get("capture") != deployment.checksum(capture_sql)
            or deployment.capture_triggers(conn, settings, target.catalog) != triggers):
        result.functions.append(("capture", capture_sql))
    shard_sql = target.rendered[SHARD_FILE]
    if settings.shard and (applied_checksums.get("shard") != deployment.checksum(shard_sql)
                           or any(name in ("user_metric", "user_kpis") for name, _ in result.functions)):
        result.functions.append(("shard", shard_sql))  # what the fleet's router calls, after what it calls
    if cron_conn is not None:
        result.cron_database = cron_conn.info.dbname
        result.jobs = cron.plan_jobs(cron_conn, settings, conn.info.dbname)
    converting = partitions.conversions(conn, settings, target.catalog)
    result.conversions = [(rollup.table, change) for rollup, change in converting]
    result.preparations = partitions.preparations(conn, settings, converting)
    if settings.partitioned:
        first = partitions.first_day(conn, settings, target.catalog)
        for rollup in partitions.rollups(target.catalog):
            if partitions.is_partitioned(conn, settings, rollup.table):
                result.partitions_due += [f"{rollup.table} from {day}"
                                          for day in partitions.missing_periods(conn, settings, rollup.table, first)]
                result.partition_fixes += partitions.differences(conn, settings, rollup.table)
    return result


LOCK_HOLDER = "statskit migrate "


class _OneConnectionBackend(PostgresqlPsycopgBackend):
    """yoyo's PostgreSQL backend, with every migration step on this backend's own connection.

    yoyo runs each migration on a copy of the backend with a connection of its own, so a
    deployment would commit piece by piece. Here the copy is the backend itself: inside the
    transaction migrate begins, yoyo's transactions become savepoints, and the migrations,
    functions, grants and settings commit or roll back as one. Its connection is opened the way
    every statskit connection is (db.connect: timeout, one-line error, no password shown).
    """

    def connect(self, dburi):
        self.schema = STATSKIT_SCHEMA  # yoyo's own tables go there (it sets search_path)
        return db.connect(dburi.args["dsn"], autocommit=True, application_name=dburi.args["application_name"])

    @contextmanager
    def copy(self):
        yield self


def _yoyo_backend(dsn: str) -> _OneConnectionBackend:
    # The application name carries the pid yoyo writes into its lock row, so a lock whose holder
    # is no longer connected can be told from one that is.
    uri = parse_uri("postgresql+psycopg://")._replace(args={"dsn": dsn, "application_name": f"{LOCK_HOLDER}{os.getpid()}"})
    backend = _OneConnectionBackend(uri, YOYO_MIGRATION_TABLE)
    backend.init_database()  # creates yoyo's lock table, as yoyo.get_backend does
    return backend


@contextmanager
def _migration_files(target: Target):
    """The deployment's migrations rendered into a directory, as yoyo reads them."""
    with tempfile.TemporaryDirectory(prefix="statskit-migrations-") as tmp:
        for rel, text in target.rendered.items():
            if rel.startswith("migrations/"):
                (Path(tmp) / Path(rel).name).write_text(text)
        yield read_migrations(tmp)


def _ensure_bookkeeping(conn: psycopg.Connection, key_type: str) -> None:
    # Serialised, because two concurrent `create schema if not exists` can still collide.
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(hashtext('statskit'), hashtext('bookkeeping'))")
        conn.execute(deployment.bookkeeping_sql(key_type))


def clear_stale_lock(conn: psycopg.Connection, break_lock: bool = False) -> list[str]:
    """Delete yoyo's lock row when its holder is gone (or when told to); say what was cleared.

    yoyo's lock is a table row, not an advisory lock, so it outlives a killed migrate.
    """
    if not deployment.table_exists(conn, f"{STATSKIT_SCHEMA}.yoyo_lock"):
        return []
    stale = conn.execute(
        f"delete from {STATSKIT_SCHEMA}.yoyo_lock l where %s or not exists ("
        "  select 1 from pg_stat_activity a where a.application_name = %s || l.pid)"
        " returning pid, ctime",
        [break_lock, LOCK_HOLDER],
    ).fetchall()
    return [f"cleared the migrate lock of process {pid} (taken {ctime:%Y-%m-%d %H:%M} UTC"
            f"{'' if break_lock else ', no longer connected'})" for pid, ctime in stale]


@contextmanager
def _locked(target: Target, wait: float):
    backend = _yoyo_backend(target.dsn)
    try:
        try:
            with backend.lock(timeout=wait):
                yield backend
        except LockTimeout:
            raise StatskitError(
                f"another statskit migrate holds the lock on {target.conn.info.dbname} "
                f"(table {STATSKIT_SCHEMA}.yoyo_lock) and is still connected; waited {wait:.0f} s. "
                f"If it is stuck, stop it, or run migrate with {{break_lock}}"
            ) from None
    finally:
        backend.connection.close()


def open_cron(target: Target, cron_dsn: str | None = None) -> psycopg.Connection | None:
    """pg_cron's database (see cron.connect_cron), or None for a deployment without jobs (--no-cron)."""
    if not target.settings.cron:
        return None
    return cron.connect_cron(target.dsn, target.conn, cron_dsn, target.settings)


@dataclass(frozen=True)
class LockPolicy:
    """How DDL waits for locks: PostgreSQL's lock_timeout on every statement, then whole retries.

    A statement that waits for an ACCESS EXCLUSIVE lock queues every later reader behind it;
    lock_timeout bounds that queue, and the deployment, one transaction, is simply tried again;
    as it is when PostgreSQL breaks a deadlock with another session by rolling it back.
    """

    lock_timeout: float = 2.0  # seconds
    retries: int = 5
    wait: float = 300  # seconds to wait for another migrate's lock

    def backoff(self, attempt: int) -> float:
        return min(0.5 * 2 ** attempt, 10.0)


def _in_one_transaction(backend, policy: LockPolicy, work, what: str):
    """Run work() in one transaction on the backend's connection, under lock_timeout, retrying."""
    for attempt in range(1, policy.retries + 2):
        backend.begin()
        try:
            backend.connection.execute(f"set local lock_timeout = '{int(policy.lock_timeout * 1000)}ms'")
            result = work()
            backend.commit()
            return result
        except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected) as exc:
            # A deadlock is another session's locks taken in another order than ours (an
            # application's transaction, autovacuum): PostgreSQL rolled this attempt back whole.
            backend.rollback()
            if attempt > policy.retries:
                why = (f"a lock was not granted within {{lock_timeout}} {policy.lock_timeout:g} s"
                       if isinstance(exc, psycopg.errors.LockNotAvailable) else "another session deadlocked with it")
                raise StatskitError(
                    f"{what}: {why}, {attempt} attempt{'s' if attempt > 1 else ''} ({db.describe_error(exc)}); "
                    f"nothing changed. Retry when the table is quiet, or allow more with {{lock_timeout}}/{{retries}}"
                ) from None
            time.sleep(policy.backoff(attempt))
        except BaseException:
            backend.rollback()
            raise


def _finish_committed(target: Target, cron_conn: psycopg.Connection | None, todo: MigratePlan,
                      policy: LockPolicy) -> None:
    """What follows the deployment's transaction, each its own: the partitions ahead, and the
    jobs of a pg_cron in another database."""
    conn = target.conn
    if target.settings.partitioned:
        try:
            # every day a row can have gets its partition, so that a day re-run by hand finds one
            partitions.maintain(conn, target.settings, partitions.first_day(conn, target.settings, target.catalog),
                                lock_timeout=policy.lock_timeout)
        except psycopg.Error as exc:
            raise StatskitError(
                f"the deployment is committed but its partitions ahead are not ({db.describe_error(exc)}): "
                f"run statskit migrate again"
            ) from None
    if cron_conn is not None and todo.jobs:
        try:
            cron.schedule(cron_conn, todo.jobs, conn.info.dbname)
        except psycopg.Error as exc:
            raise StatskitError(
                f"the deployment is committed but its pg_cron jobs are not ({db.describe_error(exc)}): "
                f"run statskit migrate again to schedule them, or statskit rollback to undo"
            ) from None


def migrate(target: Target, cron_dsn: str | None = None, dry_run: bool = False,
            policy: LockPolicy = LockPolicy(), break_lock: bool = False) -> MigratePlan:
    """Check everything first, then apply pending migrations, changed functions, grants and
    cron jobs in one transaction (jobs after it when pg_cron lives in another database).

    The settings record where pg_cron lives (or that there are no jobs), so later commands
    find it without being told again."""
    conn = target.conn
    deployment.check_source_tables(conn, target.catalog, target.settings)
    cron_conn = open_cron(target, cron_dsn)
    if cron_conn is not None:
        target.settings = dataclasses.replace(target.settings, cron_database=cron_conn.info.dbname,
                                              cron_user=cron.job_user(cron_conn, target.settings)[0])
    try:
        if cron_conn is not None:  # before plan() reads cron.job: a missing grant is named, not raw
            cron.check_can_schedule(cron_conn, cron.wanted_jobs(target.settings))
        checked = plan(target, cron_conn)  # raises on a cron name conflict before anything changes
        deployment.check_can_deploy(conn, target.catalog, target.settings, checked)
        advice = [f"no index leads with {index}: the one-user function and verify's sample look users up by it "
                  f"({index.statement()})"
                  for index in deployment.missing_lookup_indexes(conn, target.catalog, target.settings)]
        step = deployment.missing_step_indexes(conn, target.catalog, target.settings)
        if step:
            advice.append(f"no index leads with {', '.join(map(str, step))}: the nightly step reads each day's rows "
                          f"through them, and without them scans every table every night. Each costs the "
                          f"application's writes (docs/performance.md measures them); advised:"
                          + "".join(f"\n  {index.statement()};  -- {index.cost}" for index in step))
        if target.stored and target.stored.cron and not target.settings.cron:
            advice.append("--no-cron: this deployment now has no pg_cron jobs for statskit to keep; jobs an "
                          "earlier migrate scheduled are left as they are (cron.unschedule removes them)")
        advice += [f"the nightly step's sums of {r.table} are defined otherwise now: migrate re-creates them and "
                   f"rebuilds them as of {r.day}, its last stored day (one day computed from history, in this "
                   f"transaction; the stored rows stay as they are), so the next night steps from them"
                   for r in checked.sums_rebuilt]
        checked.notes = advice
        if dry_run:
            return checked
        first_deployment = not deployment.table_exists(conn, f"{STATSKIT_SCHEMA}.settings")
        committed = False
        try:
            _ensure_bookkeeping(conn, target.catalog.users.key_type)
            notes = clear_stale_lock(conn, break_lock)
            with _locked(target, policy.wait) as backend, _migration_files(target) as migrations:
                backend.ensure_internal_schema_updated()  # outside the transaction, as yoyo needs
                # the one step PostgreSQL wants apart: validating a converted table's bound check is a scan
                converting = partitions.conversions(backend.connection, target.settings, target.catalog)
                for statement in partitions.preparations(backend.connection, target.settings, converting):
                    _in_one_transaction(backend, policy, lambda s=statement: backend.connection.execute(s),
                                        f"migrate {conn.info.dbname} ({statement})")
                # pg_cron's own tables are transactional: in the same database, the jobs commit with the rest.
                jobs_inside = cron_conn is not None and _same_session(cron_conn, conn)

                def deploy() -> MigratePlan:
                    todo = plan(target, cron_conn)  # again under the lock: another migrate may have finished
                    run = backend.connection.execute
                    # first, as every writer of the rollup takes it first (docs/operations.md, "Writers"):
                    # a night or a backfill chunk running now finishes before any table changes under it
                    run("select pg_advisory_xact_lock(hashtext(%s), 0)", [writer_lock(target.settings)])
                    run(f"create schema if not exists {quote_ident(target.settings.schema)}")
                    backend.apply_migrations(backend.to_apply(migrations))
                    for signature in todo.drops:
                        run(f"drop routine {signature}")
                    if todo.migrations:
                        todo.unfilled = deployment.record_unfilled(
                            backend.connection, target.settings, target.catalog, [mid for mid, _ in todo.migrations])
                    for name, text in todo.functions:
                        run(text)
                        deployment.record_checksum(backend.connection, name, text)
                    for rebuild in todo.sums_rebuilt:  # after every function they call is in place
                        deployment.rebuild_sums(backend.connection, target.settings, rebuild)
                    # Last, as the dashboard takes its locks: the source tables (the capture triggers
                    # above lock them), then the rollup. Taken the other way, a dashboard call that read
                    # a user's profile and waits for the rollup would deadlock with this transaction.
                    for rollup, change in partitions.conversions(backend.connection, target.settings, target.catalog):
                        (partitions.swap if change == "partition" else partitions.unswap)(
                            backend.connection, target.settings, target.catalog, rollup)
                    deployment.save_settings(backend.connection, target.settings)
                    if todo.jobs:
                        deployment.record_jobs_scheduled(backend.connection)
                    if jobs_inside:
                        cron.schedule(backend.connection, todo.jobs, conn.info.dbname)
                    return todo

                todo = _in_one_transaction(backend, policy, deploy, f"migrate {conn.info.dbname}")
                committed = True
                target.stored = target.settings  # what the database holds now
                todo.notes = notes + advice
                # still under the lock, so a migrate waiting for it finds these done too
                _finish_committed(target, cron_conn if not jobs_inside else None, todo, policy)
        except BaseException:
            if first_deployment and not committed:
                deployment.drop_bookkeeping(conn)  # nothing was committed: leave no trace either
            raise
        return todo
    finally:
        if cron_conn is not None:
            cron_conn.close()


def _same_session(cron_conn: psycopg.Connection, conn: psycopg.Connection) -> bool:
    """pg_cron lives in the target database and we schedule as the same login."""
    return (cron_conn.info.dbname, cron_conn.info.user) == (conn.info.dbname, conn.info.user)


@dataclass
class RollbackResult:
    rolled_back: str | None
    remaining: list[str]
    dropped_functions: list[str] = field(default_factory=list)
    unscheduled_jobs: list[str] = field(default_factory=list)


def rollback(target: Target, cron_dsn: str | None = None, policy: LockPolicy = LockPolicy()) -> RollbackResult:
    """Undo the last applied migration, in one transaction. Undoing the first one also removes
    the functions, the jobs and statskit's bookkeeping: the database is as before statskit."""
    conn = target.conn
    deployment.require_deployment(conn)
    cron_conn = open_cron(target, cron_dsn)
    try:
        with _locked(target, policy.wait) as backend, _migration_files(target) as migrations:
            backend.ensure_internal_schema_updated()
            applied = backend.to_rollback(migrations)
            if not applied:
                return RollbackResult(None, [])
            result = RollbackResult(applied[0].id, [m.id for m in applied[1:]])
            everything = not result.remaining
            jobs_inside = cron_conn is not None and _same_session(cron_conn, conn)
            if everything and cron_conn is not None and not jobs_inside:
                # First, in pg_cron's database: should the rest fail, migrate or rollback again completes it.
                result.unscheduled_jobs = cron.unschedule(cron_conn, target.settings, conn.info.dbname)

            def undo() -> None:
                backend.rollback_migrations(applied[:1])
                if not everything:
                    return
                key_type = target.catalog.users.key_type
                result.dropped_functions = []
                for name in reversed(FUNCTIONS):
                    backend.connection.execute(f"drop routine if exists {signature(target.settings.schema, name, key_type)}")
                    result.dropped_functions.append(name)
                # the triggers live on the application's tables: they go before statskit's schema
                without_capture = dataclasses.replace(target.settings, capture=False)
                backend.connection.execute(render_all(target.sql_dir, without_capture, target.catalog)[CAPTURE_FILE])
                if jobs_inside:
                    result.unscheduled_jobs = cron.unschedule(backend.connection, target.settings, conn.info.dbname)

            _in_one_transaction(backend, policy, undo, f"rollback {conn.info.dbname}")
        if everything:
            deployment.drop_bookkeeping(conn)
        return result
    finally:
        if cron_conn is not None:
            cron_conn.close()


@dataclass
class Status:
    settings: Settings
    migrations: list[tuple[str, str]]  # (id, applied | pending | unknown)
    functions: list[deployment.FunctionState]
    jobs: list[cron.RegisteredJob] | None  # None: pg_cron not consulted


def status(target: Target, cron_dsn: str | None = None) -> Status:
    applied = deployment.applied_migrations(target.conn)
    rows = [(mid, "applied" if mid in applied else "pending") for mid in target.migration_ids]
    rows += [(mid, "unknown") for mid in applied if mid not in target.migration_ids]
    functions = deployment.function_states(target.conn, target.settings, target.rendered, target.catalog.users.key_type)
    jobs = None
    cron_conn = open_cron(target, cron_dsn)
    if cron_conn is not None:
        try:
            names = [j.name for j in cron.wanted_jobs(target.settings)]
            jobs = [j for j in cron.registered_jobs(cron_conn, names) if j.database == target.conn.info.dbname]
        finally:
            cron_conn.close()
    return Status(target.settings, rows, functions, jobs)
