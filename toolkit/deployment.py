"""What is deployed in a database: statskit's bookkeeping schema, settings, applied migrations, function checksums."""

import hashlib
from dataclasses import dataclass
from datetime import date

import psycopg

from . import compiler, dates
from .catalog import Catalog
from .errors import NotMigrated, StatskitError, UsageError
from .render import FUNCTIONS, quote_ident, signature, sums_digest
from .settings import READER_ROLE, STATSKIT_SCHEMA, WRITER_ROLE, Settings

YOYO_MIGRATION_TABLE = "_yoyo_migration"
MIN_SERVER_VERSION = 150000


# The settings and what migrate applied, by checksum (a fleet's router keeps both too).
CHECKSUMS_SQL = f"""
create schema if not exists {STATSKIT_SCHEMA};
create table if not exists {STATSKIT_SCHEMA}.settings (
    key text primary key,
    value text not null
);
create table if not exists {STATSKIT_SCHEMA}.function_checksums (
    function_name text primary key,
    sha256 text not null,
    applied_at timestamptz not null default now()
);
"""


def record_checksum(conn: psycopg.Connection, name: str, text: str) -> None:
    conn.execute(f"insert into {STATSKIT_SCHEMA}.function_checksums (function_name, sha256) values (%s, %s)"
                 " on conflict (function_name) do update set sha256 = excluded.sha256, applied_at = now()",
                 [name, checksum(text)])


def bookkeeping_sql(key_type: str) -> str:
    """statskit's own tables; a user in them has the catalog's user key type."""
    return CHECKSUMS_SQL + f"""
-- The change log (capture/capture.sql writes it, aggregate_*_changes take it): each user, and the
-- platform, with the first day a late or corrected source row can have changed.
create table if not exists {STATSKIT_SCHEMA}.user_changes (
    user_id {key_type} not null,
    first_day date not null,
    logged_at timestamptz not null default now()
);
create table if not exists {STATSKIT_SCHEMA}.platform_changes (
    first_day date not null,
    logged_at timestamptz not null default now()
);
-- Days whose rows hold a metric's default only because the metric was added after they were written.
create table if not exists {STATSKIT_SCHEMA}.unfilled_metrics (
    rollup_table text not null,
    metric text not null,
    first_day date not null,
    last_day date not null
);
"""



def checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def table_exists(conn: psycopg.Connection, qualified: str) -> bool:
    return conn.execute("select to_regclass(%s) is not null", [qualified]).fetchone()[0]


def stored_settings(conn: psycopg.Connection) -> Settings | None:
    """The settings of the first migrate, or None when statskit was never deployed here."""
    if not table_exists(conn, f"{STATSKIT_SCHEMA}.settings"):
        return None
    rows = dict(conn.execute(f"select key, value from {STATSKIT_SCHEMA}.settings").fetchall())
    return Settings.from_dict(rows) if rows else None


def check_catalog_fits(conn: psycopg.Connection, settings: Settings, catalog: Catalog) -> None:
    """Refuse a catalog this deployment was not made from (statskit run outside its project, or
    with another --sql-dir): its user table is not in the source schema, or its user key type
    is not the one the rollup holds."""
    users = catalog.users
    if not table_exists(conn, f"{quote_ident(settings.source_schema)}.{quote_ident(users.name)}"):
        raise UsageError(f"the catalog's user table {settings.source_schema}.{users.name} does not exist here: is this "
                         f"the project this database was deployed from? (run statskit in it, or give {{sql_dir}})")
    stored_key = conn.execute(
        "select format_type(atttypid, atttypmod) from pg_attribute"
        " where attrelid = to_regclass(%s) and attname = 'user_id' and not attisdropped",
        [f"{quote_ident(settings.schema)}.{quote_ident(catalog.user.table)}"]).fetchone()
    if stored_key and stored_key[0] != users.key_type:
        raise UsageError(f"this deployment keeps users by {stored_key[0]}, the catalog by {users.key_type} "
                         f"({users.name}.{users.key}): a user key type cannot change in place")


