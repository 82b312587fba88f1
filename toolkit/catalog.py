"""Load and check the metric catalog (sql/catalog.toml)."""

import dataclasses
import re
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .settings import check_identifier

# A source table as the catalog's SQL snippets name it.
SOURCE_TABLE = re.compile(r"\{\{ source \}\}\.(\w+)")

# What a metric's number counts, for clients that format it: money and hours with 2 decimals,
# counts as integers, ratings 1..5, scores and percentages 0..100.
UNITS = ("money", "count", "hours", "rating", "score", "percent")


@dataclass(frozen=True)
class Source:
    """A pass over a source table (or a small join, or a window over one): one row per fact, with
    the days it can count on computed in the statistics time zone."""

    name: str
    comment: str
    from_sql: str
    user_key: str | None = None  # the user a row counts for; None for the platform
    scan: str | None = None  # the rows that can count on day D, in raw timestamps (a superset)
    # The rows that can change a sum on day D: timestamp column -> the days before D it matters on (0 = D).
    changes_on: tuple[tuple[str, tuple[int, ...]], ...] = ()
    partition: tuple[str, tuple[str, ...]] | None = None  # (source table, the columns it is partitioned by)

    @property
    def alias(self) -> str:
        """The name the source's rows go by in its snippets (`... ) as t`)."""
        return self.from_sql.split()[-1]

    @property
    def offsets(self) -> list[int]:
        return [o for _, offsets in self.changes_on for o in offsets]


@dataclass(frozen=True)
class Span:
    """A metric's one definition: each row of `source` (matching `where`) adds `value` to the
    metric on every day from `enters` up to, not including, `leaves` (never, when None or NULL),
    or for `days` days, or to the end of the month it enters in. Both are dates; a row whose
    `leaves` is not after `enters` never counts. toolkit/compiler.py makes SQL of it."""

    source: str
    value: str
    enters: str
    leaves: str | None = None
    where: str | None = None
    sum_type: str = "numeric"  # of the sum: integer or numeric
    final: str | None = None  # the stored value, from the sums by name; default: this sum
    days: int | None = None  # counts for this many days from `enters` (then `leaves` is enters + days)
    month: bool = False  # counts until the end of the month it enters in (then `leaves` is the 1st after)


@dataclass(frozen=True)
class Sum:
    """A sum the functions keep per user (or platform) and day: a metric's, or a helper's."""

    name: str
    span: Span


@dataclass(frozen=True)
class Metric:
    """One statistics column: its type, default, meaning and its span."""

    name: str
    group: str
    type: str
    unit: str
    default: str | None
    meaning: str
    added_in: str
    span: Span | None  # None only for a removed metric
    removed_in: str | None = None
    retyped_in: str | None = None
    was: str | None = None  # the type before retyped_in
    sum: str | None = None  # what its sum is called when it holds something else (minutes of an hours metric)

    @property
    def sum_name(self) -> str:
        return self.sum or self.name

    @property
    def nullable(self) -> bool:
        return self.default is None

    @property
    def stored_value(self) -> str:
        """The stored value from the sums: counts and sums are 0, not NULL, when nothing happened."""
        value = self.span.final or self.sum_name
        return value if self.nullable else f"coalesce({value}, {self.default})"


