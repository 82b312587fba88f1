"""Render the catalog and templates into plain SQL: migrations and functions."""

import dataclasses
import hashlib
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import jinja2

from . import compiler, project
from .compiler import quote_literal
from .catalog import Catalog, Rollup, load_catalog
from .errors import StatskitError, UsageError
from .settings import FLEET_CLUSTER, PERIOD_LENGTHS, READER_ROLE, ROUTER_ROLE, STATSKIT_SCHEMA, WRITER_ROLE, Settings

# An installed package carries sql/ as toolkit/sql; a checkout (or editable install) has it beside toolkit/.
_PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGED_SQL_DIR = _PACKAGE_DIR / "sql" if (_PACKAGE_DIR / "sql").is_dir() else _PACKAGE_DIR.parent / "sql"
# Leftover files here are stale renderings (a migration or function the catalog no longer has).
RENDERED_GLOBS = ("migrations/*.sql", "functions/*.sql", "access/*.sql", "capture/*.sql", "fleet/*.sql")
# Repeatable files besides the functions: re-applied by migrate whenever their text changes.
ACCESS_FILE = "access/access.sql"
CAPTURE_FILE = "capture/capture.sql"
# A fleet's: what its router may call on a shard (applied on shards only), and the router's own.
SHARD_FILE = "fleet/shard.sql"
ROUTER_FILE = "fleet/router.sql"
ROUTER_ENGINE_FILES = {"plproxy": "fleet/router_plproxy.sql", "dblink": "fleet/router_dblink.sql"}
# PL/Proxy's RUN ON for the default placement: hashtext(u::text) & (N - 1), the mask PL/Proxy's own
HASH_PLACEMENT = "hashtext(p_user_id::text)"
# The copy of a router's SQL in sql/fleet/ is of a fleet of this many shards (the demo's); migrate
# --fleet renders it for the fleet file's count
REVIEWED_SHARD_COUNT = 2


@dataclass(frozen=True)
class FunctionSpec:
    parameters: str  # identity arguments, {key} standing for the catalog's user key type
    returns: str  # as format_type prints it ("record" for RETURNS TABLE)

    def arguments(self, key_type: str) -> str:
        """The identity arguments as pg_proc prints them, for a deployment whose users have key_type."""
        return self.parameters.format(key=key_type)


# Every rendered function (sql/functions/<name>.sql), in the order migrate creates them (callers after callees).
FUNCTIONS = {
    "aggregate_single_user_statistics": FunctionSpec("{key}, date", "integer"),
    "aggregate_user_statistics": FunctionSpec("{key}, date", "integer"),
    "aggregate_daily_statistics": FunctionSpec("date", "integer"),
    "aggregate_user_statistics_range": FunctionSpec("date, date, {key}[], boolean", "integer"),
    "aggregate_daily_statistics_range": FunctionSpec("date, date, boolean", "integer"),
    "aggregate_user_changes": FunctionSpec("", "integer"),
    "aggregate_platform_changes": FunctionSpec("", "integer"),
    "user_metric": FunctionSpec("{key}, text, date, text", "record"),
    "platform_metric": FunctionSpec("text, date, text", "record"),
    "user_kpis": FunctionSpec("{key}, date, text", "record"),
    "maintain_statistics_partitions": FunctionSpec("date, date, interval", "void"),  # a procedure
}


def default_sql_dir() -> Path:
    """The project's sql folder (statskit.toml here or above, or $STATSKIT_PROJECT), else the packaged copy."""
    folder = project.find()
    return project.sql_dir(folder) if folder else PACKAGED_SQL_DIR


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def signature(schema: str, name: str, key_type: str) -> str:
    """A rendered function as to_regprocedure reads it: "schema".name(arguments)."""
    return f"{quote_ident(schema)}.{name}({FUNCTIONS[name].arguments(key_type)})"


def digest(text: str) -> str:
    """A short stable name part for a text (the row security policy's expression)."""
    return hashlib.sha256(text.encode()).hexdigest()[:8]


# The sums tables' own shape: 2 since every key's sums are of the one day <table>_sums_day names
SUMS_LAYOUT = 2


