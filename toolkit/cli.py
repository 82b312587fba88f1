"""The `statskit` command line: parse options, call one core function, print what it returns."""

import contextlib
import functools
import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

import click
import psycopg

from . import api, backfill as backfill_core, cron as cron_core, dashboard, db, demo as demo_core, docs, migrate as migrate_core, project, report, verify as verify_core
from . import demo_fleet, fleet as fleet_core, router as router_core
from .dates import parse_date
from .errors import StatskitError, UsageError
from .render import PACKAGED_SQL_DIR, default_sql_dir
from .settings import PARTITION_PERIODS

# The library's errors name the parameter they concern by its Python name; here each is the flag.
FLAGS = {"first": "--from", "scope": "--only", "user_id": "--user", "lookback_days": "--lookback-days",
         "row_security": "--row-security", "cron_dsn": "--cron-dsn", "no_cron": "--no-cron",
         "no_capture": "--no-capture", "roles": "--roles", "job_suffix": "--job-suffix", "break_lock": "--break-lock",
         "lock_timeout": "--lock-timeout", "retries": "--retries", "sql_dir": "--sql-dir",
         "partition_period": "--partition-period", "retention": "--retention", "fleet": "--fleet"}

EXIT_CODES = """Exit codes: 0 success, 1 the command failed (one line says why),
2 bad input or the database cannot be used (unreachable, not migrated)."""


def _flag_names() -> dict[str, str]:
    """Python names to flags (or the command's own argument names, e.g. USER_ID): read in the
    command's thread, where click keeps its context."""
    return {**FLAGS, **click.get_current_context().meta.get("statskit.arguments", {})}


def _named(exc: StatskitError, names: dict[str, str] | None = None) -> str:
    """The error's line with its field and options called by their flags."""
    return exc.named(names or _flag_names())


class StatskitGroup(click.Group):
    """Turns statskit's own errors and database errors into one line on stderr and an exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except StatskitError as exc:
            self._fail(ctx, _named(exc), exc.exit_code)
        except psycopg.Error as exc:
            dsn = ctx.meta.get("statskit.dsn", "")
            # Permission denied means the database cannot be used with this login: like no connection.
            code = 2 if isinstance(exc, psycopg.errors.InsufficientPrivilege) else 1
            self._fail(ctx, db.mask_secrets(db.describe_error(exc), dsn), code)

    @staticmethod
    def _fail(ctx, message, code):
        if ctx.meta.get("statskit.debug"):
            # the same exit code as without --debug, only more said, and no password in it either
            click.echo(db.mask_secrets(traceback.format_exc(), ctx.meta.get("statskit.dsn", "")), err=True)
        click.echo(f"statskit: error: {message}", err=True)
        ctx.exit(code)


@click.group(cls=StatskitGroup, epilog=EXIT_CODES)
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.version_option(package_name="statskit")
@click.pass_context
def cli(ctx, debug):
    """Generate, deploy, backfill and verify a daily statistics rollup on PostgreSQL.

    \b
    Typical first deployment:
      statskit migrate --dsn postgresql://dba@db.internal/app
      statskit migrate --status --dsn postgresql://dba@db.internal/app
    """
    ctx.meta["statskit.debug"] = debug


def dsn_option(command):
    """--dsn, resolved as --dsn, $STATSKIT_DSN, $DATABASE_URL, then libpq's PG* defaults."""

    @click.option("--dsn", metavar="DSN", help="Target database (URL or key=value). Default: $STATSKIT_DSN, "
                  "$DATABASE_URL, then libpq's PGHOST/PGDATABASE/... defaults.")
    @functools.wraps(command)
    def wrapper(*args, dsn=None, **kwargs):
        resolved = db.resolve_dsn(dsn)
        click.get_current_context().meta["statskit.dsn"] = resolved
        return command(*args, dsn=resolved, **kwargs)

    return wrapper


def cron_options(command):
    """--cron/--no-cron and --cron-dsn: whether the deployment has pg_cron jobs, and where pg_cron lives."""
    command = click.option(
        "--cron/--no-cron", "cron", default=None,
        help="--no-cron: no pg_cron jobs (you schedule the nightly functions yourself); statskit neither "
             "schedules, removes nor checks any. migrate records the choice and later commands follow it.")(command)
    return click.option(
        "--cron-dsn", metavar="DSN", envvar=cron_core.CRON_DSN_VARIABLE,
        help="pg_cron's database, needed once where this login cannot read cron.database_name: a database "
             "name (postgres) or dbname=postgres keeps the target's server and login; a full DSN keeps what it "
             "leaves out. migrate records the database. Default: $STATSKIT_CRON_DSN, the recorded database, "
             "then the server's cron.database_name.")(command)