@dataclass(frozen=True)
class Rollup:
    """A statistics table with the sources and metrics that fill it.

    `history` holds every metric ever released, so old migrations render as they were;
    `metrics` are the current ones, which the functions write.
    """

    table: str
    comment: str
    sources: tuple[Source, ...]
    history: tuple[Metric, ...]
    helpers: tuple[Sum, ...] = ()
    notes: str = ""  # what the contract says of its rows beyond each column's meaning

    @property
    def metrics(self) -> tuple[Metric, ...]:
        return tuple(m for m in self.history if m.removed_in is None)

    @property
    def sums(self) -> tuple[Sum, ...]:
        return tuple(Sum(m.sum_name, m.span) for m in self.metrics) + self.helpers

    @property
    def offsets(self) -> list[int]:
        """The days before D whose rows the nightly step reads."""
        return sorted({o for s in self.sources for o in s.offsets})

    def sums_of(self, source: Source) -> list[Sum]:
        return [s for s in self.sums if s.span.source == source.name]

    @property
    def tables_read(self) -> list[str]:
        """The source tables the functions read, in catalog order."""
        return list(dict.fromkeys(t for s in self.sources for t in SOURCE_TABLE.findall(s.from_sql)))

    def metrics_added_in(self, migration_id: str) -> list[Metric]:
        """Metrics a migration adds, with the type they had then."""
        return [dataclasses.replace(m, type=m.was) if m.retyped_in else m
                for m in self.history if m.added_in == migration_id]

    def partials(self) -> "Rollup":
        """What a fleet's shard keeps in place of this rollup: `<table>_partials`, every sum as
        summed over the shard's own rows, with no `final` (the router adds the shards' sums up,
        then applies it: a rounded hours or an average does not add up)."""
        def partial(metric: Metric) -> Metric:
            return Metric(metric.sum_name, "partials", metric.span.sum_type if metric.span else metric.type,
                          "count" if metric.sum else metric.unit, "0", f"the sum behind {metric.name}",
                          metric.added_in, metric.span and dataclasses.replace(metric.span, final=None),
                          metric.removed_in)
        first = self.history[0].added_in
        helpers = tuple(Metric(h.name, "partials", h.span.sum_type, "count", "0", f"the sum {h.name}", first,
                               h.span) for h in self.helpers)
        return dataclasses.replace(
            self, table=f"{self.table}_partials", history=tuple(partial(m) for m in self.history) + helpers,
            helpers=(), comment=f"One row per statistics date: the sums behind {self.table} of this shard's own "
                                f"rows, which a fleet's router adds up. Written by the platform functions.")

    def metrics_removed_in(self, migration_id: str) -> list[Metric]:
        return [m for m in self.history if m.removed_in == migration_id]

    def metrics_retyped_in(self, migration_id: str) -> list[Metric]:
        return [m for m in self.history if m.retyped_in == migration_id]


# information_schema's data_type of an application's column that statskit can read in place of
# the contract's type: same values, same comparisons (a varchar is a text; any integer width
# holds an id or a count). A timestamp without time zone or a float is refused: its days or
# sums would differ.
COMPATIBLE_TYPES = {
    "uuid": {"uuid"},
    "text": {"text", "character varying", "character"},
    "timestamptz": {"timestamp with time zone"},
    "bigint": {"smallint", "integer", "bigint"},
    "integer": {"smallint", "integer", "bigint"},
    "smallint": {"smallint", "integer", "bigint"},
    "numeric": {"numeric"},
}


@dataclass(frozen=True)
class SourceColumn:
    name: str
    type: str  # the contract's type, e.g. numeric(12,2)
    meaning: str
    nullable: bool = False
    read: bool = True  # False: the contract names it, no metric reads it

    @property
    def accepts(self) -> set[str]:
        return COMPATIBLE_TYPES[self.type.split("(")[0]]


