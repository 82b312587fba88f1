"""A user-sharded fleet on two real servers: four shard databases (two on the session's server,
two on a second), the test marketplace split by the layout of docs/contract.md's "Sharding", each
deployed, backfilled and verified by the fleet commands as a non-superuser owner with pg_cron in
each server's own database. The union of the shards' user rows is the literal oracle's on the
unsplit data; drift, a changed copy, a misplaced profile and a stopped server are each named."""

import os
import re
import threading
from datetime import timedelta

import psycopg
import pytest
from click.testing import CliRunner

from conftest import SIDE_PORT, SQL_DIR, cluster as session_cluster, extract_release, invoke_cli, run_previous
from spec_oracle import differences, expected_platform_row, expected_user_rows, stored_platform_row, stored_user_rows
from toolkit import api, compiler, fleet as fleet_core
from toolkit.backfill import Stopped
from toolkit.catalog import load_catalog
from toolkit.cluster import CRON_DATABASE, LocalCluster
from toolkit.errors import UsageError
from toolkit.reference import marketplace, shards as reference_shards

pytestmark = pytest.mark.pg  # a second server of its own

OWNER = "fleet_owner"
SHARDS = 4
# shard i lives on server i % 2: each server holds two shard databases, so job names must differ
DATABASES = [f"fleet_shard{i}" for i in range(SHARDS)]
# the routers live beside two of the shards: PL/Proxy's is a superuser's, dblink's the owner's
ROUTERS = {"plproxy": "fleet_router", "dblink": "fleet_router_dblink"}
CRON_GRANTS = f"""
grant usage on schema cron to {OWNER};
grant execute on function cron.schedule_in_database(text, text, text, text, text, boolean) to {OWNER};
grant execute on function cron.alter_job(bigint, text, text, text, text, boolean) to {OWNER};
"""


def as_owner(server, dbname):
    return server.dsn(dbname).replace("user=postgres", f"user={OWNER}")


# The router logs into the shards as statskit_router, by password (dblink lets a non-superuser
# connect no other way); every other login of the test servers stays trusted.
ROUTER_PASSWORD = "router-secret"
ROUTER_HBA = "host all statskit_router 127.0.0.1/32 scram-sha-256\n"


def _prepare(server):
    hba = server.datadir / "pg_hba.conf"
    if ROUTER_HBA not in hba.read_text():
        hba.write_text(ROUTER_HBA + hba.read_text())
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        if not conn.execute("select 1 from pg_roles where rolname = %s", [OWNER]).fetchone():
            conn.execute(f"create role {OWNER} login createrole")
        if not conn.execute("select 1 from pg_roles where rolname = 'statskit_router'").fetchone():
            conn.execute("create role statskit_router login")
        conn.execute(f"alter role statskit_router password '{ROUTER_PASSWORD}'")
        conn.execute(CRON_GRANTS)
        conn.execute("select pg_reload_conf()")


@pytest.fixture(scope="module")
def servers():
    second = LocalCluster(f"fleet-{SIDE_PORT + 2}", SIDE_PORT + 2, durable=False)
    second.destroy()
    second.start()
    for server in (session_cluster, second):
        _prepare(server)
    os.environ["STATSKIT_ROUTER_PASSWORD"] = ROUTER_PASSWORD  # what migrate puts in the user mappings
    try:
        yield [session_cluster, second]
    finally:
        del os.environ["STATSKIT_ROUTER_PASSWORD"]
        second.destroy()
        hba = session_cluster.datadir / "pg_hba.conf"  # the session's server trusts every login again
        hba.write_text(hba.read_text().replace(ROUTER_HBA, ""))
        databases = [*DATABASES, *ROUTERS.values(), *SECURED, *SECURED_ROUTERS.values()]
        with psycopg.connect(session_cluster.dsn(), autocommit=True) as conn:
            conn.execute("select cron.unschedule(jobid) from cron.job where database = any(%s)", [databases])
            for name in databases + ["fleet_whole"]:
                conn.execute(f"drop database if exists {name} with (force)")
            # the secured fleet's roles, once nothing of theirs is left
            conn.execute("drop role if exists fleet_dashboard")
            for role in ("statskit_reader", "statskit_writer"):
                if conn.execute("select from pg_roles where rolname = %s", [role]).fetchone():
                    conn.execute(f"drop owned by {role}")
                    conn.execute(f"drop role {role}")
            conn.execute("select pg_reload_conf()")


def shard_server(servers, index):
    return servers[index % 2]


def owned_database(server, name, owner=OWNER):
    """`name` on `server`, made afresh and owned by `owner`."""
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute(f"drop database if exists {name} with (force)")
        conn.execute(f"create database {name} owner {owner}")


def shard_database(server, name, part):
    """A shard database of the owner's, holding its part of the split marketplace."""
    owned_database(server, name)
    with psycopg.connect(as_owner(server, name)) as conn:
        conn.execute(reference_shards.shard_schema_sql())
        marketplace.load(conn, part)


def dblink_router_database(name):
    """A router database of the owner's on the session's server, prepared as a managed service's
    admin role would: the dblink extension, and its wrapper's use."""
    owned_database(session_cluster, name)
    with psycopg.connect(session_cluster.dsn(name), autocommit=True) as conn:
        conn.execute("create extension dblink")
        conn.execute(f"grant usage on foreign data wrapper dblink_fdw to {OWNER}")


