"""user_metric, platform_metric, user_kpis and the `metric` / `kpis` commands, against a literal
reading of the spec's "Serving the dashboard" section."""

import calendar
import json
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal

import psycopg
import pytest

from spec_oracle import PLATFORM_METRICS, USER_METRICS
from toolkit.catalog import load_catalog
from conftest import SQL_DIR

DAYS = [date(2026, 3, 31), date(2026, 3, 1)]  # a month end (compares with 02-28) and a month start


def comparison_date(day: date, compare: str) -> date:
    if compare == "day":
        return day - timedelta(days=1)
    if compare == "week":
        return day - timedelta(days=7)
    year, month = (day.year, day.month - 1) if day.month > 1 else (day.year - 1, 12)
    return date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def expected(value, previous):
    """(value, previous_value, change, change_pct, trend) as the spec's table defines them."""
    change = value - previous if value is not None and previous is not None else None
    pct = None
    if change is not None and previous != 0:
        pct = (100 * change / abs(previous)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    trend = "up" if change is not None and change > 0 else "down" if change is not None and change < 0 else "neutral"
    return (value, previous, change, pct, trend)


def as_decimal(v):
    return None if v is None else Decimal(v)


@pytest.fixture
def rolled_up(migrated_dsn, run_cli):
    assert run_cli("backfill", "--from", "2026-01-31", "--to", "2026-03-31", "--quiet", "--dsn", migrated_dsn).exit_code == 0
    return migrated_dsn


def stored(conn, table, metric, day, key="user_id"):
    rows = conn.execute(f"select {key}, {metric} from {table} where date = %s", [day]).fetchall()
    return {k: as_decimal(v) for k, v in rows}


@pytest.mark.parametrize("compare", ["day", "week", "month"])
@pytest.mark.parametrize("day", DAYS, ids=str)
def test_user_metric_equals_the_spec_for_every_metric_and_user(rolled_up, day, compare):
    with psycopg.connect(rolled_up) as conn:
        users = [r[0] for r in conn.execute("select id from profiles").fetchall()]
        seen = {"no previous row": 0, "null value": 0, "previous zero": 0}
        for metric in USER_METRICS:
            now = stored(conn, "user_statistics_daily", metric, day)
            before = stored(conn, "user_statistics_daily", metric, comparison_date(day, compare))
            got = {r[0]: r[1:] for r in conn.execute(
                "select p.id, m.* from profiles p cross join lateral user_metric(p.id, %s, %s, %s) m",
                [metric, day, compare]).fetchall()}
            for user in users:
                assert got[user] == expected(now.get(user), before.get(user)), (metric, user)
                seen["no previous row"] += user in now and user not in before
                seen["null value"] += user in now and now[user] is None
                seen["previous zero"] += before.get(user) == 0
        assert all(seen.values()), seen  # the data covers the spec's edge cases


@pytest.mark.parametrize("compare", ["day", "week", "month"])
def test_platform_metric_equals_the_spec(rolled_up, compare):
    day = date(2026, 3, 31)
    with psycopg.connect(rolled_up) as conn:
        for metric in PLATFORM_METRICS:
            now = stored(conn, "platform_statistics_daily", metric, day, key="date")
            before = stored(conn, "platform_statistics_daily", metric, comparison_date(day, compare), key="date")
            got = conn.execute("select * from platform_metric(%s, %s, %s)", [metric, day, compare]).fetchone()
            assert got == expected(now.get(day), before.get(comparison_date(day, compare))), metric


def test_user_kpis_follow_the_role_in_order(rolled_up):
    kpis = load_catalog(SQL_DIR / "catalog.toml").kpis
    day = date(2026, 3, 31)
    with psycopg.connect(rolled_up) as conn:
        for role in ("tutor", "client", "agent"):
            user = conn.execute("select id from profiles where role = %s and created_at < '2026-03-01' order by id limit 1", [role]).fetchone()[0]
            rows = conn.execute("select * from user_kpis(%s, %s, 'week')", [user, day]).fetchall()
            assert [r[0] for r in rows] == list(kpis[role])
            for row in rows:
                assert row[1:] == conn.execute("select * from user_metric(%s, %s, %s, 'week')", [user, row[0], day]).fetchone()
        with pytest.raises(psycopg.errors.NoDataFound):
            conn.execute("select * from user_kpis('00000000-0000-4000-8000-000000000000', %s)", [day])


@pytest.mark.parametrize("evil", [
    "total_earnings; drop table profiles", "total_earnings'--", '"total_earnings"', "TOTAL_EARNINGS",
    "1=1", "", None, "s.total_earnings", "id", "user_id",
])
def test_anything_but_a_metric_name_raises_22023_and_runs_nothing(rolled_up, evil):
    with psycopg.connect(rolled_up, autocommit=True) as conn:
        user = conn.execute("select id from profiles limit 1").fetchone()[0]
        with pytest.raises(psycopg.errors.InvalidParameterValue) as raised:
            conn.execute("select * from user_metric(%s, %s, '2026-03-31')", [user, evil])
        assert raised.value.sqlstate == "22023"
        assert "use one of: total_earnings, monthly_earnings" in raised.value.diag.message_primary
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute("select * from platform_metric(%s, '2026-03-31')", [evil])
        assert conn.execute("select to_regclass('profiles') is not null").fetchone()[0]


@pytest.mark.parametrize("compare", ["year", "Day", None, "day; select 1"])
def test_an_unknown_comparison_raises_22023(rolled_up, compare):
    with psycopg.connect(rolled_up, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute("select * from platform_metric('total_users', '2026-03-31', %s)", [compare])


def test_each_call_is_one_index_lookup_per_date(rolled_up):
    with psycopg.connect(rolled_up) as conn:
        # pg_stat_xact counts what this backend has not flushed yet, so touch the table only through the call
        user = conn.execute("select id from profiles where created_at < '2026-03-01' limit 1").fetchone()[0]
        conn.execute("select * from user_metric(%s, 'total_earnings', '2026-03-31', 'week')", [user])
        scans = conn.execute(
            "select sum(seq_scan), sum(idx_scan) from pg_stat_xact_user_tables"
            " where relid in (select relid from pg_partition_tree('user_statistics_daily'))"
        ).fetchone()
    assert scans == (0, 2)  # one index descent per date, each in its month's partition


def test_functions_are_stable_and_readable_by_a_read_only_role(rolled_up):
    with psycopg.connect(rolled_up, autocommit=True) as conn:
        volatility = dict(conn.execute(
            "select proname, provolatile from pg_proc where proname in ('user_metric', 'platform_metric', 'user_kpis')").fetchall())
        assert volatility == {"user_metric": "s", "platform_metric": "s", "user_kpis": "s"}
        user = conn.execute("select id from profiles where role = 'tutor' limit 1").fetchone()[0]
        conn.execute("begin read only")
        assert len(conn.execute("select * from user_kpis(%s, '2026-03-31')", [user]).fetchall()) == 6
        conn.execute("rollback")


def tutor_with_rows(dsn):
    with psycopg.connect(dsn) as conn:
        return str(conn.execute(
            "select s.user_id from user_statistics_daily s join profiles p on p.id = s.user_id"
            " where p.role = 'tutor' and s.date = '2026-03-31' order by s.completed_sessions desc limit 1").fetchone()[0])


def test_kpis_command_text_and_json(rolled_up, run_cli):
    tutor = tutor_with_rows(rolled_up)
    text = run_cli("kpis", tutor, "--date", "2026-03-31", "--compare", "month", "--dsn", rolled_up)
    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    assert lines[0] == f"tutor {tutor} on 2026-03-31, compared with the month before"
    assert [line.split()[0] for line in lines[2:]] == list(load_catalog(SQL_DIR / "catalog.toml").kpis["tutor"])
    assert "\x1b[" not in text.output  # no colour without a terminal
    data = json.loads(run_cli("kpis", tutor, "--date", "2026-03-31", "--compare", "month", "--format", "json", "--dsn", rolled_up).output)
    assert data["role"] == "tutor" and len(data["metrics"]) == 6
    assert set(data["metrics"][0]) == {"metric", "value", "previous_value", "change", "change_pct", "trend"}
    with psycopg.connect(rolled_up) as conn:  # exact digits, as stored: money is never a float
        earnings = conn.execute("select total_earnings::text from user_statistics_daily"
                                " where user_id = %s and date = '2026-03-31'", [tutor]).fetchone()[0]
    assert data["metrics"][0]["metric"] == "total_earnings" and data["metrics"][0]["value"] == earnings
    platform = run_cli("kpis", "--platform", "--date", "2026-03-31", "--dsn", rolled_up)
    assert platform.exit_code == 0 and len(platform.output.splitlines()) == 2 + 16


def test_metric_command_formats_counts_and_money(rolled_up, run_cli):
    tutor = tutor_with_rows(rolled_up)
    counts = run_cli("metric", tutor, "completed_sessions", "--date", "2026-03-31", "--dsn", rolled_up).output.splitlines()[1].split()
    money = run_cli("metric", tutor, "total_earnings", "--date", "2026-03-31", "--dsn", rolled_up).output.splitlines()[1].split()
    assert counts[1].isdigit() and "." not in counts[1]
    assert money[1].count(".") == 1 and len(money[1].split(".")[1]) == 2


@pytest.mark.parametrize("args, code, message", [
    (["metric", "00000000-0000-4000-8000-000000000000", "total_earnings", "--date", "2026-03-31"], 2, "unknown user"),
    (["metric", "not-a-uuid", "total_earnings"], 2, "USER_ID 'not-a-uuid' is not a user key: profiles.id is uuid"),
    (["metric", "{tutor}", "total_earnings; drop table profiles", "--date", "2026-03-31"], 2, "unknown metric"),
    (["metric", "{tutor}", "total_earnings", "--date", "2026-04-15"], 1,
     "no rollup for 2026-04-15 yet — run statskit backfill --from 2026-04-15 --to 2026-04-15"),
    (["metric", "{tutor}", "total_earnings", "--date", "2025-01-01"], 1, "did not exist yet on 2025-01-01 (created 2026-"),
    (["kpis", "{tutor}", "--date", "2099-01-01"], 1, "2099-01-01 is not over yet in UTC: the rollup holds complete days"),
    (["metric", "{tutor}", "total_earnings", "--date", "2026-02-30"], 2, "impossible date"),
    (["kpis", "--date", "2026-03-31"], 2, "give a USER_ID or --platform"),
    (["kpis", "--platform", "--date", "2025-01-01"], 1, "no rollup for 2025-01-01 yet"),
])
def test_bad_dashboard_input_is_one_line(rolled_up, run_cli, args, code, message):
    tutor = tutor_with_rows(rolled_up)
    result = run_cli(*[a.format(tutor=tutor) for a in args], "--dsn", rolled_up)
    assert result.exit_code == code, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
