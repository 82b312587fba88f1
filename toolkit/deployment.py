"""What is deployed in a database: statskit's bookkeeping schema, settings, applied migrations, function checksums."""

import hashlib
from dataclasses import dataclass

import psycopg

from .catalog import Catalog
from .errors import NotMigrated, StatskitError, UsageError
from .render import FUNCTIONS, quote_ident
from .settings import STATSKIT_SCHEMA, Settings

YOYO_MIGRATION_TABLE = "_yoyo_migration"
MIN_SERVER_VERSION = 150000

BOOKKEEPING_SQL = f"""
create schema if not exists {STATSKIT_SCHEMA};
create table if not exists {STATSKIT_SCHEMA}.settings (
    key text primary key,
    value text not null
);
create table if not exists {STATSKIT_SCHEMA}.function_checksums (
    function_name text primary key,
    sha256 text not null,
    applied_at timestamptz not null default now()
);
"""



def checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def table_exists(conn: psycopg.Connection, qualified: str) -> bool:
    return conn.execute("select to_regclass(%s) is not null", [qualified]).fetchone()[0]


def stored_settings(conn: psycopg.Connection) -> Settings | None:
    """The settings of the first migrate, or None when statskit was never deployed here."""
    if not table_exists(conn, f"{STATSKIT_SCHEMA}.settings"):
        return None
    rows = dict(conn.execute(f"select key, value from {STATSKIT_SCHEMA}.settings").fetchall())
    return Settings.from_dict(rows) if rows else None


def save_settings(conn: psycopg.Connection, settings: Settings) -> None:
    for key, value in settings.as_dict().items():
        conn.execute(
            f"insert into {STATSKIT_SCHEMA}.settings (key, value) values (%s, %s)"
            " on conflict (key) do update set value = excluded.value",
            [key, value],
        )


def applied_migrations(conn: psycopg.Connection) -> list[str]:
    if not table_exists(conn, f"{STATSKIT_SCHEMA}.{YOYO_MIGRATION_TABLE}"):
        return []
    rows = conn.execute(
        f"select migration_id from {STATSKIT_SCHEMA}.{YOYO_MIGRATION_TABLE} order by applied_at_utc"
    ).fetchall()
    return [r[0] for r in rows]


def function_checksums(conn: psycopg.Connection) -> dict[str, str]:
    if not table_exists(conn, f"{STATSKIT_SCHEMA}.function_checksums"):
        return {}
    return dict(conn.execute(f"select function_name, sha256 from {STATSKIT_SCHEMA}.function_checksums").fetchall())


def function_exists(conn: psycopg.Connection, settings: Settings, name: str) -> bool:
    signature = f"{quote_ident(settings.schema)}.{name}({FUNCTIONS[name].arguments})"
    return conn.execute("select to_regprocedure(%s) is not null", [signature]).fetchone()[0]


@dataclass(frozen=True)
class FunctionState:
    name: str
    state: str  # current | changed | missing


def function_states(conn: psycopg.Connection, settings: Settings, rendered: dict[str, str]) -> list[FunctionState]:
    """Compare each rendered function with what was applied (by checksum) and what exists."""
    applied = function_checksums(conn)
    states = []
    for name in FUNCTIONS:
        text = rendered[f"functions/{name}.sql"]
        if not function_exists(conn, settings, name):
            states.append(FunctionState(name, "missing"))
        elif applied.get(name) != checksum(text):
            states.append(FunctionState(name, "changed"))
        else:
            states.append(FunctionState(name, "current"))
    return states


def check_server(conn: psycopg.Connection) -> None:
    version = conn.info.server_version
    if version < MIN_SERVER_VERSION:
        raise StatskitError(f"PostgreSQL {version // 10000} is too old: statskit needs PostgreSQL 15 or later")


def check_source_tables(conn: psycopg.Connection, catalog: Catalog, settings: Settings) -> None:
    """Raise naming the first source table or column the catalog reads that does not exist."""
    rows = conn.execute(
        "select table_name, column_name from information_schema.columns where table_schema = %s",
        [settings.source_schema],
    ).fetchall()
    present: dict[str, set[str]] = {}
    for table, column in rows:
        present.setdefault(table, set()).add(column)
    for table, columns in catalog.source_tables.items():
        if table not in present:
            raise StatskitError(f"source table {settings.source_schema}.{table} is missing; nothing changed")
        missing = [c for c in columns if c not in present[table]]
        if missing:
            raise StatskitError(
                f"source table {settings.source_schema}.{table} lacks column {', '.join(missing)}; nothing changed"
            )


def check_time_zone(conn: psycopg.Connection, settings: Settings) -> None:
    known = conn.execute("select 1 from pg_timezone_names where name = %s", [settings.time_zone]).fetchone()
    if not known:
        raise UsageError(f"unknown time zone {settings.time_zone!r} (see pg_timezone_names)")


def require_deployment(conn: psycopg.Connection) -> Settings:
    """The deployment's settings, or NotMigrated with the command to run."""
    settings = stored_settings(conn)
    if settings is None or not applied_migrations(conn):
        raise NotMigrated(f"database {conn.info.dbname} has no statskit deployment: run statskit migrate first")
    return settings
