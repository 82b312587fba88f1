"""`statskit verify`: prove a deployment right, check by check, without changing it.

Every check returns a Check(check, status, detail) with status pass, warn or fail. The
spot check recomputes sampled rows inside a transaction that is always rolled back: the
stored values are kept in a temporary table, the one-user function recomputes the row in
place (it only writes when a number differs), and the rollback undoes any such write.
"""

import re
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta, timezone

import psycopg

from . import access, cron, deployment, partitions
from .catalog import Rollup
from .db import first_line
from .errors import StatskitError
from .dates import check_range, yesterday
from .migrate import Target
from .render import FUNCTIONS, quote_ident
from .settings import STATSKIT_SCHEMA, Settings

CHECK_GROUPS = ("schema", "functions", "access", "migrations", "cron", "capture", "data", "sample")
CRON_STALE_AFTER = timedelta(hours=26)
USER_JOB_HOUR_UTC = 1


@dataclass(frozen=True)
class Check:
    check: str
    status: str  # pass | warn | fail
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


def _result(name: str, problems: list[str], warnings: list[str] = (), ok: str = "ok") -> Check:
    if problems:
        return Check(name, "fail", "; ".join(problems))
    if warnings:
        return Check(name, "warn", "; ".join(warnings))
    return Check(name, "pass", ok)


# -- schema -------------------------------------------------------------------------------

def _expected_columns(rollup: Rollup, key_type: str | None) -> dict[str, tuple[str, bool, str | None]]:
    """{column: (type, not null, default)} as format_type and pg_get_expr print them; key_type None
    for the platform's table, which has no user."""
    columns = {"id": ("bigint", True, None)}
    if key_type:
        columns["user_id"] = (key_type, True, None)
    columns["date"] = ("date", True, None)
    for m in rollup.metrics:
        columns[m.name] = (m.type, not m.nullable, m.default)
    columns["updated_at"] = ("timestamp with time zone", True, "now()")
    return columns


def _check_table(conn, settings: Settings, rollup: Rollup, key_type: str | None) -> list[Check]:
    table = f"{settings.schema}.{rollup.table}"
    oid = conn.execute("select to_regclass(%s)::oid", [f"{quote_ident(settings.schema)}.{rollup.table}"]).fetchone()[0]
    if oid is None:
        return [Check(f"schema {rollup.table}", "fail", f"table {table} does not exist")]
    actual = {
        name: (typ, notnull, default)
        for name, typ, notnull, default in conn.execute(
            "select a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid)"
            " from pg_attribute a left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum"
            " where a.attrelid = %s and a.attnum > 0 and not a.attisdropped",
            [oid],
        ).fetchall()
    }
    problems, warnings = [], []
    expected = _expected_columns(rollup, key_type)
    per_user = key_type is not None
    for name, (typ, notnull, default) in expected.items():
        if name not in actual:
            problems.append(f"column {name} is missing")
            continue
        got_type, got_notnull, got_default = actual[name]
        if got_type != typ:
            problems.append(f"column {name} is {got_type}, expected {typ}")
        if got_notnull != notnull:
            problems.append(f"column {name} is {'NOT NULL' if got_notnull else 'nullable'}, expected {'NOT NULL' if notnull else 'nullable'}")
        if default is not None and got_default != default:
            problems.append(f"column {name} defaults to {got_default}, expected {default}")
    extra = sorted(set(actual) - set(expected))
    if extra:
        warnings.append(f"unknown columns: {', '.join(extra)}")
    checks = [_result(f"schema {rollup.table}", problems, warnings, f"{len(actual)} columns as in the catalog")]

    # A unique index backs both a unique constraint and a plain unique index, so both count.
    indexes = conn.execute(
        "select i.indisunique, array_agg(a.attname order by k.ord)"
        " from pg_index i cross join lateral unnest(i.indkey) with ordinality k(attnum, ord)"
        " join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum"
        " where i.indrelid = %s and i.indpred is null group by i.indexrelid, i.indisunique",
        [oid],
    ).fetchall()
    key = ["user_id", "date"] if per_user else ["date"]
    key_problems = []
    if not any(unique and sorted(cols) == sorted(key) for unique, cols in indexes):
        key_problems.append(f"no unique key on ({', '.join(key)})")
    if per_user and not any(cols[0] == "date" for _, cols in indexes):
        key_problems.append("no index leading with date")
    checks.append(_result(f"keys {rollup.table}", key_problems, ok=f"unique ({', '.join(key)})"
                          + (" and index on (date)" if per_user else "")))
    return checks


