"""Connections: where the DSN comes from, friendly connection errors, passwords kept out of output."""

import os
import re

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .errors import ConnectionFailed, UsageError


def resolve_dsn(dsn: str | None) -> str:
    """--dsn, else $STATSKIT_DSN, else $DATABASE_URL, else "" (libpq's PGHOST, PGDATABASE… defaults)."""
    return dsn or os.environ.get("STATSKIT_DSN") or os.environ.get("DATABASE_URL") or ""


def dsn_parts(dsn: str) -> dict:
    """The DSN's key=value parts; a malformed DSN is a UsageError, its password masked."""
    try:
        return conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise UsageError(f"invalid DSN: {mask_secrets(str(exc), dsn)}") from None


def with_database(dsn: str, dbname: str) -> str:
    """The same server and login, another database."""
    return make_conninfo(**{**dsn_parts(dsn), "dbname": dbname})


def derived(dsn: str, other: str) -> str:
    """`other` completed from `dsn`: a bare database name ("postgres") or key=value pairs
    ("dbname=postgres") keep the target's host, port and login; a full DSN keeps whatever it
    leaves out (the password only for the same login)."""
    given = {"dbname": other} if "=" not in other and "://" not in other else dsn_parts(other)
    parts = dsn_parts(dsn)
    if given.get("user", parts.get("user")) != parts.get("user"):
        parts.pop("password", None)
    return make_conninfo(**{**parts, **given})


def database_of(dsn: str) -> str | None:
    return dsn_parts(dsn).get("dbname")


def describe(dsn: str) -> str:
    """user@host:port/dbname for messages: never the password."""
    parts = dsn_parts(dsn)
    user = parts.get("user") or os.environ.get("PGUSER", "")
    host = parts.get("host") or os.environ.get("PGHOST", "localhost")
    port = parts.get("port") or os.environ.get("PGPORT", "5432")
    db = parts.get("dbname") or os.environ.get("PGDATABASE", user)
    return f"{user + '@' if user else ''}{host}:{port}/{db}"


def mask_secrets(text: str, dsn: str) -> str:
    """Replace the DSN's password (and any password=/:pass@ shapes) in text with ***."""
    password = None
    try:
        password = conninfo_to_dict(dsn).get("password")
    except psycopg.ProgrammingError:
        pass
    password = password or os.environ.get("PGPASSWORD")
    if password:
        text = text.replace(password, "***")
    text = re.sub(r"(password\s*=\s*)\S+", r"\1***", text, flags=re.IGNORECASE)
    return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


def first_line(what: Exception | str, empty: str | None = None) -> str:
    """The first non-blank line of an error or a message (PostgreSQL appends context lines)."""
    lines = [line.strip() for line in str(what).splitlines() if line.strip()]
    return lines[0] if lines else empty or what.__class__.__name__


def connect(dsn: str, autocommit: bool = False, application_name: str = "statskit") -> psycopg.Connection:
    """Open a connection or raise ConnectionFailed with one line naming the server and the reason."""
    parts = dsn_parts(dsn)
    parts.setdefault("application_name", application_name)
    parts.setdefault("connect_timeout", "10")
    try:
        return psycopg.connect(make_conninfo(**parts), autocommit=autocommit)
    except psycopg.OperationalError as exc:
        reason = mask_secrets(first_line(exc), dsn)
        raise ConnectionFailed(f"cannot connect to {describe(dsn)}: {reason}") from None


def describe_error(exc: psycopg.Error) -> str:
    """One line for a database error; timeouts say what waited, from the server's context line."""
    line = first_line(exc)
    context = (exc.diag.context or "").strip().splitlines()
    if isinstance(exc, psycopg.errors.LockNotAvailable):
        return f"lock_timeout: {line}" + (f" ({context[0]})" if context else "") + "; another session holds the lock"
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return f"statement_timeout: {line}" + (f" ({context[0]})" if context else "")
    return line