def save_settings(conn: psycopg.Connection, settings: Settings) -> None:
    for key, value in settings.as_dict().items():
        conn.execute(
            f"insert into {STATSKIT_SCHEMA}.settings (key, value) values (%s, %s)"
            " on conflict (key) do update set value = excluded.value",
            [key, value],
        )


# Not a setting of the rendering: when migrate last (re)scheduled the jobs, so that verify can tell
# a job that has not had its first night yet from one that stopped running.
JOBS_SCHEDULED_AT = "jobs_scheduled_at"


def record_jobs_scheduled(conn: psycopg.Connection) -> None:
    conn.execute(f"insert into {STATSKIT_SCHEMA}.settings (key, value) values (%s, now()::text)"
                 " on conflict (key) do update set value = excluded.value", [JOBS_SCHEDULED_AT])


def jobs_scheduled_at(conn: psycopg.Connection):
    """When migrate last scheduled the jobs (the first migration's time for a deployment made
    before statskit recorded it), timezone-aware, or None."""
    if not table_exists(conn, f"{STATSKIT_SCHEMA}.{YOYO_MIGRATION_TABLE}"):
        return None
    return conn.execute(
        f"select coalesce((select value::timestamptz from {STATSKIT_SCHEMA}.settings where key = %s),"
        f" (select min(applied_at_utc) at time zone 'UTC' from {STATSKIT_SCHEMA}.{YOYO_MIGRATION_TABLE}))",
        [JOBS_SCHEDULED_AT]).fetchone()[0]


def applied_migrations(conn: psycopg.Connection) -> list[str]:
    if not table_exists(conn, f"{STATSKIT_SCHEMA}.{YOYO_MIGRATION_TABLE}"):
        return []
    rows = conn.execute(
        f"select migration_id from {STATSKIT_SCHEMA}.{YOYO_MIGRATION_TABLE} order by applied_at_utc"
    ).fetchall()
    return [r[0] for r in rows]


def function_checksums(conn: psycopg.Connection) -> dict[str, str]:
    if not table_exists(conn, f"{STATSKIT_SCHEMA}.function_checksums"):
        return {}
    return dict(conn.execute(f"select function_name, sha256 from {STATSKIT_SCHEMA}.function_checksums").fetchall())


def function_exists(conn: psycopg.Connection, settings: Settings, name: str, key_type: str) -> bool:
    return conn.execute("select to_regprocedure(%s) is not null",
                        [signature(settings.schema, name, key_type)]).fetchone()[0]


@dataclass(frozen=True)
class FunctionState:
    name: str
    state: str  # current | changed | missing


def function_states(conn: psycopg.Connection, settings: Settings, rendered: dict[str, str],
                    key_type: str) -> list[FunctionState]:
    """Compare each rendered function with what was applied (by checksum) and what exists."""
    applied = function_checksums(conn)
    states = []
    for name in FUNCTIONS:
        text = rendered[f"functions/{name}.sql"]
        if not function_exists(conn, settings, name, key_type):
            states.append(FunctionState(name, "missing"))
        elif applied.get(name) != checksum(text):
            states.append(FunctionState(name, "changed"))
        else:
            states.append(FunctionState(name, "current"))
    return states


def check_server(conn: psycopg.Connection) -> None:
    version = conn.info.server_version
    if version < MIN_SERVER_VERSION:
        raise StatskitError(f"PostgreSQL {version // 10000} is too old: statskit needs PostgreSQL 15 or later")