def lock_options(command):
    """--lock-timeout, --retries, --wait: how migrate and rollback wait for locks, as a LockPolicy."""

    @click.option("--lock-timeout", type=click.FloatRange(min=0.1), default=2.0, show_default=True, metavar="SECONDS",
                  help="PostgreSQL lock_timeout for every statement: how long a dashboard query may queue "
                       "behind a statement that waits for a table lock.")
    @click.option("--retries", type=click.IntRange(0, 100), default=5, show_default=True,
                  help="Times the whole transaction is tried again after a lock timeout or a deadlock with "
                       "another session (with back-off).")
    @click.option("--wait", type=click.FloatRange(min=0), default=300, show_default=True, metavar="SECONDS",
                  help="How long to wait for another statskit migrate or rollback to finish.")
    @functools.wraps(command)
    def wrapper(*args, lock_timeout, retries, wait, **kwargs):
        return command(*args, policy=migrate_core.LockPolicy(lock_timeout, retries, wait), **kwargs)

    return wrapper


def fleet_options(command):
    """--fleet FILE and --parallel: the command on every shard of a fleet file instead of one --dsn."""

    @click.option("--fleet", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
                  help="Run on every shard of this fleet file (docs/scaling.md) instead of one --dsn; every other "
                       "option applies to each shard, and each shard's pg_cron jobs carry its name.")
    @click.option("--parallel", type=click.IntRange(1, 64), default=fleet_core.DEFAULT_PARALLEL, show_default=True,
                  help="With --fleet: shards worked on at once.")
    @functools.wraps(command)
    def wrapper(*args, fleet, parallel, **kwargs):
        ctx = click.get_current_context()
        if fleet and ctx.get_parameter_source("dsn") == click.core.ParameterSource.COMMANDLINE:
            raise UsageError("give --dsn or --fleet, not both")
        return command(*args, fleet=fleet, parallel=parallel, **kwargs)

    return wrapper


def _shard_line(outcome, what, names=None) -> str:
    """One shard's line, as it finishes: its name and database, what it did or why it failed."""
    said = what(outcome.value) if outcome.ok else f"FAILED: {_named(outcome.error, names)}"
    return f"{outcome.shard.label}: {said} ({outcome.seconds:.1f} s)"


def _finish_fleet(outcomes, what, command) -> None:
    """The final table; a failed shard fails the command, naming every failed shard."""
    _fleet_table(outcomes, what)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise StatskitError(f"{command} failed on {fleet_core.failed_shards(outcomes)}")


def _fleet_table(outcomes, what) -> None:
    """shard, database, result, seconds, what it did (or why it failed)."""
    rows = [(o.shard.name, o.shard.where, "ok" if o.ok else "FAILED", f"{o.seconds:.1f}",
             what(o.value) if o.ok else _named(o.error)) for o in outcomes]
    widths = [max(len(r[i]) for r in rows + [("shard", "database", "result", "s", "")]) for i in range(4)]
    click.echo("")
    click.echo(f"{'shard':<{widths[0]}}  {'database':<{widths[1]}}  {'result':<{widths[2]}}  {'s':>{widths[3]}}  what")
    for row in rows:
        click.echo(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]:>{widths[3]}}  {row[4]}")


def _echo_shard_done(what):
    """A shard's line as it finishes, printed from the shard's thread."""
    names = _flag_names()
    return lambda outcome: click.echo(_shard_line(outcome, what, names))


sql_dir_option = click.option(
    "--sql-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    callback=lambda ctx, param, value: value or default_sql_dir(),
    help="Folder with catalog.toml and templates/. Default: the project's (statskit.toml here or above, "
         "or $STATSKIT_PROJECT), else the catalog installed with statskit.",
)


@cli.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path), default=".")
def init(folder):
    """Start a project in FOLDER (default: here): statskit.toml, sql/ with the catalog and
    templates to edit, the rendered SQL, and clients/ with the web app's typed contract.

    statskit run in FOLDER or below (or with STATSKIT_PROJECT=FOLDER) then uses this catalog.

    \b
    Example:
      statskit init stats && cd stats && statskit migrate --dsn ...
    """
    written = api.init(folder)
    sql_dir = project.sql_dir(folder)
    for path in written:
        click.echo(f"wrote {path}")
    click.echo(f"rendered {sql_dir}/migrations, functions, access and {folder / 'clients'}")
    click.echo("next: edit sql/catalog.toml if you like, statskit render, then statskit migrate --dsn ...")


@cli.command()
@sql_dir_option
@click.option("--check", is_flag=True, help="Change nothing; exit 1 when a committed rendered file is stale.")
def render(sql_dir, check):
    """Render the catalog and templates into sql/migrations/ and sql/functions/.

    Beside sql/, when the folders exist, it also writes docs/metrics.md and docs/contract.md
    (your catalog's dictionary and contract), and the web app's contract clients/metrics.ts
    and clients/metrics.json.
    Rendering is deterministic: a re-render that changes nothing touches no file.

    \b
    Example:
      statskit render            # after editing sql/catalog.toml or a template
      statskit render --check    # in CI: fail when someone forgot to render
    """
    project_ = api.Project.open(sql_dir)
    # statskit's own checkout documents its commands too (a project's docs are about its catalog)
    own = sql_dir.resolve() == PACKAGED_SQL_DIR.resolve() and (sql_dir.parent / "docs").is_dir()
    extra = {"docs": {"commands.md": docs.commands_markdown(cli)}} if own else {}
    if check:
        stale, total = project_.stale(extra)
        if stale:
            raise StatskitError(f"rendered files are stale, run statskit render: {', '.join(map(str, stale))}")
        click.echo(f"rendered files are up to date ({total} files)")
        return
    done = project_.render(extra)
    for warning in done.warnings:
        click.echo(f"warning: {warning}", err=True)
    for path in done.touched:
        click.echo(f"wrote {path}")
    click.echo(f"{len(done.touched)} of {done.total} files changed")
    if done.new_migrations:
        click.echo("next: statskit migrate applies the new migration and names the days to backfill")


