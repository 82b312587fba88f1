"""Compare the rendered functions of a git revision with the working tree's, on one generated
database: the rows they write, their plans' shapes and their times.

    python -m bench.compare --base HEAD --users 10000

A change to the generated SQL that is meant to read better, not to compute otherwise, must write
the same rows with plans of the same shape (node types and join order, from EXPLAIN) in about
the same time. Both sets of function files are applied to the same database in turn, round after
round, so both see the same data, cache and machine. Each round times, for each set:

- `one-day`: aggregate_user_statistics(D - 1) with no sums (from history: a first night, a day
  re-run by hand); the platform's aggregate_daily_statistics(D - 1) likewise;
- `step`: the night of D, stepping from the sums D - 1 left;
- `range`: aggregate_user_statistics_range over the 30 days before D (a backfill's chunk, the
  change catch-up); the platform's range likewise.

The rollup tables are emptied before each call, so every call writes its rows afresh; what they
hold after it is compared between the two sets, row by row (a digest of every column but id and
updated_at). Plans are read through auto_explain at NOTICE level, without ANALYZE, so reading
them costs the timed calls nothing.
"""

import argparse
import json
import statistics
import subprocess
import time
from datetime import date, timedelta

import psycopg

from toolkit.cluster import LocalCluster
from toolkit.render import FUNCTIONS

from .__main__ import REPO, generated_database, step_indexes

# No sums kept, nor the day they were of (a table only the working tree's functions may have made)
NO_SUMS = """do $no_sums$ begin
    truncate statskit.{0}_sums;
    if to_regclass('statskit.{0}_sums_day') is not null then truncate statskit.{0}_sums_day; end if;
end $no_sums$"""

CALLS = {
    "user one-day": (NO_SUMS.format("user_statistics_daily"),
                     "select aggregate_user_statistics(null, %(before)s)"),
    "user step": (None, "select aggregate_user_statistics(null, %(day)s)"),
    "user range": (None, "select aggregate_user_statistics_range(%(first)s, %(before)s, null, false)"),
    "platform one-day": (NO_SUMS.format("platform_statistics_daily"),
                         "select aggregate_daily_statistics(%(before)s)"),
    "platform step": (None, "select aggregate_daily_statistics(%(day)s)"),
    "platform range": (None, "select aggregate_daily_statistics_range(%(first)s, %(before)s, false)"),
}


def function_files(revision: str | None) -> list[str]:
    """The rendered function files, in the order migrate applies them: of a git revision, or
    the working tree's (None)."""
    if revision is None:
        return [(REPO / "sql" / "functions" / f"{name}.sql").read_text() for name in FUNCTIONS]
    return [subprocess.run(["git", "-C", REPO, "show", f"{revision}:sql/functions/{name}.sql"],
                           capture_output=True, text=True, check=True).stdout for name in FUNCTIONS]


def stored_digest(conn) -> str:
    """Every stored row, but its id and updated_at, as one digest: a count and a sum of each
    row's hash, which neither row order nor a table's size (millions of rows) can upset."""
    parts = []
    for table in ("user_statistics_daily", "platform_statistics_daily"):
        parts.append(conn.execute(
            f"select count(*) || ' ' || coalesce(sum(('x' || left(md5((to_jsonb(s) - 'id' - 'updated_at')::text), 15))"
            f"::bit(60)::bigint::numeric), 0) from {table} s").fetchone()[0])
    return " / ".join(parts)


def shape(plan: dict) -> list[str]:
    """A plan's node types in order, each with the relation it reads (join order shows in it)."""
    found = [plan["Node Type"] + (f" {plan['Relation Name']}" if "Relation Name" in plan else "")]
    for child in plan.get("Plans", []):
        found += shape(child)
    return found