def sums_digest(rollup: Rollup, settings: Settings) -> str:
    """What the nightly step's sums of a rollup mean (its sources, its sums' spans, the days they
    fall on): the sums table is kept across a re-applied function file while this holds."""
    return digest(repr((SUMS_LAYOUT, settings.time_zone, settings.source_schema, rollup.sources, rollup.sums)))


def writer_lock(settings: Settings) -> str:
    """Name of the one advisory lock every writer of the deployment's rollup takes first."""
    return f"{settings.schema}.rollup writers"


def _environment(sql_dir: Path) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(sql_dir / "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["literal"] = quote_literal
    env.filters["ident"] = quote_ident
    env.filters["digest"] = digest
    env.filters["regex_replace"] = lambda text, pattern, replacement: re.sub(pattern, replacement, text)
    return env


def _resolve_snippets(rollup: Rollup, env: jinja2.Environment, source: str, rewrite=None) -> Rollup:
    """Put the source schema into the catalog's SQL snippets (each first rewritten, if asked)."""
    rewrite = rewrite or (lambda text: text)
    return dataclasses.replace(rollup, sources=tuple(
        dataclasses.replace(s, from_sql=env.from_string(rewrite(s.from_sql)).render(source=source))
        for s in rollup.sources))


def _tidy(text: str) -> str:
    """Strip trailing blanks and runs of blank lines so re-rendering is byte-stable and clean."""
    lines = [line.rstrip() for line in text.splitlines()]
    text = "\n".join(lines).strip("\n") + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)


# Renderings already made in this process: a fleet's shards render the same SQL (their names and
# jobs' names are not in it), and rendering is most of what opening a shard costs, under one GIL.
_RENDERED: dict[tuple, dict[str, str]] = {}
_RENDERING = threading.Lock()


def render_all(sql_dir: Path, settings: Settings = Settings(), catalog: Catalog | None = None,
               placement: str = HASH_PLACEMENT, dblink_schema: str = "public",
               shard_count: int = REVIEWED_SHARD_COUNT) -> dict[str, str]:
    """Return {relative path under sql/: text} for every migration and function file, and a
    fleet's router's: its user calls run on the shard `placement` names (PL/Proxy's RUN ON; the
    hash, which PL/Proxy masks, or the application's function of p_user_id), and with the dblink
    engine through the extension's functions in `dblink_schema`, over `shard_count` shards."""
    catalog = catalog or load_catalog(sql_dir / "catalog.toml")
    templates = sorted((sql_dir / "templates").rglob("*.j2"))
    sources = hashlib.sha256(b"".join(str(p).encode() + p.read_bytes() for p in templates)).hexdigest()
    # what the rendering depends on: not which shard, nor the jobs' names
    rendered_as = dataclasses.replace(settings, job_suffix="", shard="shard" if settings.shard else "")
    key = (str(sql_dir.resolve()), sources, repr(rendered_as), repr(catalog), placement, dblink_schema, shard_count)
    with _RENDERING:
        if key not in _RENDERED:
            if len(_RENDERED) > 32:
                _RENDERED.clear()
            _RENDERED[key] = _render(sql_dir, rendered_as, catalog, placement, dblink_schema, shard_count)
        return dict(_RENDERED[key])


