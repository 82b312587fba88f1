"""statskit's Python API: what every CLI command calls, for an orchestrator's task to call too.

    from toolkit import api

    project = api.Project.open()                   # statskit.toml here or above, else the packaged catalog
    with project.deployment(dsn) as app:           # one connection, reused by every call below
        app.migrate()                              # app.plan() says what it would do
        app.backfill(date(2026, 1, 1), date(2026, 3, 31), progress=print_progress, cancel=stop_event)
        report = app.verify()                      # report.ok, report.checks
        day, role, kpis = app.user_kpis(user_key)

Nothing here prints or installs a signal handler: progress and notes are callbacks, cancellation
is a threading.Event. Errors are StatskitError (one line; `field` names the parameter it concerns).
docs/api.md has the whole surface and a scheduled task written as the plain function a task calls.
"""

import dataclasses
import threading
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Callable

from . import backfill as backfill_core
from . import clients, dashboard, deployment, docs, project as project_files, verify as verify_core
from . import db, fleet as fleet_core, router as router_core
from . import migrate as migrate_core
from .catalog import Catalog, UserKey, load_catalog
from .errors import StatskitError
from .settings import Settings
from .render import PACKAGED_SQL_DIR, RENDERED_GLOBS, default_sql_dir, render_all, stale_files, write_rendered

WARNING = "-- WARNING: "


@dataclass(frozen=True)
class Rendered:
    """What a render wrote: the paths it touched, out of how many files, and the warnings of the
    migrations it wrote (a retyped column that rewrites its table, ...)."""

    touched: list[Path]
    total: int
    warnings: list[str]

    @property
    def new_migrations(self) -> bool:
        return any(p.parent.name == "migrations" for p in self.touched)


@dataclass(frozen=True)
class Project:
    """A catalog and the folder its SQL is rendered into (a project made by `statskit init`)."""

    sql_dir: Path
    catalog: Catalog

    @classmethod
    def open(cls, sql_dir: Path | str | None = None) -> "Project":
        """The project at sql_dir; by default the one statskit.toml here or above (or
        $STATSKIT_PROJECT) names, else the catalog installed with statskit."""
        folder = Path(sql_dir) if sql_dir else default_sql_dir()
        return cls(folder, load_catalog(folder / "catalog.toml"))

    def _outputs(self, extra: dict[str, dict[str, str]]) -> list[tuple[Path, dict[str, str], tuple[str, ...]]]:
        """(folder, {file: text}, globs render owns there): sql/, and the docs/ and clients/ a
        project keeps beside it, with `extra` files for folders by name."""
        outputs = [(self.sql_dir, render_all(self.sql_dir, catalog=self.catalog), RENDERED_GLOBS)]
        for folder, files in (("docs", docs.render_docs), ("clients", clients.render_clients)):
            if (self.sql_dir.parent / folder).is_dir():
                outputs.append((self.sql_dir.parent / folder, {**files(self.catalog), **extra.get(folder, {})}, ()))
        return outputs

    def stale(self, extra: dict[str, dict[str, str]] | None = None) -> tuple[list[Path], int]:
        """Rendered files that differ from a fresh rendering (or are missing, or left over), and
        how many files a render writes."""
        outputs = self._outputs(extra or {})
        stale = [folder / rel for folder, files, owned in outputs for rel in stale_files(folder, files, owned)]
        return stale, sum(len(files) for _, files, _ in outputs)

    def render(self, extra: dict[str, dict[str, str]] | None = None) -> Rendered:
        """Write what changed. A released migration is never rewritten: if the catalog would change
        one, nothing is written and StatskitError says to add a migration instead."""
        if self.sql_dir.resolve() == PACKAGED_SQL_DIR.resolve() and self.sql_dir.parent.name == "toolkit":
            raise StatskitError("render writes into a project's sql/ folder: open a project (statskit init makes one)")
        outputs = self._outputs(extra or {})
        sql = outputs[0][1]
        released = [rel for rel in stale_files(self.sql_dir, sql)
                    if rel.startswith("migrations/") and (self.sql_dir / rel).exists()]
        if released:
            raise StatskitError(
                f"released migration {released[0]} would change or disappear: never edit a released migration, "
                f"add a new [[migrations]] entry to the catalog instead (delete the file first only if it was "
                f"never applied anywhere)")
        touched = [folder / rel for folder, files, owned in outputs for rel in write_rendered(folder, files, owned)]
        warnings = [f"{rel}: {line.removeprefix(WARNING)}" for rel, text in sql.items()
                    if rel.startswith("migrations/") and self.sql_dir / rel in touched
                    for line in text.splitlines() if line.startswith(WARNING)]
        return Rendered(touched, sum(len(files) for _, files, _ in outputs), warnings)

    def deployment(self, dsn: str, **settings) -> "Deployment":
        """Open the database at dsn (settings: schema, time_zone, capture, cron, ... as migrate takes
        them; those not given, or None, come from the project's [deployment] in statskit.toml)."""
        given = {name: value for name, value in settings.items() if value is not None}
        return Deployment(migrate_core.Target.open(dsn, self.sql_dir, {**project_files.deployment_settings(self.sql_dir), **given}))

    def fleet(self, fleet: "fleet_core.Fleet | Path | str", **settings) -> "FleetDeployment":
        """Every shard of a fleet file (or a loaded Fleet), each deployed as one database with
        these settings (its jobs named after the shard)."""
        if settings.get("job_suffix"):
            raise StatskitError("a fleet names each shard's jobs after the shard (its name in the fleet file)",
                                field="job_suffix")
        loaded = fleet if isinstance(fleet, fleet_core.Fleet) else fleet_core.load(fleet)
        return FleetDeployment(self, loaded, settings)


