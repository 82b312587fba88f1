"""Dates from the command line: strict ISO parsing and range checks with one-line errors."""

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
        raise UsageError(f"reversed range: --from {first} is after --to {last}")