def _check_partitions(conn, settings: Settings, table: str) -> Check:
    name = f"partitions {table}"
    partitioned = partitions.is_partitioned(conn, settings, table)
    if not settings.partitioned:
        return _result(name, ["partitioned, but partition_period is 'none': run statskit migrate"] if partitioned else [],
                       ok="not partitioned (partition_period 'none')")
    if not partitioned:
        return Check(name, "warn", f"not partitioned yet (partition_period {settings.partition_period!r}): "
                                   f"statskit migrate converts it in place")
    problems = []
    missing = partitions.missing_periods(conn, settings, table)
    if missing:
        problems.append(f"no partition for the {settings.partition_period} from {', '.join(map(str, missing))}: "
                        f"the partitions job (or statskit migrate) makes them")
    have = partitions.partitions(conn, settings, table)
    kept_from = partitions.retention_edge(conn, settings)
    past = [p.name for p in have if kept_from and p.after_day and p.after_day <= kept_from]
    if past:
        problems.append(f"{len(past)} partitions past retention ({settings.retention}, days before {kept_from}), "
                        f"e.g. {past[0]}: the partitions job drops them")
    unlike = partitions.differences(conn, settings, table)
    if unlike:
        problems.append(f"{len(unlike)} partition owners, grants or policies differ from the table's (e.g. {unlike[0]}): "
                        f"run statskit migrate")
    last = max((p.after_day for p in have if p.after_day), default=None)
    return _result(name, problems, ok=f"{len(have)} partitions by {settings.partition_period}, ahead to {last}, "
                                      f"each with the table's owner, grants and policies"
                                      + (f"; none past retention ({settings.retention})" if settings.retention else ""))


def _check_source_indexes(conn, target: Target) -> Check:
    missing = deployment.missing_lookup_indexes(conn, target.catalog, target.settings)
    step = deployment.missing_step_indexes(conn, target.catalog, target.settings)
    warnings = [f"no index leads with {', '.join(map(str, missing))}: the one-user function and "
                f"this sample read a user's rows through them"] if missing else []
    warnings += [f"no index leads with {', '.join(map(str, step))}: the nightly step scans whole tables "
                 f"instead of reading the day's rows"] if step else []
    return _result("keys source tables", [], warnings,
                   ok="every column a user's rows and a day's rows are looked up by leads an index")


# -- functions ----------------------------------------------------------------------------

_BODY = re.compile(r"\$function\$(.*)\$function\$", re.S)


def _check_functions(conn, target: Target) -> list[Check]:
    checks = []
    for name, spec in FUNCTIONS.items():
        signature = spec.arguments(target.catalog.users.key_type)
        row = conn.execute(
            "select l.lanname, format_type(p.prorettype, null), p.prosrc from pg_proc p"
            " join pg_language l on l.oid = p.prolang where p.oid = to_regprocedure(%s)",
            [f"{quote_ident(target.settings.schema)}.{name}({signature})"],
        ).fetchone()
        check = f"function {name}"
        if row is None:
            checks.append(Check(check, "fail", f"{target.settings.schema}.{name}({signature}) does not exist"))
            continue
        language, returns, body = row
        problems = []
        if language != "plpgsql":
            problems.append(f"language {language}, expected plpgsql")
        if returns != spec.returns:
            problems.append(f"returns {returns}, expected {spec.returns}")
        rendered_body = _BODY.search(target.rendered[f"functions/{name}.sql"]).group(1)
        if body != rendered_body:
            problems.append("deployed body differs from the rendered one (edited by hand?): run statskit migrate")
        checks.append(_result(check, problems, ok="body matches the rendered SQL"))
    return checks


# -- access -------------------------------------------------------------------------------

def _check_access(conn, target: Target) -> list[Check]:
    if not target.settings.roles:
        return [Check("access roles", "pass", "no statskit roles: the jobs' own roles are checked with cron")]
    problems = access.problems(conn, access.role_needs(target.settings, target.catalog))
    if problems:
        problems.append("run statskit migrate to restore them")
    return [_result("access roles", problems, ok="owners, grants and row security as access.sql sets them")]


# -- migrations ---------------------------------------------------------------------------

def _check_migrations(conn, target: Target) -> list[Check]:
    applied = deployment.applied_migrations(conn)
    pending = [m for m in target.migration_ids if m not in applied]
    unknown = [m for m in applied if m not in target.migration_ids]
    problems = []
    if pending:
        problems.append(f"pending: {', '.join(pending)} (run statskit migrate)")
    if unknown:
        problems.append(f"applied but unknown to this statskit version: {', '.join(unknown)}")
    return [_result("migrations", problems, ok=f"{len(applied)} applied, none pending")]


