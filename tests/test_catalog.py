"""The catalog's one definition per metric: what it accepts, and the conditions generated from a span."""

import shutil

import pytest

from conftest import SQL_DIR
from toolkit.catalog import Span, load_catalog
from toolkit.compiler import changed, changes, counts_on, leaving_day, step_changes
from toolkit.errors import UsageError


def test_a_span_counts_from_the_day_it_enters_until_the_day_it_leaves():
    assert counts_on(Span("s", "1", "t.created_on"), "p_date") == "t.created_on <= p_date"
    assert counts_on(Span("s", "1", "t.created_on", leaves="t.available_on"), "p_date") == (
        "t.created_on <= p_date and (t.available_on > p_date or t.available_on is null)")
    assert counts_on(Span("s", "1", "m.created_on", days=1), "p_date") == "m.created_on = p_date"
    month = Span("s", "1", "t.created_on", month=True)
    assert counts_on(month, "p_date") == "t.created_on between date_trunc('month', p_date::timestamp)::date and p_date"
    assert leaving_day(month) == "(date_trunc('month', t.created_on::timestamp) + interval '1 month')::date"
    window = Span("s", "1", "v.viewed_on", days=30)
    assert counts_on(window, "p_date") == "v.viewed_on between p_date - 29 and p_date"
    assert leaving_day(window) == "v.viewed_on + 30"


def test_change_rows_name_each_event_and_each_sum_its_own_values():
    """The VALUES of a source's change rows carry (event, day) only; each sum says which events
    move it and by how much, so no row is a wall of zeros counted by position."""
    catalog = load_catalog(SQL_DIR / "catalog.toml")
    bookings = next(s for s in catalog.user.sources if s.name == "booking_days")
    found = changes(catalog.user, bookings)
    assert ("month after completed_on", "(date_trunc('month', b.completed_on::timestamp) + interval '1 month')::date") in found.events
    by_name = {s.name: s.aggregate for s in found.sums}
    assert by_name["total_minutes"] == "sum(case change.event when 'completed_on' then b.duration_minutes end)"
    assert by_name["monthly_minutes"] == ("sum(case change.event when 'completed_on' then b.duration_minutes"
                                        " when 'month after completed_on' then -b.duration_minutes end)")
    # the nightly step tests each row's days against D, and starts month windows again on the
    # 1st: they never leave there
    stepped = {s.name: s.aggregate for s in step_changes(catalog.user, bookings).sums}
    assert stepped["monthly_minutes"] == stepped["total_minutes"] == \
        "sum(b.duration_minutes) filter (where b.completed_on = p_date)"
    assert stepped["active_bookings"] == (
        "(coalesce(sum(1) filter (where b.created_on = p_date), 0)\n"
        "             - coalesce(sum(1) filter (where case when b.closed_on > b.created_on then b.closed_on"
        " when b.closed_on <= b.created_on then b.created_on end = p_date), 0))")
    transactions = next(s for s in catalog.user.sources if s.name == "transaction_days")
    pending = next(s for s in changes(catalog.user, transactions).sums if s.name == "pending_earnings")
    assert pending.aggregate.endswith("end) filter (where t.kind = 'earning')")


@pytest.mark.parametrize("entry, message", [
    ('days = 30\nleaves = "v.viewed_on"', "has both leaves and days: a row leaves once"),
    ("days = 0", "has days = 0: use a whole number of days, 1 or more"),
    ('sum_type = "bigint"', "has sum_type 'bigint': use integer or numeric"),
    ('month = true\nleaves = "v.viewed_on"', "has both leaves and month: a row leaves once"),
    ("month = 1", "has month = 1: use month = true"),
])
def test_a_bad_span_is_refused_by_name(tmp_path, entry, message):
    catalog = tmp_path / "catalog.toml"
    shutil.copy(SQL_DIR / "catalog.toml", catalog)
    text = catalog.read_text()
    anchor = 'name = "listing_views"\n'
    listing_views = text.index(anchor)
    end = text.index("\n\n", listing_views)
    block = "\n".join(line for line in text[listing_views:end].splitlines() if not line.startswith("days"))
    catalog.write_text(text[:listing_views] + block + "\n" + entry + text[end:])
    with pytest.raises(UsageError) as refused:
        load_catalog(catalog)
    assert str(refused.value) == f"catalog: user_statistics_daily.listing_views {message}"