def check_source_tables(conn: psycopg.Connection, catalog: Catalog, settings: Settings) -> None:
    """Raise naming every source table, column and type the catalog reads that is missing or wrong."""
    rows = conn.execute(
        "select table_name, column_name, data_type from information_schema.columns where table_schema = %s",
        [settings.source_schema],
    ).fetchall()
    present: dict[str, dict[str, str]] = {}
    for table, column, data_type in rows:
        present.setdefault(table, {})[column] = data_type
    problems = []
    for name, table in catalog.source_tables.items():
        if name not in present:
            problems.append(f"table {name} is missing")
            continue
        for column in table.read_columns:
            got = present[name].get(column.name)
            if got is None:
                problems.append(f"{name}.{column.name} is missing")
            elif got not in column.accepts:
                problems.append(f"{name}.{column.name} is {got}, expected {column.type}")
    if problems:
        raise StatskitError(f"source tables in schema {settings.source_schema} do not match the contract "
                            f"(docs/contract.md): {'; '.join(problems)}; nothing changed")


@dataclass(frozen=True)
class AdvisedIndex:
    """An index migrate advises on a source column (`table` and `column` as PostgreSQL quotes them).
    Partial on a nullable column the nightly step reads (`nullable`): its rows without a value never
    enter it, and the step's range of timestamps implies a value, so PostgreSQL proves it usable.
    The one-user lookups' are whole: a join's key does not prove a partial index's predicate."""

    schema: str
    table: str
    column: str
    nullable: bool

    def __str__(self) -> str:
        return f"{self.schema}.{self.table}({self.column})"

    def statement(self, name: str = "", concurrently: bool = True) -> str:
        how = "concurrently " if concurrently else ""
        where = f" where {self.column} is not null" if self.nullable else ""
        return f"create index {how}{name + ' ' if name else ''}on {self.schema}.{self.table} ({self.column}){where}"

    @property
    def cost(self) -> str:
        """What it costs the application's writes, for the advice."""
        if self.nullable:
            return "an entry for each row once it has a value; an UPDATE that sets or moves it is not HOT"
        return "an entry for each row inserted"


def _not_indexed(conn: psycopg.Connection, catalog: Catalog, settings: Settings,
                 columns: list[tuple[str, str]], partial: bool) -> list[AdvisedIndex]:
    """The indexes advised on the (table, column) of the source schema that no index leads with:
    partial on nullable columns if asked (and then a partial index counts if it is that one, every
    row with a value; otherwise only a whole index counts)."""
    indexed = {(table, column) for table, column in conn.execute(
        "select c.relname, a.attname from pg_index i join pg_class c on c.oid = i.indrelid"
        " join pg_attribute a on a.attrelid = i.indrelid and a.attnum = i.indkey[0]"
        " where c.relnamespace = %s::regnamespace"
        " and (i.indpred is null or %s and pg_get_expr(i.indpred, i.indrelid) = '(' || quote_ident(a.attname) || ' IS NOT NULL)')",
        [quote_ident(settings.source_schema), partial]).fetchall()}
    missing = [(table, column) for table, column in columns if (table, column) not in indexed]
    names = conn.execute("select quote_ident(%s), quote_ident(t), quote_ident(c)"
                         " from unnest(%s::text[], %s::text[]) with ordinality n (t, c, i) order by i",
                         [settings.source_schema, [t for t, _ in missing], [c for _, c in missing]]).fetchall()
    return [AdvisedIndex(schema, table, column, partial and catalog.source_tables[name].column(plain).nullable)
            for (schema, table, column), (name, plain) in zip(names, missing)]


def missing_lookup_indexes(conn: psycopg.Connection, catalog: Catalog, settings: Settings) -> list[AdvisedIndex]:
    """Source columns the one-user paths look users up by that no index leads with: advice."""
    return _not_indexed(conn, catalog, settings, [(name, column) for name, table in catalog.source_tables.items()
                                                  for column in table.lookup], partial=False)


def missing_step_indexes(conn: psycopg.Connection, catalog: Catalog, settings: Settings) -> list[AdvisedIndex]:
    """Source columns the nightly step finds a day's rows by that no index leads with (with change
    capture only: without it there is no step). Advice: each costs the application's writes."""
    if not settings.capture:
        return []
    lookups = {(name, column) for name, table in catalog.source_tables.items() for column in table.lookup}
    return _not_indexed(conn, catalog, settings, [c for c in catalog.step_lookups if c not in lookups],
                        partial=True)


