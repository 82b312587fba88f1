"""A fleet's router (docs/scaling.md): the one database the dashboard connects to.

PL/Proxy runs each user's dashboard call on the user's shard, by the fleet's placement, as the
role `statskit_router` that may only run the routed functions there (fleet/shard.sql). The
platform's rows are kept here, merged from every shard's partial sums by
merge_platform_statistics: a day only once every shard has it, rewritten when a shard's sums
change (late data), by a pg_cron job of the router's own every hour and by `backfill --fleet`.
"""

import os
from dataclasses import dataclass, field

import psycopg

from . import db, deployment
from .catalog import Catalog
from .errors import StatskitError
from .compiler import quote_literal
from .fleet import Fleet, check_of
from .render import HASH_PLACEMENT, ROUTER_FILE, quote_ident, render_all
from .settings import FLEET_CLUSTER, ROUTER_ROLE, STATSKIT_SCHEMA, Settings
from .verify import Check

# Hourly, after the shards' nights (their platform jobs at 00:00 UTC): a day a late shard
# writes is merged within the hour, and nothing races a shard's job (a day waits for all).
MERGE_SCHEDULE = "30 * * * *"
# libpq reads it: the router role's password, put into the cluster's user mapping (never printed)
PASSWORD_VARIABLE = "STATSKIT_ROUTER_PASSWORD"
ROUTED = ("user_metric", "user_kpis", "platform_metric", "merge_platform_statistics")


@dataclass
class RouterDone:
    """What migrate did on the router."""

    applied: list[str] = field(default_factory=list)  # "cluster", "router.sql", "merge job"

    @property
    def empty(self) -> bool:
        return not self.applied


def merge_job(conn: psycopg.Connection) -> str:
    """The merge job's name: the router database's own, so two routers of one server never share it."""
    return f"merge-platform-statistics-{conn.info.dbname}"


def cluster_options(fleet: Fleet) -> dict[str, str]:
    """The PL/Proxy cluster's partitions, p0 .. pN-1 in placement order: each shard's server and
    database, without its login (the user mapping gives the router role)."""
    options = {}
    for shard in fleet.shards:
        parts = {k: v for k, v in db.dsn_parts(shard.dsn).items() if k not in ("user", "password")}
        options[f"p{shard.index}"] = psycopg.conninfo.make_conninfo(**parts)
    return options


def rendered_sql(fleet: Fleet, sql_dir, settings: Settings, catalog: Catalog) -> str:
    """fleet/router.sql, then one server's platform_metric, which reads the router's platform table."""
    placement = f"{fleet.placement}(p_user_id)" if fleet.placement else HASH_PLACEMENT
    rendered = render_all(sql_dir, settings, catalog, placement)
    return rendered[ROUTER_FILE] + "\n" + rendered["functions/platform_metric.sql"]


def _stored_options(conn: psycopg.Connection) -> dict[str, str] | None:
    row = conn.execute("select srvoptions from pg_foreign_server where srvname = %s", [FLEET_CLUSTER]).fetchone()
    if row is None:
        return None
    return dict(option.split("=", 1) for option in row[0] or [])


def _require_superuser(conn: psycopg.Connection) -> None:
    if not conn.execute("select rolsuper from pg_roles where rolname = current_user").fetchone()[0]:
        raise StatskitError(
            f"the router's PL/Proxy functions need a superuser (PL/Proxy is an untrusted language), and "
            f"{conn.info.user} is not one; nothing changed")


def deploy(fleet: Fleet, sql_dir, settings: Settings, catalog: Catalog) -> RouterDone:
    """Bring the router up to date, in one transaction: the cluster (re-made when the fleet file's
    shards or their order changed), the routed functions and the platform table; then its job."""
    done = RouterDone()
    text = rendered_sql(fleet, sql_dir, settings, catalog)
    wanted = cluster_options(fleet)
    with db.connect(fleet.router, autocommit=True) as conn:
        _require_superuser(conn)
        with conn.transaction():
            conn.execute(deployment.CHECKSUMS_SQL)
            if _stored_options(conn) != wanted:
                conn.execute("create extension if not exists plproxy")
                conn.execute(f"drop server if exists {FLEET_CLUSTER} cascade")  # with its user mapping
                options = ", ".join(f"{k} {quote_literal(v)}" for k, v in wanted.items())
                conn.execute(f"create server {FLEET_CLUSTER} foreign data wrapper plproxy options ({options})")
                login = {"user": ROUTER_ROLE, **({"password": os.environ[PASSWORD_VARIABLE]}
                                                 if os.environ.get(PASSWORD_VARIABLE) else {})}
                conn.execute(f"create user mapping for public server {FLEET_CLUSTER} options "
                             f"({', '.join(f'{k} {quote_literal(v)}' for k, v in login.items())})")
                # the dashboard's roles call through it; what they reach is the router role's only
                conn.execute(f"grant usage on foreign server {FLEET_CLUSTER} to public")
                done.applied.append(f"cluster {FLEET_CLUSTER} of {len(wanted)} shards")
            if deployment.function_checksums(conn).get("router") != deployment.checksum(text):
                conn.execute(text)
                deployment.record_checksum(conn, "router", text)
                done.applied.append("routed functions and platform table (fleet/router.sql)")
        if _schedule_merge(conn, fleet.router, settings):
            done.applied.append(f"pg_cron job {merge_job(conn)} ({MERGE_SCHEDULE})")
    return done


