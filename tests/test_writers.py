"""Every writer of the rollup beside every other: no deadlock in any order, days committed whole.

Writers, each as statskit or a DBA runs it: `statskit backfill --jobs 2`, a DBA's descending
multi-day transaction (both tables, in a seeded order), the nightly jobs' commands (catch-up, then
the step), one user's days in one transaction, the change catch-up's range call for a list of
users. Each pair runs at once, with seeded start offsets; then the stored rows equal one clean
backfill's. A forced interleaving shows the order matters: the one-day function without its
writer lock deadlocks against backfill, with it both finish.
"""

import itertools
import random
import threading
import time
from datetime import date, timedelta

import psycopg
import pytest

from test_backfill import clean_run_then_empty, snapshot
from toolkit import api
from toolkit.render import render_all
from conftest import SQL_DIR

FIRST, LAST = date(2026, 3, 1), date(2026, 3, 21)
DAYS = [FIRST + timedelta(days=n) for n in range((LAST - FIRST).days + 1)]


def run_backfill(dsn, rng, notes):
    with api.Project.open(SQL_DIR).deployment(dsn) as app:
        app.backfill(FIRST, LAST, jobs=2, chunk_days=rng.choice([3, 7, 21]), notify=notes.append)


def descending_transaction(dsn, rng, notes):
    """A DBA re-running the days newest first in one transaction, the two tables in either order."""
    statements = ["select aggregate_user_statistics(null, d::date) from generate_series(%s::date, %s, '-1 day') d",
                  "select aggregate_daily_statistics(d::date) from generate_series(%s::date, %s, '-1 day') d"]
    rng.shuffle(statements)
    with psycopg.connect(dsn) as conn:
        for statement in statements:
            conn.execute(statement, [LAST, FIRST])


def nightly_commands(dsn, rng, notes):
    """The jobs' commands as pg_cron sends them: one implicit transaction each."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"select aggregate_platform_changes(); select aggregate_daily_statistics('{LAST}')")
        conn.execute(f"select aggregate_user_changes(); select aggregate_user_statistics(null, '{LAST}'); "
                     f"select aggregate_user_statistics(null, ('{LAST}'::date - n)) from generate_series(2, 3) as n")


def one_user_days(dsn, rng, notes):
    with psycopg.connect(dsn) as conn:
        users = [row[0] for row in conn.execute("select id from profiles order by id limit 3")]
        for day in rng.sample(DAYS, len(DAYS)):
            conn.execute("select aggregate_user_statistics(%s, %s)", [rng.choice(users), day])


def catch_up_range(dsn, rng, notes):
    """What aggregate_user_changes does for the users it names, the platform range after it."""
    with psycopg.connect(dsn) as conn:
        users = [row[0] for row in conn.execute("select id from profiles order by random() limit 20")]
        conn.execute("select aggregate_user_statistics_range(%s, %s, p_users => %s)", [FIRST, LAST, users])
        conn.execute("select aggregate_daily_statistics_range(%s, %s)", [FIRST, LAST])


WRITERS = {"backfill": run_backfill, "descending": descending_transaction, "nightly": nightly_commands,
           "one user": one_user_days, "catch-up": catch_up_range}
PAIRS = list(itertools.combinations_with_replacement(WRITERS, 2))


def window(rows):
    users, platform = rows
    keep = lambda row: FIRST.isoformat() <= row[0]["date"] <= LAST.isoformat()  # noqa: E731
    return [r for r in users if keep(r)], [r for r in platform if keep(r)]


def run_at_once(dsn, writers, seed):
    """Start the writers together (each after a seeded offset); return their errors and notes."""
    errors, notes, rng = [], [], random.Random(seed)
    offsets = [rng.uniform(0, 0.15) for _ in writers]

    def run(writer, offset, writer_seed):
        time.sleep(offset)
        try:
            writer(dsn, random.Random(writer_seed), notes)
        except Exception as exc:  # noqa: BLE001 - every failure is the finding
            errors.append(f"{writer.__name__}: {exc!r}")

    threads = [threading.Thread(target=run, args=(w, o, rng.random())) for w, o in zip(writers, offsets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    return errors, notes


@pytest.mark.parametrize("pair", PAIRS, ids=" + ".join)
def test_every_pair_of_writers_finishes_without_a_deadlock_and_with_the_clean_rows(migrated_dsn, pair):
    clean = window(clean_run_then_empty(migrated_dsn, FIRST, LAST))
    for seed in range(2):
        errors, notes = run_at_once(migrated_dsn, [WRITERS[name] for name in pair], seed)
        assert errors == [], errors
        assert not [n for n in notes if "deadlock" in n or "serializ" in n], notes  # no retry hid one either
        with psycopg.connect(migrated_dsn, autocommit=True) as conn:
            # the writers that do not write every user and day leave the rest to the others
            conn.execute("select aggregate_user_statistics_range(%s, %s), aggregate_daily_statistics_range(%s, %s)",
                         [FIRST, LAST, FIRST, LAST])
        assert window(snapshot(migrated_dsn)) == clean


def descending_against_backfill(dsn):
    """The descending transaction holds its newest day while backfill --jobs 2 starts, then goes on."""
    notes, errors = [], []
    with psycopg.connect(dsn) as dba:
        dba.execute("select aggregate_user_statistics(null, %s)", [LAST])
        started = threading.Event()

        def backfill():
            started.set()
            try:
                run_backfill(dsn, random.Random(0), notes)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        thread = threading.Thread(target=backfill)
        thread.start()
        started.wait()
        time.sleep(1.0)  # the backfill's chunks are in flight, or waiting for the DBA
        try:
            dba.execute("select aggregate_user_statistics(null, d::date) from generate_series(%s::date, %s, '-1 day') d",
                        [LAST - timedelta(days=1), FIRST])
            dba.commit()
        except psycopg.errors.DeadlockDetected as exc:
            errors.append(exc)
            dba.rollback()
        thread.join(timeout=120)
    return errors, notes


def test_a_descending_transaction_beside_backfill_waits_instead_of_deadlocking(migrated_dsn):
    clean = window(clean_run_then_empty(migrated_dsn, FIRST, LAST))
    errors, notes = descending_against_backfill(migrated_dsn)
    assert errors == []
    assert [n for n in notes if "another writer of the rollup" in n]  # the backfill said whom it waited for
    assert window(snapshot(migrated_dsn)) == clean


def test_mutation_the_one_day_function_without_its_writer_lock_deadlocks(migrated_dsn):
    """Take the lock out of the one-day function (so it meets backfill's rows in another order):
    the same interleaving as above must end in a deadlock, or the test above proves nothing."""
    text = render_all(SQL_DIR)["functions/aggregate_user_statistics.sql"]
    lock = "    perform pg_advisory_xact_lock(hashtext('public.rollup writers'), 0);\n"
    assert text.count(lock) == 1
    clean_run_then_empty(migrated_dsn, FIRST, LAST)
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        conn.execute(text.replace(lock, ""))
    errors, notes = descending_against_backfill(migrated_dsn)
    found = [e for e in errors if isinstance(e, psycopg.errors.DeadlockDetected) or "deadlock" in str(e)]
    found += [n for n in notes if "deadlock" in n]
    assert found, (errors, notes)