@pytest.fixture(scope="module")
def fleet_file(servers, market, tmp_path_factory):
    """The four shard databases holding the split marketplace, the unsplit one, and the fleet file."""
    catalog = load_catalog(SQL_DIR / "catalog.toml")
    with psycopg.connect(session_cluster.dsn(), autocommit=True) as conn:
        conn.execute("drop database if exists fleet_whole with (force)")
        conn.execute("create database fleet_whole")
    with psycopg.connect(session_cluster.dsn("fleet_whole")) as conn:
        marketplace.create_source_tables(conn)
        marketplace.load(conn, market)
        keys = [row[0] for row in market.rows["profiles"]]
        fleet = fleet_core.Fleet(None, tuple(fleet_core.Shard(i, f"shard{i}", "") for i in range(SHARDS)))
        shard_of = fleet_core.placements(conn, fleet, keys, "uuid")
    parts = reference_shards.split(market, catalog, shard_of, SHARDS)
    lines = []
    for index, (name, part) in enumerate(zip(DATABASES, parts)):
        server = shard_server(servers, index)
        shard_database(server, name, part)
        lines += ["[[shards]]", f'dsn = "{as_owner(server, name)}"']
    folder = tmp_path_factory.mktemp("fleet")
    for engine, name in ROUTERS.items():
        if engine == "dblink":
            dblink_router_database(name)
        else:
            owned_database(session_cluster, name, "postgres")
        (folder / f"{engine}.toml").write_text("\n".join(
            lines + ["[router]", f'dsn = "{router_dsn(engine)}"', f'engine = "{engine}"']) + "\n")
    (folder / "fleet.toml").write_text((folder / "plproxy.toml").read_text())
    return folder / "fleet.toml"


def router_dsn(engine="plproxy"):
    name = ROUTERS[engine]
    return as_owner(session_cluster, name) if engine == "dblink" else session_cluster.dsn(name)


@pytest.fixture(scope="module", params=list(ROUTERS))
def router(request, deployed, run_cli_module):
    """(engine, fleet file, router DSN) of each router: the dblink one deployed and merged by the owner."""
    engine = request.param
    path = deployed.parent / f"{engine}.toml"
    if engine == "dblink":
        done = run_cli_module("migrate", "--fleet", path, "--cron-dsn", CRON_DATABASE)
        assert done.exit_code == 0, done.output
        with psycopg.connect(router_dsn(engine), autocommit=True) as conn:
            conn.execute("select merge_platform_statistics()")
    return engine, path, router_dsn(engine)


def check_line(output, name):
    """(status, detail) of the report line of check `name`."""
    line = next(line for line in output.splitlines() if line.split(" ", 1)[0] == name)
    _, status, detail = line.split(None, 2)
    return status, detail


def shard_dsn(servers, index):
    return as_owner(shard_server(servers, index), DATABASES[index])


@pytest.fixture(scope="module")
def deployed(fleet_file, market, run_cli_module):
    done = run_cli_module("migrate", "--fleet", fleet_file, "--cron-dsn", CRON_DATABASE, "--parallel", "2")
    assert done.exit_code == 0, done.output
    filled = run_cli_module("backfill", "--fleet", fleet_file, "--from", market.first_day, "--to", market.last_day,
                            "--quiet")
    assert filled.exit_code == 0, filled.output
    return fleet_file


@pytest.fixture(scope="module")
def run_cli_module():
    runner = CliRunner()
    return lambda *args: invoke_cli(runner, *args)


def test_the_split_puts_every_row_where_the_layout_says(fleet_file, market, servers):
    """The layout itself: each profile on one shard, a booking between two shards' users on both."""
    counts = []
    for index in range(SHARDS):
        with psycopg.connect(shard_dsn(servers, index)) as conn:
            counts.append(dict(conn.execute(
                "select 'profiles', count(*) from profiles union all select 'bookings', count(*) from bookings"
            ).fetchall()))
    assert sum(c["profiles"] for c in counts) == len(market.rows["profiles"])
    assert all(c["profiles"] > 0 for c in counts)
    assert sum(c["bookings"] for c in counts) > len(market.rows["bookings"])  # the shared ones twice


def test_the_fleet_is_deployed_and_its_user_rows_are_the_oracles(deployed, market, servers):
    days = [market.first_day, market.first_day + timedelta(days=29), market.last_day]
    with psycopg.connect(session_cluster.dsn("fleet_whole")) as whole:
        expected = {day: expected_user_rows(whole, day) for day in days}
    for day in days:
        union = {}
        for index in range(SHARDS):
            with psycopg.connect(shard_dsn(servers, index)) as conn:
                rows = stored_user_rows(conn, day)
            assert not set(rows) & set(union), "a user has rows on two shards"
            union.update(rows)
        assert differences(expected[day], union) == []
    # every shard's jobs, named after it: two shard databases on one server each have their own
    for server in servers:
        with psycopg.connect(server.dsn(CRON_DATABASE)) as conn:
            jobs = conn.execute("select database, jobname, username from cron.job where database like 'fleet_shard%'"
                                " order by 1, 2").fetchall()
        held = [i for i in range(SHARDS) if shard_server(servers, i) is server]
        assert jobs == [(DATABASES[i], f"{job}-shard{i}", OWNER) for i in held
                        for job in ("aggregate-platform-statistics", "aggregate-user-statistics", "statistics-partitions")]


def test_a_rerun_changes_nothing_and_verify_passes_the_fleet(deployed, run_cli_module):
    again = run_cli_module("migrate", "--fleet", deployed)
    assert again.exit_code == 0, again.output
    assert again.output.count("up to date, nothing to do") == 2 * (SHARDS + 1)  # shards and router: line, table
    verified = run_cli_module("verify", "--fleet", deployed, "--sample", "5000", "--from", "2026-03-25", "--to", "2026-03-31")
    assert verified.exit_code == 0, verified.output
    for check in ("fleet:deployment", "fleet:jobs", "fleet:placement", "fleet:copies",
                  "router:functions", "router:cluster", "router:jobs", "router:merge"):
        assert check_line(verified.output, check)[0] == "pass", verified.output
    assert check_line(verified.output, "shard3:sample")[0] == "pass"
    assert int(check_line(verified.output, "fleet:copies")[1].split()[0]) > 0  # copies were compared