def init(folder: Path | str) -> list[Path]:
    """Write a new project (statskit.toml, sql/ with the packaged catalog and templates, clients/)
    and render it; return the paths written. An application adapts the catalog to its own
    tables before its first migrate (docs/getting-started.md)."""
    folder = Path(folder)
    written = project_files.init(folder, PACKAGED_SQL_DIR)
    Project.open(project_files.sql_dir(folder)).render()
    return written


class _Verdict:
    """status and ok of a report's `checks`."""

    checks: list[verify_core.Check]

    @property
    def status(self) -> str:
        """pass, warn or fail: the worst of the checks."""
        return verify_core.overall(self.checks)

    @property
    def ok(self) -> bool:
        return self.status != "fail"


@dataclass(frozen=True)
class Report(_Verdict):
    """verify's result: every check, and the window of days the data checks read."""

    checks: list[verify_core.Check]
    database: str
    first: date
    last: date

    @property
    def failures(self) -> list[verify_core.Check]:
        return [c for c in self.checks if c.status == "fail"]


class Deployment:
    """One database with statskit deployed in it, or to deploy into. A context manager: every
    call uses the one connection it opened (a backfill's extra jobs open their own)."""

    def __init__(self, target: migrate_core.Target):
        self.target = target

    def close(self) -> None:
        self.target.close()

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def catalog(self) -> Catalog:
        return self.target.catalog

    def user_key(self, text: str) -> UserKey:
        """A user key typed in, as the catalog's key type holds it."""
        return self.catalog.users.parse_key(text)

    # -- deploying ------------------------------------------------------------------------

    def plan(self, cron_dsn: str | None = None) -> migrate_core.MigratePlan:
        """What migrate would do, changing nothing (plan.script() is the exact SQL)."""
        return migrate_core.migrate(self.target, cron_dsn, dry_run=True)

    def migrate(self, cron_dsn: str | None = None, policy: migrate_core.LockPolicy = migrate_core.LockPolicy(),
                break_lock: bool = False) -> migrate_core.MigratePlan:
        """Bring the deployment up to date: migrations, functions, access, capture, pg_cron jobs."""
        return migrate_core.migrate(self.target, cron_dsn, policy=policy, break_lock=break_lock)

    def status(self, cron_dsn: str | None = None) -> migrate_core.Status:
        return migrate_core.status(self.target, cron_dsn)

    def rollback(self, cron_dsn: str | None = None,
                 policy: migrate_core.LockPolicy = migrate_core.LockPolicy()) -> migrate_core.RollbackResult:
        return migrate_core.rollback(self.target, cron_dsn, policy)

    # -- filling and checking ---------------------------------------------------------------

    def backfill(self, first: date, last: date, *, only: str = "both", user: UserKey | None = None,
                 resume: bool = False, chunk_days: int = backfill_core.Request.chunk_days,
                 jobs: int = backfill_core.Request.jobs,
                 progress: Callable[[backfill_core.Progress, tuple[date, date]], None] = lambda *a: None,
                 notify: Callable[[str], None] = lambda message: None,
                 cancel: threading.Event | None = None) -> backfill_core.Progress:
        """Write every day from first to last (a last day after yesterday is clamped, with a
        note). Each chunk of days commits whole; on cancel or error, backfill_core.Stopped says
        what is committed, and resume=True writes the rest."""
        request = backfill_core.Request(first=first, last=last, scope=only, user_id=user, resume=resume,
                                         chunk_days=chunk_days, jobs=jobs)
        return backfill_core.backfill(self.target, request, progress, notify, cancel)

    def verify(self, first: date | None = None, last: date | None = None,
               groups: tuple[str, ...] = verify_core.CHECK_GROUPS, sample: int = 20,
               cron_dsn: str | None = None) -> Report:
        """Every check of the groups; the data window defaults to the last 7 complete days."""
        deployment.require_deployment(self.target.conn)
        first, last = verify_core.window(self.target.conn, self.target.settings, first, last)
        checks = verify_core.run_checks(self.target, cron_dsn, groups, first, last, sample)
        return Report(checks, self.target.conn.info.dbname, first, last)

    # -- the dashboard's reads --------------------------------------------------------------

    def user_metric(self, user: UserKey, metric: str, day: date | None = None,
                    compare: str = "day") -> tuple[date, dashboard.MetricValue]:
        deployment.require_deployment(self.target.conn)
        return dashboard.user_metric(self.target, user, metric, day, compare)

    def user_kpis(self, user: UserKey, day: date | None = None,
                  compare: str = "day") -> tuple[date, str, list[dashboard.MetricValue]]:
        """(day, the user's role, its KPI set in dashboard order)."""
        deployment.require_deployment(self.target.conn)
        return dashboard.user_kpis(self.target, user, day, compare)

    def platform_kpis(self, day: date | None = None,
                      compare: str = "day") -> tuple[date, list[dashboard.MetricValue]]:
        deployment.require_deployment(self.target.conn)
        return dashboard.platform_kpis(self.target, day, compare)

    def metric_units(self) -> dict[str, str]:
        return dashboard.metric_units(self.target)