def _render(sql_dir: Path, settings: Settings, catalog: Catalog, placement: str, dblink_schema: str,
            shard_count: int) -> dict[str, str]:
    env = _environment(sql_dir)
    source = quote_ident(settings.source_schema)
    user = _resolve_snippets(catalog.user, env, source)
    # a fleet's shard counts each platform fact on one shard: its home user's
    platform = _resolve_snippets(catalog.platform, env, source, (lambda text: compiler.home_snippet(
        text, catalog.source_tables, catalog.users, source)) if settings.shard else None)
    context = {
        "schema": quote_ident(settings.schema),
        "statskit": quote_ident(STATSKIT_SCHEMA),
        "capture": settings.capture,
        "source": source,
        "time_zone": settings.time_zone,
        "partition_period": settings.partition_period,
        # one period, as an interval (none: no partitions, so no period the SQL steps by)
        "period": PERIOD_LENGTHS.get(settings.partition_period, "0 months"),
        "retention": settings.retention,
        "user": user,
        "platform": platform,
        # what the nightly step's sums of each rollup mean: kept across a re-applied file while it holds
        "sums_digests": {r.table: sums_digest(r, settings) for r in (catalog.user, catalog.platform)},
        "kpis": catalog.kpis,
        "roles": settings.roles,
        "reader_role": READER_ROLE,
        "writer_role": WRITER_ROLE,
        "row_security": settings.row_security,
        "source_tables": catalog.source_tables,
        "sql": compiler,
        "captured": compiler.captured_tables(catalog.source_tables, source),
        "triggers": compiler.TRIGGERS,
        "functions": FUNCTIONS,
        "user_table": catalog.users,
        "key_type": catalog.users.key_type,
        "writer_lock": writer_lock(settings),
        "key_types": {s.name: catalog.key_types(s) for r in (catalog.user, catalog.platform) for s in r.sources if s.partition},
        # a fleet: the sums behind the platform that a shard keeps, and what its router calls
        "partials": catalog.platform if settings.shard else catalog.platform.partials(),
        "own_user": compiler.own_user(catalog.users, source) if settings.shard else None,
        "router_role": ROUTER_ROLE,
        "cluster": FLEET_CLUSTER,
        "placement": placement,
        "shard_index": f"{placement} & ({quote_ident(STATSKIT_SCHEMA)}.fleet_size() - 1)"
                       if placement == HASH_PLACEMENT else placement,
        "dblink_schema": quote_ident(dblink_schema),
        "shard_count": shard_count,
    }
    out = {}
    try:
        previous = None
        names = env.list_templates()
        for migration in catalog.migrations:
            kind = migration.id if f"migrations/{migration.id}.sql.j2" in names else "change_metrics"
            for suffix in (".sql", ".rollback.sql"):
                template = env.get_template(f"migrations/{kind}{suffix}.j2")
                text = _tidy(template.render(context, migration=migration, previous=previous))
                if "%" in text:
                    # yoyo hands migration SQL to psycopg with a parameter dict, so % would be a placeholder.
                    raise UsageError(f"migration {migration.id} would contain '%', which yoyo cannot run")
                out[f"migrations/{migration.id}{suffix}"] = text
            previous = migration
        for name in FUNCTIONS:
            out[f"functions/{name}.sql"] = _tidy(env.get_template(f"functions/{name}.sql.j2").render(context))
        out[ACCESS_FILE] = _tidy(env.get_template("access/access.sql.j2").render(context))
        out[CAPTURE_FILE] = _tidy(env.get_template("capture/capture.sql.j2").render(context))
        for rel in (SHARD_FILE, ROUTER_FILE, *ROUTER_ENGINE_FILES.values()):
            out[rel] = _tidy(env.get_template(f"{rel}.j2").render(context))
    except jinja2.TemplateError as exc:
        raise StatskitError(f"template error: {exc}") from None
    return out


def _existing(folder: Path, rendered: dict[str, str], owned: tuple[str, ...]) -> dict[str, str]:
    """The files render owns in folder: those it renders now, and any leftover matching `owned`."""
    paths = {rel for rel in rendered if (folder / rel).is_file()}
    paths |= {str(p.relative_to(folder)) for pattern in owned for p in folder.glob(pattern)}
    return {rel: (folder / rel).read_text() for rel in sorted(paths)}


def stale_files(folder: Path, rendered: dict[str, str], owned: tuple[str, ...] = RENDERED_GLOBS) -> list[str]:
    """Paths whose committed text differs from the rendering, is missing, or is left over."""
    existing = _existing(folder, rendered, owned)
    return sorted(p for p in set(existing) | set(rendered) if existing.get(p) != rendered.get(p))


def write_rendered(folder: Path, rendered: dict[str, str], owned: tuple[str, ...] = RENDERED_GLOBS) -> list[str]:
    """Write what changed (and remove leftovers); return the paths touched. Unchanged files keep their mtime."""
    touched = stale_files(folder, rendered, owned)
    for rel in touched:
        path = folder / rel
        if rel in rendered:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(rendered[rel])
        else:
            path.unlink()
    return touched