def test_drift_on_one_shard_is_named_and_migrate_repairs_it(deployed, servers, run_cli_module):
    with psycopg.connect(shard_dsn(servers, 2), autocommit=True) as conn:
        conn.execute("drop function user_kpis")
    found = run_cli_module("verify", "--fleet", deployed, "--only", "functions")
    assert found.exit_code == 1
    assert re.search(r"^shard2:function user_kpis +fail +public.user_kpis\(.*\) does not exist", found.output, re.M)
    # the checksums recorded are the same: a function gone behind migrate's back is the shard's own check
    assert check_line(found.output, "fleet:deployment")[0] == "pass"
    repaired = run_cli_module("migrate", "--fleet", deployed)
    assert repaired.exit_code == 0, repaired.output
    assert "shard2 (" in repaired.output and "1 functions" in repaired.output
    assert run_cli_module("verify", "--fleet", deployed, "--only", "functions").exit_code == 0

    # a shard left at another setting than the others is named by the fleet check
    with psycopg.connect(shard_dsn(servers, 1), autocommit=True) as conn:
        conn.execute("update statskit.settings set value = '5' where key = 'lookback_days'")
    try:
        drifted = run_cli_module("verify", "--fleet", deployed, "--only", "migrations")
        assert drifted.exit_code == 1
        status, line = check_line(drifted.output, "fleet:deployment")
        assert status == "fail" and "shard1" in line and "lookback_days = '5'" in line and "migrate --fleet" in line
    finally:
        with psycopg.connect(shard_dsn(servers, 1), autocommit=True) as conn:
            conn.execute("update statskit.settings set value = '1' where key = 'lookback_days'")


def test_a_copy_changed_on_one_shard_and_a_misplaced_profile_are_named(deployed, servers, run_cli_module):
    with psycopg.connect(shard_dsn(servers, 0)) as conn:
        booking = conn.execute(
            f"select id from bookings where (hashtext(tutor_id::text) & {SHARDS - 1}) <>"
            f" (hashtext(client_id::text) & {SHARDS - 1}) order by id limit 1").fetchone()[0]
    with psycopg.connect(shard_dsn(servers, 0), autocommit=True) as conn:
        conn.execute("update bookings set duration_minutes = duration_minutes + 1 where id = %s", [booking])
        stray = conn.execute("select id from profiles limit 1").fetchone()[0]
    other = next(i for i in range(1, SHARDS))
    with psycopg.connect(shard_dsn(servers, other), autocommit=True) as conn:
        conn.execute("insert into profiles select %s, 'client', '2026-01-01' on conflict do nothing", [stray])
    try:
        found = run_cli_module("verify", "--fleet", deployed, "--only", "schema", "--sample", "10000")
        assert found.exit_code == 1
        copies = check_line(found.output, "fleet:copies")[1]
        assert f"bookings id {booking} is on shard0 and differs on" in copies, copies
        placement = check_line(found.output, "fleet:placement")[1]
        assert f"shard{other}" in placement and str(stray) in placement, placement
    finally:
        with psycopg.connect(shard_dsn(servers, 0), autocommit=True) as conn:
            conn.execute("update bookings set duration_minutes = duration_minutes - 1 where id = %s", [booking])
        with psycopg.connect(shard_dsn(servers, other), autocommit=True) as conn:
            conn.execute("delete from profiles where id = %s", [stray])


def first_users(servers):
    """A user of each shard."""
    users = []
    for index in range(SHARDS):
        with psycopg.connect(shard_dsn(servers, index)) as conn:
            users.append(conn.execute("select id from profiles order by id limit 1").fetchone()[0])
    return users


def test_a_stopped_server_fails_only_its_shards(router, servers, run_cli_module):
    engine, deployed, dsn = router
    users_of = first_users(servers)
    second = servers[1]
    kept = psycopg.connect(dsn, autocommit=True)  # a pooled dashboard session, across the restart
    assert len(kept.execute("select * from user_kpis(%s, '2026-03-31')", [users_of[1]]).fetchall()) == 6
    second.stop()
    try:
        verified = run_cli_module("verify", "--fleet", deployed, "--only", "schema")
        assert verified.exit_code == 1
        assert "shard1:verify" in verified.output and "shard3:verify" in verified.output
        assert "shard0:schema" in verified.output and "shard2:schema" in verified.output
        migrated = run_cli_module("migrate", "--fleet", deployed)
        assert migrated.exit_code == 1
        last = migrated.output.strip().splitlines()[-1]
        assert last.startswith("statskit: error: migrate failed on shard1 (")
        assert "shard3 (" in last and "shard0" not in last and "password" not in migrated.output
        assert migrated.output.count("up to date, nothing to do") == 6  # shards 0 and 2, the router: line, table
        # the router keeps answering the users of the shards still up, and names the shard of the others
        for index in range(SHARDS):
            user = users_of[index]
            with psycopg.connect(dsn) as conn:
                if shard_server(servers, index) is second:
                    with pytest.raises(psycopg.Error, match="fleet_shard" if engine == "plproxy" else "connection"):
                        conn.execute("select * from user_kpis(%s, '2026-03-31')", [user]).fetchall()
                else:
                    assert len(conn.execute("select * from user_kpis(%s, '2026-03-31')", [user]).fetchall()) == 6
    finally:
        second.start()
    with kept:  # its connection to the restarted shard was lost
        if engine == "plproxy":
            # PL/Proxy may fail the call that finds the kept connection lost, and makes a new one
            # for the next (in some runs here it found it closed before the call: no failure)
            try:
                kept.execute("select * from user_kpis(%s, '2026-03-31')", [users_of[1]]).fetchall()
            except psycopg.Error as exc:
                assert "[fleet_shard1] REMOTE FATAL" in str(exc)
        # dblink's routed functions make a new one at once
        assert len(kept.execute("select * from user_kpis(%s, '2026-03-31')", [users_of[1]]).fetchall()) == 6
    assert run_cli_module("migrate", "--fleet", deployed).exit_code == 0


