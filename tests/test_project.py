"""A DBA's own project: `statskit init` writes it, and statskit finds it from the working
directory (or above) or $STATSKIT_PROJECT, so an installed statskit uses the DBA's catalog."""

import psycopg
import pytest

from test_catalog_growth import NEW_METRIC, add_migration


@pytest.fixture
def shop(tmp_path, run_cli, monkeypatch):
    """`statskit init shop`, and the working directory somewhere inside it."""
    monkeypatch.delenv("STATSKIT_PROJECT", raising=False)
    folder = tmp_path / "shop"
    result = run_cli("init", folder)
    assert result.exit_code == 0, result.output
    (folder / "reports").mkdir()
    monkeypatch.chdir(folder / "reports")
    return folder


def test_init_writes_a_project_that_renders_clean(shop, run_cli):
    assert (shop / "statskit.toml").is_file() and (shop / "sql" / "catalog.toml").is_file()
    assert (shop / "sql" / "functions" / "aggregate_user_statistics.sql").is_file()
    assert (shop / "clients" / "metrics.ts").is_file()
    check = run_cli("render", "--check")  # found from a folder below the project
    assert check.exit_code == 0 and "rendered files are up to date" in check.output


def test_init_never_overwrites_a_project(shop, run_cli):
    again = run_cli("init", shop)
    assert again.exit_code == 2 and "is a statskit project already" in again.output


def test_the_projects_catalog_is_the_one_deployed(shop, dsn, run_cli):
    catalog = shop / "sql" / "catalog.toml"
    add_migration(catalog, "0002_payments_made", "Add payments_made")
    catalog.write_text(catalog.read_text() + NEW_METRIC)
    rendered = run_cli("render")
    assert rendered.exit_code == 0 and "next: statskit migrate applies the new migration" in rendered.output
    assert (shop / "sql" / "migrations" / "0002_payments_made.sql").is_file()
    assert '"payments_made"' in (shop / "clients" / "metrics.ts").read_text()
    assert run_cli("migrate", "--dsn", dsn).exit_code == 0
    with psycopg.connect(dsn) as conn:
        assert conn.execute("select to_regclass('user_statistics_daily') is not null and exists (select from"
                            " pg_attribute where attrelid = 'user_statistics_daily'::regclass"
                            " and attname = 'payments_made')").fetchone()[0]


def test_statskit_project_names_the_project_from_anywhere(shop, tmp_path, run_cli, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("STATSKIT_PROJECT", str(shop))
    assert run_cli("render", "--check").exit_code == 0
    monkeypatch.setenv("STATSKIT_PROJECT", str(elsewhere))
    result = run_cli("render", "--check")
    assert result.exit_code == 2 and f"STATSKIT_PROJECT={elsewhere}: no statskit.toml there" in result.output


def test_a_projects_docs_are_about_its_catalog_only(shop, run_cli):
    (shop / "docs").mkdir()
    assert run_cli("render").exit_code == 0
    assert sorted(p.name for p in (shop / "docs").iterdir()) == ["contract.md", "metrics.md"]
