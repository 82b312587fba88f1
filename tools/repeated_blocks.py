"""Count what each rendered SQL file restates: blocks of 4 or more lines that stand again, the
same, further down the same file.

A reviewer reads a rendered file top to bottom; a block they have already read is noise unless a
plan needs it there (docs/architecture.md, "Generated SQL"). Lines are compared normalized:
white space folded, blank lines and `--` comment lines left out, so re-indenting a copy does not
hide it. A line counts as repeated when it lies in a run of 4 normalized lines that already
stood, in that order, earlier in the file; a block is a maximal stretch of such lines.

    python tools/repeated_blocks.py            # the table, per rendered file
    python tools/repeated_blocks.py --check    # exit 1 when a file repeats more than its limit

The limits are committed in tools/repeated_blocks.toml: CI runs --check (.ci/run), so a change
that copies a block into the generated SQL fails until it is stated once, or the limit is raised
in the same commit, where a reviewer sees it.
"""

import argparse
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMITS = Path(__file__).with_suffix(".toml")
RUN = 4  # lines a repeated block has at the least


def normalized(text: str) -> list[str]:
    lines = (re.sub(r"\s+", " ", line).strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("--")]


def repeated(lines: list[str]) -> tuple[int, int]:
    """(blocks, lines): the lines that restate a run of RUN lines seen earlier, and the maximal
    stretches they form."""
    seen = set()
    marked = [False] * len(lines)
    for start in range(len(lines) - RUN + 1):
        window = tuple(lines[start:start + RUN])
        if window in seen:
            marked[start:start + RUN] = [True] * RUN
        seen.add(window)
    blocks = sum(1 for i, m in enumerate(marked) if m and (i == 0 or not marked[i - 1]))
    return blocks, sum(marked)


def rendered_files() -> list[Path]:
    return sorted(p for p in (ROOT / "sql").rglob("*.sql") if "templates" not in p.parts)


def count() -> dict[str, tuple[int, int, int]]:
    """Per rendered file (relative to the repository): (normalized lines, blocks, repeated lines)."""
    found = {}
    for path in rendered_files():
        lines = normalized(path.read_text())
        found[str(path.relative_to(ROOT))] = (len(lines), *repeated(lines))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when a file repeats more lines than its limit")
    args = parser.parse_args(argv)
    limits = tomllib.loads(LIMITS.read_text())["repeated_lines"]
    found = count()
    failed = []
    print(f"{'file':<52} {'lines':>6} {'blocks':>7} {'repeated':>9} {'limit':>6}")
    for name, (lines, blocks, again) in found.items():
        limit = limits.get(name, 0)
        print(f"{name:<52} {lines:>6} {blocks:>7} {again:>9} {limit:>6}")
        if again > limit:
            failed.append(f"{name} repeats {again} lines, more than its limit {limit}")
    if args.check:
        for line in failed:
            print(f"repeated_blocks: {line}: state the block once, or raise the limit in {LIMITS.relative_to(ROOT)}",
                  file=sys.stderr)
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
