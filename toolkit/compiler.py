"""Compile the catalog into the named SQL fragments the templates place.

`catalog.py` reads and checks what the catalog says; this module turns it into SQL text: each
fragment a string (or a list of lines, one item each) named for what it holds, so that a
template only loops over fragments and puts them where they go. No template builds SQL out of
pieces of strings.
"""

from dataclasses import dataclass

from .catalog import SourceTable

# -- change capture -------------------------------------------------------------------------

# The transition tables each capture trigger hands its function, by event. `changed_rows` holds
# the rows a statement wrote (inserted, or updated: their new version) or deleted, so one query
# reads an insert's and a delete's rows alike; an update also has its rows as they were.
TRIGGERS = (
    ("insert", None, "changed_rows"),
    ("update", "old_rows", "changed_rows"),
    ("delete", "changed_rows", None),
)


def referencing(old: str | None, new: str | None) -> str:
    """A trigger's REFERENCING clause."""
    return " ".join(f"{image} table as {name}" for image, name in (("old", old), ("new", new)) if name)


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

    @property
    def relation(self) -> str:
        return f"{self.source}.{self.table.name}"

    def first_moment(self, alias: str) -> str:
        """A row's earliest read timestamp: a row counts on no day before it."""
        moments = [f"{alias}.{column}" for column in self.table.timestamps]
        return moments[0] if len(moments) == 1 else f"least({', '.join(moments)})"

    def users(self, *aliases: str) -> str:
        """The users the rows count for, as one array: each users column, and the home user of
        each row an owners column references."""
        found = []
        for alias in aliases:
            found += [f"{alias}.{column}" for column in self.table.users]
            for column, owner in self.owners.items():
                found.append(f"(select owning.{owner.home} from {self.source}.{owner.name} owning"
                             f" where owning.{owner.key} = {alias}.{column})")
        return f"array[{', '.join(found)}]"

    def update_moment(self) -> list[str]:
        """For an updated row (`o` as it was, `n` as it is; one of them missing when the key
        changed): the first moment the update can have moved a statistic at. Every moment of
        the row, when a value statskit reads changed (it changes the row's numbers on all its
        days); else the earliest of each changed timestamp's old and new value; NULL when
        nothing statskit reads changed."""
        key, values = self.table.key, self.table.values
        whole = [f"o.{key} is null", f"n.{key} is null"]
        if values:
            whole.append(f"({', '.join('o.' + v for v in values)}) is distinct from ({', '.join('n.' + v for v in values)})")
        changed = [f"case when o.{c} is distinct from n.{c} then least(o.{c}, n.{c}) end" for c in self.table.timestamps]
        everything = [f"o.{c}" for c in self.table.timestamps] + [f"n.{c}" for c in self.table.timestamps]
        lines = ["case", f"    when {' or '.join(whole)}", f"        then least({', '.join(everything)})"]
        if len(changed) == 1:
            lines.append(f"    else {changed[0]}")
        else:
            lines += ["    else least(", *(f"        {c}," for c in changed[:-1]), f"        {changed[-1]}", "    )"]
        return lines + ["end"]


def captured_tables(source_tables: dict[str, SourceTable], source: str) -> list[CapturedTable]:
    return [CapturedTable(table, {column: source_tables[owned] for column, owned in table.owners.items()}, source)
            for table in source_tables.values()]
