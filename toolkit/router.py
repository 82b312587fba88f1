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

from . import cron, db, deployment
from .catalog import Catalog
from .errors import StatskitError
from .compiler import quote_literal
from .fleet import Fleet, check_of
from .render import HASH_PLACEMENT, ROUTER_ENGINE_FILES, ROUTER_FILE, quote_ident, render_all
from .settings import FLEET_CLUSTER, ROUTER_ROLE, STATSKIT_SCHEMA, Settings
from .verify import Check

# Hourly, after the shards' nights (their platform jobs at 00:00 UTC): a day a late shard
# writes is merged within the hour, and nothing races a shard's job (a day waits for all).
MERGE_SCHEDULE = "30 * * * *"
# The router role's password on the shards' servers: migrate puts it into the user mappings (never printed)
PASSWORD_VARIABLE = "STATSKIT_ROUTER_PASSWORD"
ROUTED = ("user_metric", "user_kpis", "platform_metric", "merge_platform_statistics")
# How many of the dblink extension's functions PUBLIC may execute
PUBLIC_DBLINK_SQL = """
select count(*) from pg_depend d join pg_proc p on p.oid = d.objid
where d.classid = 'pg_proc'::regclass and d.deptype = 'e'
  and d.refobjid = (select oid from pg_extension where extname = 'dblink')
  and exists (select from aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
              where a.grantee = 0 and a.privilege_type = 'EXECUTE')
"""


@dataclass
class RouterDone:
    """What migrate did on the router."""

    applied: list[str] = field(default_factory=list)  # how it reaches the shards, its functions, its job

    @property
    def empty(self) -> bool:
        return not self.applied


def merge_job(conn: psycopg.Connection) -> str:
    """The merge job's name: the router database's own, so two routers of one server never share it."""
    return f"merge-platform-statistics-{conn.info.dbname}"


def _shard_address(shard) -> dict[str, str]:
    """A shard's server and database, without its login (the user mapping gives the router role)."""
    return {k: v for k, v in db.dsn_parts(shard.dsn).items() if k not in ("user", "password")}


def _options_sql(options: dict[str, str]) -> str:
    return ", ".join(f"{k} {quote_literal(v)}" for k, v in options.items())


def _superuser(conn: psycopg.Connection) -> bool:
    return conn.execute("select rolsuper from pg_roles where rolname = current_user").fetchone()[0]


def _router_login() -> dict[str, str]:
    password = os.environ.get(PASSWORD_VARIABLE)
    return {"user": ROUTER_ROLE, **({"password": password} if password else {})}


class PlProxy:
    """PL/Proxy: one SQL/MED server, the cluster, whose partitions p0 .. pN-1 are the shards."""

    name = "plproxy"

    def wanted(self, fleet: Fleet) -> dict[str, dict[str, str]]:
        partitions = {f"p{s.index}": psycopg.conninfo.make_conninfo(**_shard_address(s)) for s in fleet.shards}
        # The application's placement returns the shard's index itself, for any number of shards:
        # PL/Proxy maps it to partition index % N, where its hash mapping needs N a power of two.
        return {FLEET_CLUSTER: {**partitions, **({"modular_mapping": "1"} if fleet.placement else {})}}

    def stored(self, conn: psycopg.Connection) -> dict[str, dict[str, str]]:
        return _servers(conn, f"^{FLEET_CLUSTER}$")

    def require(self, conn: psycopg.Connection, settings: Settings) -> None:
        if not _superuser(conn):
            raise StatskitError(
                f"the router's PL/Proxy functions need a superuser (PL/Proxy is an untrusted language), and "
                f"{conn.info.user} is not one: use engine = \"dblink\" in the fleet file's [router]; nothing changed")
        conn.execute("create extension if not exists plproxy")

    def make(self, conn: psycopg.Connection, servers: dict[str, dict[str, str]]) -> None:
        conn.execute(f"drop server if exists {FLEET_CLUSTER} cascade")  # with its user mapping
        conn.execute(f"create server {FLEET_CLUSTER} foreign data wrapper plproxy "
                     f"options ({_options_sql(servers[FLEET_CLUSTER])})")
        conn.execute(f"create user mapping for public server {FLEET_CLUSTER} options ({_options_sql(_router_login())})")
        # the dashboard's roles call through it; what they reach is the router role's only
        conn.execute(f"grant usage on foreign server {FLEET_CLUSTER} to public")


