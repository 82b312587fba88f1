"""Compile the catalog into the named SQL fragments the templates place.

`catalog.py` reads and checks what the catalog says; this module turns it into SQL text: each
fragment a string (or a list of lines, one item each) named for what it holds, so that a
template only loops over fragments and puts them where they go. No template builds SQL out of
pieces of strings.
"""

import hashlib
import re
import textwrap
from dataclasses import dataclass

from .catalog import SOURCE_TABLE, Rollup, Source, SourceTable, Span, Sum, UserTable


def quote_literal(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _least(expressions: list[str]) -> str:
    """The earliest of the expressions: the one itself when alone (no one-argument least())."""
    return expressions[0] if len(expressions) == 1 else f"least({', '.join(expressions)})"


def _negated(value: str) -> str:
    return f"-{value}" if re.fullmatch(r"[\w.]+", value) else f"-({value})"


# -- spans: the days a row counts on ----------------------------------------------------------

def leaves(span: Span) -> str | None:
    """The day a row of the span stops counting (NULL or None: never)."""
    if span.days:
        return f"{span.enters} + {span.days}"
    if span.month:
        enters = span.enters if re.fullmatch(r"[\w.]+", span.enters) else f"({span.enters})"
        return f"(date_trunc('month', {enters}::timestamp) + interval '1 month')::date"
    return span.leaves


def leaving_day(span: Span) -> str | None:
    """The day a row's value is taken back. A row that leaves before it enters never counts (it
    leaves the day it enters); a row that never enters never leaves either (NULL, as for a NULL
    leaves)."""
    left = leaves(span)
    if not left or span.days or span.month:
        return left
    return f"case when {left} > {span.enters} then {left} when {left} <= {span.enters} then {span.enters} end"


def counts_on(span: Span, day: str) -> str:
    """Whether a row counts on `day`: it entered by then and has not left."""
    if span.days == 1:
        return f"{span.enters} = {day}"
    if span.days:
        return f"{span.enters} between {day} - {span.days - 1} and {day}"
    if span.month:
        return f"{span.enters} between date_trunc('month', {day}::timestamp)::date and {day}"
    entered = f"{span.enters} <= {day}"
    return f"{entered} and ({span.leaves} > {day} or {span.leaves} is null)" if span.leaves else entered


def day_sum(span: Span) -> str:
    """A sum of D over a source's rows, as one filtered aggregate of the rows that count on D."""
    conditions = [f"({span.where})" if " or " in span.where else span.where] if span.where else []
    conditions.append(counts_on(span, "p_date"))
    aggregate = "count(*)" if span.value == "1" else f"sum({span.value})"
    return f"{aggregate} filter (where {' and '.join(conditions)})"


def entered_by(rollup: Rollup, source: Source, day: str) -> str:
    """Whether a row of the source counts for any sum by `day`: none counts before it enters."""
    return f"{_least(list(dict.fromkeys(s.span.enters for s in rollup.sums_of(source))))} <= {day}"


def changed(source: Source, alias: str) -> str:
    """Whether a row (of the source, or of its partition table) can change a sum on D: one of its
    timestamps falls on a day the catalog's `changes_on` names. The bounds v_from_N and v_to_N
    are the start and end of D - N."""
    return "\nor ".join(f"({alias}.{column} >= v_from_{o} and {alias}.{column} < v_to_{o})"
                        for column, offsets in source.changes_on for o in offsets)


def day_bounds(offsets: list[int], time_zone: str) -> list[str]:
    """The start (v_from_N) and end (v_to_N) of each day D - N that `offsets` names, as the
    declarations of a function of p_date: D itself (0) for the sources' `scan` tests, and the
    days the nightly step reads (the sources' `changes_on`)."""
    zone = quote_literal(time_zone)
    lines = []
    for n in offsets:
        start = "p_date" if n == 0 else f"(p_date - {n})"
        end = "(p_date + 1)" if n == 0 else "p_date" if n == 1 else f"(p_date - {n - 1})"
        lines += [f"v_from_{n} constant timestamptz := {start}::timestamp at time zone {zone};",
                  f"v_to_{n} constant timestamptz := {end}::timestamp at time zone {zone};"]
    return lines


def stepped(item: Sum) -> str:
    """A sum of D in the nightly step: the sum of D - 1 (none on the 1st, for a month window)
    plus what changes on D."""
    before = f"case when v_month_starts then 0 else s.{item.name} end" if item.span.month else f"s.{item.name}"
    return f"{before} + coalesce({item.span.source}_on_d.{item.name}, 0)"


def step_touches(rollup: Rollup) -> str:
    """Whether D may have changed a key's sums in the nightly step: a change row of any source
    on D, or the 1st of a month (its month windows start again from 0)."""
    tests = (["v_month_starts"] if any(item.span.month for item in rollup.sums) else [])
    tests += [f"{source.name}_on_d.user_id is not null" for source in rollup.sources]
    return "\n               or ".join(tests)


def partition_filters(source: Source) -> list[str]:
    """The nightly step's test that a row of a window or group source is in a partition with a
    row that changes on D (partition_lists): whole partitions, so the window sees every row of each."""
    _, keys = source.partition
    tests = [f"{source.alias}.{key} = any (v_{source.name}_{key})" for key in keys]
    if len(keys) > 1:
        tests.append(f"concat_ws(' ', {', '.join(source.alias + '.' + key for key in keys)}) = any (v_{source.name}_keys)")
    return tests


def source_rows(source: Source) -> str:
    """The query inside a source's `from` snippet (`(select …) as t`), for a CTE of its rows."""
    text = source.from_sql
    return textwrap.dedent(text[text.index("(") + 1:text.rindex(")")]).strip("\n")


def rows_from(source: Source, named: bool) -> str:
    """Where a function reads a source's rows: its snippet, or the CTE of its rows (`named`)
    where the function reads them twice, so they are written once."""
    return f"{source.name}_rows as {source.alias}" if named else source.from_sql


def until_test(source: Source) -> str | None:
    """Whether a row of the source can count on a day up to the last one a function computes
    (v_until is the end of that day): a row changes its sums on no day before the earliest of
    its `changes_on` timestamps, and on none at all without one, so the rows created later are
    dropped on their raw timestamps before any day is computed. A window or group source
    (`partition`) names its partition table's columns instead: its own SQL narrows its rows by
    v_until where that is exact (None here)."""
    if source.partition:
        return None
    return f"{_least([f'{source.alias}.{column}' for column, _ in source.changes_on])} < v_until"


def day_tests(source: Source, only: str | None, own: str | None = None) -> list[str]:
    """What narrows a source's rows in the one-day sums: its `scan` test (the rows that can count
    on D itself) or else its until_test, both on raw timestamps before any day is computed;
    `only` (a condition on its user, {key}) and, on a fleet's shard, `own` (its user is one of
    the shard's: the rows a shard holds for another shard's users count for none of its own, so
    they are dropped before any day is computed)."""
    tests = [only] if only else []
    tests += [own] if own and source.user_key else []
    first = [source.scan] if source.scan else [until] if (until := until_test(source)) else []
    tests = first + [test.replace("{key}", source.user_key) for test in tests]
    return [f"({test})" for test in tests] if len(tests) > 1 else tests  # and-ed: each whole


# -- change rows: what each source row adds on the day it enters, and takes back when it leaves

@dataclass(frozen=True)
class ChangedSum:
    name: str
    sum_type: str
    aggregate: str  # over a source's change rows: its value on the events it enters and leaves on


@dataclass(frozen=True)
class Changes:
    """A source's change rows: one per event (a day a row enters or leaves some sum on, named),
    and each sum as the aggregate of its own events' values."""

    events: list[tuple[str, str]]  # (name, day)
    sums: list[ChangedSum]


def _event_name(span: Span, kind: str) -> str | None:
    """What a span's day of entering or leaving is called: its column (`completed_on`), or the
    window it ends (`month after created_on`, `30 days after viewed_on`)."""
    def column(expression):
        found = re.fullmatch(r"\w+\.(\w+)", expression)
        return found and found.group(1)
    if kind == "enters":
        return column(span.enters)
    if span.month or span.days:
        entered = column(span.enters)
        after = "month" if span.month else "day" if span.days == 1 else f"{span.days} days"
        return entered and f"{after} after {entered}"
    return column(span.leaves)


def changes(rollup: Rollup, source: Source) -> Changes:
    """A row adds a sum's value on the day it enters and takes it back on the day it leaves. Each
    event is named for its day (_event_name), or for the sum that first enters or leaves on it."""
    found = rollup.sums_of(source)
    gone = {s.name: leaving_day(s.span) for s in found}
    events: dict[str, str] = {}  # day -> name
    for item in found:
        for day, kind in ((item.span.enters, "enters"), (gone.get(item.name), "leaves")):
            if day and day not in events:
                name = _event_name(item.span, kind)
                events[day] = name if name and name not in events.values() else f"{item.name} {kind}"
    sums = []
    for item in found:
        whens = [f"when {quote_literal(events[item.span.enters])} then {item.span.value}"]
        if gone.get(item.name):
            whens.append(f"when {quote_literal(events[gone[item.name]])} then {_negated(item.span.value)}")
        aggregate = f"sum(case change.event {' '.join(whens)} end)"
        if item.span.where:
            aggregate += f" filter (where {item.span.where})"
        sums.append(ChangedSum(item.name, item.span.sum_type, aggregate))
    return Changes([(name, day) for day, name in events.items()], sums)


def step_changes(rollup: Rollup, source: Source) -> Changes:
    """What each sum of a source gains on D in the nightly step: the values of its rows that enter
    on D, less those of its rows that leave on D, tested on each row (no change rows: the step
    has one day). Month windows do not leave: on the 1st every row they hold leaves at once, and
    the step starts those sums again from 0 instead."""
    sums = []
    for item in rollup.sums_of(source):
        where = ""
        if item.span.where:
            where = f"({item.span.where}) and " if " or " in item.span.where.lower() else f"{item.span.where} and "
        added = f"sum({item.span.value}) filter (where {where}{item.span.enters} = p_date)"
        gone = None if item.span.month else leaving_day(item.span)
        if gone:
            added = (f"(coalesce({added}, 0)\n"
                     f"             - coalesce(sum({item.span.value}) filter (where {where}{gone} = p_date), 0))")
        sums.append(ChangedSum(item.name, item.span.sum_type, added))
    return Changes([], sums)


def partition_lists(source: Source) -> tuple[list[str], list[str]]:
    """The nightly step's lists of the partitions (of a window or group source) with a row that can
    change on D: (variables, aggregates into them) for each key column, and for several keys
    together as text (each key's values alone admit every combination of them)."""
    table, keys = source.partition
    targets = [f"v_{source.name}_{key}" for key in keys]
    values = [f"array_agg(distinct k.{key})" for key in keys]
    if len(keys) > 1:
        targets.append(f"v_{source.name}_keys")
        values.append(f"array_agg(distinct concat_ws(' ', {', '.join('k.' + key for key in keys)}))")
    return targets, values

# -- change capture -------------------------------------------------------------------------

# The transition tables each capture trigger hands its function, by event. `changed_rows` holds
# the rows a statement wrote (inserted) or deleted, so one query reads an insert's and a delete's
# rows alike. An update's trigger is a row trigger instead, with none: its WHEN condition lets
# only the rows that moved a statistic before today call the function (most updates are of
# today's events: a read receipt, a completion, a status), where a statement trigger's transition
# tables and call cost every update.
TRIGGERS = (
    ("insert", None, "changed_rows"),
    ("update", None, None),
    ("delete", "changed_rows", None),
)


@dataclass(frozen=True)
class CapturedTable:
    """A source table as its capture function reads it: the users a row counts for, and the
    first moment at which it can have moved a statistic."""

    table: SourceTable
    owners: dict[str, SourceTable]  # owners column -> the table whose row's home user it counts for
    source: str  # the quoted source schema

    @property
    def name(self) -> str:
        return self.table.name

    def first_moment(self, alias: str) -> str:
        """A row's earliest read timestamp: a row counts on no day before it."""
        return _least([f"{alias}.{column}" for column in self.table.timestamps])

    def users(self, *aliases: str) -> list[str]:
        """The users the rows count for: each users column, and the home user of each row an
        owners column references."""
        found = []
        for alias in aliases:
            found += [f"{alias}.{column}" for column in self.table.users]
            for column, owner in self.owners.items():
                found.append(f"(select owning.{owner.home} from {self.source}.{owner.name} owning"
                             f" where owning.{owner.key} = {alias}.{column})")
        return found

    def logged(self, update: bool) -> list[str]:
        """Each user the changed rows count for, with the earliest moment before today one of its
        rows can have moved a statistic at: an insert's or a delete's rows (`r`), or an updated
        row as it was (`old`) and is (`new`). The moment, when it is more than a column, is named
        once (a select PostgreSQL flattens), so rows with none before today leave before their
        owners are looked up."""
        if update:
            lines, users, moment = [], self.users("old", "new"), self.update_moment()
        else:
            lines, users, moment = ["from changed_rows r"], self.users("r"), [self.first_moment("r")]
        joined = "cross join lateral (" if lines else "from ("
        if len(moment) == 1 and re.fullmatch(r"\w+\.\w+", moment[0]):
            named = moment[0]
        elif len(moment) == 1:
            named = "changed.moment"
            lines.append(f"{joined}select {moment[0]} as moment) as changed")
        else:
            named = "changed.moment"
            lines += [joined, f"    select {moment[0]}", *(f"    {line}" for line in moment[1:-1]),
                      f"    {moment[-1]} as moment", ") as changed"]
        user = users[0] if len(users) == 1 else "affected.user_id"
        if len(users) > 1:
            lines.append(f"cross join lateral unnest(array[{', '.join(users)}]) as affected (user_id)")
        user_id = user if user.endswith(".user_id") else f"{user} as user_id"
        return [f"select {user_id}, min({named}) as moment", *lines, f"where {named} < v_today_start", "group by 1"]

    def update_moment(self) -> list[str]:
        """For an updated row (`old` as it was, `new` as it is): the first moment the update can
        have moved a statistic at. Every moment of the row, when its key or a value statskit reads
        changed (it changes the row's numbers on all its days); else the earliest of each changed
        timestamp's old and new value; NULL when nothing statskit reads changed."""
        columns = (self.table.key, *(v for v in self.table.values if v != self.table.key))
        whole = (f"old.{columns[0]} is distinct from new.{columns[0]}" if len(columns) == 1 else
                 f"({', '.join('old.' + v for v in columns)}) is distinct from ({', '.join('new.' + v for v in columns)})")
        changed = [f"case when old.{c} is distinct from new.{c} then least(old.{c}, new.{c}) end"
                   for c in self.table.timestamps]
        everything = [f"old.{c}" for c in self.table.timestamps] + [f"new.{c}" for c in self.table.timestamps]
        lines = ["case", f"    when {whole}", f"        then least({', '.join(everything)})"]
        if len(changed) == 1:
            lines.append(f"    else {changed[0]}")
        else:
            lines += ["    else least(", *(f"        {c}," for c in changed[:-1]), f"        {changed[-1]}", "    )"]
        return lines + ["end"]

    def update_when(self, today_start: str) -> list[str]:
        """The update trigger's WHEN: the update moved a statistic before `today_start`. PostgreSQL
        evaluates it for each row, before any call: only timestamps compared, nothing that can
        raise but what would fail the statement anyway (a cancel, out of memory)."""
        moment = self.update_moment()
        return [f"({moment[0]}", *moment[1:-1], f"{moment[-1]} < {today_start})"]

    def update_digest(self, today_start: str) -> str:
        """The update trigger's argument: a digest of its condition (its function ignores it), so
        migrate re-creates the trigger (a lock on the table) only when the condition differs."""
        return hashlib.sha256("\n".join(self.update_when(today_start)).encode()).hexdigest()[:16]


def captured_tables(source_tables: dict[str, SourceTable], source: str) -> list[CapturedTable]:
    return [CapturedTable(table, {column: source_tables[owned] for column, owned in table.owners.items()}, source)
            for table in source_tables.values()]


# -- the rollup's own partitions ----------------------------------------------------------------

def retention_edge(retention: str, time_zone: str = "v_time_zone") -> str:
    """The first day kept under retention ("25 months"): days before it are past retention. It
    reads the transaction's now(), so every writer of one transaction agrees."""
    return f"((pg_catalog.now() at time zone {time_zone})::date - interval {quote_literal(retention)})::date"


def rollup_partition_bounds(table: str) -> str:
    """A query of the partitions of `table` (a regclass expression): each partition's name, its
    first day and the day after its last (NULL: unbounded), read from its bound as PostgreSQL
    prints it: FOR VALUES FROM ('2026-04-01') TO ('2026-05-01'), or MINVALUE."""
    return textwrap.dedent(f"""\
        select c.oid::pg_catalog.regclass::text as partition,
               nullif(pg_catalog.btrim(bound.edges[1], ''''), 'MINVALUE')::date as first_day,
               nullif(pg_catalog.btrim(bound.edges[2], ''''), 'MAXVALUE')::date as after_day
        from pg_catalog.pg_inherits i
        join pg_catalog.pg_class c on c.oid = i.inhrelid
        cross join lateral pg_catalog.regexp_match(pg_catalog.pg_get_expr(c.relpartbound, c.oid),
                                                   'FROM \\((.+)\\) TO \\((.+)\\)') as bound (edges)
        where i.inhparent = {table}""")


def rollup_partition_differences(table: str) -> str:
    """A query of the statements that make every partition of `table` (a regclass expression)
    like the table: see relation_differences."""
    return relation_differences(table, f"select i.inhrelid from pg_catalog.pg_inherits i where i.inhparent = {table}")


def relation_differences(model: str, copies: str) -> str:
    """A query of the statements that make each table whose oid the query `copies` returns like
    the table `model` (a regclass expression): its owner, its grants (and no others), its row
    security and its policies, each row (step, change) to be run in the order of step (the owner
    first: it is who grants, revokes and creates policies). Empty when they all are."""
    return textwrap.dedent(f"""\
        with parent as (
            select c.oid, c.relowner, c.relacl, c.relrowsecurity from pg_catalog.pg_class c where c.oid = {model}
        ),
        part as (
            select c.oid, c.oid::pg_catalog.regclass::text as name, c.relowner, c.relacl, c.relrowsecurity
            from pg_catalog.pg_class c
            where c.oid in ({copies})
        ),
        parent_grant as (
            select g.grantee, g.privilege_type from parent cross join lateral pg_catalog.aclexplode(parent.relacl) as g
            where g.grantee <> parent.relowner
        ),
        part_grant as (
            select part.oid, g.grantee, g.privilege_type from part cross join lateral pg_catalog.aclexplode(part.relacl) as g
            where g.grantee <> part.relowner
        )
        select 1 as step, pg_catalog.format('alter table %s owner to %s', part.name, parent.relowner::pg_catalog.regrole) as change
        from part cross join parent
        where part.relowner <> parent.relowner
        union all
        select 2 as step, pg_catalog.format('grant %s on %s to %s', g.privilege_type, part.name,
                                 case g.grantee when 0 then 'public' else g.grantee::pg_catalog.regrole::text end)
        from part cross join parent_grant as g
        where not exists (select from part_grant h where h.oid = part.oid and (h.grantee, h.privilege_type) = (g.grantee, g.privilege_type))
        union all
        select 3 as step, pg_catalog.format('revoke %s on %s from %s', h.privilege_type, part.name,
                                 case h.grantee when 0 then 'public' else h.grantee::pg_catalog.regrole::text end)
        from part join part_grant as h on h.oid = part.oid
        where not exists (select from parent_grant g where (g.grantee, g.privilege_type) = (h.grantee, h.privilege_type))
        union all
        select 4 as step, pg_catalog.format('alter table %s %s row level security', part.name,
                                 case when parent.relrowsecurity then 'enable' else 'disable' end)
        from part cross join parent
        where part.relrowsecurity <> parent.relrowsecurity
        union all
        select 5 as step, pg_catalog.format('create policy %I on %s as %s for %s to %s%s%s', q.polname, part.name,
                                 case when q.polpermissive then 'permissive' else 'restrictive' end,
                                 case q.polcmd when 'r' then 'select' when 'a' then 'insert' when 'w' then 'update'
                                               when 'd' then 'delete' else 'all' end,
                                 (select pg_catalog.string_agg(case r when 0 then 'public' else r::pg_catalog.regrole::text end, ', ')
                                  from pg_catalog.unnest(q.polroles) as r),
                                 ' using (' || pg_catalog.pg_get_expr(q.polqual, q.polrelid) || ')',
                                 ' with check (' || pg_catalog.pg_get_expr(q.polwithcheck, q.polrelid) || ')')
        from part cross join parent
        join pg_catalog.pg_policy q on q.polrelid = parent.oid
        where not exists (select from pg_catalog.pg_policy p where p.polrelid = part.oid and p.polname = q.polname)
        union all
        select 6 as step, pg_catalog.format('drop policy %I on %s', p.polname, part.name)
        from part join pg_catalog.pg_policy p on p.polrelid = part.oid
        where not exists (select from parent join pg_catalog.pg_policy q on q.polrelid = parent.oid where q.polname = p.polname)""")


# -- a fleet's shard: each platform fact counted on its home user's shard only -------------------

def home_rows(table: SourceTable, tables: dict[str, SourceTable], users: UserTable, source: str) -> str:
    """Where a shard's platform functions read `table`: its rows whose home user lives here (has
    its row in the user table: a shard holds its own users only), so that a row held by two
    shards counts on one. The user table itself is all home."""
    if table.name == users.name:
        return f"{source}.{table.name}"
    if table.home in table.users:
        home = f"{source}.{users.name} u where u.{users.key} = h.{table.home}"
    else:
        owned = tables[table.owners[table.home]]
        home = (f"{source}.{owned.name} o join {source}.{users.name} u on u.{users.key} = o.{owned.home}"
                f" where o.{owned.key} = h.{table.home}")
    return f"(select h.* from {source}.{table.name} h where exists (select from {home}))"


def own_user(users: UserTable, source: str) -> str:
    """A shard's test that a source row's user ({key}) is one of its own: has its row in the user table."""
    return f"exists (select from {source}.{users.name} own where own.{users.key} = {{key}})"


def home_tables(table: SourceTable, tables: dict[str, SourceTable], users: UserTable) -> list[str]:
    """The tables home_rows reads besides `table` itself."""
    if table.name == users.name:
        return []
    return ([users.name] if table.home in table.users else [table.owners[table.home], users.name])


def home_snippet(from_sql: str, tables: dict[str, SourceTable], users: UserTable, source: str) -> str:
    """A platform source's snippet with each source table it names read through home_rows."""
    return SOURCE_TABLE.sub(lambda m: home_rows(tables[m.group(1)], tables, users, source), from_sql)


def merged_platform(platform: Rollup, partials: str, shards: int) -> str:
    """The platform's rows from its shards' partial rows (`partials`: a query of date and each
    sum, a row per shard and day, as Rollup.partials keeps them): every sum added up over the
    shards, then each metric's `final` on the totals, as one server would; a day only once every
    shard has it."""
    sums = ",\n           ".join(f"sum(p.{s.name}) as {s.name}" for s in platform.sums)
    values = ",\n       ".join(f"{m.stored_value} as {m.name}" for m in platform.metrics)
    return (f"select sums.date,\n       {values}\n"
            f"from (\n    select p.date,\n           {sums}\n    from ({partials}) as p\n"
            f"    group by p.date\n    having count(*) = {shards}\n) as sums")
