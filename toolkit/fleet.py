"""A user-sharded fleet (docs/scaling.md): the fleet file, which shard holds a user, one statskit
command run on every shard side by side, and the checks that only the fleet as a whole can fail.

The fleet file lists the shard databases in placement order:

    [[shards]]
    dsn = "postgresql://dba@shard0.internal/app"
    [[shards]]
    dsn = "postgresql://dba@shard1.internal/app"

By default user u lives on shard `hashtext(u::text) & (N - 1)`, N a power of two (PL/Proxy's own
rule); `placement = "app.shard_of"` names the application's function of a user key that returns
the shard's index instead. Each shard is deployed as one server would be, with its pg_cron jobs
named after the shard (`name`, by default shard0, shard1, ...) so that two shard databases of one
server never share a job.
"""

import re
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Callable, Generic, TypeVar

import psycopg

from . import db, deployment
from .catalog import Catalog
from .errors import StatskitError, UsageError
from .render import quote_ident
from .settings import JOB_SUFFIX, Settings
from .verify import Check

PLACEMENT = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?$")
# How a router reaches the shards: PL/Proxy (a superuser's), or dblink where PL/Proxy cannot be had.
ROUTER_ENGINES = ("plproxy", "dblink")
# Shards migrated, backfilled or verified at once: each is one connection (a backfill: --jobs).
DEFAULT_PARALLEL = 4
# What may differ between shards of one deployment: the jobs' names, and where each server keeps
# pg_cron and as whom its jobs run.
PER_SHARD_SETTINGS = ("shard", "job_suffix", "cron_database", "cron_user")

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    index: int
    name: str  # its jobs' suffix and its name in every message
    dsn: str

    @property
    def where(self) -> str:
        """user@host:port/dbname: never the password."""
        return db.describe(self.dsn)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.where})"


@dataclass(frozen=True)
class Fleet:
    path: Path
    shards: tuple[Shard, ...]
    placement: str = ""  # the application's function of a user key; "" = hashtext & (N - 1)
    router: str | None = None  # the router database's DSN (docs/scaling.md); None: no router
    router_engine: str = "plproxy"  # how it reaches the shards: "plproxy", or "dblink" (managed PostgreSQL)

    def shard_of_sql(self, key: str) -> str:
        """SQL of the index of the shard that holds the user whose key is the expression `key`."""
        if self.placement:
            return f"{self.placement}({key})"
        return f"(hashtext(({key})::text) & {len(self.shards) - 1})"


