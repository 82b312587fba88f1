"""`statskit migrate` and `statskit rollback`: plan what a deployment lacks, then apply it.

yoyo applies the table migrations (identified by file name). Functions are kept like
Flyway's repeatable migrations: statskit stores a checksum of each rendered function
and re-creates exactly the ones whose text changed or that went missing.
"""

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict
from yoyo import read_migrations
from yoyo.backends.core.postgresql import PostgresqlPsycopgBackend
from yoyo.connections import parse_uri
from yoyo.exceptions import LockTimeout

from . import cron, db, deployment
from .catalog import Catalog, load_catalog
from .deployment import YOYO_MIGRATION_TABLE
from .errors import StatskitError, UsageError
from .render import ACCESS_FILE, FUNCTIONS, quote_ident, render_all
from .settings import STATSKIT_SCHEMA, Settings


@dataclass
class MigratePlan:
    """What migrate would do; `script()` is the exact SQL, for --dry-run."""

    settings: Settings
    database: str
    migrations: list[tuple[str, str]] = field(default_factory=list)  # (id, sql) not yet applied
    functions: list[tuple[str, str]] = field(default_factory=list)  # (name, sql) to create or replace
    jobs: list[cron.Job] = field(default_factory=list)  # to (re)schedule
    cron_database: str | None = None  # None: --no-cron
    notes: list[str] = field(default_factory=list)  # things done on the way that the user should hear of

    @property
    def empty(self) -> bool:
        return not (self.migrations or self.functions or self.jobs)

    def script(self) -> str:
        parts = [f"-- migration {mid}\n{text}" for mid, text in self.migrations]
        parts += [f"-- function {name}\n{text}" for name, text in self.functions]
        parts += [
            f"-- pg_cron job {job.name}, run in database {self.cron_database}\n"
            f"{cron.schedule_statement(job, self.database).as_string(None)};\n"
            for job in self.jobs
        ]
        return "\n".join(parts) if parts else "-- nothing to do: the deployment is up to date\n"


@dataclass
class Target:
    """A database to deploy into, with the catalog and rendering for its settings."""

    dsn: str
    conn: psycopg.Connection
    sql_dir: Path
    settings: Settings
    rendered: dict[str, str]
    catalog: Catalog

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
            catalog = load_catalog(sql_dir / "catalog.toml")
            rendered = render_all(sql_dir, settings, catalog)
            deployment.check_time_zone(conn, settings)
            return cls(dsn, conn, sql_dir, settings, rendered, catalog)
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        self.conn.close()


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
        for state in deployment.function_states(conn, settings, target.rendered)
        if state.state != "current"
    ]
    access = target.rendered[ACCESS_FILE]
    if settings.roles and (result.functions or deployment.function_checksums(conn).get("access") != deployment.checksum(access)):
        # after any re-created function too: CREATE OR REPLACE keeps the owner, but not when it creates
        result.functions.append(("access", access))
    if cron_conn is not None:
        result.cron_database = cron_conn.info.dbname
        result.jobs = cron.plan_jobs(cron_conn, settings, conn.info.dbname)
    return result


LOCK_HOLDER = "statskit migrate "


def _yoyo_backend(dsn: str) -> PostgresqlPsycopgBackend:
    # yoyo hands URI query arguments to psycopg.connect, so the DSN's parts go there as they are;
    # its own tables land in the statskit schema through `schema` (yoyo sets search_path). The
    # application name carries the pid yoyo writes into its lock row, so a lock whose holder is
    # no longer connected can be told from one that is.
    args = {**conninfo_to_dict(dsn), "schema": STATSKIT_SCHEMA, "application_name": f"{LOCK_HOLDER}{os.getpid()}"}
    uri = parse_uri("postgresql+psycopg://")._replace(args=args)
    backend = PostgresqlPsycopgBackend(uri, YOYO_MIGRATION_TABLE)
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


def _ensure_bookkeeping(conn: psycopg.Connection, settings: Settings) -> None:
    # Serialised, because two concurrent `create schema if not exists` can still collide.
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(hashtext('statskit'), hashtext('bookkeeping'))")
        conn.execute(deployment.BOOKKEEPING_SQL)
        conn.execute(f"create schema if not exists {quote_ident(settings.schema)}")


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
def _locked(target: Target, lock_timeout: float):
    backend = _yoyo_backend(target.dsn)
    try:
        try:
            with backend.lock(timeout=lock_timeout):
                yield backend
        except LockTimeout:
            raise StatskitError(
                f"another statskit migrate holds the lock on {target.conn.info.dbname} "
                f"(table {STATSKIT_SCHEMA}.yoyo_lock) and is still connected; waited {lock_timeout:.0f} s. "
                f"If it is stuck, stop it, or run statskit migrate --break-lock"
            ) from None
    finally:
        backend.connection.close()


