"""pg_cron registration of the two nightly jobs, in whichever database pg_cron lives.

pg_cron runs in one database per server (cron.database_name); jobs for any other
database are created there with cron.schedule_in_database. In pg_cron 1.4 scheduling
a name that already exists for the same user rewrites that job but keeps its old
database, so a name held by a job of another database is refused, never reused.
"""

import dataclasses
from dataclasses import dataclass

import psycopg
from psycopg import sql

from . import db
from .errors import StatskitError
from .compiler import quote_literal
from .render import quote_ident
from .settings import WRITER_ROLE, Settings


# The spec's schedule. pg_cron 1.4 reads cron times in UTC (GMT), whatever the server's time zone.
PLATFORM_SCHEDULE = "0 0 * * *"
USER_SCHEDULE = "0 1 * * *"
# Partitions are made three periods ahead, so the day it runs matters little: before the nights.
PARTITIONS_SCHEDULE = "30 23 * * *"


@dataclass(frozen=True)
class Job:
    name: str
    schedule: str
    command: str
    rollup: str  # "platform" or "user": the table the job writes; "partitions": both tables' partitions
    username: str | None = None  # None: the user of the cron connection
    replaces: int | None = None  # jobid of this database's job under another user, removed first


@dataclass(frozen=True)
class RegisteredJob:
    jobid: int
    jobname: str
    schedule: str
    command: str
    database: str
    username: str
    active: bool


def wanted_jobs(settings: Settings) -> list[Job]:
    """The spec's schedule: the platform job at 00:00 UTC, the user job after it at 01:00.

    With change capture each job first takes its change log (late and corrected source rows).
    The user job writes yesterday, as the spec says, and then re-writes the lookback days
    before it.
    """
    schema = quote_ident(settings.schema)
    # With change capture each job first rewrites what late and corrected source rows touched.
    catch_up = {table: f"select {schema}.aggregate_{table}_changes(); " if settings.capture else ""
                for table in ("user", "platform")}
    user_command = f"{catch_up['user']}select {schema}.aggregate_user_statistics()"
    if settings.lookback_days > 1:
        today = f"(now() at time zone {quote_literal(settings.time_zone)})::date"
        user_command += (f"; select {schema}.aggregate_user_statistics(null, {today} - n)"
                         f" from generate_series(2, {settings.lookback_days}) as n")
    jobs = [
        Job(settings.platform_job, PLATFORM_SCHEDULE, f"{catch_up['platform']}select {schema}.aggregate_daily_statistics()",
            "platform"),
        Job(settings.user_job, USER_SCHEDULE, user_command, "user"),
    ]
    if settings.partitioned:  # a CALL alone in its command, so the procedure may commit
        jobs.append(Job(settings.partitions_job, PARTITIONS_SCHEDULE,
                        f"call {schema}.maintain_statistics_partitions()", "partitions"))
    return jobs


CRON_DSN_VARIABLE = "STATSKIT_CRON_DSN"


def cron_database(conn: psycopg.Connection) -> str | None:
    """The database pg_cron lives in, or None when pg_cron is not preloaded on this server.

    cron.database_name is readable only by superusers and members of pg_read_all_settings,
    which managed services rarely grant. Without that right the answer can still be had where
    the extension itself is installed: pg_cron refuses CREATE EXTENSION in any other database.
    """
    try:
        row = conn.execute("select current_setting('cron.database_name', true)").fetchone()
        return row[0] if row and row[0] else None
    except psycopg.errors.InsufficientPrivilege:
        if has_extension(conn):
            return conn.info.dbname
        raise StatskitError(
            "cannot tell which database pg_cron lives in: reading cron.database_name needs superuser or "
            "pg_read_all_settings; name it once with {cron_dsn} (a database name, e.g. postgres, "
            f"keeps this server and login; or ${CRON_DSN_VARIABLE}) and migrate records it, or use {{no_cron}}"
        ) from None


def has_extension(conn: psycopg.Connection) -> bool:
    return conn.execute("select 1 from pg_extension where extname = 'pg_cron'").fetchone() is not None


def connect_cron(target_dsn: str, target_conn: psycopg.Connection, cron_dsn: str | None,
                 settings: Settings = Settings()) -> psycopg.Connection:
    """Connect to pg_cron's database: `cron_dsn` (completed from the target's, see db.derived),
    else the database migrate recorded, else the one the server names, with the target's login."""
    if cron_dsn:
        conn = db.connect(db.derived(target_dsn, cron_dsn), autocommit=True)
        cron_db = conn.info.dbname
    else:
        cron_db = settings.cron_database or cron_database(target_conn)
        if cron_db is None:
            raise StatskitError(
                "pg_cron is not loaded on this server (shared_preload_libraries = 'pg_cron' and a restart); "
                "install it, or run with {no_cron} to skip the nightly jobs"
            )
        same = cron_db == target_conn.info.dbname
        conn = db.connect(target_dsn if same else db.with_database(target_dsn, cron_db), autocommit=True)
    if not has_extension(conn):
        conn.close()
        raise StatskitError(
            f"the pg_cron extension is missing in database {cron_db}: run CREATE EXTENSION pg_cron there "
            f"(pg_cron's database is cron.database_name), or use {{no_cron}}"
        )
    return conn