def check_can_deploy(conn: psycopg.Connection, catalog: Catalog, settings: Settings, plan) -> None:
    """Raise, before anything changes, naming every privilege this login lacks for the plan."""
    user, superuser, createrole = conn.execute(
        "select current_user, rolsuper, rolcreaterole from pg_roles where rolname = current_user").fetchone()
    if superuser or plan.empty and not settings.roles:
        return
    missing = []
    for schema in dict.fromkeys((STATSKIT_SCHEMA, settings.schema)):
        exists = conn.execute("select to_regnamespace(%s) is not null", [quote_ident(schema)]).fetchone()[0]
        if not exists and not conn.execute("select has_database_privilege(current_database(), 'create')").fetchone()[0]:
            missing.append(f"CREATE on database {conn.info.dbname} (to create schema {schema})")
        elif exists and not conn.execute("select has_schema_privilege(%s, 'create')", [schema]).fetchone()[0]:
            missing.append(f"CREATE on schema {schema}")
    owners = conn.execute(
        "select c.oid::regclass::text, c.relowner::regrole::text from pg_class c"
        " where c.oid in (select to_regclass(t) from unnest(%s::text[]) t)"
        " and not pg_has_role(current_user, c.relowner, 'usage')",
        [[f"{quote_ident(settings.schema)}.{t}" for t in (catalog.user.table, catalog.platform.table)]],
    ).fetchall()
    missing += [f"membership in {owner}, which owns {table}" for table, owner in owners]
    if settings.roles:
        roles_exist = conn.execute("select count(*) = 2 from pg_roles where rolname in (%s, %s)",
                                   [READER_ROLE, WRITER_ROLE]).fetchone()[0]
        if not roles_exist and not createrole:
            missing.append(f"CREATEROLE (to create {READER_ROLE} and {WRITER_ROLE})")
        ungrantable = conn.execute(
            "select t from unnest(%s::text[]) t where to_regclass(t) is not null"
            " and not has_table_privilege(t, 'select with grant option')",
            [[f"{quote_ident(settings.source_schema)}.{name}" for name in catalog.source_tables]],
        ).fetchall()
        missing += [f"SELECT WITH GRANT OPTION on {t} (to let {WRITER_ROLE} read it)" for (t,) in ungrantable]
    if settings.capture:
        untriggerable = conn.execute(
            "select t from unnest(%s::text[]) t where to_regclass(t) is not null and not has_table_privilege(t, 'trigger')",
            [[f"{quote_ident(settings.source_schema)}.{name}" for name in catalog.source_tables]],
        ).fetchall()
        missing += [f"TRIGGER on {t} (change capture; or deploy with {{no_capture}})" for (t,) in untriggerable]
    if missing:
        raise StatskitError(f"{user} cannot deploy here: it lacks {'; '.join(missing)} "
                            f"(see docs/managed.md); nothing changed")


def drop_bookkeeping(conn: psycopg.Connection) -> None:
    """Remove statskit's schema: settings, checksums, backfill ledger and yoyo's tables."""
    with conn.transaction():
        conn.execute(f"drop schema if exists {STATSKIT_SCHEMA} cascade")


def check_time_zone(conn: psycopg.Connection, settings: Settings) -> None:
    known = conn.execute("select 1 from pg_timezone_names where name = %s", [settings.time_zone]).fetchone()
    if not known:
        raise UsageError(f"unknown time zone {settings.time_zone!r} (see pg_timezone_names)")


def require_deployment(conn: psycopg.Connection) -> Settings:
    """The deployment's settings, or NotMigrated with the command to run."""
    settings = stored_settings(conn)
    if settings is None or not applied_migrations(conn):
        raise NotMigrated(f"database {conn.info.dbname} has no statskit deployment: run statskit migrate first")
    return settings