def test_a_users_backfill_runs_on_its_shard_and_a_cancel_leaves_whole_days(deployed, servers, market):
    with psycopg.connect(shard_dsn(servers, 3)) as conn:
        user = conn.execute("select id from profiles order by id limit 1").fetchone()[0]
    shards = api.Project.open(SQL_DIR).fleet(deployed)
    assert shards.shard_of(user).index == 3
    outcomes = shards.backfill(market.last_day - timedelta(days=2), market.last_day, user=user)
    assert [o.shard.index for o in outcomes] == [3] and outcomes[0].ok
    assert outcomes[0].value.days_done == 3

    cancel = threading.Event()
    cancel.set()
    stopped = shards.backfill(market.first_day, market.last_day, cancel=cancel)
    assert [o.shard.index for o in stopped] == list(range(SHARDS))
    assert all(isinstance(o.error, Stopped) and o.error.cancelled for o in stopped)


@pytest.mark.parametrize("text, message", [
    ("", "no [[shards]]"),
    ('[[shards]]\ndsn = "dbname=a"\n[[shards]]\ndsn = "dbname=b"\n[[shards]]\ndsn = "dbname=c"\n', "power of two"),
    ('[[shards]]\ndsn = "dbname=a"\n[[shards]]\ndsn = "dbname=a"\n', "same database"),
    ('[[shards]]\ndsn = "dbname=a"\n[routers]\ndsn = "dbname=r"\n', "unknown entry 'routers'"),
    ('[[shards]]\ndsn = "dbname=a"\n[router]\nuser = "r"\n', "[router] has a dsn"),
    ('[[shards]]\ndsn = "dbname=a"\n[router]\ndsn = "dbname=r"\nengine = "citus"\n', "plproxy or dblink"),
    ('[[shards]]\nname = "x"\n', "shard 0 has no dsn"),
    ('[[shards]]\ndsn = "host=h password=hunter2 port=x y"\n', "invalid DSN"),
    ('[[shards]]\ndsn = "dbname=a"\nname = "Shard A"\n', "name 'Shard A'"),
    ('placement = "x; drop"\n[[shards]]\ndsn = "dbname=a"\n', "placement"),
    ("[[shards]\n", "fleet file"),
])
def test_a_bad_fleet_file_is_one_line(tmp_path, run_cli, text, message):
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    done = run_cli("verify", "--fleet", path)
    assert done.exit_code == 2
    lines = done.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("statskit: error: fleet file") and message in lines[0], done.output
    assert "hunter2" not in done.output


def test_fleet_options_that_cannot_apply_are_refused(tmp_path, run_cli):
    path = tmp_path / "fleet.toml"
    path.write_text('[[shards]]\ndsn = "dbname=a"\n')
    both = run_cli("verify", "--fleet", path, "--dsn", "dbname=a")
    assert both.exit_code == 2 and "--dsn or --fleet" in both.output
    suffix = run_cli("migrate", "--fleet", path, "--job-suffix", "x")
    assert suffix.exit_code == 1 and "--job-suffix" in suffix.output
    full = run_cli("migrate", "--fleet", path, "--cron-dsn", "host=elsewhere dbname=postgres")
    assert full.exit_code == 2 and "--cron-dsn" in full.output and "each shard" in full.output
    missing = run_cli("migrate", "--fleet", tmp_path / "nope.toml")
    assert missing.exit_code == 2 and "cannot read the fleet file" in missing.output