@cli.command()
@dsn_option
@fleet_options
@cron_options
@sql_dir_option
@click.option("--status", "show_status", is_flag=True, help="Show applied and pending migrations, functions and jobs; change nothing.")
@click.option("--dry-run", is_flag=True, help="Print the SQL migrate would run; change nothing.")
@click.option("--schema", help="Schema of the rollup tables and functions (first migrate only). Default: public.")
@click.option("--source-schema", help="Schema of the application's source tables. Default: public.")
@click.option("--time-zone", help="Statistics time zone: day boundaries follow it. Default: UTC.")
@click.option("--job-suffix", help="Suffix for the pg_cron job names, so several databases on one server each have their own jobs.")
@lock_options
@click.option("--lookback-days", type=int,
              help="Days the nightly user job writes: yesterday and the days before it, for late data. "
                   "Default: 1 (yesterday only) with change capture, which repairs late data itself; 3 without.")
@click.option("--roles", is_flag=True, default=None,
              help="Create statskit_reader (dashboards: read only) and statskit_writer (owns the rollup, runs the jobs); see docs/operations.md.")
@click.option("--row-security", metavar="EXPR",
              help="Row-level security on the user rollup table: EXPR is the current user's id, "
                   "e.g. \"current_setting('app.user_id')::<key type>\" or \"auth.uid()\". Needs --roles.")
@click.option("--capture/--no-capture", default=None,
              help="Triggers on the source tables log late and corrected rows, and the nightly jobs rewrite "
                   "exactly the users and days they touched (default). --no-capture: the lookback days only; "
                   "older corrections need statskit backfill.")
@click.option("--partition-period", type=click.Choice(PARTITION_PERIODS),
              help="One partition of the rollup tables per period of days (default: month; or [deployment] "
                   "partition_period in statskit.toml). week: a night writes a third of the WAL of a month's, "
                   "for 52 partitions a year, which the dashboard's plans lock. none: one plain table. A "
                   "deployment made unpartitioned is converted in place, without rewriting its rows.")
@click.option("--retention", metavar="'N months'",
              help="Days older than this (e.g. '25 months', '400 days') are dropped with their partitions by the "
                   "partitions job, and never written again. Default: kept forever (or [deployment] retention).")
@click.option("--break-lock", is_flag=True, help="Remove another migrate's lock first (a lock whose holder is gone is removed anyway).")
def migrate(dsn, fleet, parallel, cron_dsn, cron, sql_dir, show_status, dry_run, schema, source_schema, time_zone,
            job_suffix, lookback_days, roles, row_security, capture, partition_period, retention, policy, break_lock):
    """Create or update the rollup tables, functions and pg_cron jobs.

    Checks first (server version, source tables, columns and types, this login's privileges,
    pg_cron, job names) and changes nothing when a check fails. Then applies everything in one
    transaction, each statement under --lock-timeout, retried as a whole; jobs in another
    database are scheduled right after. Running it again changes nothing.

    \b
    Examples:
      statskit migrate --dsn postgresql://dba@db.internal/app
      statskit migrate --dry-run --dsn ...     # the SQL it would run
      statskit migrate --status --dsn ...      # what is applied, what is pending
      statskit migrate --fleet fleet.toml      # every shard, 4 at a time
    """
    overrides = dict(schema=schema, source_schema=source_schema, time_zone=time_zone, job_suffix=job_suffix,
                     lookback_days=lookback_days, roles=roles, row_security=row_security, capture=capture, cron=cron,
                     partition_period=partition_period, retention=retention)
    if fleet:
        _migrate_fleet(api.Project.open(sql_dir).fleet(fleet, **overrides), cron_dsn, show_status, dry_run, policy,
                       break_lock, parallel)
        return
    with api.Project.open(sql_dir).deployment(dsn, **overrides) as app:
        if show_status:
            _print_status(app.status(cron_dsn))
            return
        done = app.plan(cron_dsn) if dry_run else app.migrate(cron_dsn, policy=policy, break_lock=break_lock)
    for note in done.notes:
        click.echo(f"note: {note}", err=True)
    if dry_run:
        click.echo(done.script(), nl=False)
        return
    where = db.describe(dsn)
    if done.empty:
        click.echo(f"{where}: up to date, nothing to do")
        return
    for mid, _ in done.migrations:
        click.echo(f"applied migration {mid}")
    for table, change in done.conversions:
        click.echo(f"partitioned {done.settings.schema}.{table} by {done.settings.partition_period} (its rows stay where they are)"
                   if change == "partition" else
                   f"made {done.settings.schema}.{table} one table again (its largest partition; the others' rows copied in)")
    for due in done.partitions_due:
        click.echo(f"created the partition of {due}")
    if done.partition_fixes:
        click.echo(f"gave partitions their table's owner, grants and policies ({len(done.partition_fixes)} changes)")
    for name, _ in done.functions:
        click.echo({"access": "applied roles and grants (access.sql)",
                    "capture": f"{'installed' if done.settings.capture else 'removed'} change capture (capture.sql)",
                    "shard": "applied what the fleet's router may call on this shard (fleet/shard.sql)"}
                   .get(name, f"created function {done.settings.schema}.{name}"))
    for signature in done.drops:
        click.echo(f"dropped function {signature} (an older signature)")
    for job in done.jobs:
        click.echo(f"scheduled pg_cron job {job.name} ({job.schedule}) in {done.cron_database} for {done.database}")
    click.echo(f"{where}: deployment up to date")
    if done.unfilled:
        first, last = min(u.first for u in done.unfilled), max(u.last for u in done.unfilled)
        names = ", ".join(dict.fromkeys(u.metric for u in done.unfilled))
        click.echo(f"new metric columns hold their default in the days stored before them ({names}); fill them with:\n"
                   f"  statskit backfill --from {first} --to {last}")


