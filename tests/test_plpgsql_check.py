"""plpgsql_check (an independent static checker) finds nothing in any function statskit creates."""

import psycopg

from toolkit.render import FUNCTIONS, signature


def plpgsql_findings(dsn: str, key_type: str = "uuid", also: tuple[str, ...] = ()) -> dict:
    """What plpgsql_check says of every deployed function (in public), of capture's one writer
    of the change log and of the functions `also` names, with all its warnings."""
    findings = {}
    functions = [signature("public", name, key_type) for name in FUNCTIONS]
    functions += [f"statskit.log_changes({key_type}[], timestamptz[])", *also]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("create extension if not exists plpgsql_check")
        for function in functions:
            rows = conn.execute(
                "select level, lineno, message from plpgsql_check_function_tb(%s::regprocedure,"
                " fatal_errors => false, all_warnings => true)", [function]).fetchall()
            if rows:
                findings[function] = rows
    return findings


def test_every_function_passes_plpgsql_check_with_all_warnings(migrated_dsn):
    assert plpgsql_findings(migrated_dsn) == {}


def test_plpgsql_check_reports_what_it_should(migrated_dsn):
    """The checker is live: a function with an unused variable and a wrong column is reported."""
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        conn.execute("create extension plpgsql_check")
        conn.execute("create function public.broken() returns integer language plpgsql as $$"
                     " declare v_unused integer; begin return (select no_such_column from public.user_statistics_daily); end $$")
        messages = [r[0] for r in conn.execute(
            "select message from plpgsql_check_function_tb('public.broken()', fatal_errors => false, all_warnings => true)")]
    assert any("no_such_column" in m for m in messages) and any("unused variable" in m for m in messages)


def test_every_capture_trigger_function_passes_plpgsql_check(migrated_dsn):
    from toolkit.catalog import load_catalog
    from conftest import SQL_DIR
    tables = load_catalog(SQL_DIR / "catalog.toml").source_tables
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        conn.execute("create extension plpgsql_check")
        findings = {}
        for table in tables:
            rows = conn.execute(
                "select level, lineno, message from plpgsql_check_function_tb(%s::regprocedure, %s::regclass,"
                " fatal_errors => false, oldtable => 'old_rows', newtable => 'changed_rows', all_warnings => true)",
                [f"statskit.capture_{table}()", f"public.{table}"]).fetchall()
            if rows:
                findings[table] = rows
    assert findings == {}
