"""The web app's contract (clients/): generated from the catalog, compiles under tsc --strict,
its helpers pass their tests, and its names are the ones the deployed functions accept."""

import json
import re
import shutil
import subprocess

import psycopg
import pytest

from conftest import SQL_DIR, npm_install
from test_catalog_growth import NEW_METRIC, add_migration
from toolkit.catalog import load_catalog
from toolkit.clients import RPC_ARGUMENTS, render_clients
from toolkit.render import stale_files

CLIENTS = SQL_DIR.parent / "clients"


def npm(*args):
    result = subprocess.run(["npm", *args], cwd=CLIENTS, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"npm {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def compiled():
    """Install the pinned TypeScript, type-check strictly, run the helpers' tests; return the exports."""
    npm_install(CLIENTS)
    npm("run", "check")
    npm("test")  # compiles into clients/build/ and runs node --test
    script = "import('./build/metrics.js').then(m => console.log(JSON.stringify(m)))"
    out = subprocess.run(["node", "-e", script], cwd=CLIENTS, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def test_committed_client_files_are_current():
    assert stale_files(CLIENTS, render_clients(load_catalog(SQL_DIR / "catalog.toml")), ()) == []


def test_the_json_and_the_typescript_carry_the_same_facts(compiled):
    facts = json.loads((CLIENTS / "metrics.json").read_text())
    assert compiled["USER_METRIC_NAMES"] == list(facts["userMetrics"])
    assert compiled["USER_METRICS"] == facts["userMetrics"]
    assert compiled["PLATFORM_METRICS"] == facts["platformMetrics"]
    assert compiled["KPIS"] == facts["kpis"]
    assert compiled["USER_KEY"] == facts["userKey"] == {"table": "profiles", "column": "id", "sqlType": "uuid"}
    assert compiled["FUNCTIONS"] == facts["functions"]
    assert compiled["SCHEDULE"] == facts["schedule"]


def test_units_follow_the_column_types(compiled):
    for info in list(compiled["USER_METRICS"].values()) + list(compiled["PLATFORM_METRICS"].values()):
        assert (info["unit"] == "count") == (info["sqlType"] == "integer"), info
        assert info["scale"] == (0 if info["unit"] == "count" else 2), info
    assert compiled["USER_METRICS"]["average_rating"]["nullable"] is True
    assert compiled["USER_METRICS"]["total_earnings"]["nullable"] is False


def test_adding_a_metric_changes_the_module_in_the_same_render(tmp_path, run_cli):
    shutil.copytree(SQL_DIR, tmp_path / "sql")
    shutil.copytree(CLIENTS, tmp_path / "clients", ignore=shutil.ignore_patterns("node_modules", "build"))
    catalog = tmp_path / "sql" / "catalog.toml"
    add_migration(catalog, "0002_payments_made", "Add payments_made")
    catalog.write_text(catalog.read_text() + NEW_METRIC)
    result = run_cli("render", "--sql-dir", tmp_path / "sql")
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'clients' / 'metrics.ts'}" in result.output
    module = (tmp_path / "clients" / "metrics.ts").read_text()
    assert re.search(r'USER_METRIC_NAMES = \[[^\]]*"profile_completeness",\n  "payments_made"\n\]', module)
    assert '"payments_made": {\n    "unit": "count"' in module
    assert "payments_made" in json.loads((tmp_path / "clients" / "metrics.json").read_text())["userMetrics"]
    assert run_cli("render", "--check", "--sql-dir", tmp_path / "sql").exit_code == 0


def test_a_metric_without_a_known_unit_is_refused(tmp_path, run_cli):
    shutil.copytree(SQL_DIR, tmp_path / "sql")
    catalog = tmp_path / "sql" / "catalog.toml"
    catalog.write_text(catalog.read_text().replace('unit = "hours"', 'unit = "minutes"', 1))
    result = run_cli("render", "--sql-dir", tmp_path / "sql")
    assert result.exit_code == 2
    assert "total_hours has unit 'minutes': use one of money, count, hours, rating, score, percent" in result.output


def _accepted_names(conn, call):
    """The names a deployed function accepts, from the 22023 error it raises for an unknown one."""
    with pytest.raises(psycopg.errors.InvalidParameterValue) as raised:
        conn.execute(call)
    return raised.value.diag.message_primary.split("use one of: ")[1].split(", ")


def test_names_and_arguments_equal_the_deployed_functions(compiled, migrated_dsn):
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        user_id = conn.execute("select id from profiles limit 1").fetchone()[0]
        assert _accepted_names(conn, f"select * from user_metric('{user_id}', 'no_such_metric')") == compiled["USER_METRIC_NAMES"]
        assert _accepted_names(conn, "select * from platform_metric('no_such_metric')") == compiled["PLATFORM_METRIC_NAMES"]
        for name in compiled["USER_METRIC_NAMES"]:
            conn.execute("select * from user_metric(%s, %s, p_compare => 'week')", [user_id, name])
        for name in compiled["PLATFORM_METRIC_NAMES"]:
            conn.execute("select * from platform_metric(%s, p_compare => 'month')", [name])
        for function, spec in compiled["FUNCTIONS"].items():
            args = conn.execute(
                "select proargnames from pg_proc where proname = %s and pronamespace = %s::regnamespace",
                [function, spec["schema"]]).fetchone()[0]
            assert [a for a in args if a.startswith("p_")] == spec["args"] == list(RPC_ARGUMENTS[function])
        returned = {name: conn.execute("select proargnames[pronargs + 1:] from pg_proc where proname = %s",
                                       [name]).fetchone()[0] for name in ("user_metric", "platform_metric", "user_kpis")}
    module = (CLIENTS / "metrics.ts").read_text()
    row = _fields(module, "MetricRow")
    assert returned["user_metric"] == returned["platform_metric"] == row
    assert returned["user_kpis"] == _fields(module, "KpiRow") + row


def _fields(module, interface):
    body = re.search(rf"export interface {interface}\b[^{{]*{{(.*?)\n}}", module, re.S).group(1)
    return re.findall(r"readonly (\w+):", body)