@dataclass(frozen=True)
class SourceTable:
    name: str
    meaning: str
    columns: tuple[SourceColumn, ...]
    users: tuple[str, ...]  # columns holding a user the row counts for
    owners: dict[str, str]  # column -> the table it references, whose row's home user the row counts for
    home: str  # the user the row belongs to (its shard's): one of `users`, or of `owners`
    key: str = "id"  # the primary key: capture pairs a row's old and new version by it

    @property
    def read_columns(self) -> tuple[SourceColumn, ...]:
        return tuple(c for c in self.columns if c.read)

    @property
    def user_columns(self) -> tuple[str, ...]:
        """Columns that name a user a row counts for: directly, or through the row they reference."""
        return self.users + tuple(self.owners)

    @property
    def lookup(self) -> tuple[str, ...]:
        """Columns the one-user paths find a user's rows by: worth an index (the key has its own)."""
        return tuple(c for c in self.user_columns if c != self.key)

    @property
    def timestamps(self) -> tuple[str, ...]:
        """Read timestamps: the days on which a row can count."""
        return tuple(c.name for c in self.read_columns if c.type == "timestamptz")

    @property
    def values(self) -> tuple[str, ...]:
        """Every other read column: changing one can change the row's numbers on all its days."""
        return tuple(c.name for c in self.read_columns if c.type != "timestamptz")

    def column(self, name: str) -> SourceColumn:
        return next(c for c in self.columns if c.name == name)


SOURCE_TABLE_KEYS = {"meaning", "columns", "users", "owners", "home", "key"}


def _read_source_table(name: str, raw: dict) -> SourceTable:
    check_identifier(name, "source table")
    _refuse_unknown_keys(raw, SOURCE_TABLE_KEYS, f"source_tables.{name}")
    columns = []
    for column, spec in raw["columns"].items():
        check_identifier(column, "source column")
        if spec.get("type", "").split("(")[0] not in COMPATIBLE_TYPES:
            raise UsageError(f"catalog: source column {name}.{column} has type {spec.get('type')!r}: "
                             f"use one of {', '.join(COMPATIBLE_TYPES)}")
        columns.append(SourceColumn(column, spec["type"], spec.get("meaning", ""), spec.get("null", False),
                                    spec.get("read", True)))
    users, owners = tuple(raw.get("users", ())), dict(raw.get("owners", {}))
    key, home = raw.get("key", "id"), raw.get("home")
    names = {c.name for c in columns}
    unknown = sorted((set(users) | set(owners) | {key}) - names)
    if unknown:
        raise UsageError(f"catalog: source table {name} names unknown column {', '.join(unknown)}")
    table = SourceTable(name, raw.get("meaning", ""), tuple(columns), users, owners, home, key)
    if home not in table.user_columns:
        raise UsageError(f"catalog: source table {name} has home = {home!r}: name the column of the user "
                         f"each row belongs to, one of its users or owners ({', '.join(table.user_columns)})")
    return table


@dataclass(frozen=True)
class UserTable:
    """The application's table of users: one row per user, the key every statistic is kept by."""

    name: str
    key: str
    key_type: str  # its column's type: uuid, bigint, integer or text
    created_at: str  # when the user signed up: the first day it has rows
    role: str  # which KPI set its dashboard shows

    def parse_key(self, text: str, field: str = "user_id") -> "UserKey":
        """A user key typed in (a flag, an argument) as the value its column holds."""
        try:
            if self.key_type == "uuid":
                return uuid.UUID(text)
            if self.key_type in ("bigint", "integer"):
                value = int(text)
                if abs(value) >= 2 ** (63 if self.key_type == "bigint" else 31):
                    raise ValueError
                return value
        except ValueError:
            raise UsageError(f"{text!r} is not a user key: {self.name}.{self.key} is {self.key_type}",
                             field=field) from None
        return text


UserKey = uuid.UUID | int | str  # a user's key, as parse_key gives it and psycopg sends it


# The types a user key may have: every generated signature and statskit's own tables take it.
USER_KEY_TYPES = ("uuid", "bigint", "integer", "text")


def _check_owners(source_tables: dict[str, SourceTable]) -> None:
    """An `owners` column counts for the home user of the row it references: that table's home
    must be a user column of its own, not another reference."""
    for table in source_tables.values():
        for column, owned in table.owners.items():
            if owned not in source_tables or source_tables[owned].home not in source_tables[owned].users:
                raise UsageError(f"catalog: {table.name}.owners.{column} = {owned!r}: name a source table "
                                 f"whose home is one of its users columns")


