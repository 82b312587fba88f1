"""`pip install .` carries every file of sql/: each folder is a listed package with package data."""

import tomllib

from conftest import REPO


def test_every_sql_folder_is_packaged():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    for path in sorted((REPO / "sql").rglob("*")):
        if path.is_file():
            folder = path.parent.relative_to(REPO / "sql")
            package = ".".join(["toolkit.sql", *folder.parts])
            assert package in setuptools["packages"], f"{path.relative_to(REPO)}: add {package} to packages"
            patterns = setuptools["package-data"].get(package, [])
            assert any(path.match(p) for p in patterns), f"{path.relative_to(REPO)}: no package-data pattern"