# -- cron ---------------------------------------------------------------------------------

def _check_cron(cron_conn, target: Target) -> list[Check]:
    database = target.conn.info.dbname
    registered = cron.registered_jobs(cron_conn, [j.name for j in cron.wanted_jobs(target.settings)])
    viewer, sees_all = cron_conn.execute(
        "select current_user, rolsuper or rolbypassrls from pg_roles where rolname = current_user").fetchone()
    checks = []
    for wanted in cron.wanted_jobs(target.settings):
        mine = [j for j in registered if j.jobname == wanted.name and j.database == database]
        if not mine and not sees_all and viewer != target.settings.cron_user:
            # cron.job's row security shows a role only its own jobs: absent here is not absent,
            # unless they are this role's own (migrate records whom it scheduled them for).
            checks.append(Check(f"cron job {wanted.name}", "warn",
                                f"not visible to {viewer}: pg_cron shows each role only its own jobs; "
                                f"verify as the role that scheduled them, or as a superuser"))
            continue
        if not mine:
            checks.append(Check(f"cron job {wanted.name}", "fail", f"not registered for database {database}"))
            checks.append(Check(f"cron health {wanted.name}", "fail", "job not registered"))
            continue
        job = mine[0]
        problems = []
        if job.schedule != wanted.schedule:
            problems.append(f"schedule {job.schedule!r}, expected {wanted.schedule!r}")
        if job.command.strip().rstrip(";") != wanted.command:
            problems.append(f"command {job.command!r}, expected {wanted.command!r}")
        if not job.active:
            problems.append("inactive")
        checks.append(_result(f"cron job {wanted.name}", problems, ok=f"{job.schedule}, active, in {database}"))
        needs = access.job_needs(target.settings, target.catalog, job.username, wanted.rollup, wanted.name)
        checks.append(_result(f"cron runs-as {wanted.name}", access.problems(target.conn, needs),
                              ok=f"{job.username} can run it"))
        checks.append(_cron_health(cron_conn, job, deployment.jobs_scheduled_at(target.conn)))
    return checks


def _cron_health(cron_conn, job: cron.RegisteredJob, scheduled_at: datetime | None) -> Check:
    name = f"cron health {job.jobname}"
    last = cron_conn.execute(
        "select status, return_message, coalesce(end_time, start_time) from cron.job_run_details"
        " where jobid = %s order by runid desc limit 1",
        [job.jobid],
    ).fetchone()
    if last is None:
        # Jobs scheduled just now have not had their first night yet; a whole night later they should have.
        if scheduled_at and datetime.now(timezone.utc) - scheduled_at <= CRON_STALE_AFTER:
            return Check(name, "pass", f"no run yet: scheduled {scheduled_at:%Y-%m-%d %H:%M} UTC, first run at "
                                       f"'{job.schedule}' (UTC)")
        return Check(name, "fail", f"no run since it was scheduled ({scheduled_at:%Y-%m-%d %H:%M} UTC), more than 26 h"
                                   if scheduled_at else "no run yet")
    status, message, when = last
    if status == "failed":
        # pg_cron stores the whole error, function context included: its first line names it.
        return Check(name, "fail", f"last run failed at {when:%Y-%m-%d %H:%M}: {first_line(message or '', 'no message')}")
    if status != "succeeded":
        return Check(name, "warn", f"last run is {status} (started {when:%Y-%m-%d %H:%M})")
    age = datetime.now(timezone.utc) - when
    if age > CRON_STALE_AFTER:
        return Check(name, "fail", f"last success {age.total_seconds() / 3600:.0f} h ago, more than 26 h")
    return Check(name, "pass", f"last run succeeded {age.total_seconds() / 3600:.1f} h ago")


# -- capture ------------------------------------------------------------------------------

