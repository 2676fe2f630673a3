"""`rlm session`: broker sessions for sandboxes that run the exec script themselves.

A container, a Modal function or an E2B/Daytona sandbox runs `rlm_repl.py` (the stdlib exec
script) and needs only a broker URL and a session token to call `llm_query`. `rlm session
create` opens that session (with the admin token for a named tenant, or with a tenant's own
token) and prints the variables the exec script reads, as `export` lines to `eval` or as
JSON; `rlm session close` revokes a token before its TTL (docs/deploy/tunnels.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shlex
import time
import urllib.parse
from dataclasses import dataclass

import click

from rlm_repl import DEFAULT_WAIT_S
from rlm_wire.broker_client import BrokerClient
from rlm_wire.errors import WireError
from rlm_wire.run_info import MAX_DEPTH, RunBudgetInfo, RunInfo
from rlm_wire.serving import BROKER_PORT


@dataclass(frozen=True)
class Credentials:
    """The token the command acts with, and the tenant an admin token must name."""

    token: str
    tenant_id: str | None

    @classmethod
    def from_environment(cls, tenant: str | None) -> Credentials:
        """`--tenant` takes RLM_ADMIN_TOKEN; without it, RLM_TENANT_TOKEN acts for itself."""
        if tenant is not None:
            admin = os.environ.get("RLM_ADMIN_TOKEN")
            if not admin:
                raise click.ClickException(
                    "--tenant needs RLM_ADMIN_TOKEN (the broker's admin token)"
                )
            return cls(admin, tenant)
        own = os.environ.get("RLM_TENANT_TOKEN")
        if not own:
            raise click.ClickException(
                "name the tenant with --tenant (and set RLM_ADMIN_TOKEN), "
                "or set RLM_TENANT_TOKEN to open a session of that tenant"
            )
        return cls(own, None)


def sandbox_environment(
    *, broker_url: str, token: str, wait_s: float, call_timeout_s: float, max_depth: int
) -> dict[str, str]:
    """The variables `rlm_repl.py` reads (its `build_namespace`), for one session."""
    return {
        "RLM_BROKER_URL": broker_url,
        "RLM_SESSION_TOKEN": token,
        "RLM_BROKER_WAIT_S": f"{wait_s:g}",
        "RLM_CALL_TIMEOUT_S": f"{call_timeout_s:g}",
        "RLM_DEPTH": "0",
        "RLM_MAX_DEPTH": str(max_depth),
    }


def _http_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An http(s) URL with a host, or a one-line usage error naming the option."""
    if value is None:
        return None
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise click.BadParameter(f"{value!r} is not an http(s) URL with a host")
    return value


def as_exports(environment: dict[str, str], comment: str) -> str:
    lines = [f"# {comment}"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in environment.items()]
    return "\n".join(lines)


#: Both commands call the broker at this URL (not necessarily the sandbox's: --public-url).
broker_url_option = click.option(
    "--broker-url",
    envvar="RLM_BROKER_URL",
    callback=_http_url,
    default=f"http://127.0.0.1:{BROKER_PORT}",
    show_default=True,
    help="Broker this command calls (RLM_BROKER_URL).",
)


@click.group("session")
def session_group() -> None:
    """Broker sessions for sandboxes that run the exec script (rlm_repl.py) themselves."""