Outcomes = list[fleet_core.Outcome]


@dataclass(frozen=True)
class FleetReport(_Verdict):
    """verify --fleet's result: each shard's own report (or why it could not run), and the checks
    of the fleet as one (the same deployment everywhere, jobs, placement, copies equal)."""

    outcomes: Outcomes  # of Report
    checks: list[verify_core.Check]  # each shard's prefixed with its name, then the fleet's


class FleetDeployment:
    """The shards of a fleet, each a Deployment of its own, worked on side by side (at most
    `parallel` at once). Every command returns one Outcome per shard in fleet order; one shard's
    failure stops no other, and `done` hears each shard's outcome as it finishes."""

    def __init__(self, project: Project, fleet: fleet_core.Fleet, settings: dict):
        self.project, self.fleet, self.settings = project, fleet, settings

    def shard(self, shard: fleet_core.Shard) -> Deployment:
        """One shard's deployment, its jobs named after it."""
        return self.project.deployment(shard.dsn, **{**self.settings, "shard": shard.name, "job_suffix": shard.name})

    def _each(self, work, parallel: int, done, shards: tuple[fleet_core.Shard, ...] | None = None) -> Outcomes:
        def on_shard(shard):
            with self.shard(shard) as app:
                return work(shard, app)
        return fleet_core.each_shard(self.fleet.shards if shards is None else shards, on_shard, parallel, done)

    def plan(self, cron_dsn: str | None = None, parallel: int = fleet_core.DEFAULT_PARALLEL,
             done=lambda outcome: None) -> Outcomes:
        fleet_core.check_cron_dsn(cron_dsn)
        return self._each(lambda shard, app: app.plan(cron_dsn), parallel, done)

    def migrate(self, cron_dsn: str | None = None, policy: migrate_core.LockPolicy = migrate_core.LockPolicy(),
                break_lock: bool = False, parallel: int = fleet_core.DEFAULT_PARALLEL,
                done=lambda outcome: None) -> Outcomes:
        """migrate on every shard; a re-run changes only the shards not up to date."""
        fleet_core.check_cron_dsn(cron_dsn)
        outcomes = self._each(lambda shard, app: app.migrate(cron_dsn, policy, break_lock), parallel, done)
        return outcomes + self._on_router(lambda settings: router_core.deploy(
            self.fleet, self.project.sql_dir, settings, self.project.catalog, cron_dsn), outcomes, done)

    @property
    def router(self) -> fleet_core.Shard | None:
        """The router as a member of the fleet's outcomes (it is listed last, as "router")."""
        return fleet_core.Shard(len(self.fleet.shards), "router", self.fleet.router) if self.fleet.router else None

    def _router_settings(self, outcomes: Outcomes | None = None) -> Settings:
        """The shards' settings as one server would have them (a shard's own name and jobs aside)."""
        stored = next((o.value.settings for o in outcomes or [] if isinstance(o.value, migrate_core.MigratePlan)), None)
        failures = []
        for shard in self.fleet.shards if stored is None else ():
            try:
                with self.shard(shard) as app:
                    stored = app.target.settings
                break
            except StatskitError as exc:
                failures.append(f"{shard.name}: {exc}")
        if stored is None:
            raise StatskitError(f"no shard could be read for the router's settings ({'; '.join(failures)})")
        return dataclasses.replace(stored, shard="", job_suffix="")

    def _on_router(self, work, outcomes: Outcomes, done) -> Outcomes:
        """work(settings) on the router after the shards (none without a router), as one more outcome."""
        if self.router is None:
            return []
        return fleet_core.each_shard((self.router,), lambda router: work(self._router_settings(outcomes)), 1, done)

    def status(self, cron_dsn: str | None = None, parallel: int = fleet_core.DEFAULT_PARALLEL,
               done=lambda outcome: None) -> Outcomes:
        fleet_core.check_cron_dsn(cron_dsn)
        return self._each(lambda shard, app: app.status(cron_dsn), parallel, done)

    def user_key(self, text: str) -> UserKey:
        return self.project.catalog.users.parse_key(text)

    def shard_of(self, user: UserKey) -> fleet_core.Shard:
        """The shard that holds the user, by the fleet's placement (asked of the first shard that answers)."""
        key_type = self.project.catalog.users.key_type
        failures = []
        for shard in self.fleet.shards:
            try:
                with db.connect(shard.dsn, autocommit=True) as conn:
                    index = conn.execute(f"select {self.fleet.shard_of_sql(f'%s::{key_type}')}", [user]).fetchone()[0]
                return self.fleet.shards[index]
            except StatskitError as exc:
                failures.append(str(exc))
        raise StatskitError(f"no shard answered which one holds the user: {failures[0]}")

    def backfill(self, first: date, last: date, *, only: str = "both", user: UserKey | None = None,
                 resume: bool = False, chunk_days: int = backfill_core.Request.chunk_days,
                 jobs: int = backfill_core.Request.jobs, parallel: int = fleet_core.DEFAULT_PARALLEL,
                 progress: Callable[[fleet_core.Shard, backfill_core.Progress, tuple[date, date]], None] = lambda *a: None,
                 notify: Callable[[fleet_core.Shard, str], None] = lambda shard, message: None,
                 cancel: threading.Event | None = None, done=lambda outcome: None) -> Outcomes:
        """backfill on every shard (a user's: on the shard that holds it), each with its own jobs;
        one cancel event stops them all, each shard's committed days whole."""
        def work(shard, app):
            return app.backfill(first, last, only=only, user=user, resume=resume, chunk_days=chunk_days, jobs=jobs,
                                progress=lambda p, chunk: progress(shard, p, chunk),
                                notify=lambda message: notify(shard, message), cancel=cancel)
        outcomes = self._each(work, parallel, done, None if user is None else (self.shard_of(user),))
        if user is not None or only == "users" or (cancel is not None and cancel.is_set()):
            return outcomes
        # the days the shards filled reach the router's platform rows (only days every shard has)
        return outcomes + self._on_router(lambda settings: router_core.merge(self.fleet, settings), outcomes, done)

    def verify(self, first: date | None = None, last: date | None = None,
               groups: tuple[str, ...] = verify_core.CHECK_GROUPS, sample: int = 20,
               cron_dsn: str | None = None, parallel: int = fleet_core.DEFAULT_PARALLEL,
               done=lambda outcome: None) -> FleetReport:
        """Every shard's own verify, then the fleet's checks across the shards that answered."""
        fleet_core.check_cron_dsn(cron_dsn)
        catalog = self.project.catalog

        def work(shard, app):
            report = app.verify(first, last, groups, sample, cron_dsn)
            return report, fleet_core.shard_state(app.target.conn, self.fleet, shard, app.target.catalog,
                                                  app.target.settings, sample)

        def report_only(o):
            return fleet_core.Outcome(o.shard, o.seconds, o.value[0] if o.ok else None, o.error)

        outcomes = self._each(work, parallel, lambda o: done(report_only(o)))
        states = {o.shard: o.value[1] for o in outcomes if o.ok}
        checks = []
        for o in outcomes:
            checks += ([verify_core.Check(f"{o.shard.name}:{c.check}", c.status, c.detail) for c in o.value[0].checks]
                       if o.ok else [verify_core.Check(f"{o.shard.name}:verify", "fail", f"could not run on "
                                                       f"{o.shard.where}: {o.error}")])
        copies = {shard: fleet_core.copies_differing(shard, catalog, state.settings["source_schema"],
                                                     {holder: held.copies[shard.index] for holder, held in states.items()
                                                      if shard.index in held.copies})
                  for shard, state in states.items()}
        checks += fleet_core.fleet_checks(states, copies)
        if self.router is not None:
            try:
                settings = self._router_settings()
            except StatskitError as exc:
                checks.append(verify_core.Check("router", "fail", f"not checked: {exc}"))
            else:
                checks += router_core.checks(self.fleet, self.project.sql_dir, settings, catalog,
                                             {shard: state.last_partial for shard, state in states.items()}, cron_dsn)
        return FleetReport([report_only(o) for o in outcomes], checks)
