"""The local stack: everything rlm-broker needs on one machine, in this process.

    Redis (embedded unless RLM_REDIS_URL) -> broker (uvicorn, free or fixed port)
    -> admin token + one tenant -> scripted LLM (unless a provider is configured) -> poller

Used by `rlm up`, `rlm ask` (with no broker configured) and tests. The parts are a list of
`StackComponent`s, each started as soon as the earlier ones it `needs` have started (Redis,
the scripted LLM and the sandbox runtime at once; by default a component needs every one
before it) and stopped once the ones that need it have stopped, so another component (the
sandbox runtime) joins by being added to the list. `LocalStack` is an async context manager.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import json
import logging
import secrets
import shlex
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import uvicorn
from pydantic import SecretStr

from broker.redis_server import RedisServer
from broker.settings import BrokerSettings
from host_poller.llm.profiles import LLMSettings
from host_poller.poller.hooks import BudgetLookup, SubRLMRunner
from host_poller.poller.poller import Poller
from host_poller.poller.settings import PollerSettings
from rlm_cli.env_file import make_way_for_env_file, write_env_file
from rlm_wire.broker_client import BrokerClient
from rlm_wire.link import KeepAliveLink
from rlm_wire.serving import LoopServer, uvicorn_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackConfig:
    """What to start. Unset settings objects are read from the environment at start."""

    host: str = "127.0.0.1"
    broker_port: int = 0
    """0 picks a free port (as do the other ports); `rlm up` passes the fixed defaults."""
    sandbox_port: int = 0
    llm_port: int = 0
    """Port of the scripted LLM, when it runs."""
    redis_url: str | None = None
    """None: the broker settings' RLM_REDIS_URL, else an embedded Redis."""
    durable_redis: bool | None = None
    """Whether an embedded Redis keeps its data in RLM_REDIS_DIR across restarts. None: when
    the stack serves others (an `env_file`: `rlm up`); a stack private to one run (`rlm ask`,
    tests) gets a throwaway Redis, since its requests end with it."""
    scenario: str = "count_words"
    """Scenario of the scripted LLM, used when no LLM provider is configured."""
    tenant_name: str = "local"
    env_file: Path | None = None
    """Where `rlm up` writes URLs and tokens (`rlm_cli.env_file`); removed at stop."""
    broker_settings: BrokerSettings | None = None
    llm_settings: LLMSettings | None = None
    poller_settings: PollerSettings | None = None