def check_can_schedule(cron_conn: psycopg.Connection, jobs: list["Job"]) -> None:
    """Raise, before anything changes, when this login cannot (re)schedule the jobs."""
    user, superuser = cron_conn.execute(
        "select current_user, rolsuper from pg_roles where rolname = current_user").fetchone()
    if superuser or not jobs:
        return
    # Without USAGE on the schema its functions cannot even be named: that grant is asked for first.
    if not cron_conn.execute("select has_schema_privilege('cron', 'usage')").fetchone()[0]:
        missing = ["USAGE on schema cron"]
    else:
        missing = [what for what, ok in cron_conn.execute(
            "select 'EXECUTE on cron.schedule_in_database', has_function_privilege("
            "  'cron.schedule_in_database(text,text,text,text,text,boolean)', 'execute')"
            " union all select 'EXECUTE on cron.unschedule', has_function_privilege('cron.unschedule(bigint)', 'execute')"
        ).fetchall() if not ok]
    if missing:
        raise StatskitError(
            f"{user} cannot schedule pg_cron jobs in {cron_conn.info.dbname}: it lacks {', '.join(missing)} "
            f"(grant them there, see docs/managed.md); nothing changed"
        )


def registered_jobs(cron_conn: psycopg.Connection, names: list[str]) -> list[RegisteredJob]:
    rows = cron_conn.execute(
        "select jobid, jobname, schedule, command, database, username, active"
        " from cron.job where jobname = any(%s) order by jobid",
        [names],
    ).fetchall()
    return [RegisteredJob(*row) for row in rows]


def job_user(cron_conn: psycopg.Connection, settings: Settings) -> tuple[str, str]:
    """Who runs the jobs, and who schedules them. The writer role runs them when there is one
    and we may schedule for another role: pg_cron allows that to superusers only."""
    user, superuser = cron_conn.execute(
        "select current_user, rolsuper from pg_roles where rolname = current_user").fetchone()
    return (WRITER_ROLE if settings.roles and superuser else user), user


def plan_jobs(cron_conn: psycopg.Connection, settings: Settings, database: str) -> list[Job]:
    """Return the jobs that must be (re)scheduled; raise when a name belongs to another database."""
    user, caller = job_user(cron_conn, settings)
    # No username for the caller's own jobs: pg_cron 1.4 refuses any username from a non-superuser.
    wanted = [dataclasses.replace(w, username=None if user == caller else user) for w in wanted_jobs(settings)]
    existing = {}
    for job in registered_jobs(cron_conn, [w.name for w in wanted]):
        if job.database != database:
            # a shard's jobs carry its name: two fleets' shards of one server may share one
            remedy = ("a shard name of its own (name = ... under its [[shards]] in the fleet file)" if settings.shard
                      else "{job_suffix}")
            raise StatskitError(
                f"pg_cron job {job.jobname!r} already belongs to database {job.database!r} (user {job.username!r}); "
                f"nothing changed. Give this database its own jobs with {remedy}"
            )
        existing[job.jobname] = job
    todo = []
    for w in wanted:
        have = existing.get(w.name)
        if have is None:
            todo.append(w)
        elif have.username != (w.username or caller):
            todo.append(dataclasses.replace(w, replaces=have.jobid))
        elif (have.schedule, have.command, have.active) != (w.schedule, w.command, True):
            todo.append(w)
    return todo


def schedule_statement(job: Job, database: str) -> sql.Composed:
    args = [job.name, job.schedule, job.command, database] + ([job.username] if job.username else [])
    return sql.SQL("select cron.schedule_in_database({})").format(sql.SQL(", ").join(map(sql.Literal, args)))


def schedule(cron_conn: psycopg.Connection, jobs: list[Job], database: str) -> None:
    with cron_conn.transaction():
        for job in jobs:
            if job.replaces is not None:
                cron_conn.execute("select cron.unschedule(%s::bigint)", [job.replaces])
            cron_conn.execute(schedule_statement(job, database))


def unschedule(cron_conn: psycopg.Connection, settings: Settings, database: str) -> list[str]:
    """Remove this database's jobs (by id: pg_cron 1.4's unschedule by name raises when missing)."""
    names = [w.name for w in wanted_jobs(settings)]
    removed = []
    with cron_conn.transaction():
        for job in registered_jobs(cron_conn, names):
            if job.database == database:
                cron_conn.execute("select cron.unschedule(%s::bigint)", [job.jobid])
                removed.append(job.jobname)
    return removed