def test_the_shards_partial_sums_add_up_to_the_oracles_platform(deployed, market, servers):
    """Each platform fact on one shard (its home user's): the shards' sums, added up and then
    finalised as the router does, are the literal oracle's platform row of the unsplit data."""
    catalog = load_catalog(SQL_DIR / "catalog.toml")
    partials = catalog.for_shard().platform
    columns = ["date"] + [m.name for m in partials.metrics]
    rows = []
    for index in range(SHARDS):
        with psycopg.connect(shard_dsn(servers, index)) as conn:
            rows += conn.execute(f"select {', '.join(columns)} from {partials.table} where date <= %s",
                                 [market.last_day]).fetchall()
    days = sorted({row[0] for row in rows})
    assert days[0] == market.first_day and days[-1] == market.last_day and len(rows) == SHARDS * len(days)
    def merge(rows):
        relation = (f"select * from (values {', '.join(['(' + ', '.join(['%s'] * len(columns)) + ')'] * len(rows))})"
                    f" as v ({', '.join(columns)})")
        with psycopg.connect(session_cluster.dsn("fleet_whole")) as whole:
            return {row[0]: row[1:] for row in whole.execute(compiler.merged_platform(catalog.platform, relation, SHARDS),
                                                             [v for row in rows for v in row]).fetchall()}

    merged = merge(rows)
    with psycopg.connect(session_cluster.dsn("fleet_whole")) as whole:
        for day in (days[0], days[len(days) // 2], days[-1]):
            got = dict(zip([m.name for m in catalog.platform.metrics], merged[day]))
            assert differences({"platform": expected_platform_row(whole, day)}, {"platform": got}) == []
    # a day that one shard has not written yet is not merged
    lacking = merge([row for row in rows if row is not next(r for r in rows if r[0] == days[-1])])
    assert days[-1] not in lacking and days[-2] in lacking


def test_a_shard_cannot_become_one_server_again(deployed, servers):
    with pytest.raises(UsageError, match="is shard 'shard0' of a fleet and cannot become one server"):
        api.Project.open(SQL_DIR).deployment(shard_dsn(servers, 0), shard="")


def test_a_shards_and_the_routers_functions_pass_plpgsql_check(router, servers):
    """The shard's rendering (its platform functions read home rows into partial sums) and the
    router's merge are checked by the same independent checker as one server's functions."""
    from test_plpgsql_check import plpgsql_findings
    assert plpgsql_findings(shard_server(servers, 0).dsn(DATABASES[0])) == {}
    functions = ["public.merge_platform_statistics()", "public.platform_metric(text, date, text)"]
    if router[0] == "dblink":
        functions += ["statskit.shard_partials()", "statskit.shard_connection(text, boolean)",
                      "public.user_metric(uuid, text, date, text)", "public.user_kpis(uuid, date, text)"]
    with psycopg.connect(session_cluster.dsn(ROUTERS[router[0]]), autocommit=True) as conn:
        conn.execute("create extension if not exists plpgsql_check")
        findings = {function: conn.execute("select level, lineno, message from plpgsql_check_function_tb("
                                           "%s::regprocedure, fatal_errors => false, all_warnings => true)",
                                           [function]).fetchall() for function in functions}
    assert findings == {function: [] for function in functions}


def test_a_router_whose_cluster_differs_from_the_fleet_file_is_named_and_repaired(router, run_cli_module):
    """Two shards swapped in the router's cluster would route users to the wrong shard."""
    engine, deployed, dsn = router
    with psycopg.connect(dsn, autocommit=True) as conn:
        if engine == "plproxy":
            options = dict(o.split("=", 1) for o in conn.execute(
                "select srvoptions from pg_foreign_server where srvname = 'statskit_fleet'").fetchone()[0])
            conn.execute(f"alter server statskit_fleet options (set p1 '{options['p2']}', set p2 '{options['p1']}')")
        else:
            conn.execute("alter server statskit_shard1 options (set dbname 'fleet_shard3')")
    found = run_cli_module("verify", "--fleet", deployed, "--only", "migrations")
    status, detail = check_line(found.output, "router:cluster")
    expected = "p1: " if engine == "plproxy" else "statskit_shard1.dbname: fleet_shard3, the fleet file says fleet_shard1"
    assert status == "fail" and detail.startswith(expected) and "migrate --fleet" in detail, detail
    repaired = run_cli_module("migrate", "--fleet", deployed, "--cron-dsn", CRON_DATABASE)
    assert repaired.exit_code == 0 and f"{engine}: 4 shards in the fleet file's order" in repaired.output, repaired.output
    assert check_line(run_cli_module("verify", "--fleet", deployed, "--only", "migrations").output,
                      "router:cluster")[0] == "pass"


def test_the_router_answers_every_user_as_the_users_shard_does(router, servers, market):
    day, dsn = market.last_day, router[2]
    for index, user in enumerate(first_users(servers)):
        with psycopg.connect(shard_dsn(servers, index)) as shard, psycopg.connect(dsn) as router:
            for query, args in (("select * from user_kpis(%s, %s, 'week')", [user, day]),
                                ("select * from user_metric(%s, 'total_earnings', %s)", [user, day])):
                direct = shard.execute(query, args).fetchall()
                assert direct and router.execute(query, args).fetchall() == direct
    with psycopg.connect(dsn) as router:
        with pytest.raises(psycopg.Error, match="unknown user"):
            router.execute("select * from user_kpis('00000000-0000-0000-0000-000000000000', %s)", [day]).fetchall()


def test_the_routers_platform_rows_are_the_oracles(router, market):
    """backfill --fleet merged the days it filled: the router's platform rows are one server's."""
    with psycopg.connect(session_cluster.dsn("fleet_whole")) as whole, psycopg.connect(router[2]) as router:
        assert router.execute("select min(date), max(date), count(*) from platform_statistics_daily where date <= %s",
                              [market.last_day]).fetchone() == (
            market.first_day, market.last_day, (market.last_day - market.first_day).days + 1)
        for day in (market.first_day, market.first_day + timedelta(days=17), market.last_day):
            expected = expected_platform_row(whole, day)
            assert differences({"platform": expected}, {"platform": stored_platform_row(router, day)}) == []
            value = router.execute("select value from platform_metric('hours_completed', %s)", [day]).fetchone()[0]
            assert value == expected["hours_completed"]


def test_a_day_waits_for_every_shard_and_late_data_reaches_the_router(router, servers, market, run_cli_module):
    """A day one shard has not written is absent from the router and verify names that shard; late
    data on a shard reaches the router's row after the shard's night and the next merge."""
    engine, deployed, dsn = router
    next_day = market.last_day + timedelta(days=1 if engine == "plproxy" else 2)
    platform_night = "select aggregate_platform_changes(); select aggregate_daily_statistics(%s)"

    def night(index, day):
        with psycopg.connect(shard_dsn(servers, index), autocommit=True) as conn:
            for statement in platform_night.split("; "):
                conn.execute(statement, [day] if "%s" in statement else [])

    def merge():
        with psycopg.connect(dsn, autocommit=True) as conn:
            return conn.execute("select merge_platform_statistics()").fetchone()[0]

    def merged(day):
        with psycopg.connect(dsn) as router:
            return router.execute("select count(*) from platform_statistics_daily where date = %s", [day]).fetchone()[0]

    for index in (0, 1, 2):
        night(index, next_day)
    merge()
    assert merged(next_day) == 0
    found = run_cli_module("verify", "--fleet", deployed, "--only", "migrations")
    status, detail = check_line(found.output, "router:merge")
    assert status == "fail" and "shard3" in detail and "waits for it" in detail, found.output
    night(3, next_day)
    assert merge() >= 1 and merged(next_day) == 1

    # a booking completed on a stored day, recorded late on its tutor's (home) shard and its client's
    late = market.last_day - timedelta(days=5)
    with psycopg.connect(shard_dsn(servers, 0)) as conn:
        tutor, client = conn.execute("select b.tutor_id, b.client_id from bookings b join profiles p on p.id = b.tutor_id"
                                     " limit 1").fetchone()
    holders = sorted({fleet_core.placements(psycopg.connect(dsn), fleet_core.Fleet(None, tuple(
        fleet_core.Shard(i, f"shard{i}", "") for i in range(SHARDS))), [tutor, client], "uuid")[u] for u in (tutor, client)})
    booking = (99_000_001, None, tutor, client, "completed", f"{late} 08:00+00", f"{late} 08:30+00", None,
               f"{late} 12:00+00", f"{late} 11:00+00", 90)
    insert = ("insert into bookings (id, listing_id, tutor_id, client_id, status, created_at, confirmed_at, cancelled_at,"
              " completed_at, session_start, duration_minutes) values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)")
    for index in holders:
        with psycopg.connect(shard_dsn(servers, index)) as conn:
            conn.execute(insert, booking)
    with psycopg.connect(session_cluster.dsn("fleet_whole")) as whole:
        whole.execute(insert, booking)
    try:
        for index in holders:
            night(index, next_day)
        assert merge() >= 1  # the late day, and each day after it its numbers moved
        with psycopg.connect(session_cluster.dsn("fleet_whole")) as whole, psycopg.connect(dsn) as router:
            expected = expected_platform_row(whole, late)
            assert differences({"platform": expected}, {"platform": stored_platform_row(router, late)}) == []
    finally:
        for index in holders:
            with psycopg.connect(shard_dsn(servers, index), autocommit=True) as conn:
                conn.execute("delete from bookings where id = %s", [booking[0]])
                night(index, next_day)
        with psycopg.connect(session_cluster.dsn("fleet_whole"), autocommit=True) as whole:
            whole.execute("delete from bookings where id = %s", [booking[0]])
        merge()


@pytest.mark.parametrize("stop, seed", [("SIGINT", 1), ("SIGTERM", 2), ("SIGTERM", 3)])
def test_a_fleet_backfill_stopped_by_a_signal_leaves_whole_days_and_resumes(deployed, servers, market, stop, seed):
    """Ctrl-C or a service manager's SIGTERM in a fleet's backfill, after a seeded number of
    committed chunks: every shard's statements cancelled, exit 128 + the signal within 5 s, each
    shard's committed days whole (all its users or none); --resume writes the rest, as the oracle has it."""
    import random
    import signal
    import subprocess
    import sys
    import time as clock
    signum, chunks = getattr(signal, stop), random.Random(seed).randint(1, 4)
    for index in range(SHARDS):
        with psycopg.connect(shard_dsn(servers, index), autocommit=True) as conn:
            conn.execute("delete from user_statistics_daily where date between %s and %s",
                         [market.first_day, market.last_day])
            conn.execute("delete from statskit.backfill_ledger")  # as if never filled
    args = ["backfill", "--fleet", deployed, "--from", market.first_day, "--to", market.last_day,
            "--chunk-days", "3", "--jobs", "1", "--parallel", "2", "--only", "users"]
    run = subprocess.Popen([sys.executable, "-m", "toolkit", *map(str, args)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    for line in run.stdout:
        chunks -= " committed: " in line
        if not chunks:
            break
    run.send_signal(signum)
    stopped = clock.monotonic()
    output = run.stdout.read()
    assert run.wait(timeout=10) == 128 + signum and clock.monotonic() - stopped < 5, output
    assert f"stopped by {stop}" in output and "--resume" in output
    for index in range(SHARDS):
        with psycopg.connect(shard_dsn(servers, index)) as conn:
            partial = conn.execute(
                "select d.day, count(s.user_id), (select count(*) from profiles p where p.created_at::date <= d.day)"
                " from generate_series(%s::date, %s::date, '1 day') d (day)"
                " left join user_statistics_daily s on s.date = d.day group by d.day"
                " having count(s.user_id) not in (0, (select count(*) from profiles p where p.created_at::date <= d.day))",
                [market.first_day, market.last_day]).fetchall()
        assert partial == [], f"shard{index} has days with some users only: {partial}"
    resumed = subprocess.run([sys.executable, "-m", "toolkit", *map(str, args[:-2]), "--resume", "--quiet"],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    with psycopg.connect(session_cluster.dsn("fleet_whole")) as whole:
        expected = expected_user_rows(whole, market.last_day)
    union = {}
    for index in range(SHARDS):
        with psycopg.connect(shard_dsn(servers, index)) as conn:
            union.update(stored_user_rows(conn, market.last_day))
    assert differences(expected, union) == []


# A second, smaller fleet: three shards (not a power of two) placed by the application's own
# function, deployed with the statskit roles and row security, behind a router of each engine.
SECURED = [f"fleet_secured{i}" for i in range(3)]
SECURED_ROUTERS = {"plproxy": "fleet_secured_router", "dblink": "fleet_secured_router_dblink"}
EXPRESSION = "current_setting('app.user_id', true)::uuid"
# what docs/scaling.md gives the admin to run on a dblink router under row security
DBLINK_TO_OWNER_ONLY = """do $$
declare
    f regprocedure;
begin
    for f in select objid from pg_depend where classid = 'pg_proc'::regclass and deptype = 'e'
             and refobjid = (select oid from pg_extension where extname = 'dblink') loop
        execute format('revoke execute on function %s from public', f);
        execute format('grant execute on function %s to OWNER', f);
    end loop;
end
$$"""
PLACEMENT_SQL = """create or replace function public.tenant_shard(p_user uuid) returns integer
language sql immutable as $$ select get_byte(uuid_send(p_user), 0) % 3 $$"""


@pytest.fixture(scope="module")
def secured_fleet(deployed, servers, market, tmp_path_factory, run_cli_module):
    """{engine: (fleet file, router DSN)} of the three-shard fleet, migrated and backfilled
    beside the first fleet (whose shards' jobs have the default names on the same servers)."""
    catalog = load_catalog(SQL_DIR / "catalog.toml")
    with psycopg.connect(session_cluster.dsn("fleet_whole"), autocommit=True) as conn:
        conn.execute(PLACEMENT_SQL)
        fleet = fleet_core.Fleet(None, tuple(fleet_core.Shard(i, f"shard{i}", "") for i in range(3)), "public.tenant_shard")
        shard_of = fleet_core.placements(conn, fleet, [row[0] for row in market.rows["profiles"]], "uuid")
    lines = ['placement = "public.tenant_shard"']
    for index, (name, part) in enumerate(zip(SECURED, reference_shards.split(market, catalog, shard_of, 3))):
        server = shard_server(servers, index)
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("select cron.unschedule(jobid) from cron.job where database = %s", [name])
            conn.execute(f"drop database if exists {name} with (force)")
            conn.execute(f"create database {name} owner {OWNER}")
        with psycopg.connect(as_owner(server, name)) as conn:
            conn.execute(reference_shards.shard_schema_sql())
            conn.execute(PLACEMENT_SQL)
            marketplace.load(conn, part)
        lines += ["[[shards]]", f'name = "secured{index}"', f'dsn = "{as_owner(server, name)}"']
    folder, fleets = tmp_path_factory.mktemp("secured"), {}
    for engine, name in SECURED_ROUTERS.items():
        with psycopg.connect(session_cluster.dsn(), autocommit=True) as conn:
            conn.execute(f"drop database if exists {name} with (force)")
            conn.execute(f"create database {name} owner {OWNER if engine == 'dblink' else 'postgres'}")
        with psycopg.connect(session_cluster.dsn(name), autocommit=True) as conn:
            conn.execute(PLACEMENT_SQL)  # the router routes by it too
            if engine == "dblink":
                conn.execute("create extension dblink")
        dsn = as_owner(session_cluster, name) if engine == "dblink" else session_cluster.dsn(name)
        path, text = folder / f"{engine}.toml", "\n".join(lines + ["[router]", f'dsn = "{dsn}"', f'engine = "{engine}"']) + "\n"
        migrate = ("migrate", "--fleet", path, "--cron-dsn", CRON_DATABASE, "--roles", "--row-security", EXPRESSION)
        if engine == "plproxy":  # the first fleet's shards took the default job names on these servers
            path.write_text(re.sub(r'name = "secured\d"\n', "", text))
            taken = run_cli_module(*migrate)
            assert taken.exit_code == 1 and "name = ... under its [[shards]] in the fleet file" in taken.output
            assert "nothing changed" in taken.output and "--job-suffix" not in taken.output, taken.output
        path.write_text(text)
        if engine == "dblink":  # the wrapper's use is the admin role's to grant, and migrate says so
            refused = run_cli_module(*migrate)
            assert refused.exit_code == 1 and "GRANT USAGE ON FOREIGN DATA WRAPPER dblink_fdw TO fleet_owner" in (
                refused.output), refused.output
            with psycopg.connect(session_cluster.dsn(name), autocommit=True) as conn:
                conn.execute(f"grant usage on foreign data wrapper dblink_fdw to {OWNER}")
            public = run_cli_module(*migrate)  # and, under row security, dblink's functions to the owner only
            assert public.exit_code == 1 and "PUBLIC may not execute dblink's functions" in public.output, public.output
            with psycopg.connect(session_cluster.dsn(name), autocommit=True) as conn:
                conn.execute(DBLINK_TO_OWNER_ONLY.replace("OWNER", OWNER))
        done = run_cli_module(*migrate)
        assert done.exit_code == 0, done.output
        fleets[engine] = (path, dsn)
    filled = run_cli_module("backfill", "--fleet", fleets["plproxy"][0], "--from", market.last_day - timedelta(days=7),
                            "--to", market.last_day, "--quiet")
    assert filled.exit_code == 0, filled.output
    with psycopg.connect(fleets["dblink"][1], autocommit=True) as conn:  # its own merge of what was filled
        conn.execute("select merge_platform_statistics()")
    for server in servers:  # a dashboard's login, a reader on the shards (for one server's answers)
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("drop role if exists fleet_dashboard")
            conn.execute("create role fleet_dashboard login in role statskit_reader")
    return fleets  # the servers fixture drops it all


def secured_users(servers):
    """A user of each of the three shards."""
    users = []
    for index in range(3):
        with psycopg.connect(as_owner(shard_server(servers, index), SECURED[index])) as conn:
            users.append(conn.execute("select id from profiles order by id limit 1").fetchone()[0])
    return users


def as_dashboard(dsn, viewer):
    conn = psycopg.connect(re.sub(r"user=\w+", "user=fleet_dashboard", dsn), autocommit=True)
    if viewer:
        conn.execute("select set_config('app.user_id', %s, false)", [str(viewer)])
    return conn


@pytest.mark.parametrize("engine", list(SECURED_ROUTERS))
def test_row_security_through_the_router_answers_as_the_users_shard_does(secured_fleet, servers, market, engine):
    """A dashboard session on the router, its user set by the policy's setting, gets what the same
    session gets from one server under the policy: its own numbers, every other user's hidden.
    The three users are each on another shard, by the application's placement function."""
    router = secured_fleet[engine][1]
    users = list(enumerate(secured_users(servers)))
    day = market.last_day
    queries = [("select * from user_kpis(%s, %s, 'week')", lambda user: [user, day]),
               ("select * from user_metric(%s, 'total_earnings', %s)", lambda user: [user, day])]
    compared = 0
    for viewer in (users[0][1], users[2][1], None):
        for index, user in users:
            shard = as_owner(shard_server(servers, index), SECURED[index])
            with as_dashboard(shard, viewer) as direct, as_dashboard(router, viewer) as routed:
                for query, args in queries:
                    expected = direct.execute(query, args(user)).fetchall()
                    assert routed.execute(query, args(user)).fetchall() == expected, (viewer, user, query)
                    compared += 1
                    assert any(row[-5] is not None for row in expected) == (user == viewer)  # the value column
    assert compared == 18
    with as_dashboard(router, users[0][1]) as routed:
        with pytest.raises(psycopg.Error, match="unknown user"):
            routed.execute("select * from user_kpis('00000000-0000-0000-0000-000000000000', %s)", [day]).fetchall()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # no viewer of the caller's choosing
            routed.execute("select * from statskit.proxied_user_kpis(%s, %s, %s, 'day')",
                           [users[1][1], users[1][1], day]).fetchall()
    from test_plpgsql_check import plpgsql_findings
    assert plpgsql_findings(shard_server(servers, 0).dsn(SECURED[0]),
                            also=("statskit.routed_user_kpis_for(uuid, uuid, date, text)",)) == {}


def test_the_router_serves_shards_at_the_old_and_the_new_version_during_a_fleet_migrate(
        secured_fleet, servers, market, tmp_path, run_cli_module):
    """A release that adds a metric reaches shard0 first: the router answers every user meanwhile,
    verify names the shards behind, and migrate --fleet brings them and the router up."""
    import shutil
    from test_catalog_growth import NEW_METRIC, add_migration
    sql = tmp_path / "sql"
    shutil.copytree(SQL_DIR, sql)
    add_migration(sql / "catalog.toml", "0002_payments_made", "Add payments_made")
    (sql / "catalog.toml").write_text((sql / "catalog.toml").read_text() + NEW_METRIC)
    path, router = secured_fleet["plproxy"]
    first_only = tmp_path / "shard0.toml"  # the fleet file up to its first shard: a migrate one shard into
    head, first, *_ = path.read_text().split("[[shards]]")
    first_only.write_text(f"{head}[[shards]]{first}")
    assert run_cli_module("migrate", "--fleet", first_only, "--sql-dir", sql).exit_code == 0
    users, day = secured_users(servers), market.last_day

    def answers(index, metric="total_earnings"):
        shard = as_owner(shard_server(servers, index), SECURED[index])
        with as_dashboard(shard, users[index]) as direct, as_dashboard(router, users[index]) as routed:
            for query in ("select * from user_kpis(%s, %s)", f"select * from user_metric(%s, '{metric}', %s)"):
                expected = direct.execute(query, [users[index], day]).fetchall()
                assert expected and routed.execute(query, [users[index], day]).fetchall() == expected

    for index in range(3):
        answers(index)
    answers(0, "payments_made")  # the new metric, from the shard that has it
    behind = run_cli_module("verify", "--fleet", path, "--sql-dir", sql, "--only", "migrations")
    status, detail = check_line(behind.output, "fleet:deployment")
    assert behind.exit_code == 1 and status == "fail" and "secured1" in detail and "secured2" in detail, behind.output
    upgraded = run_cli_module("migrate", "--fleet", path, "--sql-dir", sql)
    assert upgraded.exit_code == 0, upgraded.output
    for index in range(3):
        answers(index, "payments_made")
    verified = run_cli_module("verify", "--fleet", path, "--sql-dir", sql, "--only", "functions,migrations")
    assert verified.exit_code == 0, verified.output


# The last release that landed, whose dblink router counted the fleet's servers in every call
FLEET_RELEASE = "9031d62"
UPGRADED = ["upgraded_shard0", "upgraded_shard1", "upgraded_router"]  # a shard on each server; the router


def fleet_rows(dsns):
    """Every row the fleet stores, as it is (ids and updated_at included): each shard's user rows
    and partial sums, then the router's platform rows."""
    rows = []
    for dsn in dsns[:-1]:
        with psycopg.connect(dsn) as conn:
            rows += [conn.execute(f"select to_jsonb(s) from {table} s order by 1").fetchall()
                     for table in ("user_statistics_daily", "platform_statistics_daily_partials")]
    with psycopg.connect(dsns[-1]) as conn:
        rows.append(conn.execute("select to_jsonb(s) from platform_statistics_daily s order by 1").fetchall())
    return rows


def test_a_fleet_the_previous_release_deployed_upgrades_with_its_rows_unchanged(servers, market, tmp_path,
                                                                                run_cli_module):
    """Two shards and a dblink router (as on a managed service) deployed, backfilled and merged by
    the previous release's CLI, then plain `migrate --fleet` of this one: every row the fleet
    stores is unchanged, the router's functions are re-applied, verify --fleet passes, and the
    router answers each shard's users as the shard itself does."""
    release = extract_release(FLEET_RELEASE, tmp_path)
    catalog = load_catalog(SQL_DIR / "catalog.toml")
    homes = [servers[0], servers[1], session_cluster]
    dsns = [as_owner(server, name) for server, name in zip(homes, UPGRADED)]
    with psycopg.connect(session_cluster.dsn()) as conn:
        fleet = fleet_core.Fleet(None, tuple(fleet_core.Shard(i, f"upgraded{i}", "") for i in range(2)))
        shard_of = fleet_core.placements(conn, fleet, [row[0] for row in market.rows["profiles"]], "uuid")
    try:
        for server, name, part in zip(homes, UPGRADED, reference_shards.split(market, catalog, shard_of, 2)):
            shard_database(server, name, part)
        dblink_router_database(UPGRADED[-1])
        path = tmp_path / "upgraded.toml"
        path.write_text("".join(f'[[shards]]\nname = "upgraded{i}"\ndsn = "{dsn}"\n' for i, dsn in enumerate(dsns[:2]))
                        + f'[router]\ndsn = "{dsns[-1]}"\nengine = "dblink"\n')
        login = {"STATSKIT_ROUTER_PASSWORD": ROUTER_PASSWORD}
        for args in (("migrate", "--fleet", path, "--cron-dsn", CRON_DATABASE),
                     ("backfill", "--fleet", path, "--from", market.first_day, "--to", market.last_day, "--quiet")):
            done = run_previous(release, *args, env=login)
            assert done.returncode == 0, done.stdout + done.stderr
        before = fleet_rows(dsns)
        assert len(before[-1]) == (market.last_day - market.first_day).days + 1  # every day merged

        upgraded = run_cli_module("migrate", "--fleet", path)
        assert upgraded.exit_code == 0, upgraded.output
        assert "routed functions and platform table (fleet/dblink router)" in upgraded.output
        assert fleet_rows(dsns) == before
        verified = run_cli_module("verify", "--fleet", path, "--from", market.last_day - timedelta(days=6),
                                  "--to", market.last_day)
        assert verified.exit_code == 0, verified.output
        for dsn in dsns[:2]:  # ten users of each shard: a router routing by another count misses some
            with psycopg.connect(dsn) as shard, psycopg.connect(dsns[-1]) as router:
                for (user,) in shard.execute("select id from profiles order by id limit 10").fetchall():
                    call = "select * from user_kpis(%s, %s)"
                    assert router.execute(call, [user, market.last_day]).fetchall() == \
                        shard.execute(call, [user, market.last_day]).fetchall()
    finally:
        for server in servers:
            with psycopg.connect(server.dsn(CRON_DATABASE), autocommit=True) as conn:
                conn.execute("select cron.unschedule(jobid) from cron.job where database = any(%s)", [UPGRADED])
        for server, name in zip(homes, UPGRADED):
            with psycopg.connect(server.dsn(), autocommit=True) as conn:
                conn.execute(f"drop database if exists {name} with (force)")
