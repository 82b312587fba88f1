"""Whether a deployment can run, not only whether it exists: owners, grants, row security,
and what the role each nightly job runs as needs to do its job.

A restore with --no-owner --no-privileges brings every object back owned by the restoring
role with no grants, and the checksums with it: the objects all exist, and the nightly job
fails. Each need here is asked of PostgreSQL for that role (has_*_privilege), so verify names
what is missing and migrate knows to re-apply the access SQL.
"""

from dataclasses import dataclass

import psycopg

from . import compiler
from .catalog import Catalog
from .render import FUNCTIONS, digest, quote_ident, signature
from .settings import READER_ROLE, STATSKIT_SCHEMA, WRITER_ROLE, Settings

# The function each job's command calls, by rollup: the user job also reads the user table, a row per user.
JOB_FUNCTIONS = {"platform": "aggregate_daily_statistics", "user": "aggregate_user_statistics"}


@dataclass(frozen=True)
class Need:
    role: str
    what: str  # e.g. "INSERT on public.<the user rollup>"
    sql: str  # a boolean expression of %(role)s
    why: str = ""  # who needs it, for the message


def _table_needs(role: str, table: str, privileges: str, why: str) -> list[Need]:
    return [Need(role, f"{p} on {table}", f"has_table_privilege(%(role)s, to_regclass({_lit(table)}), '{p}')", why)
            for p in privileges.split(",")]


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _execute_need(role: str, settings: Settings, catalog: Catalog, name: str, why: str) -> Need:
    function = signature(settings.schema, name, catalog.users.key_type)
    return Need(role, f"EXECUTE on {function}",
                f"has_function_privilege(%(role)s, to_regprocedure({_lit(function)}), 'execute')", why)


def _usage_need(role: str, schema: str, why: str) -> Need:
    return Need(role, f"USAGE on schema {schema}",
                f"has_schema_privilege(%(role)s, to_regnamespace({_lit(quote_ident(schema))}), 'usage')", why)


def job_needs(settings: Settings, catalog: Catalog, role: str, rollup: str, job: str) -> list[Need]:
    """What `role` needs to run one nightly job: the functions are SECURITY INVOKER, so all of it."""
    why = f"runs {job}"
    needs = [Need(role, "LOGIN (pg_cron's background workers refuse NOLOGIN roles)",
                  "(select rolcanlogin from pg_roles where rolname = %(role)s)", why)]
    if rollup == "partitions":
        return needs + _partition_needs(settings, catalog, role, why)
    table = catalog.user if rollup == "user" else catalog.platform
    schemas = dict.fromkeys((settings.schema, settings.source_schema))
    needs += [_usage_need(role, s, why) for s in schemas]
    needs.append(_execute_need(role, settings, catalog, JOB_FUNCTIONS[rollup], why))
    needs += _table_needs(role, f"{quote_ident(settings.schema)}.{table.table}", "SELECT,INSERT,UPDATE", why)
    if settings.capture:  # the job first takes its change log
        needs.append(_usage_need(role, STATSKIT_SCHEMA, why))
        needs += _table_needs(role, f"{STATSKIT_SCHEMA}.{rollup}_changes", "SELECT,DELETE", why)
        needs.append(_execute_need(role, settings, catalog, f"aggregate_{rollup}_changes", why))
    reads = ([catalog.users.name] if rollup == "user" else []) + table.tables_read
    if rollup == "platform" and settings.shard:  # each fact counted on its home user's shard only
        reads += [t for name in table.tables_read
                  for t in compiler.home_tables(catalog.source_tables[name], catalog.source_tables, catalog.users)]
    for source in dict.fromkeys(reads):
        needs += _table_needs(role, f"{quote_ident(settings.source_schema)}.{source}", "SELECT", why)
    return needs


def _partition_needs(settings: Settings, catalog: Catalog, role: str, why: str) -> list[Need]:
    """Making a partition is creating a table in the rollup's schema and attaching it to a table
    the role owns (or is a member of the owner of)."""
    schema = quote_ident(settings.schema)
    needs = [_usage_need(role, settings.schema, why),
             Need(role, f"CREATE on schema {settings.schema}",
                  f"has_schema_privilege(%(role)s, to_regnamespace({_lit(schema)}), 'create')", why),
             _execute_need(role, settings, catalog, "maintain_statistics_partitions", why)]
    for rollup in (catalog.user, catalog.platform):
        table = f"{schema}.{rollup.table}"
        needs.append(Need(role, f"ownership of {table} (or membership in its owner)",
                          f"(select pg_has_role(%(role)s, relowner, 'usage') from pg_class where oid = to_regclass({_lit(table)}))",
                          why))
    return needs


def role_needs(settings: Settings, catalog: Catalog) -> list[Need]:
    """What access.sql grants the reader and writer roles (deployments with --roles)."""
    if not settings.roles:
        return []
    schema = quote_ident(settings.schema)
    needs = []
    for rollup in (catalog.user, catalog.platform):
        table = f"{schema}.{rollup.table}"
        needs.append(Need(WRITER_ROLE, f"ownership of {table}",
                          f"(select relowner::regrole::text = %(role)s from pg_class where oid = to_regclass({_lit(table)}))"))
        needs += _table_needs(READER_ROLE, table, "SELECT", "reads the rollup")
    for name, spec in FUNCTIONS.items():
        function = signature(settings.schema, name, catalog.users.key_type)
        needs.append(Need(WRITER_ROLE, f"ownership of {function}",
                          f"(select proowner::regrole::text = %(role)s from pg_proc where oid = to_regprocedure({_lit(function)}))"))
        if spec.returns == "record":  # the dashboard's functions
            needs.append(_execute_need(READER_ROLE, settings, catalog, name, "serves the dashboard"))
    needs += job_needs(settings, catalog, WRITER_ROLE, "user", "the nightly user job")
    needs += job_needs(settings, catalog, WRITER_ROLE, "platform", "the nightly platform job")
    if settings.partitioned:
        needs += job_needs(settings, catalog, WRITER_ROLE, "partitions", "the partitions job")
    if settings.row_security:
        table = f"{schema}.{catalog.user.table}"
        policy = f"statskit_own_rows_{digest(settings.row_security)}"
        needs.append(Need(READER_ROLE, f"row security on {table} (policy {policy})",
                          f"(select relrowsecurity from pg_class where oid = to_regclass({_lit(table)}))"
                          f" and exists (select from pg_policy where polrelid = to_regclass({_lit(table)})"
                          f" and polname = {_lit(policy)})", "sees only its user's rows"))
    return needs


def problems(conn: psycopg.Connection, needs: list[Need]) -> list[str]:
    """Each unmet need as one phrase: 'statskit_writer (runs …) lacks INSERT on …'."""
    roles = {r for (r,) in conn.execute("select rolname from pg_roles where rolname = any(%s)",
                                         [list({n.role for n in needs})]).fetchall()}
    found, reported = [], set()
    for need in needs:
        if need.role not in roles:
            if need.role not in reported:
                found.append(f"role {need.role} does not exist")
                reported.add(need.role)
            continue
        if not conn.execute(f"select coalesce({need.sql}, false)", {"role": need.role}).fetchone()[0]:
            who = f"{need.role} ({need.why})" if need.why else need.role
            found.append(f"{who} lacks {need.what}")
    return found
