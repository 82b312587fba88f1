"""A statskit project: a folder with statskit.toml, the catalog and the rendered SQL beside it.

statskit finds it the way alembic and dbt find theirs: $STATSKIT_PROJECT, else statskit.toml
in the working directory or the nearest folder above it. Outside any project it uses the
catalog installed with the package (the reference marketplace).
"""

import os
import shutil
import tomllib
from pathlib import Path

from dataclasses import fields

from .errors import UsageError
from .settings import Settings

CONFIG = "statskit.toml"
CONFIG_TEXT = """\
# A statskit project: statskit run in this folder, or any folder below it, uses this catalog
# and this rendered SQL (or set STATSKIT_PROJECT to this folder from anywhere).
[project]
# catalog.toml and templates/; statskit render writes migrations/, functions/ and access/ here
sql_dir = "sql"

# Settings every deployment of this project gets (migrate's options of the same name override
# them); the first migrate stores them in the database. For example:
# [deployment]
# partition_period = "month"   # one partition per month of days (week, quarter, year; none: one table)
# retention = "25 months"      # older days are dropped with their partitions; default: kept
"""


def find(start: Path | None = None) -> Path | None:
    """The project folder: $STATSKIT_PROJECT, else the nearest folder with statskit.toml."""
    named = os.environ.get("STATSKIT_PROJECT")
    if named:
        folder = Path(named)
        folder = folder.parent if folder.name == CONFIG else folder
        if not (folder / CONFIG).is_file():
            raise UsageError(f"STATSKIT_PROJECT={named}: no {CONFIG} there (statskit init creates one)")
        return folder
    here = (start or Path.cwd()).resolve()
    return next((folder for folder in (here, *here.parents) if (folder / CONFIG).is_file()), None)


def _config(folder: Path) -> dict:
    try:
        return tomllib.loads((folder / CONFIG).read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{folder / CONFIG} is not valid TOML: {exc}") from None


def sql_dir(folder: Path) -> Path:
    """The project's sql folder, as its statskit.toml names it."""
    path = folder / _config(folder).get("project", {}).get("sql_dir", "sql")
    if not (path / "catalog.toml").is_file():
        raise UsageError(f"{folder / CONFIG}: {path} has no catalog.toml")
    return path


def deployment_settings(sql: Path) -> dict:
    """The [deployment] settings of the project whose sql folder is `sql` (none outside a project)."""
    folder = sql.resolve().parent
    if not (folder / CONFIG).is_file() or sql_dir(folder).resolve() != sql.resolve():
        return {}
    settings = _config(folder).get("deployment", {})
    known = {f.name for f in fields(Settings)} - {"cron_database", "cron_user"}  # those migrate finds itself
    unknown = sorted(set(settings) - known)
    if unknown:
        raise UsageError(f"{folder / CONFIG}: [deployment] has no setting {unknown[0]!r} "
                         f"(known: {', '.join(sorted(known))})")
    return settings


def init(folder: Path, packaged_sql: Path) -> list[Path]:
    """Write a new project: statskit.toml, sql/ with the packaged catalog and templates, and an
    empty clients/ for the web app's contract. Refuses to touch an existing project."""
    for existing in (folder / CONFIG, folder / "sql" / "catalog.toml"):
        if existing.exists():
            raise UsageError(f"{existing} exists: {folder} is a statskit project already")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG).write_text(CONFIG_TEXT)
    (folder / "sql").mkdir(exist_ok=True)
    shutil.copyfile(packaged_sql / "catalog.toml", folder / "sql" / "catalog.toml")
    shutil.copytree(packaged_sql / "templates", folder / "sql" / "templates",
                    ignore=shutil.ignore_patterns("__pycache__", "__init__.py"))
    (folder / "clients").mkdir(exist_ok=True)
    return [folder / CONFIG, folder / "sql" / "catalog.toml", folder / "sql" / "templates", folder / "clients"]