def _check_capture(conn, target: Target) -> list[Check]:
    s, catalog = target.settings, target.catalog
    triggers = deployment.capture_triggers(conn, s, catalog)
    if not s.capture:
        problems = [f"{triggers} capture triggers left on the source tables: run statskit migrate"] if triggers else []
        return [_result("capture", problems, ok="off (--no-capture): corrections older than the lookback days "
                                               "need statskit backfill")]
    expected = 3 * len(catalog.source_tables)
    checks = [_result("capture triggers", [f"{triggers} of {expected} triggers on the source tables: run statskit migrate"]
                      if triggers != expected else [], ok=f"{expected} triggers on {len(catalog.source_tables)} source tables")]
    for table in ("user", "platform"):
        entries, oldest_day, oldest_logged = conn.execute(
            f"select count(*), min(first_day), min(logged_at) from {STATSKIT_SCHEMA}.{table}_changes").fetchone()
        name = f"capture backlog {table}"
        if not entries:
            checks.append(Check(name, "pass", "empty: every logged change is in the rollup"))
            continue
        detail = f"{entries} entries, the oldest from {oldest_logged:%Y-%m-%d %H:%M} UTC touching {oldest_day}"
        kept_from = partitions.retention_edge(conn, s)
        if kept_from and oldest_day < kept_from:
            detail += f" (past retention: days before {kept_from} are not kept, so those changes touch only {kept_from} on)"
        behind = datetime.now(timezone.utc) - oldest_logged > CRON_STALE_AFTER
        checks.append(Check(name, "fail" if behind else "pass",
                            f"{detail}: the nightly job has fallen behind (more than 26 h)" if behind
                            else f"{detail}; the next nightly job takes them"))
    return checks


# -- data ---------------------------------------------------------------------------------

def default_window(conn, settings: Settings) -> tuple[date, date]:
    """The last 7 complete days in the statistics time zone."""
    last = yesterday(conn, settings.time_zone)
    return last - timedelta(days=6), last


def window(conn, settings: Settings, first: date | None = None, last: date | None = None) -> tuple[date, date]:
    """The days the data checks read: by default the last 7 complete days; a last day moves
    those 7 days, a first day widens them."""
    default_first, default_last = default_window(conn, settings)
    last = last or default_last
    first = first or last - (default_last - default_first)
    check_range(first, last)
    return first, last


def _check_data(conn, target: Target, first: date, last: date) -> list[Check]:
    s = target.settings
    schema, source = quote_ident(s.schema), quote_ident(s.source_schema)
    user_table, platform_table, users = target.catalog.user.table, target.catalog.platform.table, target.catalog.users
    last_complete = yesterday(conn, s.time_zone)
    rows_yesterday = conn.execute(f"select count(*) from {schema}.{user_table} where date = %s", [last_complete]).fetchone()[0]
    # A window that ends with a yesterday the nightly job has not written yet is a freshness question, not a hole.
    holes_last = last - timedelta(days=1) if last == last_complete and rows_yesterday == 0 else last
    missing = conn.execute(
        f"select d::date, count(*) from generate_series(%s::date, %s::date, interval '1 day') d"
        f" join {source}.{users.name} p on p.{users.created_at} < (d::date + 1)::timestamp at time zone %s"
        f" where not exists (select 1 from {schema}.{user_table} s where s.user_id = p.{users.key} and s.date = d::date)"
        f" group by 1 order by 1",
        [first, holes_last, s.time_zone],
    ).fetchall()
    missing_days = conn.execute(
        f"select d::date from generate_series(%s::date, %s::date, interval '1 day') d"
        f" where not exists (select 1 from {schema}.{platform_table} s where s.date = d::date) order by 1",
        [first, holes_last],
    ).fetchall()
    duplicates = conn.execute(
        f"select count(*) from (select user_id, date from {schema}.{user_table} where date between %s and %s"
        f" group by 1, 2 having count(*) > 1) dup",
        [first, last],
    ).fetchone()[0]
    window = f"{first}..{last}"
    checks = [
        _result("data user rows", [f"{n} missing on {d}" for d, n in missing[:5]]
                + ([f"and {len(missing) - 5} more days"] if len(missing) > 5 else []),
                ok=f"every user has a row for every day of {window}"),
        _result("data platform rows", [f"no row for {', '.join(str(d) for (d,) in missing_days)}"] if missing_days else [],
                ok=f"every day of {window} has a row"),
        _result("data duplicates", [f"{duplicates} duplicated (user, day) keys"] if duplicates else [],
                ok="no duplicate keys"),
    ]
    unfilled = deployment.unfilled(conn)
    checks.append(_result("data new metrics", [
        f"{u.metric} of {u.table} holds its default on {u.first}..{u.last} (added after those rows were written): "
        f"run statskit backfill --from {u.first} --to {u.last}" for u in unfilled],
        ok="every metric column was filled for the days stored before it"))
    hour = datetime.now(timezone.utc).hour
    if rows_yesterday:
        checks.append(Check("data freshness", "pass", f"rows for {last_complete} exist"))
    elif hour >= USER_JOB_HOUR_UTC + 1:
        checks.append(Check("data freshness", "warn", f"no rows for {last_complete} although the user job runs at 01:00 UTC"))
    else:
        checks.append(Check("data freshness", "pass", f"rows for {last_complete} are not due before 01:00 UTC"))
    return checks


