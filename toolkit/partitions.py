"""The rollup tables' partitions: what a deployment has, and converting it in place.

Each rollup table is partitioned by range of date, one partition per period (settings). The
partitions themselves are made by the deployment's procedure maintain_statistics_partitions
(rendered in sql/functions/), which migrate, backfill and a daily pg_cron job call. This module
turns a table made unpartitioned (migration 0001 always makes one) into a partitioned one and
back, without rewriting the rows it holds:

1. in transactions of their own: `ADD CHECK (date < bound) NOT VALID`, then `VALIDATE` it
   (a scan that lets readers and writers go on), so that 2. needs no scan;
2. in migrate's one transaction: rename the table and its indexes, create the partitioned
   table in its place (same columns, its identity going on from the old one's sequence, primary
   key (user_id, date)), attach the old table as the partition of every day before bound, and
   give the new table the old one's comment, owner, grants and policies.

An empty table (a new deployment) is dropped instead of attached. `partition_period = "none"`
turns a partitioned table back into one (`unswap`): the largest partition becomes the table and
takes the others' rows.
"""

from dataclasses import dataclass
from datetime import date

import psycopg

from . import compiler
from .catalog import Catalog, Rollup
from .deployment import table_exists
from .errors import StatskitError
from .render import quote_ident
from .settings import PERIOD_LENGTHS, Settings

# The CHECK constraint that lets ATTACH PARTITION skip its scan of a converted table.
BOUND_CHECK = "{table}_partition_bound"


@dataclass(frozen=True)
class Partition:
    name: str
    first_day: date | None  # None: unbounded (the converted table's MINVALUE)
    after_day: date | None


def _qualified(settings: Settings, table: str) -> str:
    return f"{quote_ident(settings.schema)}.{table}"


def rollups(catalog: Catalog) -> tuple[Rollup, Rollup]:
    return catalog.user, catalog.platform


def key_columns(catalog: Catalog, rollup: Rollup) -> str:
    return "user_id, date" if rollup is catalog.user else "date"


def is_partitioned(conn: psycopg.Connection, settings: Settings, table: str) -> bool:
    return conn.execute("select relkind = 'p' from pg_class where oid = to_regclass(%s)",
                        [_qualified(settings, table)]).fetchone() == (True,)


def partitions(conn: psycopg.Connection, settings: Settings, table: str) -> list[Partition]:
    query = compiler.rollup_partition_bounds(f"to_regclass({compiler.quote_literal(_qualified(settings, table))})")
    return [Partition(*row) for row in conn.execute(f"select * from ({query}) as b order by b.first_day nulls first")]


def differences(conn: psycopg.Connection, settings: Settings, table: str) -> list[str]:
    """The statements that would make every partition's owner, grants and policies its table's."""
    query = compiler.rollup_partition_differences(f"to_regclass({compiler.quote_literal(_qualified(settings, table))})")
    return [change for change, in conn.execute(f"select d.change from ({query}) as d order by d.step")]


def wanted_periods(conn: psycopg.Connection, settings: Settings, first: date | None = None) -> list[date]:
    """The first day of each period from first's (default: today's) to two periods after today's."""
    return [day for day, in conn.execute(
        "select day::date from generate_series(date_trunc(%(period)s, least(%(first)s, (now() at time zone %(tz)s)::date)),"
        " date_trunc(%(period)s, (now() at time zone %(tz)s)::date) + 2 * %(length)s::interval,"
        " %(length)s::interval) as day",
        {"period": settings.partition_period, "tz": settings.time_zone, "first": first,
         "length": PERIOD_LENGTHS[settings.partition_period]})]


def missing_periods(conn: psycopg.Connection, settings: Settings, table: str, first: date | None = None) -> list[date]:
    have = partitions(conn, settings, table)
    return [day for day in wanted_periods(conn, settings, first)
            if not any((p.first_day is None or p.first_day <= day) and (p.after_day is None or day < p.after_day)
                       for p in have)]


def retention_edge(conn: psycopg.Connection, settings: Settings) -> date | None:
    """The first day kept (None: no retention)."""
    if not settings.retention:
        return None
    return conn.execute(f"select {compiler.retention_edge(settings.retention, compiler.quote_literal(settings.time_zone))}").fetchone()[0]


def first_day(conn: psycopg.Connection, settings: Settings, catalog: Catalog) -> date | None:
    """The first day any rollup row can have: the first user's signup (None: no users yet), or
    the retention edge after it."""
    users = catalog.users
    day = conn.execute(f"select min(({users.created_at} at time zone %s)::date)"
                       f" from {quote_ident(settings.source_schema)}.{users.name}", [settings.time_zone]).fetchone()[0]
    kept_from = retention_edge(conn, settings)
    return max(day, kept_from) if day and kept_from else day