def _migrate_fleet(shards, cron_dsn, show_status, dry_run, policy, break_lock, parallel):
    if show_status or dry_run:  # each shard's, one after the other, under its name
        outcomes = (shards.status if show_status else shards.plan)(cron_dsn, parallel=parallel)
        for o in outcomes:
            click.echo(f"-- {o.shard.label}")
            if not o.ok:
                click.echo(f"-- FAILED: {_named(o.error)}")
            elif show_status:
                _print_status(o.value)
            else:
                click.echo(o.value.script(), nl=False)
        _finish_fleet(outcomes, lambda done: "read", "migrate")
        return
    what = _migrated
    _finish_fleet(shards.migrate(cron_dsn, policy, break_lock, parallel, done=_echo_shard_done(what)), what, "migrate")


def _migrated(done) -> str:
    if done.empty:
        return "up to date, nothing to do"
    if isinstance(done, router_core.RouterDone):
        return ", ".join(done.applied)
    return (f"{len(done.migrations)} migrations, {len(done.created_functions)} functions, "
            f"{len(done.jobs)} pg_cron jobs scheduled")


def _print_status(status):
    s = status.settings
    click.echo(f"schema {s.schema}, source schema {s.source_schema}, time zone {s.time_zone}")
    for mid, state in status.migrations:
        click.echo(f"migration  {mid:<40} {state}")
    for fn in status.functions:
        click.echo(f"function   {fn.name:<40} {fn.state}")
    if status.jobs is None:
        click.echo("pg_cron    no jobs (--no-cron): the nightly functions are scheduled outside statskit")
    elif not status.jobs:
        click.echo("pg_cron    no jobs registered")
    for job in status.jobs or []:
        active = "active" if job.active else "inactive"
        click.echo(f"pg_cron    {job.jobname:<40} {job.schedule} {active}, database {job.database}: {job.command}")


@cli.command()
@dsn_option
@cron_options
@sql_dir_option
@lock_options
def rollback(dsn, cron_dsn, cron, sql_dir, policy):
    """Undo the last applied migration (one only).

    Undoing the first migration drops both statistics tables with their rows, the
    aggregation functions and the pg_cron jobs: the database is as before statskit.

    \b
    Example:
      statskit rollback --dsn postgresql://dba@db.internal/app
    """
    with api.Project.open(sql_dir).deployment(dsn, cron=cron) as app:
        result = app.rollback(cron_dsn, policy=policy)
    if result.rolled_back is None:
        click.echo("nothing to roll back")
        return
    click.echo(f"rolled back migration {result.rolled_back}")
    for name in result.dropped_functions:
        click.echo(f"dropped function {name}")
    for name in result.unscheduled_jobs:
        click.echo(f"unscheduled pg_cron job {name}")


@cli.group(invoke_without_command=True)
@click.option("--users", type=click.IntRange(10, 1_000_000), default=1000, show_default=True, help="Profiles to generate.")
@click.option("--days", type=click.IntRange(7, 3660), default=90, show_default=True, help="Days of activity, ending yesterday.")
@click.option("--seed", type=int, default=42, show_default=True, help="Random seed: the same seed gives the same marketplace.")
@click.option("--port", type=click.IntRange(1024, 65535), default=demo_core.DEMO_PORT, show_default=True,
              envvar="STATSKIT_DEMO_PORT", help="Port of the private PostgreSQL cluster (or $STATSKIT_DEMO_PORT).")
@click.option("--dsn", metavar="DSN", help="Use this (empty) database instead of the private cluster: checked "
              "first (empty, CREATE allowed, pg_cron reachable unless --no-cron), before any row is loaded.")
@click.option("--fleet", "as_fleet", is_flag=True,
              help="A fleet instead (docs/scaling.md): two private servers (--port and --port + 2), a shard "
                   "database on each and a PL/Proxy router, the data split by user; KPIs read through the router.")
