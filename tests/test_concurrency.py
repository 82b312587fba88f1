"""Concurrent and interrupted runs: two migrates at once, a killed migrate's lock, a backfill racing
the nightly function, a server restart in the middle of a backfill."""

import os
import signal
import subprocess
import sys
import threading
import time

import psycopg

from conftest import cluster, cron_connection, deploy
from test_backfill import clean_run_then_empty, snapshot
from test_migrate import objects


def statskit(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "toolkit", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**(env or os.environ), "PYTHONUNBUFFERED": "1"})


def test_two_migrates_at_once_both_succeed_and_apply_once(loaded_dsn):
    runs = [statskit("migrate", "--dsn", loaded_dsn) for _ in range(2)]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    applied = [out for out, _ in outputs if "applied migration 0001_statistics_tables" in out]
    assert len(applied) == 1, outputs
    assert sum("nothing to do" in out for out, _ in outputs) == 1, outputs
    names = [o[1] for o in objects(loaded_dsn) if o[0] == "public"]
    assert names.count("user_statistics_daily") == 1
    with cron_connection() as conn:
        jobs = conn.execute("select jobname from cron.job where database = 'statskit_test' order by 1").fetchall()
    assert jobs == [("aggregate-platform-statistics",), ("aggregate-user-statistics",), ("statistics-partitions",)]


def test_a_lock_left_by_a_killed_migrate_is_cleared_with_a_message(loaded_dsn):
    deploy(loaded_dsn)
    blocker = psycopg.connect(loaded_dsn)
    # reads pass, writes wait: migrate stops at its settings write, which it makes holding yoyo's lock
    blocker.execute("lock table statskit.settings in exclusive mode")
    run = statskit("migrate", "--dsn", loaded_dsn)
    try:
        with psycopg.connect(loaded_dsn, autocommit=True) as conn:
            for _ in range(100):  # until the migrate holds yoyo's lock and waits on ours
                if conn.execute("select count(*) from statskit.yoyo_lock").fetchone()[0]:
                    break
                time.sleep(0.1)
            held_by = conn.execute("select pid from statskit.yoyo_lock").fetchone()[0]
        assert held_by == run.pid
        run.send_signal(signal.SIGKILL)
        run.wait()
    finally:
        blocker.rollback()
        blocker.close()
    started = time.monotonic()
    again = statskit("migrate", "--dsn", loaded_dsn, "--wait", 20)
    out, err = again.communicate(timeout=60)
    assert again.returncode == 0, err
    assert f"note: cleared the migrate lock of process {run.pid}" in err and "no longer connected" in err
    assert time.monotonic() - started < 15
    with psycopg.connect(loaded_dsn) as conn:
        assert conn.execute("select count(*) from statskit.yoyo_lock").fetchone()[0] == 0


def test_a_live_lock_is_waited_for_then_named(loaded_dsn):
    deploy(loaded_dsn)
    holder = psycopg.connect(loaded_dsn, autocommit=True, application_name=f"statskit migrate {os.getpid()}")
    holder.execute("insert into statskit.yoyo_lock (locked, ctime, pid) values (1, now(), %s)", [os.getpid()])
    try:
        run = statskit("migrate", "--dsn", loaded_dsn, "--wait", 1)
        _, err = run.communicate(timeout=60)
        assert run.returncode == 1
        assert "holds the lock" in err and "--break-lock" in err and "Traceback" not in err
        broken = statskit("migrate", "--dsn", loaded_dsn, "--break-lock")
        _, err = broken.communicate(timeout=60)
        assert broken.returncode == 0 and f"cleared the migrate lock of process {os.getpid()}" in err
    finally:
        holder.close()