def maintain(conn: psycopg.Connection, settings: Settings, first: date | None = None, last: date | None = None,
             lock_timeout: float = 2.0) -> None:
    """Create the partitions from first's period to two periods after today's (or last's), each
    in a short transaction of its own; conn must be in autocommit (the procedure commits)."""
    conn.execute(f"call {quote_ident(settings.schema)}.maintain_statistics_partitions(%s, %s, make_interval(secs => %s))",
                 [first, last, lock_timeout])


# -- conversion ---------------------------------------------------------------------------------

def conversion_bound(conn: psycopg.Connection, settings: Settings, table: str) -> date:
    """The first day the converted table will not hold: the period after the one two periods
    from today (or after its last stored day): slack for the nights until the swap commits."""
    return conn.execute(
        f"select (date_trunc(%s, greatest(max(date), (now() at time zone %s)::date)) + 3 * %s::interval)::date"
        f" from {_qualified(settings, table)}",
        [settings.partition_period, settings.time_zone, PERIOD_LENGTHS[settings.partition_period]]).fetchone()[0]


def _bound_check(conn: psycopg.Connection, settings: Settings, table: str) -> tuple[str, bool] | None:
    """(definition, validated) of the table's bound check, if it has one."""
    return conn.execute(
        "select pg_get_constraintdef(oid), convalidated from pg_constraint where conrelid = to_regclass(%s) and conname = %s",
        [_qualified(settings, table), BOUND_CHECK.format(table=table)]).fetchone()


def has_rows(conn: psycopg.Connection, settings: Settings, table: str) -> bool:
    return conn.execute(f"select exists (select from {_qualified(settings, table)})").fetchone()[0]


def preparation(conn: psycopg.Connection, settings: Settings, table: str) -> list[str]:
    """The statements, each committed alone, that make the swap need no scan of a populated table:
    a bound check added NOT VALID (a moment's lock), then validated (SHARE UPDATE EXCLUSIVE)."""
    if not has_rows(conn, settings, table):
        return []
    qualified, check = _qualified(settings, table), BOUND_CHECK.format(table=table)
    bound = conversion_bound(conn, settings, table)
    wanted = f"CHECK ((date < '{bound.isoformat()}'::date))"
    found = _bound_check(conn, settings, table)
    statements = []
    if found and found[0] != wanted:  # left by an earlier attempt, for other days
        statements.append(f"alter table {qualified} drop constraint {check}")
    if not found or found[0] != wanted:
        statements.append(f"alter table {qualified} add constraint {check} check (date < '{bound.isoformat()}') not valid")
    if not found or found[0] != wanted or not found[1]:
        statements.append(f"alter table {qualified} validate constraint {check}")
    return statements


def conversions(conn: psycopg.Connection, settings: Settings, catalog: Catalog) -> list[tuple[Rollup, str]]:
    """(rollup, "partition" or "unpartition") for each rollup table whose layout is not the settings'
    (a table migrate has yet to create is made unpartitioned by migration 0001, then converted)."""
    wanted = []
    for rollup in rollups(catalog):
        partitioned = is_partitioned(conn, settings, rollup.table)
        if settings.partitioned != partitioned:
            wanted.append((rollup, "partition" if settings.partitioned else "unpartition"))
    return wanted


def preparations(conn: psycopg.Connection, settings: Settings, converting: list[tuple[Rollup, str]]) -> list[str]:
    """Every statement to commit alone before the swaps of `converting` (see `conversions`,
    `preparation`): a table migrate has yet to create needs none."""
    return [statement for rollup, change in converting
            if change == "partition" and table_exists(conn, _qualified(settings, rollup.table))
            for statement in preparation(conn, settings, rollup.table)]


def _indexes(conn: psycopg.Connection, qualified: str) -> list[tuple[str, bool, bool]]:
    """(name, is the primary key, is unique) of each index of a table."""
    return conn.execute("select c.relname, i.indisprimary, i.indisunique from pg_index i join pg_class c on c.oid = i.indexrelid"
                        " where i.indrelid = to_regclass(%s) order by c.relname", [qualified]).fetchall()


def _make_like(conn: psycopg.Connection, model: str, copy: str) -> None:
    """Give the table `copy` the comment, owner, grants and policies of the table `model`."""
    comment = conn.execute("select obj_description(to_regclass(%s), 'pg_class')", [model]).fetchone()[0]
    if comment is not None:
        conn.execute(f"comment on table {copy} is {compiler.quote_literal(comment)}")
    like = compiler.relation_differences(f"to_regclass({compiler.quote_literal(model)})",
                                         f"select to_regclass({compiler.quote_literal(copy)})")
    for change, in conn.execute(f"select d.change from ({like}) as d order by d.step").fetchall():
        conn.execute(change)