def load(path: Path | str) -> Fleet:
    """Read and check a fleet file; every problem is one line naming the file and the entry."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read the fleet file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"fleet file {path}: {exc}") from None
    unknown = sorted(set(raw) - {"shards", "placement", "router"})
    if unknown:
        raise UsageError(f"fleet file {path}: unknown entry {unknown[0]!r} (a fleet file has [[shards]], [router] "
                         f"and placement)")
    entries = raw.get("shards")
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"fleet file {path}: no [[shards]]: list each shard database, in placement order")
    placement = raw.get("placement", "")
    if placement and not (isinstance(placement, str) and PLACEMENT.match(placement)):
        raise UsageError(f"fleet file {path}: placement = {placement!r}: name a function, schema.name")
    if not placement and len(entries) & (len(entries) - 1):
        raise UsageError(f"fleet file {path}: {len(entries)} shards: hashtext placement needs a power of two "
                         f"(1, 2, 4, 8, ...), or name the application's placement function")
    shards = tuple(_shard(path, index, entry) for index, entry in enumerate(entries))
    for attribute, what in (("name", "name"), ("where", "database")):
        seen: dict[str, Shard] = {}
        for shard in shards:
            other = seen.setdefault(getattr(shard, attribute), shard)
            if other is not shard:
                raise UsageError(f"fleet file {path}: shards {other.index} and {shard.index} have the same {what} "
                                 f"{getattr(shard, attribute)}")
    router = raw.get("router")
    if router is None:
        return Fleet(path, shards, placement)
    if (not isinstance(router, dict) or not isinstance(router.get("dsn"), str) or set(router) - {"dsn", "engine"}
            or router.get("engine", "plproxy") not in ROUTER_ENGINES):
        raise UsageError(f"fleet file {path}: [router] has a dsn (the database the dashboard connects to) and an "
                         f"engine, {' or '.join(ROUTER_ENGINES)} (default plproxy)")
    try:
        db.describe(router["dsn"])
    except UsageError as exc:
        raise UsageError(f"fleet file {path}: router: {exc}") from None
    return Fleet(path, shards, placement, router["dsn"], router.get("engine", "plproxy"))


def _shard(path: Path, index: int, entry) -> Shard:
    where = f"fleet file {path}: shard {index}"
    if not isinstance(entry, dict) or not isinstance(entry.get("dsn"), str) or not entry["dsn"]:
        raise UsageError(f"{where} has no dsn")
    unknown = sorted(set(entry) - {"dsn", "name"})
    if unknown:
        raise UsageError(f"{where}: unknown entry {unknown[0]!r} (a shard has dsn and name)")
    name = entry.get("name", f"shard{index}")
    if not isinstance(name, str) or not name or not JOB_SUFFIX.match(name):
        raise UsageError(f"{where}: name {name!r}: use lowercase letters, digits, - and _ (it ends its jobs' names)")
    try:
        db.describe(entry["dsn"])
    except UsageError as exc:  # its password masked
        raise UsageError(f"{where}: {exc}") from None
    return Shard(index, name, entry["dsn"])


def placements(conn: psycopg.Connection, fleet: Fleet, keys: list, key_type: str) -> dict:
    """{user key: its shard's index} by the fleet's placement, computed by the server on conn."""
    return dict(conn.execute(f"select k, {fleet.shard_of_sql('k')} from unnest(%s::{key_type}[]) k",
                             [list(keys)]).fetchall())


def check_cron_dsn(cron_dsn: str | None) -> None:
    """A fleet's shards keep pg_cron on their own servers: only its database may be named for all."""
    if cron_dsn and ("://" in cron_dsn or set(db.dsn_parts(cron_dsn) if "=" in cron_dsn else ()) - {"dbname"}):
        raise UsageError("with a fleet, name pg_cron's database only (postgres, or dbname=postgres): each shard "
                         "keeps its own server and login", field="cron_dsn")


@dataclass
class Outcome(Generic[T]):
    """What one shard's command gave: its value, or the one-line error that stopped it."""

    shard: Shard
    seconds: float
    value: T | None = None
    error: StatskitError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def each_shard(shards: tuple[Shard, ...], work: Callable[[Shard], T], parallel: int = DEFAULT_PARALLEL,
               done: Callable[[Outcome[T]], None] = lambda outcome: None) -> list[Outcome[T]]:
    """Run work(shard) on every shard, at most `parallel` at once; one shard's failure stops no
    other. `done` hears each outcome as it comes (from the shard's thread, one at a time); the
    outcomes are returned in shard order."""
    told = threading.Lock()

    def run(shard: Shard) -> Outcome[T]:
        started = time.monotonic()
        try:
            outcome = Outcome(shard, 0.0, value=work(shard))
        except StatskitError as exc:
            outcome = Outcome(shard, 0.0, error=exc)
        except psycopg.Error as exc:
            outcome = Outcome(shard, 0.0, error=StatskitError(db.mask_secrets(db.describe_error(exc), shard.dsn)))
        outcome.seconds = time.monotonic() - started
        with told:
            done(outcome)
        return outcome

    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="statskit-shard") as pool:
        return list(pool.map(run, shards))


def failed_shards(outcomes: list[Outcome]) -> str:
    """The failed shards named by name and database (never a password), for the last line."""
    return ", ".join(o.shard.label for o in outcomes if not o.ok)


# -- what only the whole fleet can get wrong -------------------------------------------------

@dataclass(frozen=True)
class ShardState:
    """What verify --fleet compares between shards, read from one shard."""

    migrations: tuple[str, ...]
    checksums: dict[str, str]
    settings: dict[str, str]  # as its last migrate stored them, but for PER_SHARD_SETTINGS
    job_suffix: str
    misplaced: int  # users (rows of the catalog's user table) whose placement names another shard
    example: str | None  # one of them
    copies: dict[int, dict[str, dict[str, str]]]  # other shard -> table -> key -> md5 of the row here
    last_partial: date | None  # the last day of its platform partial sums


def shard_state(conn: psycopg.Connection, fleet: Fleet, shard: Shard, catalog: Catalog, settings: Settings,
                sample: int) -> ShardState:
    users, source = catalog.users, quote_ident(settings.source_schema)
    misplaced, example = conn.execute(
        f"select count(*), min({users.key}::text) from {source}.{users.name}"
        f" where {fleet.shard_of_sql(users.key)} is distinct from %s", [shard.index]).fetchone()
    copies: dict[int, dict[str, dict[str, str]]] = {}
    for table in catalog.source_tables.values():
        if len(table.users) < 2:
            continue  # a row that counts for one user lives on that user's shard only
        held_by = ", ".join(fleet.shard_of_sql(f"t.{column}") for column in table.users)
        rows = conn.execute(
            f"select t.{table.key}::text, {_row_digest(table)}, o.shards from {source}.{table.name} t,"
            f" lateral (select array_agg(distinct s) as shards from unnest(array[{held_by}]) s where s <> %s) o"
            f" where o.shards is not null order by random() limit %s", [shard.index, sample]).fetchall()
        for key, digest, others in rows:
            for other in others:
                copies.setdefault(other, {}).setdefault(table.name, {})[key] = digest
    stored = deployment.stored_settings(conn) or settings
    last_partial = conn.execute(f"select max(date) from {quote_ident(settings.schema)}.{catalog.platform.table}"
                                ).fetchone()[0]
    return ShardState(tuple(deployment.applied_migrations(conn)), deployment.function_checksums(conn),
                      {k: v for k, v in stored.as_dict().items() if k not in PER_SHARD_SETTINGS},
                      stored.job_suffix, misplaced, example, copies, last_partial)


