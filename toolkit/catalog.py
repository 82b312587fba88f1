"""Load and check the metric catalog (sql/catalog.toml)."""

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .settings import check_identifier


@dataclass(frozen=True)
class Source:
    """One pass over a source table, grouped by user (or one row, for the platform)."""

    name: str
    comment: str
    from_sql: str
    where: str | None
    user_key: str | None = None
    one_user: str | None = None
    latest_by: str | None = None


@dataclass(frozen=True)
class Metric:
    """One statistics column: its type, default, meaning and the aggregate that computes it."""

    name: str
    group: str
    type: str
    default: str | None
    source: str
    sql: str
    meaning: str
    added_in: str
    removed_in: str | None = None
    retyped_in: str | None = None
    was: str | None = None  # the type before retyped_in

    @property
    def nullable(self) -> bool:
        return self.default is None


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

    @property
    def metrics(self) -> tuple[Metric, ...]:
        return tuple(m for m in self.history if m.removed_in is None)

    def metrics_of(self, source: Source) -> list[Metric]:
        return [m for m in self.metrics if m.source == source.name]

    def metrics_added_in(self, migration_id: str) -> list[Metric]:
        """Metrics a migration adds, with the type they had then."""
        return [dataclasses.replace(m, type=m.was) if m.retyped_in else m
                for m in self.history if m.added_in == migration_id]

    def metrics_removed_in(self, migration_id: str) -> list[Metric]:
        return [m for m in self.history if m.removed_in == migration_id]

    def metrics_retyped_in(self, migration_id: str) -> list[Metric]:
        return [m for m in self.history if m.retyped_in == migration_id]


@dataclass(frozen=True)
class Migration:
    id: str
    description: str


@dataclass(frozen=True)
class Catalog:
    migrations: tuple[Migration, ...]
    source_tables: dict[str, tuple[str, ...]]
    kpis: dict[str, tuple[str, ...]]  # role -> user metrics, in dashboard order
    user: Rollup
    platform: Rollup

    @property
    def metric_names(self) -> list[str]:
        return [m.name for m in self.user.metrics]


def _read_rollup(raw: dict, first_migration: str, migration_ids: set[str], per_user: bool) -> Rollup:
    table = check_identifier(raw["table"], "table name")
    sources = []
    for s in raw["sources"]:
        check_identifier(s["name"], "source name")
        if per_user and "user_key" not in s:
            raise UsageError(f"catalog: source {s['name']} of {table} has no user_key")
        sources.append(
            Source(
                name=s["name"],
                comment=s.get("comment", ""),
                from_sql=s["from"].strip(),
                where=s.get("where"),
                user_key=s.get("user_key"),
                one_user=s.get("one_user") or (f"{s['user_key']} = p_user_id" if per_user else None),
                latest_by=s.get("latest_by"),
            )
        )
    source_names = {s.name for s in sources}
    metrics = []
    for m in raw["metrics"]:
        name = check_identifier(m["name"], "metric name")
        if m["source"] not in source_names:
            raise UsageError(f"catalog: metric {name} names unknown source {m['source']}")
        added_in = m.get("added_in", first_migration)
        for key in ("added_in", "removed_in", "retyped_in"):
            if m.get(key, added_in) not in migration_ids:
                raise UsageError(f"catalog: metric {name} is {key} unknown migration {m[key]}")
        if ("retyped_in" in m) != ("was" in m):
            raise UsageError(f"catalog: metric {name} needs both retyped_in and was (its old type)")
        metrics.append(
            Metric(
                name=name,
                group=m.get("group", ""),
                type=m["type"],
                default=m.get("default"),
                source=m["source"],
                sql=m["sql"],
                meaning=m["meaning"],
                added_in=added_in,
                removed_in=m.get("removed_in"),
                retyped_in=m.get("retyped_in"),
                was=m.get("was"),
            )
        )
    names = [m.name for m in metrics if m.removed_in is None]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise UsageError(f"catalog: {table} defines {', '.join(duplicated)} twice")
    return Rollup(table, raw.get("comment", ""), tuple(sources), tuple(metrics))


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
        return Catalog(
            migrations=migrations,
            source_tables={
                check_identifier(table, "source table"): tuple(check_identifier(c, "source column") for c in columns)
                for table, columns in raw["source_tables"].items()
            },
            kpis=kpis,
            user=user,
            platform=_read_rollup(raw["platform"], first, ids, per_user=False),
        )
    except (KeyError, IndexError) as exc:
        raise UsageError(f"catalog {path} lacks required entry {exc}") from None