def _read_user_table(raw: dict, source_tables: dict[str, SourceTable]) -> UserTable:
    _refuse_unknown_keys(raw, {"table", "key", "created_at", "role"}, "user_table")
    table = source_tables.get(raw["table"])
    if table is None:
        raise UsageError(f"catalog: user_table.table = {raw['table']!r} is not one of the source_tables")
    names = {c.name for c in table.columns}
    for field in ("key", "created_at", "role"):
        if raw[field] not in names:
            raise UsageError(f"catalog: user_table.{field} = {raw[field]!r} is not a column of {table.name}")
    key_type = table.column(raw["key"]).type
    if key_type not in USER_KEY_TYPES:
        raise UsageError(f"catalog: the user key {table.name}.{raw['key']} has type {key_type!r}: "
                         f"use one of {', '.join(USER_KEY_TYPES)}")
    for other in source_tables.values():
        for column in other.users:
            if other.column(column).type != key_type:
                raise UsageError(f"catalog: {other.name}.{column} holds a user, so its type is the user key's "
                                 f"({key_type}), not {other.column(column).type}")
    return UserTable(table.name, raw["key"], key_type, raw["created_at"], raw["role"])


@dataclass(frozen=True)
class Migration:
    id: str
    description: str


@dataclass(frozen=True)
class Catalog:
    migrations: tuple[Migration, ...]
    source_tables: dict[str, SourceTable]
    kpis: dict[str, tuple[str, ...]]  # role -> user metrics, in dashboard order
    users: UserTable
    user: Rollup
    platform: Rollup

    @property
    def step_lookups(self) -> list[tuple[str, str]]:
        """(table, column) the nightly step finds the rows of a day by: each `changes_on` column
        in the tables a source reads that have it, and each partition key."""
        found = []
        for rollup in (self.user, self.platform):
            for source in rollup.sources:
                if source.partition:
                    table, keys = source.partition
                    found += [(table, column) for column, _ in source.changes_on] + [(table, key) for key in keys]
                    continue
                for table in SOURCE_TABLE.findall(source.from_sql):
                    names = {c.name for c in self.source_tables[table].columns}
                    found += [(table, column) for column, _ in source.changes_on if column in names]
        return list(dict.fromkeys(found))

    def key_types(self, source: Source) -> dict[str, str]:
        """The SQL type of each key of a partitioned source, for the nightly step's lists of keys."""
        table, keys = source.partition
        return {key: next(c.type for c in self.source_tables[table].columns if c.name == key) for key in keys}

    def for_shard(self) -> "Catalog":
        """The catalog as a fleet's shard deploys it: the platform's sums kept raw (Rollup.partials)."""
        return dataclasses.replace(self, platform=self.platform.partials())

    @property
    def metric_names(self) -> list[str]:
        return [m.name for m in self.user.metrics]


def _read_source(raw: dict, table: str, per_user: bool) -> Source:
    name = check_identifier(raw["name"], "source name")
    if per_user and "user_key" not in raw:
        raise UsageError(f"catalog: source {name} of {table} has no user_key")
    changes_on = raw.get("changes_on") or {}
    if not changes_on:
        raise UsageError(f"catalog: source {name} of {table} has no changes_on "
                         f"(the timestamps of the rows that can change a sum on a day, for the nightly step)")
    for column, offsets in changes_on.items():
        check_identifier(column, "changes_on column")
        if not offsets or not all(isinstance(o, int) and o >= 0 for o in offsets):
            raise UsageError(f"catalog: source {name} of {table} has changes_on.{column} = {offsets!r}: "
                             f"use days before D (0 = D)")
    if not re.fullmatch(r"\(.*\)\s+as\s+\w+", raw["from"].strip(), re.DOTALL):
        raise UsageError(f"catalog: source {name} of {table} has from = {raw['from'].strip()[:40]!r}…: write it as "
                         f"a query in parentheses with its alias, (select … from {{{{ source }}}}.table t) as t")
    partition = raw.get("partition")
    if partition is not None:
        if set(partition) != {"table", "keys"} or not partition["keys"]:
            raise UsageError(f"catalog: source {name} of {table} needs partition = {{ table, keys }}")
        partition = (check_identifier(partition["table"], "partition table"),
                     tuple(check_identifier(k, "partition key") for k in partition["keys"]))
    return Source(name=name, comment=raw.get("comment", ""), from_sql=raw["from"].strip(),
                  user_key=raw.get("user_key"), scan=raw.get("scan"),
                  changes_on=tuple((c, tuple(o)) for c, o in changes_on.items()), partition=partition)


