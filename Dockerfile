# One image for every rlm-broker component; docker-compose.yml picks the command.
# Pyodide and Deno come from the npm lock file (no download at run time).
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends nodejs npm util-linux \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY package.json package-lock.json ./
# npm install, not npm ci: see scripts/setup.sh (the lock lists only linux-x64 Deno).
RUN npm install --no-audit --no-fund --loglevel=error

COPY pyproject.toml README.md ./
COPY broker ./broker
COPY host_poller ./host_poller
COPY sandbox_runtime ./sandbox_runtime
COPY rlm_cli ./rlm_cli
COPY rlm_http ./rlm_http
RUN pip install --no-cache-dir .

# The sandbox runtime's Pyodide and Deno, from the npm install above.
ENV RLM_SANDBOX_DENO_PATH=/app/node_modules/deno/deno \
    RLM_SANDBOX_PYODIDE_DIR=/app/node_modules/pyodide \
    RLM_SANDBOX_CACHE_DIR=/home/rlm/.cache/rlm-broker/sandbox \
    RLM_LOG_FORMAT=json
RUN useradd --create-home rlm
USER rlm
EXPOSE 8000 8100
CMD ["rlm", "--help"]