@dataclass(frozen=True)
class Unfilled:
    table: str
    metric: str
    first: date
    last: date


def record_unfilled(conn: psycopg.Connection, settings: Settings, catalog: Catalog, migration_ids: list[str]) -> list[Unfilled]:
    """For each metric these migrations add to a table that already has rows: the days it is unfilled."""
    for rollup in (catalog.user, catalog.platform):
        added = [m.name for mid in migration_ids for m in rollup.metrics_added_in(mid) if m.removed_in is None]
        if added:
            conn.execute(
                f"insert into {STATSKIT_SCHEMA}.unfilled_metrics (rollup_table, metric, first_day, last_day)"
                f" select %s, metric, min(date), max(date) from {quote_ident(settings.schema)}.{rollup.table},"
                f" unnest(%s::text[]) metric group by metric having count(*) > 0",
                [rollup.table, added])
    return unfilled(conn)


def unfilled(conn: psycopg.Connection) -> list[Unfilled]:
    if not table_exists(conn, f"{STATSKIT_SCHEMA}.unfilled_metrics"):
        return []
    return [Unfilled(*row) for row in conn.execute(
        f"select rollup_table, metric, first_day, last_day from {STATSKIT_SCHEMA}.unfilled_metrics order by 1, 3, 2")]


def mark_filled(conn: psycopg.Connection, table: str, first: date, last: date) -> None:
    """A backfill of every user (or the platform) wrote [first, last]: those days are filled."""
    unfilled_metrics = f"{STATSKIT_SCHEMA}.unfilled_metrics"
    if not table_exists(conn, unfilled_metrics):
        return
    with conn.transaction():
        # the part after the backfilled days, when a range reaches past both ends
        conn.execute(f"insert into {unfilled_metrics} select rollup_table, metric, %s::date + 1, last_day"
                     f" from {unfilled_metrics} where rollup_table = %s and first_day < %s and last_day > %s",
                     [last, table, first, last])
        conn.execute(f"update {unfilled_metrics} set last_day = least(last_day, %s::date - 1)"
                     f" where rollup_table = %s and first_day < %s and last_day >= %s", [first, table, first, first])
        conn.execute(f"update {unfilled_metrics} set first_day = %s::date + 1"
                     f" where rollup_table = %s and first_day between %s and %s and last_day > %s",
                     [last, table, first, last, last])
        conn.execute(f"delete from {unfilled_metrics} where rollup_table = %s and first_day >= %s and last_day <= %s",
                     [table, first, last])


def stale_overloads(conn: psycopg.Connection, settings: Settings, key_type: str) -> list[str]:
    """Our functions' names in the rollup schema with a signature statskit no longer renders
    (an argument added since): left alone, each would linger as a second overload."""
    rows = conn.execute(
        "select p.proname, oidvectortypes(p.proargtypes) from pg_proc p"
        " where p.pronamespace = to_regnamespace(%s) and p.proname = any(%s) order by 1, 2",
        [quote_ident(settings.schema), list(FUNCTIONS)]).fetchall()
    return [f"{quote_ident(settings.schema)}.{name}({args})" for name, args in rows if args != FUNCTIONS[name].arguments(key_type)]


def capture_triggers(conn: psycopg.Connection, settings: Settings, catalog: Catalog) -> int:
    """How many of statskit's capture triggers the source tables carry as their functions read them:
    with their transition tables, and the update trigger for each row (3 per table when installed;
    one an earlier statskit made counts once migrate has re-created it)."""
    return conn.execute(
        "select count(*) from pg_trigger t"
        " join unnest(%s::text[], %s::text[], %s::text[]) as wanted (event, old_table, new_table)"
        "   on t.tgname = 'statskit_capture_' || wanted.event"
        "  and (t.tgoldtable, t.tgnewtable) is not distinct from (wanted.old_table::name, wanted.new_table::name)"
        "  and (t.tgtype & 1 = 1) = (wanted.old_table is null and wanted.new_table is null)"
        " where t.tgrelid in (select to_regclass(r) from unnest(%s::text[]) r)",
        [*map(list, zip(*compiler.TRIGGERS)),
         [f"{quote_ident(settings.source_schema)}.{name}" for name in catalog.source_tables]]).fetchone()[0]


