"""Growing the catalog: a new, removed or retyped metric becomes a new migration on a live database."""

import re
import shutil

import psycopg
import pytest

from conftest import SQL_DIR

NEW_METRIC = '''
[[user.metrics]]
name = "payments_made"
group = "spending"
type = "integer"
unit = "count"
default = "0"
meaning = "The user's 'payment' transactions created as of D"
added_in = "0002_payments_made"
source = "transaction_days"
where = "t.kind = 'payment'"
value = "1"
enters = "t.created_on"
'''


def add_migration(catalog, migration_id, description):
    text = catalog.read_text()
    anchor = "\n# The source tables"
    entry = f'\n[[migrations]]\nid = "{migration_id}"\ndescription = "{description}"\n'
    catalog.write_text(text.replace(anchor, entry + anchor, 1))


def change_metric(catalog, name, extra):
    text = catalog.read_text()
    marker = f'name = "{name}"\n'
    assert text.count(marker) == 1
    catalog.write_text(text.replace(marker, marker + extra, 1))


def columns(dsn):
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute(
            "select attname, format_type(atttypid, atttypmod) from pg_attribute"
            " where attrelid = 'user_statistics_daily'::regclass and attnum > 0 and not attisdropped").fetchall())


@pytest.fixture
def grown(migrated_dsn, run_cli, tmp_path):
    assert run_cli("backfill", "--from", "2026-03-29", "--to", "2026-03-31", "--quiet", "--dsn", migrated_dsn).exit_code == 0
    sql_copy = tmp_path / "sql"
    shutil.copytree(SQL_DIR, sql_copy)
    return migrated_dsn, sql_copy


def test_a_new_metric_is_a_new_migration_old_rows_keep_their_values(grown, run_cli):
    dsn, sql_copy = grown
    with psycopg.connect(dsn) as conn:
        before = conn.execute("select user_id, date, total_spent, total_reviews from user_statistics_daily order by 1, 2").fetchall()
    catalog = sql_copy / "catalog.toml"
    add_migration(catalog, "0002_payments_made", "Add payments_made to user_statistics_daily")
    catalog.write_text(catalog.read_text() + NEW_METRIC)
    first = (sql_copy / "migrations" / "0001_statistics_tables.sql").read_text()
    rendered = run_cli("render", "--sql-dir", sql_copy)
    assert rendered.exit_code == 0, rendered.output
    assert (sql_copy / "migrations" / "0001_statistics_tables.sql").read_text() == first
    migration = (sql_copy / "migrations" / "0002_payments_made.sql").read_text()
    assert "-- depends: 0001_statistics_tables" in migration
    assert "add column payments_made integer not null default 0;" in migration
    assert "comment on column \"public\".user_statistics_daily.payments_made is" in migration
    assert "drop column payments_made;" in (sql_copy / "migrations" / "0002_payments_made.rollback.sql").read_text()

    result = run_cli("migrate", "--dsn", dsn, "--sql-dir", sql_copy)
    assert result.exit_code == 0, result.output
    assert "applied migration 0002_payments_made" in result.output
    assert "created function public.aggregate_user_statistics" in result.output
    assert result.output.rstrip().endswith("fill them with:\n  statskit backfill --from 2026-03-29 --to 2026-03-31")
    with psycopg.connect(dsn) as conn:
        assert conn.execute("select user_id, date, total_spent, total_reviews from user_statistics_daily order by 1, 2").fetchall() == before
        assert conn.execute("select count(*) from user_statistics_daily where payments_made <> 0").fetchone()[0] == 0
    window = ["--from", "2026-03-29", "--to", "2026-03-31"]
    unfilled = run_cli("verify", "--dsn", dsn, "--sql-dir", sql_copy, *window, "--only", "data")
    assert unfilled.exit_code == 1 and re.search(
        r"data new metrics +fail  payments_made of user_statistics_daily holds its default on 2026-03-29..2026-03-31"
        r" \(added after those rows were written\): run statskit backfill --from 2026-03-29 --to 2026-03-31",
        unfilled.output), unfilled.output
    # a part of the days fills a part; the rest is still named
    assert run_cli("backfill", "--from", "2026-03-30", "--to", "2026-03-30", "--quiet", "--dsn", dsn).exit_code == 0
    partly = run_cli("verify", "--dsn", dsn, "--sql-dir", sql_copy, *window, "--only", "data").output
    assert "on 2026-03-29..2026-03-29" in partly and "on 2026-03-31..2026-03-31" in partly
    assert run_cli("backfill", *window, "--quiet", "--dsn", dsn).exit_code == 0
    assert "data new metrics" in run_cli("verify", "--dsn", dsn, "--sql-dir", sql_copy, *window, "--only", "data").output
    assert run_cli("verify", "--dsn", dsn, "--sql-dir", sql_copy, *window, "--only", "data").exit_code == 0
    with psycopg.connect(dsn) as conn:
        wrong = conn.execute(
            "select count(*) from user_statistics_daily s where s.payments_made <> (select count(*) from transactions t"
            " where t.user_id = s.user_id and t.kind = 'payment' and t.created_at < s.date + 1)").fetchone()[0]
        filled = conn.execute("select count(*) from user_statistics_daily where payments_made > 0").fetchone()[0]
    assert wrong == 0 and filled > 0
    # The one-day and one-user functions come from the same entry as the range function backfill ran.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("update user_statistics_daily set payments_made = -1 where date = '2026-03-31'")
        assert conn.execute("select aggregate_user_statistics(null, '2026-03-31')").fetchone()[0] > 0
        someone = conn.execute("select user_id from user_statistics_daily where payments_made > 0 limit 1").fetchone()[0]
        conn.execute("update user_statistics_daily set payments_made = -1 where user_id = %s and date = '2026-03-30'",
                     [someone])
        assert conn.execute("select aggregate_single_user_statistics(%s, '2026-03-30')", [someone]).fetchone()[0] == 1
        assert conn.execute(
            "select count(*) from user_statistics_daily s where s.date >= '2026-03-30' and s.payments_made <> (select"
            " count(*) from transactions t where t.user_id = s.user_id and t.kind = 'payment' and t.created_at < s.date + 1)"
            " and (s.date = '2026-03-31' or s.user_id = %s)", [someone]).fetchone()[0] == 0
    assert run_cli("verify", "--dsn", dsn, "--sql-dir", sql_copy, "--from", "2026-03-29", "--to", "2026-03-31",
                   "--only", "schema,functions,migrations,sample").exit_code == 0


