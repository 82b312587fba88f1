"""Facts the docs state, checked against the code; small behaviours of the command line."""

import re

from conftest import REPO
from toolkit import db
from toolkit.render import FUNCTIONS

NUMBERS = {8: "eight", 9: "nine", 10: "ten", 11: "eleven", 12: "twelve"}


def test_the_docs_count_the_functions_migrate_creates():
    runbook = (REPO / "docs" / "runbook.md").read_text()
    operations = (REPO / "docs" / "operations.md").read_text()
    assert re.findall(r"`created function …` \((\d+)\)", runbook) == [str(len(FUNCTIONS))]
    assert f"all {NUMBERS[len(FUNCTIONS)]} functions" in operations


def test_a_cron_dsn_keeps_what_it_leaves_out_from_the_target():
    target = "host=db.internal port=6543 user=deployer password=secret dbname=app"
    for given in ("postgres", "dbname=postgres"):
        assert db._parts(db.derived(target, given)) == {**db._parts(target), "dbname": "postgres"}
    other_login = db._parts(db.derived(target, "postgresql://admin@db.internal/postgres"))
    assert other_login["user"] == "admin" and "password" not in other_login and other_login["port"] == "6543"


def test_debug_keeps_the_exit_code_and_masks_the_password(run_cli):
    from click.testing import CliRunner
    from toolkit.cli import cli
    dsn = "host=127.0.0.1 port=1 user=x password=hunter2 dbname=x"
    plain = CliRunner().invoke(cli, ["migrate", "--dsn", dsn])
    debug = CliRunner().invoke(cli, ["--debug", "migrate", "--dsn", dsn])
    assert plain.exit_code == debug.exit_code == 2
    assert "Traceback" in debug.output and "hunter2" not in debug.output


def test_the_docs_module_does_not_import_the_command_line():
    import subprocess
    import sys
    imported = subprocess.run([sys.executable, "-c", "import sys, toolkit.docs; print('toolkit.cli' in sys.modules)"],
                              capture_output=True, text=True, cwd=REPO, check=True).stdout.strip()
    assert imported == "False"
