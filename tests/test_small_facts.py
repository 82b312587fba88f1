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
        assert db.dsn_parts(db.derived(target, given)) == {**db.dsn_parts(target), "dbname": "postgres"}
    other_login = db.dsn_parts(db.derived(target, "postgresql://admin@db.internal/postgres"))
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


def test_no_module_of_toolkit_imports_one_that_imports_it_back():
    """The import graph of toolkit/ (its relative imports) has no cycle: the CLI sits on the API,
    the API on the modules, and no module reaches back up."""
    import ast
    graph = {}
    for path in (REPO / "toolkit").rglob("*.py"):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        graph[module] = {f"{package}.{node.module}" if node.module else f"{package}.{alias.name}"
                         for node in ast.walk(ast.parse(path.read_text()))
                         if isinstance(node, ast.ImportFrom) and node.level == 1
                         for alias in (node.names if not node.module else node.names[:1])}
    assert "toolkit.api" in graph["toolkit.cli"] and "toolkit.migrate" in graph["toolkit.api"]  # the graph is read

    def cycle(start):
        paths = [[start]]
        while paths:
            path = paths.pop()
            for nxt in graph.get(path[-1], ()):
                if nxt == start:
                    return path + [nxt]
                if nxt not in path:
                    paths.append(path + [nxt])
        return None

    assert [c for c in map(cycle, graph) if c] == []


def test_the_repeated_block_count_sees_a_copy_and_only_a_copy():
    """tools/repeated_blocks.py, which CI runs against its limits: a block of 4 lines written again
    (re-indented, a comment between) counts 4 repeated lines; 3 lines again, or the same lines in
    another order, count none."""
    import sys
    sys.path.insert(0, str(REPO / "tools"))
    from repeated_blocks import normalized, repeated
    block = "select a,\n  b\nfrom t\nwhere c\n"
    assert repeated(normalized(block + "-- again\n" + "    select a,\n b\n  from t\nwhere c\n")) == (1, 4)
    assert repeated(normalized(block + "select a,\n  b\nfrom t\n")) == (0, 0)
    assert repeated(normalized(block + "where c\nfrom t\n  b\nselect a,\n")) == (0, 0)
