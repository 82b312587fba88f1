#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite against a private PostgreSQL 15 + pg_cron.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec .venv/bin/python -m pytest "$@"