def _next_id(conn: psycopg.Connection, qualified: str) -> int:
    """The id the table's next row is to get: past its identity sequence's (if it has one) and
    past every id it holds."""
    start = conn.execute(f"select coalesce(max(id), 0) + 1 from {qualified}").fetchone()[0]
    sequence = conn.execute("select pg_get_serial_sequence(%s, 'id')", [qualified]).fetchone()[0]
    if sequence:
        start = max(start, conn.execute(
            f"select case when is_called then last_value + 1 else last_value end from {sequence}").fetchone()[0])
    return start


def swap(conn: psycopg.Connection, settings: Settings, catalog: Catalog, rollup: Rollup) -> None:
    """Run, in the caller's transaction, the statements that put a partitioned table in place of
    the unpartitioned one (its bound check validated first by `preparation`)."""
    table, schema = rollup.table, quote_ident(settings.schema)
    qualified = _qualified(settings, table)
    execute = conn.execute
    execute(f"lock table {qualified} in access exclusive mode")
    populated = has_rows(conn, settings, table)
    found = _bound_check(conn, settings, table)
    if populated and not (found and found[1]):  # rows came between preparation and the lock
        raise StatskitError(f"{qualified} holds rows but no validated {BOUND_CHECK.format(table=table)}: run statskit migrate again")
    bound = conn.execute("select substring(pg_get_constraintdef(oid) from '''(.*)''')::date from pg_constraint"
                         " where conrelid = to_regclass(%s) and conname = %s",
                         [qualified, BOUND_CHECK.format(table=table)]).fetchone()[0] if populated else None
    old = f"{table}_before_{bound:%Y%m%d}" if populated else f"{table}_unpartitioned"
    start = _next_id(conn, qualified)
    execute(f"alter table {qualified} rename to {old}")
    for name, primary, _ in _indexes(conn, f"{schema}.{old}"):
        if primary:  # the surrogate key: a partitioned table's key must hold date
            execute(f"alter table {schema}.{old} drop constraint {name}")
        elif name.startswith(table + "_"):
            execute(f"alter index {schema}.{name} rename to {old}{name.removeprefix(table)}")
    execute(f"create table {qualified} (like {schema}.{old} including defaults including identity including comments"
            f" including storage including statistics) partition by range (date)")
    execute(f"alter table {qualified} alter column id restart with {start}")
    execute(f"alter table {schema}.{old} alter column id drop identity")
    execute(f"alter table {qualified} add constraint {table}_pkey primary key ({key_columns(catalog, rollup)})")
    if rollup is catalog.user:
        execute(f"create index {table}_date_idx on {qualified} (date)")
    _make_like(conn, f"{schema}.{old}", qualified)
    if populated:
        execute(f"alter table {qualified} attach partition {schema}.{old} for values from (minvalue) to ('{bound.isoformat()}')")
        execute(f"alter table {schema}.{old} drop constraint {BOUND_CHECK.format(table=table)}")
    else:
        execute(f"drop table {schema}.{old}")


def unswap(conn: psycopg.Connection, settings: Settings, catalog: Catalog, rollup: Rollup) -> None:
    """Run, in the caller's transaction, the statements that put one plain table in place of the
    partitioned one: the largest partition, detached, takes the other partitions' rows (the
    only rows written again) and the table's name, indexes' names and identity."""
    table, schema = rollup.table, quote_ident(settings.schema)
    qualified = _qualified(settings, table)
    execute = conn.execute
    execute(f"lock table {qualified} in access exclusive mode")
    parts = conn.execute(
        "select c.oid::regclass::text from pg_inherits i join pg_class c on c.oid = i.inhrelid"
        " where i.inhparent = to_regclass(%s) order by c.relpages desc, c.relname", [qualified]).fetchall()
    start = _next_id(conn, qualified)
    columns = ", ".join(quote_ident(name) for name, in conn.execute(
        "select attname from pg_attribute where attrelid = to_regclass(%s) and attnum > 0 and not attisdropped order by attnum",
        [qualified]))
    for part, in parts:
        execute(f"alter table {qualified} detach partition {part}")
    if parts:
        base = parts[0][0]
        for part, in parts[1:]:
            execute(f"insert into {base} ({columns}) select {columns} from {part}")
            execute(f"drop table {part}")
    else:
        base = f"{schema}.{table}_unpartitioned"
        execute(f"create table {base} (like {qualified} including defaults including comments including storage including statistics)")
        execute(f"alter table {base} add constraint {table}_unpartitioned_key unique ({key_columns(catalog, rollup)})")
    _make_like(conn, qualified, base)
    execute(f"drop table {qualified}")
    base_name = base.rsplit(".", 1)[1]
    execute(f"alter table {base} rename to {table}")
    key = "user_id_date_key" if rollup is catalog.user else "date_key"
    for name, _, unique in _indexes(conn, qualified):
        wanted = f"{table}_{key}" if unique else f"{table}_date_idx"
        if name != wanted and name.startswith(base_name) and (unique or name.endswith("date_idx")):
            execute(f"alter index {schema}.{name} rename to {wanted}")
    execute(f"alter table {qualified} alter column id add generated always as identity (start with {start})")
