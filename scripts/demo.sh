#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run statskit end to end on a private PostgreSQL with demo data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/statskit demo "$@"