# The keys a span is written with, and those a metric adds: any other key is a typo the
# catalog would otherwise ignore (`leave` for `leaves` would count a row for ever).
SPAN_KEYS = {"name", "source", "value", "enters", "leaves", "days", "month", "where", "sum_type", "final"}
METRIC_KEYS = SPAN_KEYS | {"group", "type", "unit", "default", "meaning", "added_in", "removed_in", "retyped_in", "was",
                           "sum"}


def _refuse_unknown_keys(entry: dict, allowed: set[str], table: str) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise UsageError(f"catalog: {table}.{entry.get('name', '?')} has unknown key {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(allowed))})")


def _read_rollup(raw: dict, first_migration: str, migration_ids: set[str], per_user: bool) -> Rollup:
    table = check_identifier(raw["table"], "table name")
    sources = [_read_source(s, table, per_user) for s in raw["sources"]]
    source_names = {s.name for s in sources}
    metrics = []
    for m in raw["metrics"]:
        _refuse_unknown_keys(m, METRIC_KEYS, table)
        name = check_identifier(m["name"], "metric name")
        added_in = m.get("added_in", first_migration)
        for key in ("added_in", "removed_in", "retyped_in"):
            if m.get(key, added_in) not in migration_ids:
                raise UsageError(f"catalog: metric {name} is {key} unknown migration {m[key]}")
        if ("retyped_in" in m) != ("was" in m):
            raise UsageError(f"catalog: metric {name} needs both retyped_in and was (its old type)")
        if m.get("unit") not in UNITS:
            raise UsageError(f"catalog: metric {name} has unit {m.get('unit')!r}: use one of {', '.join(UNITS)}")
        metrics.append(
            Metric(
                name=name,
                group=m.get("group", ""),
                type=m["type"],
                unit=m["unit"],
                default=m.get("default"),
                meaning=m["meaning"],
                added_in=added_in,
                span=None if m.get("removed_in") else _read_span(m, table, source_names),
                removed_in=m.get("removed_in"),
                retyped_in=m.get("retyped_in"),
                was=m.get("was"),
                sum=check_identifier(m["sum"], "sum name") if "sum" in m else None,
            )
        )
    names = [m.name for m in metrics if m.removed_in is None]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise UsageError(f"catalog: {table} defines {', '.join(duplicated)} twice")
    for h in raw.get("helpers", []):
        _refuse_unknown_keys(h, SPAN_KEYS, table)
    helpers = tuple(Sum(check_identifier(h["name"], "helper name"), _read_span(h, table, source_names))
                    for h in raw.get("helpers", []))
    rollup = Rollup(table, raw.get("comment", ""), tuple(sources), tuple(metrics), helpers, raw.get("notes", "").strip())
    sums = [s.name for s in rollup.sums]
    duplicated = sorted({n for n in sums if sums.count(n) > 1})
    if duplicated:
        raise UsageError(f"catalog: {table} has two sums named {', '.join(duplicated)} (a metric's `sum`, or a helper)")
    unused = sorted(source_names - {s.span.source for s in rollup.sums})
    if unused:
        raise UsageError(f"catalog: source {', '.join(unused)} of {table} feeds no metric")
    return rollup