# The function that writes a rollup's day and keeps its sums, by rollup: called on a stored day,
# it sums every key from history and leaves the sums of that day.
ONE_DAY = {"user": "aggregate_user_statistics", "platform": "aggregate_daily_statistics"}


def _sums_table(table: str, suffix: str = "_sums") -> str:
    return f"{STATSKIT_SCHEMA}.{quote_ident(table + suffix)}"


def kept_sums_day(conn: psycopg.Connection, table: str) -> date | None:
    """The day the nightly step's kept sums of a rollup table are of (None before a first night)."""
    row = conn.execute(f"select date from {_sums_table(table, '_sums_day')}").fetchone()
    return row[0] if row else None


def write_day_keeping_sums(conn: psycopg.Connection, settings: Settings, rollup: str, day: date) -> int:
    """The nightly function of a rollup ("user" or "platform") on a stored day: the keys without
    sums of the day before are summed from history, and the sums of the day are kept (if it is
    not before the day they were of). Returns the rows it wrote (none where they were right)."""
    arguments = "null, %s" if rollup == "user" else "%s"
    return conn.execute(f"select {quote_ident(settings.schema)}.{ONE_DAY[rollup]}({arguments})", [day]).fetchone()[0]


@dataclass(frozen=True)
class SumsRebuild:
    rollup: str  # "user" or "platform"
    table: str
    day: date  # the last stored day before today: the sums are rebuilt as of it


def sums_to_rebuild(conn: psycopg.Connection, settings: Settings, catalog: Catalog) -> list[SumsRebuild]:
    """The rollups whose nightly sums the functions about to be applied re-create, because what
    defines them changed (a metric added, a span or a sum renamed, another time zone), each with
    the last day before today its table stores: migrate rebuilds them as of that day, so the next
    night steps from them instead of summing every key from history."""
    if not settings.capture:
        return []
    found = []
    yesterday = dates.yesterday(conn, settings.time_zone)
    for kind, rollup in (("user", catalog.user), ("platform", catalog.platform)):
        comment = conn.execute("select obj_description(c.oid, 'pg_class') from pg_class c where c.oid = to_regclass(%s)",
                               [_sums_table(rollup.table)]).fetchone()
        if comment is None or comment[0] == f"statskit sums {sums_digest(rollup, settings)}":
            continue  # none yet (the first night sums from history), or still what they were
        day = conn.execute(f"select max(date) from {quote_ident(settings.schema)}.{rollup.table} where date <= %s",
                           [yesterday]).fetchone()[0]
        if day is not None:
            found.append(SumsRebuild(kind, rollup.table, day))
    return found


def rebuild_sums(conn: psycopg.Connection, settings: Settings, rebuild: SumsRebuild) -> None:
    """Rebuild the sums as of the day, leaving its stored rows as they are: the day is written
    again from history inside a savepoint (which leaves its sums and the day they are of), the
    two tables are copied out, the savepoint is rolled back (the rows the new definitions would
    change stay as stored; a backfill rewrites them), and the copies go back into the re-created
    tables."""
    tables = [_sums_table(rebuild.table), _sums_table(rebuild.table, "_sums_day")]
    conn.execute("savepoint statskit_sums")
    write_day_keeping_sums(conn, settings, rebuild.rollup, rebuild.day)
    copies = {}
    for table in tables:
        with conn.cursor().copy(f"copy {table} to stdout") as copy:
            copies[table] = [bytes(block) for block in copy]
    conn.execute("rollback to savepoint statskit_sums")
    for table, data in copies.items():
        with conn.cursor().copy(f"copy {table} from stdin") as copy:
            for block in data:
                copy.write(block)
    conn.execute("release savepoint statskit_sums")