# -- sample -------------------------------------------------------------------------------

def _check_sample(conn, target: Target, first: date, last: date, users: int) -> list[Check]:
    s = target.settings
    schema = quote_ident(s.schema)
    table = target.catalog.user.table
    metrics = [m.name for m in target.catalog.user.metrics]
    mismatches = []
    with conn.transaction(force_rollback=True):
        conn.execute(
            f"create temporary table statskit_sample on commit drop as"
            f" with days as (select distinct date from {schema}.{table} where date between %s and %s"
            f"               order by date desc limit 2),"
            f" picked as (select user_id from {schema}.{table} where date = (select max(date) from days)"
            f"            order by md5(user_id::text) limit %s)"
            f" select s.* from {schema}.{table} s join days using (date) join picked using (user_id)",
            [first, last, users],
        )
        sampled = conn.execute("select count(*) from statskit_sample").fetchone()[0]
        if sampled == 0:
            return [Check("sample", "warn", f"no stored rows in {first}..{last} to recompute")]
        conn.execute(f"select {schema}.aggregate_single_user_statistics(user_id, date) from statskit_sample")
        for metric in metrics:
            rows = conn.execute(
                f"select s.user_id, s.date, s.{metric}, now_.{metric} from statskit_sample s"
                f" join {schema}.{table} now_ using (user_id, date)"
                f" where s.{metric} is distinct from now_.{metric} order by s.date, s.user_id",
            ).fetchall()
            mismatches += [f"{metric} of {u} on {d}: stored {old}, recomputed {new}" for u, d, old, new in rows]
    if mismatches:
        more = f" (and {len(mismatches) - 3} more)" if len(mismatches) > 3 else ""
        return [Check("sample", "fail", "; ".join(mismatches[:3]) + more)]
    return [Check("sample", "pass", f"{sampled} stored rows recomputed, every metric equal")]


# -- all ----------------------------------------------------------------------------------

def run_checks(target: Target, cron_dsn: str | None, groups: tuple[str, ...],
               first: date, last: date, sample_users: int) -> list[Check]:
    """Run the named groups of checks; a group that cannot run at all is one failed check."""
    conn = target.conn
    runners = {
        "schema": lambda: _check_table(conn, target.settings, target.catalog.user, target.catalog.users.key_type)
        + _check_table(conn, target.settings, target.catalog.platform, None)
        + [_check_partitions(conn, target.settings, rollup.table) for rollup in partitions.rollups(target.catalog)]
        + [_check_source_indexes(conn, target)],
        "functions": lambda: _check_functions(conn, target),
        "access": lambda: _check_access(conn, target),
        "migrations": lambda: _check_migrations(conn, target),
        "cron": lambda: _with_cron(target, cron_dsn),
        "capture": lambda: _check_capture(conn, target),
        "data": lambda: _check_data(conn, target, first, last),
        "sample": lambda: _check_sample(conn, target, first, last, sample_users),
    }
    checks: list[Check] = []
    for group in CHECK_GROUPS:
        if group in groups:
            try:
                checks += runners[group]()
            except psycopg.errors.InsufficientPrivilege:
                raise  # verify cannot run at all (exit 2), rather than one check failing
            except (psycopg.Error, StatskitError) as exc:
                checks.append(Check(group, "fail", f"could not run: {first_line(exc)}"))
    return checks


def _with_cron(target: Target, cron_dsn: str | None) -> list[Check]:
    if not target.settings.cron:
        if target.stored and not target.stored.cron:
            return [Check("cron", "pass", "no pg_cron jobs to check: deployed with --no-cron, the nightly "
                                          "functions are scheduled outside statskit")]
        return [Check("cron", "warn", "pg_cron's jobs not checked (--no-cron)")]
    with cron.connect_cron(target.dsn, target.conn, cron_dsn, target.settings) as cron_conn:
        try:
            return _check_cron(cron_conn, target)
        except psycopg.errors.InsufficientPrivilege as exc:
            # Not a missing job: a login that may not look. Say what it cannot see.
            return [Check("cron", "warn", f"cannot see pg_cron's jobs as {cron_conn.info.user}: {first_line(exc)}; "
                                          f"verify as the role that scheduled them, or grant it USAGE on schema cron")]


def overall(checks: list[Check]) -> str:
    statuses = {c.status for c in checks}
    return "fail" if "fail" in statuses else "warn" if "warn" in statuses else "pass"