def _read_span(entry: dict, table: str, sources: set[str]) -> Span:
    """A metric's (or helper's) span: the one definition every function is generated from."""
    missing = [key for key in ("source", "value", "enters") if key not in entry]
    if missing:
        raise UsageError(f"catalog: {table}.{entry['name']} lacks {', '.join(missing)} "
                         f"(a metric counts `value` of each `source` row from the day it `enters`)")
    if entry["source"] not in sources:
        raise UsageError(f"catalog: {table}.{entry['name']} names unknown source {entry['source']}")
    ends = [key for key in ("leaves", "days", "month") if key in entry]
    if len(ends) > 1:
        raise UsageError(f"catalog: {table}.{entry['name']} has both {' and '.join(ends)}: a row leaves once")
    if "month" in entry and entry["month"] is not True:
        raise UsageError(f"catalog: {table}.{entry['name']} has month = {entry['month']!r}: use month = true")
    if "days" in entry and not (isinstance(entry["days"], int) and entry["days"] > 0):
        raise UsageError(f"catalog: {table}.{entry['name']} has days = {entry['days']!r}: use a whole number of days, 1 or more")
    sum_type = entry.get("sum_type") or ("integer" if entry.get("type", "").startswith("integer") else "numeric")
    if sum_type not in ("integer", "numeric"):
        raise UsageError(f"catalog: {table}.{entry['name']} has sum_type {sum_type!r}: use integer or numeric")
    return Span(source=entry["source"], value=entry["value"], enters=entry["enters"], leaves=entry.get("leaves"),
                where=entry.get("where"), sum_type=sum_type, final=entry.get("final"), days=entry.get("days"),
                month=entry.get("month", False))


def _check_partitions(rollup: Rollup, source_tables: dict[str, SourceTable]) -> None:
    for source in rollup.sources:
        if source.partition is None:
            continue
        table, keys = source.partition
        if table not in source_tables:
            raise UsageError(f"catalog: source {source.name} of {rollup.table} is partitioned by unknown table {table}")
        columns = {c.name for c in source_tables[table].columns}
        missing = sorted((set(keys) | {c for c, _ in source.changes_on}) - columns)
        if missing:
            raise UsageError(f"catalog: source {source.name} of {rollup.table}: table {table} has no column {', '.join(missing)}")


def load_catalog(path: Path) -> Catalog:
    """Read the catalog file; raise UsageError naming the first thing that is wrong in it."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"catalog not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"catalog {path} is not valid TOML: {exc}") from None
    try:
        migrations = tuple(Migration(m["id"], m["description"]) for m in raw["migrations"])
        ids = {m.id for m in migrations}
        first = migrations[0].id
        user = _read_rollup(raw["user"], first, ids, per_user=True)
        kpis = {role: tuple(metrics) for role, metrics in raw["kpis"].items()}
        unknown = sorted({m for metrics in kpis.values() for m in metrics} - {m.name for m in user.metrics})
        if unknown:
            raise UsageError(f"catalog: KPI sets name unknown metrics {', '.join(unknown)}")
        source_tables = {table: _read_source_table(table, spec) for table, spec in raw["source_tables"].items()}
        if "user_table" not in raw:
            raise UsageError(f"catalog {path} has no [user_table]: name the application's table of users, its key, "
                             f"created_at and role columns (docs/getting-started.md, \"Your own tables\")")
        _check_owners(source_tables)
        users = _read_user_table(raw["user_table"], source_tables)
        platform = _read_rollup(raw["platform"], first, ids, per_user=False)
        for rollup in (user, platform):
            _check_partitions(rollup, source_tables)
        return Catalog(migrations=migrations, source_tables=source_tables, kpis=kpis, users=users, user=user,
                       platform=platform)
    except (KeyError, IndexError) as exc:
        raise UsageError(f"catalog {path} lacks required entry {exc}") from None
