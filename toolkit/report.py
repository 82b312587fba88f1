"""Verify's report as text (an aligned table), JSON (stable keys) or JUnit XML (for CI)."""

import json
import xml.etree.ElementTree as ET
from collections import Counter

import click

from .verify import Check, overall

COLOURS = {"pass": "green", "warn": "yellow", "fail": "red"}


def summary_line(checks: list[Check]) -> str:
    counts = Counter(c.status for c in checks)
    return f"verify: {overall(checks).upper()} — {counts['pass']} passed, {counts['warn']} warnings, {counts['fail']} failed"


def as_text(checks: list[Check], colour: bool) -> str:
    width = max((len(c.check) for c in checks), default=5)
    lines = []
    for c in checks:
        status = f"{c.status:<4}"
        if colour:
            status = click.style(status, fg=COLOURS[c.status], bold=c.status != "pass")
        lines.append(f"{c.check:<{width}}  {status}  {c.detail}")
    lines.append(summary_line(checks))
    return "\n".join(lines) + "\n"


def as_json(checks: list[Check], database: str, first, last) -> str:
    counts = Counter(c.status for c in checks)
    return json.dumps({
        "status": overall(checks),
        "database": database,
        "window": {"from": str(first), "to": str(last)} if first else None,
        "summary": {s: counts[s] for s in ("pass", "warn", "fail")},
        "checks": [c.as_dict() for c in checks],
    }, indent=2) + "\n"


def as_junit(checks: list[Check], database: str) -> str:
    counts = Counter(c.status for c in checks)
    suites = ET.Element("testsuites", name="statskit verify")
    suite = ET.SubElement(suites, "testsuite", name=f"statskit verify {database}",
                          tests=str(len(checks)), failures=str(counts["fail"]), errors="0", skipped="0")
    for c in checks:
        case = ET.SubElement(suite, "testcase", classname=f"statskit.{c.check.split()[0]}", name=c.check)
        if c.status == "fail":
            ET.SubElement(case, "failure", message=c.detail, type="fail").text = c.detail
        else:
            ET.SubElement(case, "system-out").text = f"{c.status}: {c.detail}"
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