def test_removing_and_retyping_metrics_are_migrations_with_a_warning(grown, run_cli):
    dsn, sql_copy = grown
    catalog = sql_copy / "catalog.toml"
    add_migration(catalog, "0002_reviews_and_hours", "Drop five_star_reviews; widen total_hours")
    change_metric(catalog, "five_star_reviews", 'removed_in = "0002_reviews_and_hours"\n')
    text = catalog.read_text().replace('name = "total_hours"\ngroup = "sessions"\ntype = "numeric(10,2)"',
                                       'name = "total_hours"\ngroup = "sessions"\ntype = "numeric(14,2)"\n'
                                       'retyped_in = "0002_reviews_and_hours"\nwas = "numeric(10,2)"')
    catalog.write_text(text)
    rendered = run_cli("render", "--sql-dir", sql_copy)
    assert rendered.exit_code == 0, rendered.output
    assert "warning: migrations/0002_reviews_and_hours.sql: drops user_statistics_daily.five_star_reviews" in rendered.output
    migration = (sql_copy / "migrations" / "0002_reviews_and_hours.sql").read_text()
    assert "drop column five_star_reviews," in migration and "alter column total_hours type numeric(14,2);" in migration
    with psycopg.connect(dsn) as conn:
        hours = conn.execute("select sum(total_hours) from user_statistics_daily").fetchone()[0]

    assert run_cli("migrate", "--dsn", dsn, "--sql-dir", sql_copy).exit_code == 0
    after = columns(dsn)
    assert "five_star_reviews" not in after and after["total_hours"] == "numeric(14,2)"
    with psycopg.connect(dsn) as conn:
        assert conn.execute("select sum(total_hours) from user_statistics_daily").fetchone()[0] == hours
        assert conn.execute("select aggregate_user_statistics(null, '2026-03-31')").fetchone()[0] == 0
    assert run_cli("verify", "--dsn", dsn, "--sql-dir", sql_copy, "--from", "2026-03-29", "--to", "2026-03-31",
                   "--only", "schema,functions,migrations,sample").exit_code == 0

    undo = run_cli("rollback", "--dsn", dsn, "--sql-dir", sql_copy)
    assert undo.exit_code == 0 and "rolled back migration 0002_reviews_and_hours" in undo.output
    restored = columns(dsn)
    assert restored["five_star_reviews"] == "integer" and restored["total_hours"] == "numeric(10,2)"