@cron_options
@sql_dir_option
@click.pass_context
def demo(ctx, users, days, seed, port, dsn, as_fleet, cron_dsn, cron, sql_dir):
    """Run statskit end to end on a private PostgreSQL with a synthetic marketplace.

    Creates (first time) and starts a private cluster with pg_cron on its own port and
    data directory, loads demo data, then runs migrate, backfill and verify and tells
    what happened. Nothing touches the system's own clusters.

    \b
    Examples:
      statskit demo                      # private cluster on port 30915
      statskit demo --users 5000 --days 120 --seed 7
      statskit demo --fleet              # two shards on two servers and a router
      statskit demo shell                # psql into the demo database
      statskit demo stop | destroy
    """
    ctx.meta["statskit.demo_port"] = port
    if ctx.invoked_subcommand:
        return
    if as_fleet:
        if dsn:
            raise UsageError("--fleet runs on the demo's private servers: give --fleet or --dsn, not both")
        click.echo(f"starting two private PostgreSQL servers with pg_cron on 127.0.0.1:{port} and {port + 2} ...")
        story = demo_fleet.run(port, users, days, seed, sql_dir, say=click.echo)
        _tell_fleet(story)
        click.echo(f"the demo's servers keep running on 127.0.0.1:{port} and {port + 2}: statskit demo stop "
                   f"(or destroy) stops them")
        if not story.report.ok:
            sys.exit(1)
        return
    if dsn:
        ctx.meta["statskit.dsn"] = dsn
    else:
        click.echo(f"starting a private PostgreSQL with pg_cron on 127.0.0.1:{port} ...")
        dsn = demo_core.fresh_private_database(demo_core.demo_cluster(port))
    story = demo_core.run(dsn, users, days, seed, sql_dir, cron_dsn, cron is not False, say=click.echo)
    _tell(story)
    if not ctx.meta.get("statskit.dsn"):
        again = "" if port == demo_core.DEMO_PORT else f" --port {port}"
        click.echo(f"the demo's PostgreSQL keeps running on 127.0.0.1:{port}: statskit demo{again} stop "
                   f"(or destroy) stops it")
    if verify_core.overall(story.checks) == "fail":
        sys.exit(1)


def _tell(story):
    done = story.backfilled
    click.echo(f"loaded {story.rows_loaded} source rows: activity {story.first_day} .. {story.last_day}, "
               f"sessions booked ahead up to {story.booked_until}")
    capture = ", change capture on the source tables" if story.applied.settings.capture else ""
    click.echo(f"migrate: {len(story.applied.migrations)} migrations, {len(story.applied.created_functions)} functions, "
               f"{len(story.applied.jobs)} pg_cron jobs{capture}")
    click.echo(f"backfill: {done.days_total} days, {done.rows_written} rows in {done.seconds:.1f} s "
               f"({done.rows_written / max(done.seconds, 1e-9):.0f} rows/s)")
    click.echo(f"verify: {report.summary_line(story.checks).split(': ', 1)[1]}")
    for check in story.checks:
        if check.status != "pass":
            click.echo(f"  {check.status}: {check.check}: {check.detail}")
    for job in story.jobs:
        click.echo(f"pg_cron: {job.jobname} at '{job.schedule}' runs {job.command} in {job.database}")
    for role, (user_id, values) in story.kpis.items():
        click.echo(f"KPIs of a {role} ({user_id}) on {story.last_day}, against the week before:")
        click.echo(_metric_grid(values, story.metric_units, sys.stdout.isatty()))
    click.echo(f"look around: psql \"{story.dsn}\"   (or: statskit demo shell)")


def _tell_fleet(story):
    click.echo(f"loaded {story.rows_loaded} source rows: activity {story.first_day} .. {story.last_day}, "
               f"split over {len(story.migrated) - 1} shards by user; fleet file {story.fleet_file}")
    for title, outcomes, what in (("migrate", story.migrated, _migrated),
                                  ("backfill", story.backfilled, _backfilled)):
        click.echo(f"{title}:")
        _fleet_table(outcomes, what)
    click.echo(f"verify --fleet: {report.summary_line(story.report.checks).split(': ', 1)[1]}")
    for check in story.report.checks:
        if check.status != "pass":
            click.echo(f"  {check.status}: {check.check}: {check.detail}")
    for role, (user_id, values) in story.kpis.items():
        click.echo(f"KPIs of a {role} ({user_id}) on {story.last_day} through the router, against the week before:")
        click.echo(_metric_grid(values, story.metric_units, sys.stdout.isatty()))
    click.echo(f"the platform on {story.last_day} through the router (merged from the shards' sums):")
    click.echo(_metric_grid(story.platform, story.metric_units, sys.stdout.isatty()))
    click.echo(f"look around: statskit verify --fleet {story.fleet_file}")


@demo.command("shell")
@click.pass_context
def demo_shell(ctx):
    """Open psql on the demo database."""
    cluster = demo_core.demo_cluster(ctx.meta["statskit.demo_port"])
    if not cluster.running():
        raise StatskitError("the demo cluster is not running: run statskit demo first")
    os.execvp("psql", ["psql", cluster.dsn(demo_core.DEMO_DATABASE)])


@demo.command("stop")
@click.pass_context
def demo_stop(ctx):
    """Stop the private demo cluster, and demo --fleet's second one (their data stays)."""
    for cluster in demo_fleet.clusters(ctx.meta["statskit.demo_port"]):
        cluster.stop()
    click.echo("demo cluster stopped")