def run(conn, call: str, params: dict) -> tuple[float, list[list[str]], str]:
    """Time one call afresh; return its seconds, the shapes of the statements it ran (largest
    first) and the digest of what it stored."""
    setup, query = CALLS[call]
    conn.execute("truncate user_statistics_daily, platform_statistics_daily")
    if setup:
        conn.execute(setup)
    # both sets plan from the same statistics: what the tables hold now, not what a call before left
    conn.execute("analyze user_statistics_daily, platform_statistics_daily,"
                 " statskit.user_statistics_daily_sums, statskit.platform_statistics_daily_sums")
    plans = []

    def keep(notice):
        plans.append(notice.message_primary)
    conn.add_notice_handler(keep)
    started = time.perf_counter()
    conn.execute(query, params)
    seconds = time.perf_counter() - started
    conn.remove_notice_handler(keep)
    shapes = []
    for message in plans:
        if message.startswith("duration:") and "{" in message:
            tree = json.loads(message[message.index("{"):])
            shapes.append(shape(tree["Plan"]))
    return seconds, sorted(shapes, key=len, reverse=True), stored_digest(conn)


def compare(dsn: str, day: date, base: str, rounds: int) -> list[dict]:
    variants = {"base": function_files(base), "tree": function_files(None)}
    params = {"day": day, "before": day - timedelta(days=1), "first": day - timedelta(days=30)}
    found = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("load 'auto_explain'")
        conn.execute("set auto_explain.log_nested_statements = on")
        conn.execute("set auto_explain.log_format = json")
        conn.execute("set auto_explain.log_level = notice")
        # a first round reads the plans, untimed; the step of each set starts from the sums its
        # own one-day call left
        for round_ in range(rounds + 1):
            conn.execute(f"set auto_explain.log_min_duration = {0 if round_ == 0 else -1}")
            order = list(variants.items())
            for variant, files in order if round_ % 2 else order[::-1]:  # neither always goes first
                for text in files:
                    conn.execute(text)
                conn.execute("analyze")
                for call in CALLS:
                    seconds, shapes, digest = run(conn, call, params)
                    entry = found.setdefault((variant, call), {"seconds": [], "shapes": shapes, "digest": digest})
                    if round_:
                        entry["seconds"].append(seconds)
                    if entry["digest"] != digest:
                        raise SystemExit(f"{variant} {call}: rows differ between rounds")
    rows = []
    for call in CALLS:
        base_entry, tree_entry = found[("base", call)], found[("tree", call)]
        base_s, tree_s = (statistics.median(e["seconds"]) for e in (base_entry, tree_entry))
        rows.append({"call": call, "base_s": base_s, "tree_s": tree_s, "ratio": tree_s / base_s,
                     "rows": "identical" if base_entry["digest"] == tree_entry["digest"] else "DIFFER",
                     "plans": same_plans(base_entry["shapes"], tree_entry["shapes"])})
    return rows


def same_plans(base: list[list[str]], tree: list[list[str]]) -> str:
    if base == tree:
        return f"same ({len(base)} statements, {sum(map(len, base))} nodes)"
    for n, (a, b) in enumerate(zip(base, tree)):
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return f"statement {n + 1} node {at + 1}: {a[at] if at < len(a) else '-'} -> {b[at] if at < len(b) else '-'}"
    return f"{len(base)} statements -> {len(tree)}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="the git revision to compare with (default HEAD)")
    parser.add_argument("--users", type=int, default=10000)
    parser.add_argument("--days", type=int, default=120)
    parser.add_argument("--bookings-per-user", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=30916)
    args = parser.parse_args()
    cluster = LocalCluster("bench", args.port, durable=False)
    cluster.start()
    first_day = date(2026, 1, 1)
    dsn, _, _ = generated_database(cluster, f"compare_{args.users}", args.users, args.days, args.bookings_per_user,
                                   0.5, first_day)
    with psycopg.connect(dsn, autocommit=True) as conn:
        step_indexes(conn)
    rows = compare(dsn, first_day + timedelta(days=args.days - 1), args.base, args.rounds)
    print(f"{args.users} users, {args.days} days; {args.base} against the working tree, medians of {args.rounds} rounds")
    print(f"| call | {args.base} s | tree s | tree ÷ {args.base} | rows | plan shapes |")
    print("|---|---:|---:|---:|---|---|")
    for row in rows:
        print(f"| {row['call']} | {row['base_s']:.3f} | {row['tree_s']:.3f} | {row['ratio']:.2f} | {row['rows']} | {row['plans']} |")


if __name__ == "__main__":
    main()