class StackComponent(abc.ABC):
    """One part of the stack: reads what earlier parts set on the stack, adds its own."""

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...] | None] = None
    """Names of the components before it in the list whose start this one waits for (those
    that set what it reads on the stack); None: every one before it."""

    @abc.abstractmethod
    async def start(self, stack: LocalStack) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop; called only after a successful `start`."""


class LocalStack:
    """The running stack; its attributes are set by the components as they start."""

    def __init__(
        self,
        config: StackConfig | None = None,
        components: Sequence[StackComponent] | None = None,
    ) -> None:
        self.config = config or StackConfig()
        self.components = list(components) if components is not None else default_components()
        self.urls: dict[str, str] = {}
        """Name -> URL of each service (redis, broker, llm, ...), for display."""
        self.redis_url = ""
        self.broker_url = ""
        self.admin_token = ""
        self.tenant_id = ""
        self.tenant_token = ""
        self.llm_settings: LLMSettings | None = None
        self.scripted_llm = False
        self.poller: Poller | None = None
        self.runtime_url = ""
        """The sandbox runtime's URL and bearer token, when the stack runs one."""
        self.runtime_token = ""
        self._started: list[StackComponent] = []

    # Read once per stack: several components read each (a pydantic-settings object is
    # 1.5-6 ms to build, load 3), and they must agree.
    @functools.cached_property
    def broker_settings(self) -> BrokerSettings:
        """The config's broker settings, else the environment's (RLM_*), read once."""
        return self.config.broker_settings or BrokerSettings()

    @functools.cached_property
    def poller_settings(self) -> PollerSettings:
        """The config's poller settings, else the environment's (RLM_*), read once."""
        return self.config.poller_settings or PollerSettings()

    def component(self, name: str) -> StackComponent:
        for component in self.components:
            if component.name == name:
                return component
        raise KeyError(name)

    async def start(self) -> LocalStack:
        """Start every component, each once those it needs have started: the parts that wait
        on other processes (Redis, the sandbox runtime's first sandboxes) overlap.

        When one fails, those still waiting do not start, those starting are let finish (a
        start cut short could leave a process behind), and every started one is stopped."""
        started = {id(c): asyncio.Event() for c in self.components}
        starting: set[int] = set()
        done: set[int] = set()

        async def start_one(index: int, component: StackComponent) -> None:
            for earlier in self.components[:index]:
                if component.needs is None or earlier.name in component.needs:
                    await started[id(earlier)].wait()
            starting.add(id(component))
            await component.start(self)
            done.add(id(component))
            started[id(component)].set()
            logger.debug("stack component started", extra={"component": component.name})

        tasks = {
            id(c): asyncio.create_task(start_one(i, c), name=f"stack-start-{c.name}")
            for i, c in enumerate(self.components)
        }
        try:
            await _all_or_first_error(list(tasks.values()))
        except BaseException as exc:
            cut_short = not isinstance(exc, Exception)  # cancelled, interrupted: as before
            for key, task in tasks.items():
                if cut_short or key not in starting:
                    task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            # In list order, as `stop` expects, whatever order they started in.
            self._started = [c for c in self.components if id(c) in done]
            await self.stop()
            raise
        self._started = list(self.components)
        return self

    async def stop(self) -> None:
        """Stop every started component once those that need it have stopped: the poller
        first, then (at once) the broker, the LLM and the sandbox runtime, Redis last."""
        started = list(self._started)
        stopped = {id(c): asyncio.Event() for c in started}

        async def stop_one(index: int, component: StackComponent) -> None:
            for later in started[index + 1 :]:
                if later.needs is None or component.name in later.needs:
                    await stopped[id(later)].wait()
            try:
                await component.stop()
            except Exception:  # stop the others whatever one of them does
                logger.exception(
                    "stack component failed to stop", extra={"component": component.name}
                )
            finally:
                self._started.remove(component)  # a second `stop` (after a cancel) skips it
                stopped[id(component)].set()

        await asyncio.gather(*(stop_one(i, c) for i, c in reversed(list(enumerate(started)))))

    async def __aenter__(self) -> LocalStack:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def environ(self) -> dict[str, str]:
        """The variables that point `rlm ask` / `rlm poller` / clients at this stack."""
        return {
            "RLM_BROKER_URL": self.broker_url,
            "RLM_TENANT_TOKEN": self.tenant_token,
            "RLM_ADMIN_TOKEN": self.admin_token,
            "RLM_REDIS_URL": self.redis_url,
            **(
                {"RLM_RUNTIME_URL": self.runtime_url, "RLM_RUNTIME_TOKEN": self.runtime_token}
                if self.runtime_url
                else {}
            ),
            **self._scripted_llm_environ(),
        }

    def _scripted_llm_environ(self) -> dict[str, str]:
        """The scripted LLM's profiles, so that `rlm ask` in another shell reaches it too (a
        configured provider's profiles are the user's own settings already)."""
        if not self.scripted_llm or self.llm_settings is None:
            return {}
        root, sub = self.llm_settings.root(), self.llm_settings.sub()
        profiles = [p.model_dump(mode="json") for p in (root, sub)]
        return {
            "RLM_LLM_PROFILES": json.dumps(profiles),
            "RLM_ROOT_PROFILE": root.name,
            "RLM_SUB_PROFILE": sub.name,
        }

    def admin_client(self, **kwargs: Any) -> BrokerClient:
        return self._client(self.admin_token, kwargs)

    def tenant_client(self, **kwargs: Any) -> BrokerClient:
        return self._client(self.tenant_token, kwargs)

    def _client(self, token: str | None, kwargs: dict[str, Any]) -> BrokerClient:
        # The stack's broker is on loopback: the lean transport, as its poller uses. An
        # httpx2 client would import httpcore2 and load the CA bundle (~0.1 s each) at start.
        kwargs.setdefault("transport", KeepAliveLink)
        return BrokerClient(self.broker_url, token, **kwargs)


