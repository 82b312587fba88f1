"""A deployment the previous release made upgrades through plain `statskit migrate`: its stored
rows are unchanged (ids and updated_at included), its unpartitioned rollup is converted in place
under a live reader and the nightly job, the functions whose signature changed are replaced,
verify passes, its backfill ledger still serves --resume, and the conversion rolls back."""

import re
import threading
import time
from datetime import date

import psycopg
import pytest

from conftest import extract_release, run_previous
from spec_oracle import differences, expected_user_rows, stored_user_rows

# Releases a deployment is upgraded from, each with the older signatures migrate drops there:
# the last that landed before the writer lock and whole-day backfills (issue 21), the last that
# landed before this one's capture and sums (issue 23), and the last before the sums of one day
# (issue 25), which already partitioned its rollup (issue 24), the last before the fleet
# (issue 26), the last before the sources' rows created after the last day computed were
# dropped before their days are (the sums' definition changed), and the last before an update's
# capture trigger became a row trigger (its statement trigger is replaced), the last whose
# backfill left no sums, and the last landing (its functions wrote their rows in hash order and
# converted UTC by the zone's name). Each stores 90 days of history.
RELEASES = {
    "788e7e9": ["aggregate_user_statistics_range(date, date, uuid, uuid, uuid[])",
                "aggregate_daily_statistics_range(date, date)"],
    "3f35e92": [],
    "9465da4": [],
    "e59f60c": [],
    "db93537": [],
    "e9b3e5f": [],
    "68eb99e": [],
    "bf2d457": [],
}
PARTITIONED = {"9465da4", "e59f60c", "db93537", "e9b3e5f", "68eb99e", "bf2d457"}
# releases whose platform sums are defined as this one's: migrate keeps them
SAME_PLATFORM_SUMS = {"e59f60c", "db93537", "e9b3e5f", "68eb99e", "bf2d457"}
# releases whose user sums are defined as this one's too
SAME_SUMS = {"e9b3e5f", "68eb99e", "bf2d457"}
# releases whose change capture is this one's
SAME_CAPTURE = {"68eb99e", "bf2d457"}
FIRST, LAST, NEXT = date(2026, 1, 1), date(2026, 3, 31), date(2026, 4, 1)


@pytest.fixture(scope="module", params=list(RELEASES))
def previous_release(request, tmp_path_factory):
    """A previous release's toolkit/ and sql/, runnable beside this one: (revision, folder)."""
    revision = request.param
    return revision, extract_release(revision, tmp_path_factory.mktemp(f"release-{revision}"))


def stored(dsn):
    """Every stored row as it is, ids and updated_at included."""
    with psycopg.connect(dsn) as conn:
        return [conn.execute(f"select to_jsonb(s) from {table} s order by 1").fetchall()
                for table in ("user_statistics_daily", "platform_statistics_daily")]