@demo.command("destroy")
@click.pass_context
def demo_destroy(ctx):
    """Stop the private demo cluster (and demo --fleet's second one) and delete their data directories."""
    for cluster in demo_fleet.clusters(ctx.meta["statskit.demo_port"]):
        cluster.destroy()
        click.echo(f"demo cluster removed ({cluster.root})")


@cli.command()
@dsn_option
@fleet_options
@click.option("--from", "first", required=True, metavar="YYYY-MM-DD", help="First day to write (inclusive).")
@click.option("--to", "last", required=True, metavar="YYYY-MM-DD",
              help="Last day to write (inclusive); a day after yesterday is clamped to yesterday.")
@click.option("--user", "user", metavar="USER_ID", help="Write only this user's rows (a key of the catalog's user table).")
@click.option("--only", type=click.Choice(["users", "platform"]), help="Write only one of the two tables.")
@click.option("--resume", is_flag=True, help="Skip chunks of days an earlier run already finished.")
@click.option("--chunk-days", type=click.IntRange(1, 3660), default=backfill_core.Request.chunk_days, show_default=True,
              help="Most days per transaction: a kill loses at most one chunk. Each chunk reads the "
                   "sources' history up to its last day once, so fewer, longer chunks finish sooner.")
@click.option("--jobs", type=click.IntRange(1, 32), default=min(2, os.cpu_count() or 1), show_default=True,
              help="Connections writing side by side, each its own chunks of days (the users' days of a range "
                   "shorter than --jobs chunks are cut into --jobs chunks of about equal cost, estimated from the "
                   "users each day has: the later chunks, with more users and more history, get fewer days; the "
                   "platform's days, a row each, are not cut for the jobs).")
@click.option("--quiet", is_flag=True, help="Print no progress; notes (a clamped range, a wait for another "
              "writer) still go to stderr.")
@sql_dir_option
def backfill(dsn, fleet, parallel, first, last, user, only, resume, chunk_days, jobs, quiet, sql_dir):
    """Write the rollup rows of every day from --from to --to.

    Each chunk of days is computed in one pass over the sources (the *_range functions) and
    commits whole: every user's rows of its days in one transaction, so no reader ever sees a
    day with some users and not others. Stopped by Ctrl-C or SIGTERM, it cancels the statements
    in flight, says how many days are committed and exits 130 (143); after any stop, even a
    kill, the same command with --resume writes the rest, and the result equals one clean run.
    Rows outside the range are untouched. The nightly jobs wait for a chunk in flight, and it
    for them. With change capture it ends with the nightly step of --to, which keeps the sums of
    that day (the chunks discard those of the users they rewrite), so the next night steps from
    them instead of summing every user from history.

    \b
    Examples:
      statskit backfill --from 2026-01-01 --to 2026-04-30 --dsn ...
      statskit backfill --from 2026-01-01 --to 2026-04-30 --resume --dsn ...
      statskit backfill --from 2026-03-01 --to 2026-03-31 --user 0b6f...e1 --dsn ...
      statskit backfill --from 2026-01-01 --to 2026-04-30 --fleet fleet.toml   # every shard
    """
    first, last = parse_date(first, "--from"), parse_date(last, "--to")
    with _cancelled_by_signals() as (cancel, signals):
        if fleet:
            _backfill_fleet(api.Project.open(sql_dir).fleet(fleet), first, last, user, only, resume, chunk_days, jobs,
                            quiet, parallel, cancel, signals)
            return
        try:
            with api.Project.open(sql_dir).deployment(dsn) as app:
                done = app.backfill(first, last, only=only or "both", user=app.user_key(user) if user else None,
                                    resume=resume, chunk_days=chunk_days, jobs=jobs, progress=_progress_printer(quiet),
                                    notify=lambda message: click.echo(f"note: {message}", err=True),
                                    cancel=cancel)
        except backfill_core.Stopped as exc:
            exc.then = "re-run with --resume to write the rest"
            if not exc.cancelled:
                raise
            click.echo(f"statskit: backfill stopped by {signal.Signals(signals[0]).name}: {exc}", err=True)
            sys.exit(128 + signals[0])  # the shell's convention for a process ended by that signal
    if not quiet:
        rate = done.rows_written / done.seconds if done.seconds else 0
        skipped = f", {done.days_skipped} days committed earlier skipped" if done.days_skipped else ""
        kept = f"; the sums of {done.sums_of} kept, the next night steps from them" if done.sums_of else ""
        click.echo(f"backfill done: {done.days_total} days, {done.rows_written} rows written in "
                   f"{done.seconds:.1f} s ({rate:.0f} rows/s){skipped}{kept}")


def _backfilled(done) -> str:
    if isinstance(done, int):  # the router's merge
        return f"platform rows merged from every shard's sums: {done} written"
    skipped = f", {done.days_skipped} committed earlier skipped" if done.days_skipped else ""
    return f"{done.days_total} days, {done.rows_written} rows written{skipped}"