def test_backfill_racing_the_nightly_function_gives_the_specs_rows(migrated_dsn):
    clean = clean_run_then_empty(migrated_dsn, "2026-03-01", "2026-03-20")
    errors = []

    def nightly():
        try:
            with psycopg.connect(migrated_dsn, autocommit=True) as conn:
                for day in range(20, 0, -1):  # the other direction, to meet the backfill in the middle
                    conn.execute("select aggregate_user_statistics(null, %s), aggregate_daily_statistics(%s)",
                                 [f"2026-03-{day:02d}", f"2026-03-{day:02d}"])
        except psycopg.Error as exc:
            errors.append(exc)

    race = threading.Thread(target=nightly)
    backfill = statskit("backfill", "--from", "2026-03-01", "--to", "2026-03-20", "--chunk-days", 1, "--quiet",
                        "--dsn", migrated_dsn)
    race.start()
    _, err = backfill.communicate(timeout=120)
    race.join(timeout=120)
    assert backfill.returncode == 0, err
    assert errors == []
    assert snapshot(migrated_dsn) == clean


def test_a_server_restart_mid_backfill_is_one_line_and_a_rerun_completes(migrated_dsn):
    clean = clean_run_then_empty(migrated_dsn, "2026-03-01", "2026-03-31")
    run = statskit("backfill", "--from", "2026-03-01", "--to", "2026-03-31", "--chunk-days", 1, "--dsn", migrated_dsn)
    assert run.stdout.readline().startswith("chunk 2026-03-0")
    cluster.stop()
    cluster.start()
    out, err = run.communicate(timeout=60)
    assert run.returncode != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("statskit: error:"), err
    rerun = statskit("backfill", "--from", "2026-03-01", "--to", "2026-03-31", "--resume", "--quiet", "--dsn", migrated_dsn)
    assert rerun.wait(timeout=120) == 0
    assert snapshot(migrated_dsn) == clean


def test_backfill_says_whom_it_waits_for_and_a_lock_timeout_is_one_line(migrated_dsn):
    holder = psycopg.connect(migrated_dsn, application_name="nightly-by-hand")
    holder.execute("select pg_advisory_xact_lock(hashtext('public.rollup writers'), 0)")
    try:
        timed_out = statskit("backfill", "--from", "2026-03-01", "--to", "2026-03-02", "--only", "users", "--quiet",
                             "--dsn", migrated_dsn, env={**os.environ, "PGOPTIONS": "-c lock_timeout=300"})
        _, err = timed_out.communicate(timeout=60)
        assert timed_out.returncode == 1
        *notes, error = err.strip().splitlines()
        assert 1 <= len(notes) <= 2  # each connection that reached its chunk waits, and says so
        for note in notes:
            assert note.startswith(f"note: waiting for pid {holder.info.backend_pid} (nightly-by-hand")
            assert note.endswith("another writer of the rollup")
        assert error.startswith("statskit: error: lock_timeout: canceling statement due to lock timeout")
        assert error.endswith("0 of 2 days committed; re-run with --resume to write the rest")
        waiting = statskit("backfill", "--from", "2026-03-01", "--to", "2026-03-02", "--only", "users", "--quiet",
                           "--dsn", migrated_dsn)
        assert waiting.stderr.readline().startswith(f"note: waiting for pid {holder.info.backend_pid}")
    finally:
        holder.rollback()
        holder.close()
    assert waiting.wait(timeout=60) == 0


def test_a_second_backfill_waits_for_the_first(migrated_dsn):
    """Chunks of one backfill share the writer lock; a second backfill must not slip in between them."""
    first = psycopg.connect(migrated_dsn, autocommit=True, application_name="statskit backfill")
    first.execute("select pg_advisory_lock(hashtext('public.backfill'), 0)")
    try:
        second = statskit("backfill", "--from", "2026-03-01", "--to", "2026-03-02", "--quiet",
                          "--dsn", migrated_dsn, env={**os.environ, "PGOPTIONS": "-c lock_timeout=300"})
        _, err = second.communicate(timeout=60)
        note, error = err.strip().splitlines()
        assert note.startswith(f"note: waiting for pid {first.info.backend_pid} (statskit backfill")
        assert note.endswith("another statskit backfill of this database")
        assert error.startswith("statskit: error: lock_timeout")
        with psycopg.connect(migrated_dsn) as conn:
            assert conn.execute("select count(*) from user_statistics_daily").fetchone()[0] == 0
    finally:
        first.close()