@pytest.mark.parametrize("extra, unknown", [
    ('sql = "count(*)"', "sql"),  # a second form of the metric beside its span: one definition only
    ('leave = "b.completed_on"', "leave"),  # a typo of `leaves` would count the row for ever
])
def test_a_key_the_catalog_does_not_know_is_refused_by_name(tmp_path, extra, unknown):
    text = (SQL_DIR / "catalog.toml").read_text()
    marker = 'name = "cancelled_sessions"\n'
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(text.replace(marker, marker + extra + "\n", 1))
    with pytest.raises(UsageError, match=f"user_statistics_daily.cancelled_sessions has unknown key {unknown} "):
        load_catalog(catalog)


def test_the_lookback_default_follows_change_capture():
    from toolkit.settings import Settings

    assert Settings().lookback_days == 1 and Settings(capture=False).lookback_days == 3
    assert Settings().merged(capture=False).lookback_days == 3  # the log no longer repairs late data
    assert Settings(capture=False).merged(capture=True).lookback_days == 1
    assert Settings(lookback_days=5).merged(capture=False).lookback_days == 5  # a chosen value stays
    # a deployment that stored the old default keeps it
    assert Settings.from_dict({"lookback_days": "3", "capture": "True"}).merged().lookback_days == 3


@pytest.mark.parametrize("old, new, message", [
    ('changes_on = { viewed_at = [0, 30] }\n', "",
     "source listing_view_days of user_statistics_daily has no changes_on (the timestamps of the rows that can"
     " change a sum on a day, for the nightly step)"),
    ("viewed_at = [0, 30]", "viewed_at = [-1]",
     "source listing_view_days of user_statistics_daily has changes_on.viewed_at = [-1]: use days before D (0 = D)"),
    ('partition = { table = "caas_scores", keys = ["user_id"] }', 'partition = { table = "scores", keys = ["user_id"] }',
     "source caas_days of user_statistics_daily is partitioned by unknown table scores"),
    ('partition = { table = "caas_scores", keys = ["user_id"] }', 'partition = { table = "caas_scores", keys = ["owner"] }',
     "source caas_days of user_statistics_daily: table caas_scores has no column owner"),
])
def test_a_source_without_a_usable_changes_on_is_refused_by_name(tmp_path, old, new, message):
    catalog = tmp_path / "catalog.toml"
    text = (SQL_DIR / "catalog.toml").read_text()
    assert text.count(old) == 1
    catalog.write_text(text.replace(old, new))
    with pytest.raises(UsageError) as refused:
        load_catalog(catalog)
    assert str(refused.value) == f"catalog: {message}"


def test_changes_on_names_the_rows_of_d_and_the_indexes_that_find_them():
    catalog = load_catalog(SQL_DIR / "catalog.toml")
    assert catalog.user.offsets == [0, 30] and catalog.platform.offsets == [0, 1]
    views = next(s for s in catalog.user.sources if s.name == "listing_view_days")
    assert changed(views, "v") == ("(v.viewed_at >= v_from_0 and v.viewed_at < v_to_0)\n"
                                  "or (v.viewed_at >= v_from_30 and v.viewed_at < v_to_30)")
    lookups = catalog.step_lookups
    # a partitioned source is found by its key; a join's timestamp only in the table that has it
    assert ("messages", "conversation_id") in lookups and ("listing_views", "viewed_at") in lookups
    assert ("listings", "viewed_at") not in lookups and len(lookups) == len(set(lookups))


def test_two_sums_of_one_name_are_refused(tmp_path):
    """A metric's `sum` names what it holds; it may not take another sum's name."""
    text = (SQL_DIR / "catalog.toml").read_text()
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(text.replace('sum = "sum_of_ratings"', 'sum = "total_reviews"', 1))
    with pytest.raises(UsageError, match="user_statistics_daily has two sums named total_reviews"):
        load_catalog(catalog)


def test_a_source_that_is_not_a_query_with_its_alias_is_refused(tmp_path):
    """Functions read a source as `(select …) as t`, or its query alone as a CTE: the shape is checked."""
    text = (SQL_DIR / "catalog.toml").read_text()
    catalog = tmp_path / "catalog.toml"
    start = text.index('from = """', text.index('name = "review_days"'))
    end = text.index('"""', start + 10) + 3
    catalog.write_text(text[:start] + 'from = "{{ source }}.reviews r"' + text[end:])
    with pytest.raises(UsageError, match="catalog: source review_days of user_statistics_daily has from = .*"
                                         "write it as a query in parentheses with its alias"):
        load_catalog(catalog)
