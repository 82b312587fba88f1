"""The `statskit` command line: parse options, call one core function, print what it returns."""

import functools
import sys
from pathlib import Path

import click
import psycopg

from . import db, migrate as migrate_core
from .errors import StatskitError
from .render import default_sql_dir, render_all, stale_files, write_rendered

EXIT_CODES = """Exit codes: 0 success, 1 the command failed (one line says why),
2 bad input or the database cannot be used (unreachable, not migrated)."""


class StatskitGroup(click.Group):
    """Turns statskit's own errors and database errors into one line on stderr and an exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except StatskitError as exc:
            self._fail(ctx, str(exc), exc.exit_code)
        except psycopg.Error as exc:
            dsn = ctx.meta.get("statskit.dsn", "")
            self._fail(ctx, db.mask_secrets(db.first_line(exc), dsn), 1)

    @staticmethod
    def _fail(ctx, message, code):
        if ctx.meta.get("statskit.debug"):
            raise
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
    command = click.option("--no-cron", is_flag=True, help="Do not touch pg_cron (no jobs are scheduled or removed).")(command)
    return click.option("--cron-dsn", metavar="DSN", help="Where pg_cron lives. Default: the target's server and "
                        "login, database from SHOW cron.database_name.")(command)


sql_dir_option = click.option(
    "--sql-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Folder with catalog.toml and templates/. Default: ./sql in a checkout, else the installed copy.",
)


@cli.command()
@sql_dir_option
@click.option("--check", is_flag=True, help="Change nothing; exit 1 when a committed rendered file is stale.")
def render(sql_dir, check):
    """Render the catalog and templates into sql/migrations/ and sql/functions/.

    Rendering is deterministic: a re-render that changes nothing touches no file.

    \b
    Example:
      statskit render            # after editing sql/catalog.toml or a template
      statskit render --check    # in CI: fail when someone forgot to render
    """
    sql_dir = sql_dir or default_sql_dir()
    rendered = render_all(sql_dir)
    if check:
        stale = stale_files(sql_dir, rendered)
        if stale:
            raise StatskitError(f"rendered SQL is stale, run statskit render: {', '.join(stale)}")
        click.echo(f"rendered SQL is up to date ({len(rendered)} files in {sql_dir})")
        return
    touched = write_rendered(sql_dir, rendered)
    for rel in touched:
        click.echo(f"wrote {sql_dir / rel}")
    click.echo(f"{len(touched)} of {len(rendered)} files changed")


@cli.command()
@dsn_option
@cron_options
@sql_dir_option
@click.option("--status", "show_status", is_flag=True, help="Show applied and pending migrations, functions and jobs; change nothing.")
@click.option("--dry-run", is_flag=True, help="Print the SQL migrate would run; change nothing.")
@click.option("--schema", help="Schema of the rollup tables and functions (first migrate only). Default: public.")
@click.option("--source-schema", help="Schema of the application's source tables. Default: public.")
@click.option("--time-zone", help="Statistics time zone: day boundaries follow it. Default: UTC.")
@click.option("--job-suffix", help="Suffix for the pg_cron job names, so several databases on one server each have their own jobs.")
@click.option("--lock-timeout", type=float, default=300, show_default=True, help="Seconds to wait for another migrate.")
def migrate(dsn, cron_dsn, no_cron, sql_dir, show_status, dry_run, schema, source_schema, time_zone, job_suffix, lock_timeout):
    """Create or update the rollup tables, functions and pg_cron jobs.

    Checks first (server version, source tables and columns, pg_cron, job names) and
    changes nothing when a check fails. Running it again changes nothing.

    \b
    Examples:
      statskit migrate --dsn postgresql://dba@db.internal/app
      statskit migrate --dry-run --dsn ...     # the SQL it would run
      statskit migrate --status --dsn ...      # what is applied, what is pending
    """
    overrides = dict(schema=schema, source_schema=source_schema, time_zone=time_zone, job_suffix=job_suffix)
    target = migrate_core.Target.open(dsn, sql_dir or default_sql_dir(), overrides)
    try:
        if show_status:
            _print_status(migrate_core.status(target, cron_dsn, not no_cron))
            return
        done = migrate_core.migrate(target, cron_dsn, not no_cron, dry_run=dry_run, lock_timeout=lock_timeout)
    finally:
        target.close()
    if dry_run:
        click.echo(done.script(), nl=False)
        return
    where = db.describe(dsn)
    if done.empty:
        click.echo(f"{where}: up to date, nothing to do")
        return
    for mid, _ in done.migrations:
        click.echo(f"applied migration {mid}")
    for name, _ in done.functions:
        click.echo(f"created function {done.settings.schema}.{name}")
    for job in done.jobs:
        click.echo(f"scheduled pg_cron job {job.name} ({job.schedule}) in {done.cron_database} for {done.database}")
    click.echo(f"{where}: deployment up to date")


def _print_status(status):
    s = status.settings
    click.echo(f"schema {s.schema}, source schema {s.source_schema}, time zone {s.time_zone}")
    for mid, state in status.migrations:
        click.echo(f"migration  {mid:<40} {state}")
    for fn in status.functions:
        click.echo(f"function   {fn.name:<40} {fn.state}")
    if status.jobs is None:
        click.echo("pg_cron    not consulted (--no-cron)")
    elif not status.jobs:
        click.echo("pg_cron    no jobs registered")
    for job in status.jobs or []:
        active = "active" if job.active else "inactive"
        click.echo(f"pg_cron    {job.jobname:<40} {job.schedule} {active}, database {job.database}: {job.command}")


@cli.command()
@dsn_option
@cron_options
@sql_dir_option
@click.option("--lock-timeout", type=float, default=300, show_default=True, help="Seconds to wait for another migrate.")
def rollback(dsn, cron_dsn, no_cron, sql_dir, lock_timeout):
    """Undo the last applied migration (one only).

    Undoing the first migration drops both statistics tables with their rows, the
    aggregation functions and the pg_cron jobs: the database is as before statskit.

    \b
    Example:
      statskit rollback --dsn postgresql://dba@db.internal/app
    """
    target = migrate_core.Target.open(dsn, sql_dir or default_sql_dir())
    try:
        result = migrate_core.rollback(target, cron_dsn, not no_cron, lock_timeout=lock_timeout)
    finally:
        target.close()
    if result.rolled_back is None:
        click.echo("nothing to roll back")
        return
    click.echo(f"rolled back migration {result.rolled_back}")
    for name in result.dropped_functions:
        click.echo(f"dropped function {name}")
    for name in result.unscheduled_jobs:
        click.echo(f"unscheduled pg_cron job {name}")


def main():
    sys.exit(cli(prog_name="statskit"))
