"""A backfill stopped by Ctrl-C, SIGTERM or SIGKILL at random points leaves only whole days, says
what is committed, cancels its statements on the server, and --resume completes it exactly."""

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import date

import psycopg
import pytest

from test_backfill import clean_run_then_empty, snapshot

FIRST, LAST = date(2026, 1, 1), date(2026, 4, 10)
DAYS = (LAST - FIRST).days + 1


def backfill(dsn, *args):
    return subprocess.Popen(
        [sys.executable, "-m", "toolkit", "backfill", "--from", str(FIRST), "--to", str(LAST), *args, "--dsn", dsn],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def users_per_day(dsn):
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute("select date, count(*) from user_statistics_daily group by date").fetchall())


def committed_days(dsn):
    """Days the ledger says are committed in both tables."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "select count(*) from (select d from statskit.backfill_ledger l,"
            " generate_series(l.chunk_first, l.chunk_last, interval '1 day') d"
            " group by d having count(distinct l.scope) = 2) both_tables").fetchone()[0]


def statskit_backends(dsn):
    with psycopg.connect(dsn) as conn:
        return conn.execute("select count(*) from pg_stat_activity where application_name = 'statskit'"
                            " and datname = current_database() and state <> 'idle'").fetchone()[0]


class Reader(threading.Thread):
    """Reads the rollup as a dashboard would, all along: every day it sees must have every user."""

    def __init__(self, dsn, whole):
        super().__init__(daemon=True)
        self.dsn, self.whole, self.done, self.partial, self.reads = dsn, whole, threading.Event(), [], 0

    def run(self):
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.done.is_set():
                seen = conn.execute("select date, count(*) from user_statistics_daily group by date").fetchall()
                self.partial += [(day, n, self.whole[day]) for day, n in seen if n != self.whole[day]]
                self.reads += 1


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda s: signal.Signals(s).name)
def test_a_signal_cancels_the_statement_in_flight_and_says_what_is_committed(migrated_dsn, signum):
    holder = psycopg.connect(migrated_dsn, application_name="dba")
    holder.execute("select pg_advisory_xact_lock(hashtext('public.rollup writers'), 0)")  # every chunk waits
    try:
        run = backfill(migrated_dsn, "--quiet")
        assert run.stderr.readline().startswith("note: waiting for pid")
        time.sleep(0.3)
        assert statskit_backends(migrated_dsn) >= 1  # its statement waits on the server
        sent = time.monotonic()
        run.send_signal(signum)
        _, err = run.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        holder.rollback()
        holder.close()
    assert took < 5
    assert run.returncode == 128 + signum
    last = err.strip().splitlines()[-1]
    assert last == (f"statskit: backfill stopped by {signal.Signals(signum).name}: cancelled; "
                    f"0 of {DAYS} days committed; re-run with --resume to write the rest"), err
    assert "Traceback" not in err
    assert statskit_backends(migrated_dsn) == 0  # the server is not left running (or waiting on) it
    assert users_per_day(migrated_dsn) == {}


SIGNALS = [(signal.SIGINT, seed) for seed in range(2)] + [(signal.SIGTERM, seed) for seed in range(2)] + \
          [(signal.SIGKILL, seed) for seed in range(2)]


@pytest.mark.parametrize("signum, seed", SIGNALS, ids=lambda v: signal.Signals(v).name if v in (2, 9, 15) else str(v))
def test_a_backfill_stopped_at_a_random_point_leaves_only_whole_days(migrated_dsn, signum, seed):
    clean = clean_run_then_empty(migrated_dsn, FIRST, LAST)
    whole = Counter(row[0]["date"] for row in clean[0])
    whole = {date.fromisoformat(day): n for day, n in whole.items()}
    reader = Reader(migrated_dsn, whole)
    reader.start()
    run = backfill(migrated_dsn, "--chunk-days", "2", "--jobs", str(1 + seed))  # seeds 0 and 1: one job, two
    rng = random.Random(seed)
    for _ in range(rng.randint(1, 8)):  # a seeded number of the 50 chunks committed, the next under way
        assert run.stdout.readline().startswith("chunk ")
    time.sleep(rng.uniform(0, 0.05))
    run.send_signal(signum)
    out, err = run.communicate(timeout=30)
    reader.done.set()
    reader.join()
    assert reader.reads > 0 and reader.partial == []
    stored = users_per_day(migrated_dsn)
    assert all(n == whole[day] for day, n in stored.items())
    assert len(stored) < len(whole)  # stopped part way: the test holds a real interruption
    if signum != signal.SIGKILL:
        assert run.returncode == 128 + signum, err
        assert f"{committed_days(migrated_dsn)} of {DAYS} days committed" in err.strip().splitlines()[-1]
    resumed = subprocess.run([sys.executable, "-m", "toolkit", "backfill", "--from", str(FIRST), "--to", str(LAST),
                              "--resume", "--quiet", "--dsn", migrated_dsn], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert snapshot(migrated_dsn) == clean