def test_a_metric_without_its_span_is_refused_by_name(tmp_path, run_cli):
    sql_copy = tmp_path / "sql"
    shutil.copytree(SQL_DIR, sql_copy)
    catalog = sql_copy / "catalog.toml"
    add_migration(catalog, "0002_payments_made", "Add payments_made to user_statistics_daily")
    catalog.write_text(catalog.read_text() + NEW_METRIC.split('source = "transaction_days"')[0])
    result = run_cli("render", "--sql-dir", sql_copy)
    assert result.exit_code == 2
    assert result.output.strip() == ("statskit: error: catalog: user_statistics_daily.payments_made lacks source, value,"
                                     " enters (a metric counts `value` of each `source` row from the day it `enters`)")


def test_a_source_no_metric_uses_is_refused_by_name(tmp_path, run_cli):
    sql_copy = tmp_path / "sql"
    shutil.copytree(SQL_DIR, sql_copy)
    catalog = sql_copy / "catalog.toml"
    unused = '\n[[user.sources]]\nname = "orphan_days"\nfrom = "(select r.reviewee_id, r.created_at from {{ source }}.reviews r) as r"\nuser_key = "r.reviewee_id"\nchanges_on = { created_at = [0] }\n'
    catalog.write_text(catalog.read_text().replace("\n[platform]\n", unused + "\n[platform]\n", 1))
    result = run_cli("render", "--sql-dir", sql_copy)
    assert result.exit_code == 2
    assert result.output.strip() == "statskit: error: catalog: source orphan_days of user_statistics_daily feeds no metric"


def unrelated_changes(before: str, after: str, name: str) -> list[str]:
    """The lines a rendered file's diff changes that do not name `name`: none may, but for a line
    that only gains the comma a new last item needs, and the sums' digest (it must change: it
    says the sums are defined otherwise, and migrate rebuilds them)."""
    import difflib
    found = []
    diff = list(difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0))
    removed = [line[1:] for line in diff if line.startswith("-") and not line.startswith("---")]
    added = [line[1:] for line in diff if line.startswith("+") and not line.startswith("+++")]
    for line in removed:
        if name in line or line + "," in added or "statskit sums " in line:
            continue
        found.append(f"-{line}")
    for line in added:
        if name in line or (line.endswith(",") and line[:-1] in removed) or "statskit sums " in line:
            continue
        found.append(f"+{line}")
    return found


def test_a_new_metric_is_reviewed_by_the_lines_that_name_it(tmp_path):
    """The rendered diff of a new metric is its review: every line it changes names the metric
    (no wall of positional values gains a column, no list re-flows), plus its migration."""
    from toolkit.render import render_all
    shutil.copytree(SQL_DIR, tmp_path / "sql")
    catalog = tmp_path / "sql" / "catalog.toml"
    before = render_all(tmp_path / "sql")
    add_migration(catalog, "0002_payments_made", "Add payments_made to user_statistics_daily")
    catalog.write_text(catalog.read_text() + NEW_METRIC)
    after = render_all(tmp_path / "sql")
    assert set(after) - set(before) == {"migrations/0002_payments_made.sql", "migrations/0002_payments_made.rollback.sql"}
    changed = [rel for rel in before if before[rel] != after[rel]]
    assert "functions/aggregate_user_statistics_range.sql" in changed
    assert {rel: unrelated_changes(before[rel], after[rel], "payments_made") for rel in changed} == {rel: [] for rel in changed}