def _merge_command(settings: Settings) -> str:
    return f"select {quote_ident(settings.schema)}.merge_platform_statistics()"


def _cron(conn: psycopg.Connection, dsn: str) -> psycopg.Connection:
    """pg_cron's database on the router's server, with the router's (superuser) login."""
    cron_db = conn.execute("select current_setting('cron.database_name', true)").fetchone()[0]
    if not cron_db:
        raise StatskitError("pg_cron is not loaded on the router's server: the platform merge would have no job")
    return db.connect(db.with_database(dsn, cron_db), autocommit=True)


def _schedule_merge(conn: psycopg.Connection, dsn: str, settings: Settings) -> bool:
    """Schedule the merge job unless it is there as wanted; True when it was (re)scheduled."""
    name, command = merge_job(conn), _merge_command(settings)
    with _cron(conn, dsn) as cron_conn:
        found = cron_conn.execute("select schedule, command, database, active from cron.job where jobname = %s",
                                  [name]).fetchone()
        if found == (MERGE_SCHEDULE, command, conn.info.dbname, True):
            return False
        cron_conn.execute("select cron.schedule_in_database(%s, %s, %s, %s)",
                          [name, MERGE_SCHEDULE, command, conn.info.dbname])
        return True


def merge(fleet: Fleet, settings: Settings) -> int:
    """Merge every day each shard has now; the rows whose numbers changed."""
    with db.connect(fleet.router, autocommit=True) as conn:
        return conn.execute(_merge_command(settings)).fetchone()[0]


def checks(fleet: Fleet, sql_dir, settings: Settings, catalog: Catalog, shard_days: dict) -> list[Check]:
    """The router's checks: its functions as rendered, its cluster as the fleet file lists the
    shards, its merge job, and its platform rows through the last day every shard has.
    `shard_days`: each reachable shard's last day of partial sums."""
    try:
        with db.connect(fleet.router, autocommit=True) as conn:
            text = rendered_sql(fleet, sql_dir, settings, catalog)
            missing = [name for name in ROUTED if conn.execute(
                "select not exists (select from pg_proc where proname = %s and pronamespace = to_regnamespace(%s))",
                [name, quote_ident(settings.schema)]).fetchone()[0]]
            stale = deployment.function_checksums(conn).get("router") != deployment.checksum(text) \
                if deployment.table_exists(conn, f"{STATSKIT_SCHEMA}.function_checksums") else True
            functions = [f"missing: {', '.join(missing)}"] if missing else []
            functions += ["fleet/router.sql differs from what migrate applied"] if stale and not missing else []
            stored, wanted = _stored_options(conn), cluster_options(fleet)
            cluster = ([f"no PL/Proxy cluster {FLEET_CLUSTER}"] if stored is None else
                       [f"{k}: {stored.get(k) or 'none'}, the fleet file says {wanted.get(k) or 'none'}"
                        for k in sorted(set(stored) | set(wanted), key=lambda k: (len(k), k))
                        if k.startswith("p") and k[1:].isdigit() and stored.get(k) != wanted.get(k)])
            with _cron(conn, fleet.router) as cron_conn:
                job = cron_conn.execute("select schedule, command, active from cron.job where jobname = %s"
                                        " and database = %s", [merge_job(conn), conn.info.dbname]).fetchone()
            jobs = ([] if job == (MERGE_SCHEDULE, _merge_command(settings), True) else
                    [f"job {merge_job(conn)} " + ("missing" if job is None else f"is {job}")])
            last = conn.execute(f"select max(date) from {quote_ident(settings.schema)}.{catalog.platform.table}"
                                ).fetchone()[0] if not missing else None
    except (StatskitError, psycopg.Error) as exc:
        return [Check("router", "fail", f"could not run on {db.describe(fleet.router)}: "
                                        f"{db.mask_secrets(db.first_line(exc), fleet.router)}")]
    merged = _merge_state(last, shard_days)
    repair = "; statskit migrate --fleet repairs it"
    return [
        check_of("router:functions", functions, repair, f"{', '.join(ROUTED)} as fleet/router.sql renders them"),
        check_of("router:cluster", cluster, repair, f"{FLEET_CLUSTER}: {len(wanted)} shards in the fleet file's order"),
        check_of("router:jobs", jobs, repair, f"{MERGE_SCHEDULE}, active"),
        check_of("router:merge", merged, "", f"platform rows through {last}, the last day every shard has"),
    ]


def _merge_state(last, shard_days: dict) -> list[str]:
    days = [d for d in shard_days.values() if d is not None]
    if not days:
        return []
    complete, newest = min(days), max(days)
    problems = [f"{shard.label} has platform sums through {day or 'no day'} only, the others through {newest}: "
                f"the router waits for it" for shard, day in shard_days.items() if day != newest]
    if last is None or last < complete:
        problems.append(f"the router's platform rows end on {last or 'no day'}, every shard has {complete}: "
                        f"merge_platform_statistics has not run since (its job, or statskit backfill --fleet)")
    return problems


