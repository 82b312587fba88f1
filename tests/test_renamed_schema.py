"""An application that names everything its own way: a project made by `statskit init` whose
catalog calls the users `members` (key `member_no`, bigint, kind in `member_kind`), the bookings
`lessons` with `teacher_id`/`learner_id`, and every other table, timestamp and rollup table
otherwise. Only the catalog changes; it renders, migrates, backfills, takes late edits through
capture, serves the dashboard and verifies, and every stored day equals the literal oracle
rewritten with the same names."""

import json
import re
import shutil
import uuid
from datetime import date, timedelta

import psycopg
import pytest

from conftest import REPO
from test_plpgsql_check import plpgsql_findings
from spec_oracle import differences, expected_platform_row, expected_user_rows
from toolkit.catalog import load_catalog
from toolkit.reference import marketplace

# Whole words, everywhere they occur: the catalog's tables, columns, snippets and metric names,
# the source schema, the oracle's SQL.
RENAMES = {
    "profiles": "members", "role": "member_kind", "created_at": "made_at",
    "bookings": "lessons", "tutor_id": "teacher_id", "client_id": "learner_id",
    "listings": "offers", "listing_views": "offer_views", "listing_id": "offer_id",
    "transactions": "ledger_entries", "reviews": "ratings", "messages": "notes",
    "referrals": "invites", "caas_scores": "trust_scores", "reviewee_id": "rated_id", "referrer_id": "inviter_id",
    "user_statistics_daily": "member_stats_daily", "platform_statistics_daily": "site_stats_daily",
    "uuid": "bigint",
}
WORDS = re.compile(r"\b(" + "|".join(sorted(RENAMES, key=len, reverse=True)) + r")\b")
# The reference's names statskit must not carry anywhere once the catalog says otherwise.
REFERENCE_NAMES = re.compile(r"\b(uuid|profiles|listings|listing_views|bookings|tutor_id|client_id|reviewee_id|"
                             r"caas_scores|referrer_id|user_statistics_daily|platform_statistics_daily)\b")
FIRST_ID = 10_000_000_000  # past 2^31: an integer key would not hold them


def rename(text: str, key_type: str = "bigint") -> str:
    text = WORDS.sub(lambda m: key_type if m.group(1) == "uuid" else RENAMES[m.group(1)], text)
    return re.sub(r"\bp\.id\b", "p.member_no", text)  # the oracle's p is always the user table


USER_TABLE = """[user_table]
table = "members"
key = "member_no"
created_at = "made_at"
role = "member_kind"
"""


def renamed_catalog(text: str, key_type: str = "bigint") -> str:
    text = re.sub(r"\[user_table\]\n(.+\n)+", USER_TABLE, rename(text, key_type))
    members = text.index("[source_tables.members]")
    end = text.index("[source_tables.", members + 1)
    section = (text[members:end].replace('users = ["id"]', 'users = ["member_no"]')
               .replace('home = "id"', 'home = "member_no"\nkey = "member_no"').replace("columns.id =", "columns.member_no ="))
    return text[:members] + section + text[end:]


def renamed_schema() -> str:
    schema = rename(marketplace.reference_schema_sql())
    return schema.replace("create table members (\n    id bigint primary key", "create table members (\n    member_no bigint primary key")


def load_renamed(conn: psycopg.Connection, market) -> dict[uuid.UUID, int]:
    """The reference rows with every table and column renamed and every user a bigint."""
    keys = {row[0]: FIRST_ID + n for n, row in enumerate(market.rows["profiles"])}
    with conn.transaction(), conn.cursor() as cur:
        for table, columns in marketplace.TABLE_COLUMNS.items():
            names = ["member_no" if table == "profiles" and c == "id" else rename(c) for c in columns]
            with cur.copy(f"copy {rename(table)} ({', '.join(names)}) from stdin") as copy:
                for row in market.rows[table]:
                    copy.write_row([keys[v] if isinstance(v, uuid.UUID) else v for v in row])
    return keys


