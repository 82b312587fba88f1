#!/usr/bin/env bash
# Install what statskit needs on Debian 12, as root or as a user with sudo:
# PostgreSQL 15 with pg_cron and PL/Proxy (apt), a virtualenv in .venv, and statskit with its test
# extra. With --test also what only the tests use: plpgsql_check, and Node.js with npm (the web
# client's type check).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

need_apt=()
[ -x /usr/lib/postgresql/15/bin/pg_ctl ] || need_apt+=(postgresql-15)
[ -f /usr/share/postgresql/15/extension/pg_cron.control ] || need_apt+=(postgresql-15-cron)
# a fleet's router (statskit demo --fleet, tests/test_fleet.py)
[ -f /usr/share/postgresql/15/extension/plproxy.control ] || need_apt+=(postgresql-15-plproxy)
if [ "${1:-}" = "--test" ]; then
    [ -f /usr/share/postgresql/15/extension/plpgsql_check.control ] || need_apt+=(postgresql-15-plpgsql-check)
    command -v npm >/dev/null || need_apt+=(nodejs npm)
fi
python3 -c "import ensurepip, venv" 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing ${need_apt[*]} with apt-get"
    # Another apt (unattended-upgrades on a fresh machine) may hold the lock: wait for it.
    as_root apt-get -o DPkg::Lock::Timeout=600 update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${need_apt[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q ".[test]"
echo "setup: statskit $(.venv/bin/statskit --version | awk '{print $NF}') installed in .venv"