@contextlib.contextmanager
def _cancelled_by_signals():
    """SIGINT and SIGTERM set an event the backfill core checks (and cancels its statements on),
    instead of raising wherever the main thread happens to be; the signals received are listed."""
    cancel, signals = threading.Event(), []

    def stop(signum, frame):
        signals.append(signum)
        cancel.set()

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield cancel, signals
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _backfill_fleet(shards, first, last, user, only, resume, chunk_days, jobs, quiet, parallel, cancel, signals):
    def progress(shard, done, chunk):
        if not quiet:
            click.echo(f"{shard.name}: chunk {chunk[0]}..{chunk[1]} committed: {done.days_done}/{done.days_total} "
                       f"days, {done.rows_written} rows")

    what = _backfilled
    outcomes = shards.backfill(first, last, only=only or "both", user=shards.user_key(user) if user else None, resume=resume, chunk_days=chunk_days, jobs=jobs, parallel=parallel,
                               progress=progress, cancel=cancel, done=_echo_shard_done(what),
                               notify=lambda shard, message: click.echo(f"note: {shard.name}: {message}", err=True))
    for o in outcomes:
        if isinstance(o.error, backfill_core.Stopped):
            o.error.then = "re-run with --resume to write the rest"
    if signals:
        _fleet_table(outcomes, what)
        click.echo(f"statskit: backfill stopped by {signal.Signals(signals[0]).name} on every shard; "
                   f"re-run with --resume to write the rest", err=True)
        sys.exit(128 + signals[0])
    _finish_fleet(outcomes, what, "backfill")


def _user_argument(app, text):
    """USER_ID, as the catalog's key type holds it; errors about it name USER_ID, not --user."""
    click.get_current_context().meta["statskit.arguments"] = {"user_id": "USER_ID"}
    return app.user_key(text)


def _progress_printer(quiet):
    """A bar redrawn in place on a terminal; one plain line per chunk anywhere else (cron, CI)."""
    terminal = sys.stdout.isatty()

    def report(progress, chunk):
        if quiet:
            return
        rate = progress.rows_written / progress.seconds if progress.seconds else 0
        left = progress.days_total - progress.days_done
        written = progress.days_done - progress.days_skipped
        eta = progress.seconds / written * left if written else 0
        if terminal:
            filled = int(30 * progress.days_done / progress.days_total)
            click.echo(f"\r[{'#' * filled}{'.' * (30 - filled)}] {progress.days_done}/{progress.days_total} days, "
                       f"{progress.rows_written} rows, {rate:.0f} rows/s, ETA {eta:.0f} s", nl=left == 0)
        else:
            click.echo(f"chunk {chunk[0]}..{chunk[1]} committed: {progress.days_done}/{progress.days_total} days, "
                       f"{progress.rows_written} rows, {rate:.0f} rows/s")

    return report


@cli.command(epilog="Exit codes: 0 every check passed (warnings allowed), 1 a check failed, "
             "2 verify could not run (no connection, not migrated, permission denied).")
@dsn_option
@fleet_options
@cron_options
@sql_dir_option
@click.option("--only", metavar="GROUPS", help=f"Comma-separated groups to run, of {','.join(verify_core.CHECK_GROUPS)}.")
@click.option("--from", "first", metavar="YYYY-MM-DD", help="Data window start. Default: 7 days before --to.")
@click.option("--to", "last", metavar="YYYY-MM-DD", help="Data window end. Default: yesterday.")
@click.option("--sample", "sample_users", type=click.IntRange(1, 10000), default=20, show_default=True,
              help="Users whose stored rows (2 days each) are recomputed and compared.")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "junit"]), default="text", show_default=True)
def verify(dsn, fleet, parallel, cron_dsn, cron, sql_dir, only, first, last, sample_users, fmt):
    """Prove the deployment right: schema, functions, access, migrations, cron, capture, data, spot check.

    Read-only: the spot check recomputes sampled rows in a transaction that is rolled back.

    \b
    Examples:
      statskit verify --dsn ...                                 # everything, last 7 days
      statskit verify --only schema,functions --dsn ...
      statskit verify --format junit --dsn ... > verify.xml     # for CI
      statskit verify --fleet fleet.toml                        # every shard, then the fleet as one

    With --fleet, each shard's checks are named shardN:check, and the fleet's own follow: every
    shard at the same migrations, functions and settings, each shard's jobs named after it, every
    user on the shard its placement names, and a sample of rows that count for users of two
    shards equal on both. A shard that cannot be reached fails its own line only.
    """
    groups = tuple(g.strip() for g in only.split(",")) if only else verify_core.CHECK_GROUPS
    unknown = [g for g in groups if g not in verify_core.CHECK_GROUPS]
    if unknown:
        raise UsageError(f"--only {','.join(unknown)}: unknown check group (use {','.join(verify_core.CHECK_GROUPS)})")
    first_day, last_day = (parse_date(first, "--from") if first else None), (parse_date(last, "--to") if last else None)
    if fleet:
        done = api.Project.open(sql_dir).fleet(fleet, cron=cron).verify(
            first_day, last_day, groups, sample_users, cron_dsn, parallel,
            done=_echo_shard_done(_verified) if fmt == "text" else lambda outcome: None)
        first_day, last_day = next(((o.value.first, o.value.last) for o in done.outcomes if o.ok), (first_day, last_day))
        _print_report(fmt, done.checks, fleet.stem, first_day, last_day)
        if fmt == "text":
            _fleet_table(done.outcomes, _verified)
        if not done.ok:
            sys.exit(1)
        return
    try:
        with api.Project.open(sql_dir).deployment(dsn, cron=cron) as app:
            done = app.verify(first_day, last_day, groups, sample_users, cron_dsn)
    except (StatskitError, psycopg.Error) as exc:
        if fmt != "text":  # a CI reads the report, not stderr: it holds the failure too
            reason = _named(exc) if isinstance(exc, StatskitError) else db.mask_secrets(db.describe_error(exc), dsn)
            _print_report(fmt, [verify_core.Check("verify", "fail", f"could not run: {reason}")],
                          db.database_of(dsn) or "", first_day, last_day)
        raise
    _print_report(fmt, done.checks, done.database, done.first, done.last)
    if not done.ok:
        sys.exit(1)


