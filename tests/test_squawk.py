"""squawk (an independent migration linter) passes every rendered migration, also those of a
grown catalog, under the rules recorded in .squawk.toml."""

import shutil
import subprocess

import pytest

from conftest import SQL_DIR, npm_install
from test_catalog_growth import NEW_METRIC, add_migration, change_metric

REPO = SQL_DIR.parent
TOOLS = REPO / "tools"


@pytest.fixture(scope="module")
def squawk():
    npm_install(TOOLS)

    def lint(*paths):
        return subprocess.run([TOOLS / "node_modules" / ".bin" / "squawk", "--config", REPO / ".squawk.toml",
                               "--reporter", "gcc", *map(str, paths)], capture_output=True, text=True, timeout=120)

    return lint


def test_the_rendered_migrations_pass(squawk):
    result = squawk(*sorted((SQL_DIR / "migrations").glob("*.sql")))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_grown_catalog_renders_migrations_that_pass(squawk, tmp_path, run_cli):
    sql = tmp_path / "sql"
    shutil.copytree(SQL_DIR, sql)
    catalog = sql / "catalog.toml"
    add_migration(catalog, "0002_payments_made", "Add payments_made, drop five_star_reviews, widen total_hours")
    catalog.write_text(catalog.read_text() + NEW_METRIC)
    change_metric(catalog, "five_star_reviews", 'removed_in = "0002_payments_made"\n')
    catalog.write_text(catalog.read_text().replace(
        'name = "total_hours"\ngroup = "sessions"\ntype = "numeric(10,2)"',
        'name = "total_hours"\ngroup = "sessions"\ntype = "numeric(14,2)"\nretyped_in = "0002_payments_made"\nwas = "numeric(10,2)"'))
    assert run_cli("render", "--sql-dir", sql).exit_code == 0
    grown = sorted((sql / "migrations").glob("0002_*.sql"))
    assert len(grown) == 2
    text = grown[0].read_text() + grown[1].read_text()
    assert "add column payments_made" in text and "drop column five_star_reviews" in text and "type numeric(14,2)" in text
    result = squawk(*grown)
    assert result.returncode == 0, result.stdout + result.stderr


def test_squawk_still_catches_an_unsafe_migration(squawk, tmp_path):
    unsafe = tmp_path / "0003_unsafe.sql"
    unsafe.write_text("create index user_statistics_daily_user_idx on user_statistics_daily (user_id);\n"
                      "alter table user_statistics_daily drop column total_hours;\n")
    result = squawk(unsafe)
    assert result.returncode != 0
    assert "require-concurrent-index-creation" in result.stdout and "ban-drop-column" in result.stdout