def test_a_deployment_of_the_previous_release_upgrades_with_its_rows_unchanged(loaded_dsn, previous_release, run_cli):
    revision, release = previous_release
    deployed = run_previous(release, "migrate", "--dsn", loaded_dsn)
    assert deployed.returncode == 0, deployed.stderr
    filled = run_previous(release, "backfill", "--from", FIRST, "--to", LAST, "--jobs", 2, "--quiet",
                          "--dsn", loaded_dsn)
    assert filled.returncode == 0, filled.stderr
    before = stored(loaded_dsn)
    assert before[0] and len(before[1]) == 90  # 90 days of history, as the previous release stored them
    with psycopg.connect(loaded_dsn) as conn:
        homes_before = conn.execute("select tableoid::regclass::text, count(*) from user_statistics_daily group by 1"
                                    " order by 1").fetchall()

    reader = DashboardReader(loaded_dsn, "select * from user_kpis(%s, %s)")
    nightly = DashboardReader(loaded_dsn, "select aggregate_user_statistics(null, %s::date)")  # rewrites nothing
    reader.start()
    nightly.start()
    upgraded = run_cli("migrate", "--dsn", loaded_dsn)
    for thread in (reader, nightly):
        thread.done.set()
        thread.join()
    assert upgraded.exit_code == 0, upgraded.output
    assert reader.calls > 0 and reader.errors == [] and reader.slowest < 2.0  # migrate's --lock-timeout
    # A call in flight when migrate commits runs the previous release's body to its end, against
    # the sums table migrate re-created: that one call fails (docs/operations.md says so); the
    # calls after it run the new function. Nothing else may fail: no deadlock, no lock timeout.
    assert nightly.calls > 1 and nightly.last_ok, nightly.errors
    assert len(nightly.errors) <= 1 and all(re.match(r"column s\.\w+ does not exist", e) for e in nightly.errors), \
        nightly.errors
    with psycopg.connect(loaded_dsn) as conn:  # no row written again: each stays where it was
        homes = conn.execute("select tableoid::regclass::text, count(*) from user_statistics_daily group by 1"
                             " order by 1").fetchall()
        if revision in PARTITIONED:
            assert homes == homes_before
        else:  # the old table, attached whole
            assert "partitioned public.user_statistics_daily by month (its rows stay where they are)" in upgraded.output
            assert homes == [(f"user_statistics_daily_before_{conversion_bound(conn):%Y%m%d}", len(before[0]))]
    assert sorted(line for line in upgraded.output.splitlines() if "(an older signature)" in line) == sorted(
        f'dropped function "public".{signature} (an older signature)' for signature in RELEASES[revision])
    assert stored(loaded_dsn) == before
    assert "created function public.aggregate_user_statistics\n" in upgraded.output  # every release's body differs
    assert ("installed change capture (capture.sql)" in upgraded.output) != (revision in SAME_CAPTURE)
    # the sums the previous release kept are defined otherwise now: migrate says so and rebuilds
    # them as of the last stored day, so the next night steps from them
    for table in ("user_statistics_daily", "platform_statistics_daily"):
        rebuilt = (f"the nightly step's sums of {table} are defined otherwise now: migrate re-creates them and "
                   f"rebuilds them as of {LAST}")
        kept = revision in SAME_SUMS or table == "platform_statistics_daily" and revision in SAME_PLATFORM_SUMS
        assert (rebuilt in upgraded.output) != kept, upgraded.output
    with psycopg.connect(loaded_dsn) as conn:
        users = conn.execute("select count(*) from user_statistics_daily where date = %s", [LAST]).fetchone()[0]
        assert conn.execute("select (select count(*) from statskit.user_statistics_daily_sums),"
                            " (select date from statskit.user_statistics_daily_sums_day)").fetchone() == (users, LAST)
    assert "nothing to do" in run_cli("migrate", "--dsn", loaded_dsn).output

    verified = run_cli("verify", "--dsn", loaded_dsn, "--from", FIRST, "--to", LAST)
    assert verified.exit_code == 0, verified.output
    # the previous release's ledger: its platform chunks count, its user slices do not (rewritten, unchanged)
    resumed = run_cli("backfill", "--from", FIRST, "--to", LAST, "--resume", "--dsn", loaded_dsn)
    assert resumed.exit_code == 0, resumed.output
    assert "0 rows written" in resumed.output
    assert stored(loaded_dsn) == before

    with psycopg.connect(loaded_dsn, autocommit=True) as conn:  # the next night, as the upgraded job runs it
        # a correction made after the upgrade reaches the rollup: the capture triggers the previous
        # release made were re-created for the functions that read them
        completed = conn.execute("update bookings set duration_minutes = duration_minutes + 30 where id = "
                                 "(select min(id) from bookings where completed_at < %s) returning completed_at::date",
                                 [LAST]).fetchone()[0]
        conn.execute("select aggregate_user_changes()")
        conn.execute("select aggregate_user_statistics(null, %s)", [NEXT])
        for day in (completed, NEXT):
            assert differences(expected_user_rows(conn, day), stored_user_rows(conn, day)) == []

    # the conversion rolls back: one plain table again, every row as it was
    converted = stored(loaded_dsn)
    unpartitioned = run_cli("migrate", "--dsn", loaded_dsn, "--partition-period", "none")
    assert unpartitioned.exit_code == 0, unpartitioned.output
    assert stored(loaded_dsn) == converted
    with psycopg.connect(loaded_dsn) as conn:
        assert conn.execute("select relkind from pg_class where oid = 'user_statistics_daily'::regclass").fetchone()[0] == "r"
    assert run_cli("verify", "--dsn", loaded_dsn, "--from", FIRST, "--to", LAST).exit_code == 0


def conversion_bound(conn):
    """The first day after those the converted table holds: two months past today's month."""
    return conn.execute("select (date_trunc('month', (now() at time zone 'UTC')::date) + interval '3 months')::date").fetchone()[0]


class DashboardReader(threading.Thread):
    """The web app reading KPIs all along (or another statement of a user and a day), every call timed."""

    def __init__(self, dsn, statement):
        super().__init__(daemon=True)
        self.dsn, self.statement, self.done, self.calls, self.errors, self.slowest = dsn, statement, threading.Event(), 0, [], 0.0
        self.last_ok = False

    def run(self):
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            user = conn.execute("select user_id from user_statistics_daily order by user_id limit 1").fetchone()[0]
            while not self.done.is_set():
                started = time.monotonic()
                try:
                    conn.execute(self.statement, [user, LAST][-self.statement.count("%s"):]).fetchall()
                    self.last_ok = True
                except psycopg.Error as exc:
                    self.errors.append(str(exc))
                    self.last_ok = False
                self.slowest = max(self.slowest, time.monotonic() - started)
                self.calls += 1
