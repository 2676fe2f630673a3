"""What commands check before they start anything; each failure is one line saying what to do."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import click

from rlm_cli.settings import load_settings
from rlm_wire.serving import ListenError, PortInUseError, listen_socket

if TYPE_CHECKING:
    # `host_poller.llm` imports the openai SDK (~1 s): `rlm broker` and `rlm sandbox` check
    # their ports here and never need it.
    from host_poller.llm.profiles import LLMSettings
    from sandbox_runtime.worker import WorkerSettings


def sandbox_worker_settings() -> WorkerSettings:
    """The sandbox worker settings, once Deno is seen to run and Pyodide to be installed: for
    a command that is about to run sandboxes."""
    # Imported here: the sandbox runtime's service costs ~0.1 s to import, and most commands
    # (`rlm ask` on the local environment among them) never start it.
    from sandbox_runtime.errors import SandboxStartError
    from sandbox_runtime.service.serve import SETUP, check_prerequisites
    from sandbox_runtime.worker import WorkerSettings

    try:
        worker_settings = load_settings(WorkerSettings)
    except (ImportError, FileNotFoundError) as exc:
        # The default Deno comes from the PyPI package `deno`; without it there is no default.
        raise click.ClickException(
            f"Deno is not installed (no binary from the PyPI package `deno`): {SETUP}, "
            "or set RLM_SANDBOX_DENO_PATH"
        ) from exc
    try:
        check_prerequisites(worker_settings)
    except SandboxStartError as exc:
        raise click.ClickException(str(exc)) from exc
    return worker_settings


def check_llm_keys(llm_settings: LLMSettings) -> None:
    """Every configured LLM profile's API key variable is set."""
    from host_poller.llm.errors import LLMConfigError

    try:
        llm_settings.check_api_keys()
    except LLMConfigError as exc:
        raise click.ClickException(exc.message) from exc


def listen_error(exc: ListenError, how: Mapping[str, str]) -> click.ClickException:
    """`exc` as one line; `how` maps a server's name to the option and variable of its port."""
    change = how.get(exc.name)
    hint = f": choose another with {change} (0 picks a free one)" if change else ""
    if isinstance(exc, PortInUseError):
        return click.ClickException(
            f"port {exc.port} on {exc.host} is already in use ({exc.name}){hint}"
        )
    return click.ClickException(f"{exc.name} cannot listen on {exc.host}:{exc.port}: {exc.reason}")


def check_ports_free(host: str, ports: Mapping[str, int], how: Mapping[str, str]) -> None:
    """Each fixed port (0 is any) can be listened on now: a busy one fails before anything
    starts. The servers bind again when they start, and fail the same way if they lost a race."""
    for name, port in ports.items():
        if port == 0:
            continue
        try:
            listen_socket(host, port, name=name).close()
        except ListenError as exc:
            raise listen_error(exc, how) from exc