@session_group.command("create")
@click.option(
    "--tenant",
    "tenant_id",
    help="Tenant id (from `rlm tenant create`); needs RLM_ADMIN_TOKEN. Without it, "
    "RLM_TENANT_TOKEN opens a session of its own tenant.",
)
@click.option(
    "--ttl",
    "ttl_s",
    type=click.IntRange(min=1),
    help="Session lifetime in seconds [default: the broker's RLM_SESSION_TTL_S; at most "
    "RLM_MAX_SESSION_TTL_S].",
)
@click.option(
    "--public-url",
    callback=_http_url,
    help="Broker URL as the sandbox reaches it (a tunnel's HTTPS address) [default: --broker-url].",
)
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0.1, max=120),
    default=DEFAULT_WAIT_S,
    show_default=True,
    help="RLM_BROKER_WAIT_S for the sandbox: each long-poll's wait; keep it below any "
    "proxy's request time limit.",
)
@click.option(
    "--call-timeout",
    "call_timeout_s",
    type=click.FloatRange(min=1),
    default=3600.0,
    show_default=True,
    help="RLM_CALL_TIMEOUT_S for the sandbox: how long one llm_query may wait in all.",
)
@click.option(
    "--max-depth",
    type=click.IntRange(min=1, max=MAX_DEPTH),
    default=1,
    show_default=True,
    help="RLM_MAX_DEPTH: 1 refuses rlm_query; more lets the poller answer it with sub-RLMs.",
)
@click.option(
    "--max-calls",
    type=click.IntRange(min=0),
    help="Budget: most LLM calls the session may make (the poller refuses the rest).",
)
@click.option("--max-tokens", type=click.IntRange(min=0), help="Budget: most tokens in all.")
@click.option(
    "--max-cost-usd", type=click.FloatRange(min=0), help="Budget: most cost in USD in all."
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["export", "json"]),
    default="export",
    show_default=True,
    help="export: `export NAME=value` lines (eval them); json: one object.",
)
@broker_url_option
def session_create(
    tenant_id: str | None,
    ttl_s: int | None,
    public_url: str | None,
    wait_s: float,
    call_timeout_s: float,
    max_depth: int,
    max_calls: int | None,
    max_tokens: int | None,
    max_cost_usd: float | None,
    output_format: str,
    broker_url: str,
) -> None:
    """Open a broker session; print what a sandbox needs to run the exec script with it.

    The token is printed once and never stored: pass it to the sandbox as a secret.
    """
    credentials = Credentials.from_environment(tenant_id)
    # The session is a run of its own: the poller meters it (ledger, budgets) by this id.
    budget = RunBudgetInfo(
        max_sub_calls=max_calls, max_tokens=max_tokens, max_cost_usd=max_cost_usd
    )
    metadata = RunInfo(
        run_id=f"sandbox-{secrets.token_hex(8)}",
        depth=0,
        max_depth=max_depth,
        budget=budget if budget != RunBudgetInfo() else None,
        run_started_at=time.time(),
    )

    async def create() -> tuple[str, str, float]:
        async with BrokerClient(broker_url, credentials.token) as client:
            created = await client.create_session(
                ttl_s=ttl_s, metadata=metadata, tenant_id=credentials.tenant_id
            )
        return created.session_id, created.token, created.expires_at

    try:
        session_id, token, expires_at = asyncio.run(create())
    except WireError as exc:
        raise click.ClickException(f"cannot create a session at {broker_url}: {exc}") from exc
    environment = sandbox_environment(
        broker_url=public_url or broker_url,
        token=token,
        wait_s=wait_s,
        call_timeout_s=call_timeout_s,
        max_depth=max_depth,
    )
    if output_format == "json":
        payload = {
            "session_id": session_id,
            "run_id": metadata.run_id,
            "expires_at": expires_at,
            "env": environment,
        }
        click.echo(json.dumps(payload, indent=2))
        return
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_at))
    comment = f"rlm session {session_id} (run {metadata.run_id}), expires {expires}"
    click.echo(as_exports(environment, comment))


@session_group.command("close")
@click.argument("session_id")
@click.option(
    "--tenant",
    "tenant_id",
    help="The session's tenant id; needs RLM_ADMIN_TOKEN. Without it, RLM_TENANT_TOKEN "
    "closes a session of its own tenant.",
)
@broker_url_option
def session_close(session_id: str, tenant_id: str | None, broker_url: str) -> None:
    """Revoke a session's token now; its unanswered requests fail."""
    credentials = Credentials.from_environment(tenant_id)

    async def close() -> None:
        async with BrokerClient(broker_url, credentials.token) as client:
            await client.delete_session(session_id, tenant_id=credentials.tenant_id)

    try:
        asyncio.run(close())
    except WireError as exc:
        raise click.ClickException(f"cannot close session {session_id}: {exc}") from exc
    click.echo(f"closed {session_id}")


commands: list[click.Command] = [session_group]