async def _all_or_first_error(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Wait for all of `tasks`; the first failure is raised at once (the others still run)."""
    pending: set[asyncio.Task[None]] = set(tasks)
    while pending:
        finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
        for task in finished:
            task.result()


# --- the components -------------------------------------------------------------------------


class RedisComponent(StackComponent):
    """A Redis for the broker: the configured one, else an embedded server."""

    name = "redis"
    needs = ()

    def __init__(self) -> None:
        self._server: RedisServer | None = None

    async def start(self, stack: LocalStack) -> None:
        url = stack.config.redis_url or stack.broker_settings.redis_url
        if url is None:
            self._server = await asyncio.to_thread(_embedded_redis(stack).start)
            url = self._server.url
        stack.redis_url = url
        stack.urls["redis"] = url

    async def stop(self) -> None:
        if self._server is not None:
            await asyncio.to_thread(self._server.stop)
            self._server = None


class ServiceComponent(StackComponent):
    """A component that is one ASGI app on uvicorn, served in the stack's event loop."""

    def __init__(self) -> None:
        self.service: LoopServer | None = None

    async def _serve(self, stack: LocalStack, config: uvicorn.Config) -> str:
        """Serve `config`'s app; its URL, also listed in `stack.urls` under the name."""
        self.service = await LoopServer(config, name=self.name).start()
        stack.urls[self.name] = self.service.url
        return self.service.url

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.stop()
            self.service = None


class BrokerComponent(ServiceComponent):
    """The broker on uvicorn, with a fresh admin token."""

    name = "broker"
    needs = ("redis",)

    async def start(self, stack: LocalStack) -> None:
        from broker.app import create_app
        from broker.serve import GRACEFUL_SHUTDOWN_S

        stack.admin_token = secrets.token_urlsafe(32)
        settings = stack.broker_settings.model_copy(
            update={"redis_url": stack.redis_url, "admin_token": SecretStr(stack.admin_token)}
        )
        config = uvicorn_config(
            create_app(settings),
            stack.config.host,
            stack.config.broker_port,
            graceful_shutdown_s=GRACEFUL_SHUTDOWN_S,
        )
        stack.broker_url = await self._serve(stack, config)


class TenantComponent(StackComponent):
    """Creates the stack's tenant with the admin token."""

    name = "tenant"
    needs = ("broker",)

    async def start(self, stack: LocalStack) -> None:
        async with stack.admin_client(timeout_s=10.0) as admin:
            created = await admin.create_tenant(stack.config.tenant_name)
        stack.tenant_id = created.tenant_id
        stack.tenant_token = created.token

    async def stop(self) -> None:
        """Nothing to undo: the tenant lives as long as its Redis."""


class ScriptedLLMComponent(StackComponent):
    """The configured LLM profiles; without any, the scripted LLM on a free port."""

    name = "llm"
    needs = ()

    def __init__(self) -> None:
        self._server: Any = None

    async def start(self, stack: LocalStack) -> None:
        configured = stack.config.llm_settings or LLMSettings()
        if configured.is_configured:
            stack.llm_settings = configured
            stack.urls["llm"] = configured.sub().base_url
            return
        from fake_llm import FakeLLMServer
        from rlm_cli.scripted import scripted_profiles

        server = FakeLLMServer(
            stack.config.scenario, host=stack.config.host, port=stack.config.llm_port
        )
        self._server = await asyncio.to_thread(server.start)
        root, sub = scripted_profiles(self._server.base_url)
        stack.llm_settings = LLMSettings(
            llm_profiles=(root, sub), root_profile=root.name, sub_profile=sub.name
        )
        stack.scripted_llm = True
        stack.urls["llm"] = self._server.base_url

    async def stop(self) -> None:
        if self._server is not None:
            await asyncio.to_thread(self._server.stop)
            self._server = None


class PollerComponent(StackComponent):
    """A poller with the admin token, so it answers every tenant of this stack."""

    name = "poller"
    needs = ("broker", "llm", "sub_rlm")

    def __init__(
        self, *, budgets: BudgetLookup | None = None, sub_rlm: SubRLMRunner | None = None
    ) -> None:
        self.budgets = budgets
        self.sub_rlm = sub_rlm
        self._exit: contextlib.AsyncExitStack | None = None
        self._poller: Poller | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, stack: LocalStack) -> None:
        from host_poller.poller.serve import open_poller

        if stack.llm_settings is None:
            raise RuntimeError("the poller component needs the llm component before it")
        base = stack.poller_settings
        settings = base.model_copy(
            update={"broker_url": stack.broker_url, "tenant_token": None,
                    "admin_token": SecretStr(stack.admin_token)}
        )  # fmt: skip
        self._exit = contextlib.AsyncExitStack()
        poller = await self._exit.enter_async_context(
            open_poller(settings, stack.llm_settings, budgets=self.budgets, sub_rlm=self.sub_rlm)
        )
        self._poller = stack.poller = poller
        self._task = asyncio.create_task(poller.run(), name="stack-poller")

    async def stop(self) -> None:
        if self._task is not None and self._poller is not None:
            # `run()` stops leasing, finishes in-flight calls within the grace, posts answers.
            self._poller.request_stop()
            await self._task
            self._task = None
        if self._exit is not None:
            await self._exit.aclose()
            self._exit = None


