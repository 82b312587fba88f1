"""Serve the dashboard from the rollup: one metric with its comparison, and KPI sets by role."""

from dataclasses import asdict, dataclass
from datetime import date
from decimal import Decimal

import psycopg
from psycopg.rows import class_row

from .catalog import UserKey
from .dates import yesterday
from .errors import StatskitError, UsageError
from .migrate import Target
from .render import quote_ident

COMPARISONS = ("day", "week", "month")


@dataclass
class MetricValue:
    metric: str
    value: Decimal | None
    previous_value: Decimal | None
    change: Decimal | None
    change_pct: Decimal | None
    trend: str

    def as_dict(self) -> dict:
        """For JSON: numbers as strings with their exact digits ("960.00"), as node-postgres gives
        numeric; a float would turn money into 960.0 or worse."""
        return {k: str(v) if isinstance(v, Decimal) else v for k, v in asdict(self).items()}


def _day(target: Target, day: date | None) -> date:
    if day is not None:
        return day
    return yesterday(target.conn, target.settings.time_zone)


def _call(target: Target, query: str, params: list) -> list[MetricValue]:
    cur = target.conn.cursor(row_factory=class_row(MetricValue))
    try:
        return cur.execute(query, params).fetchall()
    except psycopg.errors.InvalidParameterValue as exc:  # SQLSTATE 22023: unknown metric or comparison
        raise UsageError(exc.diag.message_primary) from None


def _require_rollup(target: Target, table: str, day: date, user_id: UserKey | None = None) -> None:
    """Raise when there is no rollup row for day, with the hint that fits: never a backfill that
    would refuse (a day not over yet) or write nothing (a day before the user existed)."""
    users = target.catalog.users
    where = "date = %s" + (f" and user_id = %s::{users.key_type}" if user_id is not None else "")
    params = [day] + ([user_id] if user_id is not None else [])
    found = target.conn.execute(
        f"select 1 from {quote_ident(target.settings.schema)}.{table} where {where}", params
    ).fetchone()
    if found:
        return
    yesterday = _day(target, None)
    if day > yesterday:
        raise StatskitError(f"{day} is not over yet in {target.settings.time_zone}: the rollup holds complete days, "
                            f"the latest is {yesterday}")
    if user_id is not None:
        created = target.conn.execute(
            f"select ({users.created_at} at time zone %s)::date from {quote_ident(target.settings.source_schema)}.{users.name}"
            f" where {users.key} = %s::{users.key_type}", [target.settings.time_zone, user_id]).fetchone()[0]
        if created > day:
            raise StatskitError(f"user {user_id} did not exist yet on {day} (created {created}): "
                                f"the rollup has rows from {created} on")
    raise StatskitError(f"no rollup for {day} yet — run statskit backfill --from {day} --to {day}")


def _require_user(target: Target, user_id: UserKey) -> str:
    users = target.catalog.users
    row = target.conn.execute(
        f"select {users.role} from {quote_ident(target.settings.source_schema)}.{users.name}"
        f" where {users.key} = %s::{users.key_type}", [user_id]
    ).fetchone()
    if row is None:
        raise UsageError(f"{user_id}: unknown user, not in {users.name}", field="user_id")
    return row[0]


def user_metric(target: Target, user_id: UserKey, metric: str, day: date | None, compare: str) -> tuple[date, MetricValue]:
    day = _day(target, day)
    _require_user(target, user_id)
    _require_rollup(target, target.catalog.user.table, day, user_id)
    schema, key_type = quote_ident(target.settings.schema), target.catalog.users.key_type
    rows = _call(target, f"select %s as metric, * from {schema}.user_metric(%s::{key_type}, %s, %s, %s)",
                 [metric, user_id, metric, day, compare])
    return day, rows[0]


def user_kpis(target: Target, user_id: UserKey, day: date | None, compare: str) -> tuple[date, str, list[MetricValue]]:
    day = _day(target, day)
    role = _require_user(target, user_id)
    _require_rollup(target, target.catalog.user.table, day, user_id)
    schema, key_type = quote_ident(target.settings.schema), target.catalog.users.key_type
    return day, role, _call(target, f"select * from {schema}.user_kpis(%s::{key_type}, %s, %s)",
                            [user_id, day, compare])


def platform_kpis(target: Target, day: date | None, compare: str) -> tuple[date, list[MetricValue]]:
    day = _day(target, day)
    _require_rollup(target, target.catalog.platform.table, day)
    schema = quote_ident(target.settings.schema)
    names = [m.name for m in target.catalog.platform.metrics]
    return day, _call(
        target,
        f"select name as metric, m.* from unnest(%s::text[]) with ordinality as k(name, position)"
        f" cross join lateral {schema}.platform_metric(k.name, %s, %s) m order by k.position",
        [names, day, compare],
    )


def metric_units(target: Target) -> dict[str, str]:
    """Unit of every metric, user and platform, for formatting."""
    return {m.name: m.unit for m in target.catalog.user.metrics + target.catalog.platform.metrics}