def _verified(done) -> str:
    return report.summary_line(done.checks).removeprefix("verify: ")


def _print_report(fmt, checks, database, first, last):
    if fmt == "json":
        click.echo(report.as_json(checks, database, first, last), nl=False)
    elif fmt == "junit":
        click.echo(report.as_junit(checks, database), nl=False)
    else:
        click.echo(report.as_text(checks, colour=sys.stdout.isatty()), nl=False)


TREND_MARKS = {"up": ("▲", "green"), "down": ("▼", "red"), "neutral": ("•", None)}


def _number(value, unit, signed=False):
    """Counts as integers; money, hours, ratings, scores and percentages with 2 decimals."""
    if value is None:
        return "-"
    sign = "+" if signed else ""
    return f"{int(value):{sign}d}" if unit == "count" else f"{value:{sign}.2f}"


def _metric_grid(values, units, colour):
    header = f"{'metric':<22} {'value':>12} {'previous':>12} {'change':>12} {'change %':>9}  trend"
    lines = [header]
    for v in values:
        mark, fg = TREND_MARKS[v.trend]
        if colour and fg:
            mark = click.style(mark, fg=fg)
        pct = "-" if v.change_pct is None else f"{v.change_pct:+.2f}%"
        kind = units[v.metric]
        lines.append(f"{v.metric:<22} {_number(v.value, kind):>12} {_number(v.previous_value, kind):>12} "
                     f"{_number(v.change, kind, signed=True):>12} {pct:>9}  {mark} {v.trend}")
    return "\n".join(lines)


def _dashboard_options(command):
    command = click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
                           help="json: numbers as strings with their exact digits (\"960.00\").")(command)
    command = click.option("--compare", type=click.Choice(dashboard.COMPARISONS), default="day", show_default=True,
                           help="Compare with the day before, 7 days before, or one month before.")(command)
    return click.option("--date", "day", metavar="YYYY-MM-DD", help="Statistics date. Default: yesterday.")(command)


@cli.command()
@dsn_option
@sql_dir_option
@click.argument("user_id")
@click.argument("metric")
@_dashboard_options
def metric(dsn, sql_dir, user_id, metric, day, compare, fmt):
    """Show one metric of one user with its comparison (value, previous, change, trend).

    \b
    Example:
      statskit metric 0b6f...e1 total_earnings --compare week --dsn ...
    """
    with api.Project.open(sql_dir).deployment(dsn) as app:
        day, value = app.user_metric(_user_argument(app, user_id), metric, parse_date(day, "--date") if day else None,
                                     compare)
        units = app.metric_units()
    if fmt == "json":
        click.echo(json.dumps({"user_id": user_id, "date": str(day), "compare": compare, **value.as_dict()}, indent=2))
    else:
        click.echo(_metric_grid([value], units, sys.stdout.isatty()))


@cli.command()
@dsn_option
@sql_dir_option
@click.argument("user_id", required=False)
@click.option("--platform", is_flag=True, help="Show every platform metric instead of a user's KPI set.")
@_dashboard_options
def kpis(dsn, sql_dir, user_id, platform, day, compare, fmt):
    """Show a user's KPI set (by role) or the platform's metrics, each with its comparison.

    \b
    Examples:
      statskit kpis 0b6f...e1 --dsn ...                 # a tutor: earnings, sessions, rating, ...
      statskit kpis --platform --compare month --dsn ...
    """
    if bool(user_id) == platform:
        raise UsageError("give a USER_ID or --platform (one of the two)")
    with api.Project.open(sql_dir).deployment(dsn) as app:
        when = parse_date(day, "--date") if day else None
        if platform:
            day, values = app.platform_kpis(when, compare)
            title, subject = f"platform on {day}, compared with the {compare} before", {"platform": True}
        else:
            day, role, values = app.user_kpis(_user_argument(app, user_id), when, compare)
            title, subject = f"{role} {user_id} on {day}, compared with the {compare} before", {"user_id": user_id, "role": role}
        units = app.metric_units()
    if fmt == "json":
        click.echo(json.dumps({**subject, "date": str(day), "compare": compare,
                               "metrics": [v.as_dict() for v in values]}, indent=2))
    else:
        click.echo(title)
        click.echo(_metric_grid(values, units, sys.stdout.isatty()))


def main():
    sys.exit(cli(prog_name="statskit"))