@pytest.fixture
def project(tmp_path, run_cli, monkeypatch):
    monkeypatch.delenv("STATSKIT_PROJECT", raising=False)
    folder = tmp_path / "school"
    assert run_cli("init", folder).exit_code == 0
    catalog = folder / "sql" / "catalog.toml"
    catalog.write_text(renamed_catalog(catalog.read_text()))
    for migration in (folder / "sql" / "migrations").glob("*.sql"):  # init rendered them; never applied anywhere
        migration.unlink()
    monkeypatch.chdir(folder)
    result = run_cli("render")
    assert result.exit_code == 0, result.output
    return folder


def stored(conn, table: str, day: date, metrics) -> dict:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    rows = cur.execute(f"select user_id, {', '.join(metrics)} from {table} where date = %s", [day]).fetchall()
    return {row.pop("user_id"): row for row in rows}


def assert_days_equal_oracle(conn, days, catalog) -> None:
    user_metrics = [m.name for m in catalog.user.metrics]
    platform_metrics = [m.name for m in catalog.platform.metrics]
    for day in days:
        problems = differences(expected_user_rows(conn, day, rename=rename),
                               stored(conn, catalog.user.table, day, user_metrics))
        assert not problems, f"{day}: {problems[:5]}"
        platform = conn.cursor(row_factory=psycopg.rows.dict_row).execute(
            f"select {', '.join(platform_metrics)} from {catalog.platform.table} where date = %s", [day]).fetchone()
        assert platform == expected_platform_row(conn, day, rename=rename), day


def test_the_rendered_sql_carries_only_the_catalogs_names(project):
    catalog = load_catalog(project / "sql" / "catalog.toml")
    assert (catalog.users.name, catalog.users.key, catalog.users.key_type) == ("members", "member_no", "bigint")
    rendered = {p: p.read_text() for p in (project / "sql").rglob("*.sql")}
    assert len(rendered) > 10
    leftovers = {str(p.relative_to(project)): sorted(set(REFERENCE_NAMES.findall(text))) for p, text in rendered.items()
                 if REFERENCE_NAMES.search(text)}
    assert leftovers == {}
    function = (project / "sql" / "functions" / "user_metric.sql").read_text()
    assert "p_user_id bigint," in function
    contract = json.loads((project / "clients" / "metrics.json").read_text())
    assert contract["userKey"] == {"table": "members", "column": "member_no", "sqlType": "bigint"}
    assert "export type UserKey = string;" in (project / "clients" / "metrics.ts").read_text()  # 2^53 and past