class Dblink:
    """dblink (contrib, on managed services too): one dblink_fdw server per shard,
    statskit_shard0 .. statskit_shardN-1, and the deployer's user mapping for each."""

    name = "dblink"

    def wanted(self, fleet: Fleet) -> dict[str, dict[str, str]]:
        return {f"statskit_shard{s.index}": _shard_address(s) for s in fleet.shards}

    def stored(self, conn: psycopg.Connection) -> dict[str, dict[str, str]]:
        return _servers(conn, "^statskit_shard[0-9]+$")

    def require(self, conn: psycopg.Connection, settings: Settings) -> None:
        if self.schema(conn) is None:
            raise StatskitError(
                f"dblink is not installed in the router's database {conn.info.dbname}: a superuser (or the "
                f"service's admin role) runs CREATE EXTENSION dblink there; nothing changed")
        if not conn.execute("select has_foreign_data_wrapper_privilege('dblink_fdw', 'usage')").fetchone()[0]:
            raise StatskitError(
                f"{conn.info.user} may not use dblink's foreign data wrapper in {conn.info.dbname}: a superuser "
                f"(or the service's admin role) runs GRANT USAGE ON FOREIGN DATA WRAPPER dblink_fdw TO "
                f"{conn.info.user} there; nothing changed")
        if settings.row_security and conn.execute(PUBLIC_DBLINK_SQL).fetchone()[0]:
            raise StatskitError(
                f"under row security, PUBLIC may not execute dblink's functions in {conn.info.dbname}: with them a "
                f"dashboard role could use the connections to the shards its session keeps and name another user; "
                f"an admin revokes them from PUBLIC and grants them to {conn.info.user} (docs/scaling.md, \"Row "
                f"security through the router\"); nothing changed")
        if not _superuser(conn) and not os.environ.get(PASSWORD_VARIABLE):
            raise StatskitError(
                f"dblink logs a non-superuser into the shards with a password only: set ${PASSWORD_VARIABLE} to "
                f"{ROUTER_ROLE}'s password on the shards' servers; nothing changed")

    @staticmethod
    def schema(conn: psycopg.Connection) -> str | None:
        row = conn.execute("select extnamespace::regnamespace::text from pg_extension where extname = 'dblink'"
                           ).fetchone()
        return row[0] if row else None

    def make(self, conn: psycopg.Connection, servers: dict[str, dict[str, str]]) -> None:
        for name in self.stored(conn):
            conn.execute(f"drop server {name} cascade")
        for name, options in servers.items():
            conn.execute(f"create server {name} foreign data wrapper dblink_fdw options ({_options_sql(options)})")
            conn.execute(f"create user mapping for current_user server {name} options ({_options_sql(_router_login())})")


ENGINES = {engine.name: engine for engine in (PlProxy(), Dblink())}



def _servers(conn: psycopg.Connection, pattern: str) -> dict[str, dict[str, str]]:
    return {name: dict(option.split("=", 1) for option in options or []) for name, options in conn.execute(
        "select srvname, srvoptions from pg_foreign_server where srvname ~ %s order by srvname", [pattern])}


def rendered_sql(fleet: Fleet, conn: psycopg.Connection, sql_dir, settings: Settings, catalog: Catalog) -> str:
    """The engine's file, fleet/router.sql, and one server's platform_metric, which reads the
    router's platform table."""
    placement = f"{fleet.placement}(p_user_id)" if fleet.placement else HASH_PLACEMENT
    rendered = render_all(sql_dir, settings, catalog, placement, Dblink.schema(conn) or "public", len(fleet.shards))
    return "\n".join(rendered[f] for f in (ROUTER_ENGINE_FILES[fleet.router_engine], ROUTER_FILE,
                                           "functions/platform_metric.sql"))


def deploy(fleet: Fleet, sql_dir, settings: Settings, catalog: Catalog, cron_dsn: str | None = None) -> RouterDone:
    """Bring the router up to date, in one transaction: how it reaches the shards (re-made when
    the fleet file's shards or their order changed), the routed functions and the platform table;
    then its merge job."""
    done, engine = RouterDone(), ENGINES[fleet.router_engine]
    wanted = engine.wanted(fleet)
    with db.connect(fleet.router, autocommit=True) as conn:
        with conn.transaction():
            engine.require(conn, settings)
            text = rendered_sql(fleet, conn, sql_dir, settings, catalog)
            conn.execute(deployment.CHECKSUMS_SQL)
            if engine.stored(conn) != wanted:
                engine.make(conn, wanted)
                done.applied.append(f"{engine.name}: {len(fleet.shards)} shards in the fleet file's order")
            if deployment.function_checksums(conn).get("router") != deployment.checksum(text):
                conn.execute(text)
                deployment.record_checksum(conn, "router", text)
                done.applied.append(f"routed functions and platform table (fleet/{engine.name} router)")
        if _schedule_merge(conn, fleet.router, settings, cron_dsn):
            done.applied.append(f"pg_cron job {merge_job(conn)} ({MERGE_SCHEDULE})")
    return done


