# One image for every rlm-broker component; docker-compose.yml picks each one's command.
# Installed from the lock files only: Python packages (Deno among them, the PyPI `deno`) by uv
# from uv.lock, Pyodide by Deno from deno.lock. The final stage has no Node.js, npm or uv.
# Where no registry is reachable, pass a locally built base: docs/deploy/compose.md.
ARG PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Keep in step with UV_VERSION in scripts/setup.sh.
ARG UV_VERSION=0.13.9
# uv and Deno trust the base image's CA store (not only their built-in roots), so a base
# that adds a site's CA (an egress proxy's) builds there too.
ENV UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_SYSTEM_CERTS=1 \
    DENO_TLS_CA_STORE=system,mozilla \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --no-cache-dir "uv==${UV_VERSION}"
WORKDIR /app
# The dependencies first: this layer changes only with uv.lock.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project --no-editable --python python3
# Pyodide as deno.lock pins it (the lock is frozen: drift is an error), copied out of Deno's
# symlinked node_modules layout into a plain directory.
COPY deno.json deno.lock package.json ./
RUN .venv/bin/deno install --frozen \
    && test -f node_modules/pyodide/pyodide.asm.wasm \
    && mkdir -p /opt/rlm \
    && cp -RL node_modules/pyodide /opt/rlm/pyodide
# The project itself, installed into the venv (not editable: the sources stay behind).
COPY . .
RUN uv sync --frozen --no-dev --no-editable --python python3

FROM ${PYTHON_IMAGE} AS runtime
# bubblewrap confines each sandbox process below Deno (docs/sandbox.md, Confinement): it needs
# user namespaces, which some container runtimes refuse; the runtime then refuses to start
# unless RLM_SANDBOX_ALLOW_WEAKER=1. util-linux (`unshare`, `prlimit`) is in the base image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends bubblewrap \
    && rm -rf /var/lib/apt/lists/*
# /data holds everything the components write; /app (the venv) stays root-owned.
RUN groupadd --gid 10001 rlm \
    && useradd --uid 10001 --gid rlm --create-home --home-dir /home/rlm \
        --shell /usr/sbin/nologin rlm \
    && mkdir -p /data/trajectories /data/sandbox-cache \
    && chown -R rlm:rlm /data
# The venv keeps its build path: its scripts' #! lines name /app/.venv/bin/python.
COPY --from=build /app/.venv /app/.venv
COPY --from=build /opt/rlm/pyodide /opt/rlm/pyodide
ENV PATH=/app/.venv/bin:$PATH \
    HOME=/home/rlm \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RLM_LOG_FORMAT=json \
    RLM_TRAJECTORY_DIR=/data/trajectories \
    RLM_REDIS_DIR=/data/redis \
    RLM_LEDGER_PATH=/data/usage.sqlite3 \
    RLM_SANDBOX_CACHE_DIR=/data/sandbox-cache \
    RLM_SANDBOX_DENO_PATH=/app/.venv/bin/deno \
    RLM_SANDBOX_PYODIDE_DIR=/opt/rlm/pyodide
WORKDIR /app
# Numeric, so that a platform can tell it is not root (Kubernetes runAsNonRoot).
USER 10001:10001
EXPOSE 8000 8100
# The default command is a broker (with an embedded Redis unless RLM_REDIS_URL is set);
# docker-compose.yml gives every other component its own command and health check.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
CMD ["rlm", "broker", "--host", "0.0.0.0", "--port", "8000"]