def _open_cron(target: Target, cron_dsn: str | None, use_cron: bool):
    return cron.connect_cron(target.dsn, target.conn, cron_dsn) if use_cron else None


def migrate(target: Target, cron_dsn: str | None = None, use_cron: bool = True,
            dry_run: bool = False, lock_timeout: float = 300, break_lock: bool = False) -> MigratePlan:
    """Check everything first, then apply pending migrations, changed functions and cron jobs."""
    deployment.check_source_tables(target.conn, target.catalog, target.settings)
    cron_conn = _open_cron(target, cron_dsn, use_cron)
    try:
        checked = plan(target, cron_conn)  # raises on a cron name conflict before anything changes
        if dry_run:
            return checked
        _ensure_bookkeeping(target.conn, target.settings)
        notes = clear_stale_lock(target.conn, break_lock)
        with _locked(target, lock_timeout) as backend, _migration_files(target) as migrations:
            todo = plan(target, cron_conn)  # again under the lock: another migrate may have finished
            todo.notes = notes
            backend.apply_migrations(backend.to_apply(migrations))
            with target.conn.transaction():
                for name, text in todo.functions:
                    target.conn.execute(text)
                    target.conn.execute(
                        f"insert into {STATSKIT_SCHEMA}.function_checksums (function_name, sha256) values (%s, %s)"
                        " on conflict (function_name) do update set sha256 = excluded.sha256, applied_at = now()",
                        [name, deployment.checksum(text)],
                    )
                deployment.save_settings(target.conn, target.settings)
            if cron_conn is not None:
                cron.schedule(cron_conn, todo.jobs, target.conn.info.dbname)
            return todo
    finally:
        if cron_conn is not None:
            cron_conn.close()


@dataclass
class RollbackResult:
    rolled_back: str | None
    remaining: list[str]
    dropped_functions: list[str] = field(default_factory=list)
    unscheduled_jobs: list[str] = field(default_factory=list)


def rollback(target: Target, cron_dsn: str | None = None, use_cron: bool = True,
             lock_timeout: float = 300) -> RollbackResult:
    """Undo the last applied migration; after the first one, remove the functions and jobs too."""
    deployment.require_deployment(target.conn)
    cron_conn = _open_cron(target, cron_dsn, use_cron)
    try:
        with _locked(target, lock_timeout) as backend, _migration_files(target) as migrations:
            applied = backend.to_rollback(migrations)
            if not applied:
                return RollbackResult(None, [])
            last = applied[0]
            backend.rollback_migrations(applied[:1])
            result = RollbackResult(last.id, [m.id for m in applied[1:]])
            if result.remaining:
                return result
            with target.conn.transaction():
                for name, spec in reversed(FUNCTIONS.items()):
                    target.conn.execute(f"drop function if exists {quote_ident(target.settings.schema)}.{name}({spec.arguments})")
                    result.dropped_functions.append(name)
                target.conn.execute(f"delete from {STATSKIT_SCHEMA}.function_checksums")
                target.conn.execute(f"delete from {STATSKIT_SCHEMA}.settings")
            if cron_conn is not None:
                result.unscheduled_jobs = cron.unschedule(cron_conn, target.settings, target.conn.info.dbname)
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


def status(target: Target, cron_dsn: str | None = None, use_cron: bool = True) -> Status:
    applied = deployment.applied_migrations(target.conn)
    rows = [(mid, "applied" if mid in applied else "pending") for mid in target.migration_ids]
    rows += [(mid, "unknown") for mid in applied if mid not in target.migration_ids]
    functions = deployment.function_states(target.conn, target.settings, target.rendered)
    jobs = None
    if use_cron:
        cron_conn = _open_cron(target, cron_dsn, use_cron)
        try:
            jobs = cron.registered_jobs(cron_conn, [j.name for j in cron.wanted_jobs(target.settings)])
        finally:
            cron_conn.close()
    return Status(target.settings, rows, functions, jobs)