def _merge_command(settings: Settings) -> str:
    return f"select {quote_ident(settings.schema)}.merge_platform_statistics()"


def _merge_job_as(cron_conn: psycopg.Connection, conn: psycopg.Connection) -> tuple | None:
    """(schedule, command, active) of this router database's merge job, None when it has none."""
    return cron_conn.execute("select schedule, command, active from cron.job where jobname = %s and database = %s",
                             [merge_job(conn), conn.info.dbname]).fetchone()


def _wanted_job(settings: Settings) -> tuple:
    return (MERGE_SCHEDULE, _merge_command(settings), True)


def _connect_cron(conn: psycopg.Connection, dsn: str, cron_dsn: str | None) -> psycopg.Connection:
    """pg_cron's database on the router's server: --cron-dsn, else where migrate found it (kept in
    the router's statskit.settings), else the server's cron.database_name."""
    stored = deployment.stored_settings(conn) if deployment.table_exists(conn, f"{STATSKIT_SCHEMA}.settings") else None
    return cron.connect_cron(dsn, conn, cron_dsn, stored or Settings())


def _schedule_merge(conn: psycopg.Connection, dsn: str, settings: Settings, cron_dsn: str | None) -> bool:
    """Schedule the merge job unless it is there as wanted, and keep where pg_cron lives; True
    when it was (re)scheduled."""
    with _connect_cron(conn, dsn, cron_dsn) as cron_conn:
        deployment.save_settings(conn, Settings(cron_database=cron_conn.info.dbname))
        if _merge_job_as(cron_conn, conn) == _wanted_job(settings):
            return False
        cron_conn.execute("select cron.schedule_in_database(%s, %s, %s, %s)",
                          [merge_job(conn), MERGE_SCHEDULE, _merge_command(settings), conn.info.dbname])
        return True


def merge(fleet: Fleet, settings: Settings) -> int:
    """Merge every day each shard has now; the rows whose numbers changed."""
    with db.connect(fleet.router, autocommit=True) as conn:
        return conn.execute(_merge_command(settings)).fetchone()[0]


def checks(fleet: Fleet, sql_dir, settings: Settings, catalog: Catalog, shard_days: dict,
           cron_dsn: str | None = None) -> list[Check]:
    """The router's checks: its functions as rendered, how it reaches the shards against the
    fleet file (in order), its merge job, and its platform rows through the last day every shard
    has. `shard_days`: each reachable shard's last day of partial sums."""
    engine = ENGINES[fleet.router_engine]
    try:
        with db.connect(fleet.router, autocommit=True) as conn:
            text = rendered_sql(fleet, conn, sql_dir, settings, catalog)
            missing = [name for name in ROUTED if conn.execute(
                "select not exists (select from pg_proc where proname = %s and pronamespace = to_regnamespace(%s))",
                [name, quote_ident(settings.schema)]).fetchone()[0]]
            stale = deployment.function_checksums(conn).get("router") != deployment.checksum(text) \
                if deployment.table_exists(conn, f"{STATSKIT_SCHEMA}.function_checksums") else True
            functions = [f"missing: {', '.join(missing)}"] if missing else []
            functions += ["the routed functions differ from what migrate applied"] if stale and not missing else []
            cluster = _differences(engine.stored(conn), engine.wanted(fleet))
            with _connect_cron(conn, fleet.router, cron_dsn) as cron_conn:
                job = _merge_job_as(cron_conn, conn)
            jobs = ([] if job == _wanted_job(settings) else
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
        check_of("router:cluster", cluster, repair, f"{engine.name}: {len(fleet.shards)} shards in the fleet file's order"),
        check_of("router:jobs", jobs, repair, f"{MERGE_SCHEDULE}, active"),
        check_of("router:merge", merged, "", f"platform rows through {last}, the last day every shard has"),
    ]


def _differences(stored: dict[str, dict[str, str]], wanted: dict[str, dict[str, str]]) -> list[str]:
    """Each server, or partition of one, that differs from the fleet file."""
    out = []
    for server in sorted(set(stored) | set(wanted)):
        if server not in stored:
            out.append(f"no server {server}")
            continue
        have, want = stored[server], wanted.get(server, {})
        keys = sorted({k for k in set(have) | set(want) if k in want or k.startswith("p") and k[1:].isdigit()},
                      key=lambda k: (len(k), k))
        out += [f"{server if len(wanted) > 1 else ''}{'.' if len(wanted) > 1 else ''}{k}: {have.get(k) or 'none'}, "
                f"the fleet file says {want.get(k) or 'none'}" for k in keys if have.get(k) != want.get(k)]
    return out


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


