"""Dates: strict ISO parsing of what the command line gives, range checks with one-line errors,
and the last complete day."""

from datetime import date

from .errors import UsageError


def parse_date(text: str, option: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        if len(text) == 10 and text[4] == "-" and text[7] == "-":
            raise UsageError(f"{option} {text}: impossible date ({exc})") from None
        raise UsageError(f"{option} {text!r}: not a date, use YYYY-MM-DD") from None


def check_range(first: date, last: date) -> None:
    if first > last:
        raise UsageError(f"{first} is after the last day {last}: a reversed range", field="first")


def yesterday(conn, time_zone: str) -> date:
    """The last complete day in the statistics time zone, by the server's clock."""
    return conn.execute("select (now() at time zone %s)::date - 1", [time_zone]).fetchone()[0]