@pytest.mark.pg
def test_a_renamed_application_gets_the_oracles_numbers(project, empty_dsn, run_cli):
    market = marketplace.generate(users=120, days=40, seed=11)
    with psycopg.connect(empty_dsn) as conn:
        conn.execute(renamed_schema())
        conn.commit()
        keys = load_renamed(conn, market)
    assert run_cli("migrate", "--dsn", empty_dsn).exit_code == 0
    assert plpgsql_findings(empty_dsn, "bigint") == {}
    first, last = market.first_day, market.last_day
    result = run_cli("backfill", "--from", first, "--to", last, "--quiet", "--dsn", empty_dsn)
    assert result.exit_code == 0, result.output
    catalog = load_catalog(project / "sql" / "catalog.toml")
    days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert conn.execute("select count(distinct date) from member_stats_daily").fetchone()[0] == len(days)
        assert_days_equal_oracle(conn, days, catalog)

        # Late edits reach the stored days through capture: a lesson completed 10 days earlier
        # than recorded, and a view of an offer (counted for its owner, through offers.teacher_id).
        lesson, teacher = conn.execute(
            "select id, teacher_id from lessons where completed_at between %s and %s order by id limit 1",
            [last - timedelta(days=5), last]).fetchone()
        before = conn.execute("select array_agg(completed_sessions order by date) from member_stats_daily"
                              " where user_id = %s", [teacher]).fetchone()[0]
        conn.execute("update lessons set completed_at = completed_at - interval '10 days' where id = %s", [lesson])
        offer = conn.execute("select id from offers where teacher_id = %s limit 1", [teacher]).fetchone()
        if offer:
            conn.execute("insert into offer_views (id, offer_id, viewed_at) values (10000000, %s, %s)",
                         [offer[0], f"{last - timedelta(days=3)} 12:00+00"])
        logged = conn.execute("select count(*) from statskit.user_changes where user_id = %s", [teacher]).fetchone()[0]
        assert logged >= 1
        conn.execute("select aggregate_user_changes(), aggregate_platform_changes()")
        assert conn.execute("select array_agg(completed_sessions order by date) from member_stats_daily"
                            " where user_id = %s", [teacher]).fetchone()[0] != before
        assert_days_equal_oracle(conn, days[-16:], catalog)

    tutor = next(k for row, k in zip(market.rows["profiles"], keys.values()) if row[1] == "tutor")
    shown = run_cli("kpis", tutor, "--date", last, "--format", "json", "--dsn", empty_dsn)
    assert shown.exit_code == 0, shown.output
    assert f'"user_id": "{tutor}"' in shown.output and '"role": "tutor"' in shown.output
    wrong = run_cli("kpis", "not-a-number", "--dsn", empty_dsn)
    assert wrong.exit_code == 2 and "USER_ID 'not-a-number' is not a user key: members.member_no is bigint" in wrong.output
    checked = run_cli("verify", "--from", last - timedelta(days=6), "--to", last, "--dsn", empty_dsn)
    assert checked.exit_code == 0, checked.output


def test_statskit_names_no_reference_table_of_its_own():
    """Outside the catalog and the reference application (its schema and synthetic data), no
    module and no template names the reference's tables or its key type. catalog.py lists the
    key types a catalog may choose, uuid among them."""
    found = []
    for path in sorted([*(REPO / "toolkit").rglob("*.py"), *(REPO / "sql" / "templates").rglob("*.j2")]):
        relative = path.relative_to(REPO)
        if relative.parts[:2] == ("toolkit", "reference"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            names = set(REFERENCE_NAMES.findall(line)) - ({"uuid"} if relative.name == "catalog.py" else set())
            if names:
                found.append(f"{relative}:{number}: {', '.join(sorted(names))}")
    assert found == []


@pytest.mark.pg
def test_a_deployment_refuses_a_catalog_it_was_not_made_from(project, empty_dsn, run_cli, monkeypatch):
    with psycopg.connect(empty_dsn) as conn:
        conn.execute(renamed_schema())
    assert run_cli("migrate", "--no-cron", "--dsn", empty_dsn).exit_code == 0
    for args in (["verify"], ["backfill", "--from", "2026-03-01", "--to", "2026-03-02"], ["migrate"]):
        wrong = run_cli(*args, "--sql-dir", REPO / "sql", "--dsn", empty_dsn)  # the reference catalog
        assert wrong.exit_code == 2, wrong.output
        assert wrong.output == ("statskit: error: the catalog's user table public.profiles does not exist here: is this "
                                "the project this database was deployed from? (run statskit in it, or give --sql-dir)\n")
    uuid_keys = project / "uuid_keys"  # the same names, users kept by uuid
    shutil.copytree(project / "sql", uuid_keys)
    reference = (REPO / "sql" / "catalog.toml").read_text()
    (uuid_keys / "catalog.toml").write_text(renamed_catalog(reference, key_type="uuid"))
    wrong = run_cli("migrate", "--sql-dir", uuid_keys, "--dsn", empty_dsn)
    assert wrong.exit_code == 2 and wrong.output == (
        "statskit: error: this deployment keeps users by bigint, the catalog by uuid (members.member_no): "
        "a user key type cannot change in place\n")