# --- the sandbox runtime (`rlm sandbox`, for the pyodide and remote environments) -------------


#: Warm sandboxes of the stack's runtime unless RLM_SANDBOX_POOL_SIZE says otherwise: one user's
#: stack needs one at a time (a run's root session), and each costs ~200 MiB idle (the
#: standalone runtime keeps 2; docs/performance.md, "Memory").
STACK_POOL_SIZE = 1


class SandboxRuntimeComponent(ServiceComponent):
    """The sandbox runtime on uvicorn with a fresh bearer token (RLM_SANDBOX_* settings)."""

    name = "sandbox"
    needs = ()

    async def start(self, stack: LocalStack) -> None:
        from sandbox_runtime.service.app import create_app
        from sandbox_runtime.service.serve import uvicorn_config as runtime_config
        from sandbox_runtime.service.settings import RuntimeSettings

        token = secrets.token_urlsafe(32)
        base = RuntimeSettings()
        updates: dict[str, Any] = {
            "host": stack.config.host,
            "port": stack.config.sandbox_port,
            "token": SecretStr(token),
        }
        if "pool_size" not in base.model_fields_set:
            updates["pool_size"] = STACK_POOL_SIZE
        settings = base.model_copy(update=updates)
        config = runtime_config(create_app(settings), settings)
        stack.runtime_url = await self._serve(stack, config)
        stack.runtime_token = token


def default_components(
    *,
    poller: bool = True,
    budgets: BudgetLookup | None = None,
    sub_rlm: SubRLMRunner | None = None,
    sandbox: bool = True,
) -> list[StackComponent]:
    """Redis, broker, tenant, LLM, (unless `sandbox=False`) the sandbox runtime and (unless
    `poller=False`) a poller, in start order."""
    components: list[StackComponent] = [
        RedisComponent(),
        BrokerComponent(),
        TenantComponent(),
        ScriptedLLMComponent(),
    ]
    if sandbox:
        components.append(SandboxRuntimeComponent())
    if poller:
        components.append(PollerComponent(budgets=budgets, sub_rlm=sub_rlm))
    return components


def _embedded_redis(stack: LocalStack) -> RedisServer:
    durable = stack.config.durable_redis
    if durable is None:
        durable = stack.config.env_file is not None
    if not durable:
        return RedisServer()
    settings = stack.broker_settings
    return RedisServer(data_dir=settings.redis_dir, appendfsync=settings.redis_appendfsync)


# --- `rlm up` ----------------------------------------------------------------------------------


def describe(stack: LocalStack, env_file: Path | None) -> list[str]:
    """What `rlm up` prints: the URLs and how to use them; never a token."""
    lines = ["rlm stack is up"]
    # In list order: the components start concurrently, so `urls` fills in any order.
    order = {c.name: index for index, c in enumerate(stack.components)}
    urls = sorted(stack.urls.items(), key=lambda item: order.get(item[0], len(order)))
    lines += [f"  {name:<8} {url}" for name, url in urls]
    if stack.scripted_llm:
        lines.append(
            f"  the LLM is the scripted one (scenario {stack.config.scenario!r}); "
            "for a real provider set OPENAI_BASE_URL and/or OPENAI_API_KEY with RLM_MODEL, "
            "or RLM_LLM_PROFILES"
        )
    if env_file is not None:
        where = shlex.quote(str(env_file.absolute()))
        lines += [
            f"  tokens   written to {env_file} (mode 0600, removed at stop)",
            "ask from another shell; `rlm ask` finds this stack by itself in this directory",
            f"(elsewhere: RLM_STACK_ENV_FILE={where}):",
            '  rlm ask --context FILE "question"',
            "or point any shell at it:",
            f"  set -a; . {where}; set +a",
        ]
    lines.append("stop with Ctrl+C (SIGINT) or SIGTERM")
    return lines


async def run_until_signal(
    config: StackConfig,
    *,
    announce: Callable[[str], None] = print,
    components: Sequence[StackComponent] | None = None,
) -> None:
    """Start the stack, announce it, and keep it up until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        if config.env_file is not None:
            await make_way_for_env_file(config.env_file)
        async with LocalStack(config, components) as stack:
            written = None
            if config.env_file is not None:
                written = write_env_file(config.env_file, stack.environ())
            try:
                for line in describe(stack, config.env_file):
                    announce(line)
                await stop.wait()
                logger.info("stack stopping")
            finally:
                if written is not None:
                    written.remove()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