def _row_digest(table) -> str:
    """md5 of the row's contract columns, in the catalog's order (so column order on disk does not matter)."""
    return f"md5(row({', '.join(f't.{c.name}' for c in table.columns)})::text)"


def copies_differing(shard: Shard, catalog: Catalog, source_schema: str,
                     held: dict[Shard, dict[str, dict[str, str]]]) -> list[str]:
    """The rows other shards hold (held: shard -> table -> key -> md5) that this shard must hold
    equal, and does not."""
    problems = []
    try:
        with db.connect(shard.dsn, autocommit=True) as conn:
            for holder, tables in held.items():
                for name, digests in tables.items():
                    table = catalog.source_tables[name]
                    here = dict(conn.execute(
                        f"select t.{table.key}::text, {_row_digest(table)} from {quote_ident(source_schema)}.{name} t"
                        f" where t.{table.key} = any(%s::text[]::{table.column(table.key).type}[])",
                        [list(digests)]).fetchall())
                    problems += [f"{name} {table.key} {key} is on {holder.name} and "
                                 f"{'missing on' if key not in here else 'differs on'} {shard.name}"
                                 for key in sorted(digests) if here.get(key) != digests[key]]
    except (StatskitError, psycopg.Error) as exc:
        problems.append(f"could not compare {shard.name}'s copies: {db.mask_secrets(db.first_line(exc), shard.dsn)}")
    return problems


def fleet_checks(states: dict[Shard, ShardState], copies: dict[Shard, list[str]]) -> list[Check]:
    """The checks of the fleet as one, from every reachable shard's state (the first is the yardstick)."""
    if not states:
        return [Check("fleet", "fail", "no shard could be read")]
    first, reference = next(iter(states.items()))
    drift, jobs, placement = [], [], []
    for shard, state in states.items():
        missing = [m for m in reference.migrations if m not in state.migrations]
        extra = [m for m in state.migrations if m not in reference.migrations]
        functions = sorted(name for name in set(reference.checksums) | set(state.checksums)
                           if reference.checksums.get(name) != state.checksums.get(name))
        settings = sorted(k for k in set(reference.settings) | set(state.settings)
                          if reference.settings.get(k) != state.settings.get(k))
        what = ([f"migrations {', '.join(missing)} not applied"] if missing else []) \
            + ([f"migrations {', '.join(extra)} applied that {first.name} lacks"] if extra else []) \
            + ([f"functions {', '.join(functions)}"] if functions else []) \
            + [f"setting {k} = {state.settings.get(k)!r} ({first.name}: {reference.settings.get(k)!r})" for k in settings]
        if what:
            drift.append(f"{shard.label} differs from {first.name}: {'; '.join(what)}")
        if state.job_suffix != shard.name:
            jobs.append(f"{shard.label}'s jobs end in {state.job_suffix or 'nothing'!r}, not {shard.name!r}")
        if state.misplaced:
            placement.append(f"{shard.label} holds {state.misplaced} users placement puts elsewhere "
                             f"(e.g. {state.example})")
    repair = "; statskit migrate --fleet brings every shard to this release"
    checked = sum(len(keys) for state in states.values() for tables in state.copies.values() for keys in tables.values())
    differing = [problem for problems in copies.values() for problem in problems]
    return [
        check_of("fleet:deployment", drift, repair, f"{len(states)} shards at the same migrations, functions and settings"),
        check_of("fleet:jobs", jobs, "; statskit migrate --fleet names them", "every shard's jobs carry its name"),
        check_of("fleet:placement", placement, "", "every user is on the shard its placement names"),
        check_of("fleet:copies", differing, "; the application keeps a row that counts for users of several "
                     "shards equal on each", f"{checked} sampled rows held on several shards equal on each"),
    ]


def check_of(name: str, problems: list[str], repair: str, ok: str) -> Check:
    """A failed check naming the first five problems and the repair, else a pass saying `ok`."""
    if problems:
        return Check(name, "fail", "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
                     + repair)
    return Check(name, "pass", ok)
