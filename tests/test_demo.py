"""`statskit demo` on a database the test gives it (the private cluster path is the same code the
session's test server runs on: toolkit.cluster)."""

import re

import psycopg
import pytest


def test_demo_runs_end_to_end_and_tells_the_story(empty_dsn, run_cli):
    result = run_cli("demo", "--dsn", empty_dsn, "--users", 80, "--days", 20, "--seed", 3)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "migrate: 1 migrations, 11 functions, 3 pg_cron jobs, change capture on the source tables" in out
    assert "backfill: 20 days," in out
    # the demo's tables are its own: it creates the indexes statskit advises, and the jobs of a
    # deployment made just now have not had their first night yet
    assert re.search(r"verify: PASS — \d+ passed, 0 warnings, 0 failed", out), out
    assert "no index leads with" not in out
    assert "KPIs of a tutor" in out and "KPIs of a client" in out
    with psycopg.connect(empty_dsn) as conn:
        days, users = conn.execute("select count(distinct date), count(distinct user_id) from user_statistics_daily").fetchone()
    assert days == 20 and users > 0


def test_demo_is_deterministic_for_a_seed():
    from toolkit.reference import marketplace
    assert marketplace.generate(50, 10, seed=9).rows == marketplace.generate(50, 10, seed=9).rows
    assert marketplace.generate(50, 10, seed=9).rows != marketplace.generate(50, 10, seed=10).rows


def test_demo_refuses_a_database_with_source_tables(dsn, run_cli):
    result = run_cli("demo", "--dsn", dsn)
    assert result.exit_code == 1
    assert "already has a profiles table: the demo needs an empty database" in result.output


@pytest.mark.pg  # servers of its own
def test_the_fleet_demo_runs_end_to_end_through_its_router(run_cli):
    """Two private servers, two shards and a PL/Proxy router: the split demo data deployed,
    backfilled and verified as one, the KPIs read through the router."""
    from conftest import SIDE_PORT
    port = SIDE_PORT + 3
    try:
        result = run_cli("demo", "--fleet", "--users", 120, "--days", 15, "--seed", 5, "--port", port)
        assert result.exit_code == 0, result.output
        out = result.output
        assert re.search(r"verify --fleet: PASS — \d+ passed, 0 warnings, 0 failed", out), out
        assert re.search(r"^router .* platform rows merged from every shard's sums: 15 written$", out, re.M), out
        assert "KPIs of a tutor" in out and "through the router" in out
        assert re.search(r"^hours_completed +\d+\.\d\d ", out, re.M)  # the platform, merged on the router
    finally:
        run_cli("demo", "--port", port, "destroy")
