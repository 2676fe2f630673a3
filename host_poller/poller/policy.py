"""What a tenant may ask of this host: the one policy applied wherever requests are answered.

Session metadata (`RunInfo`: environment, depth, max_depth, max_iterations, ...) is written
by the tenant's host, so it is a request, never an authority. Every path that answers
requests (the standalone `rlm poller`, the poller embedded in `rlm up` / `rlm ask`, any
future service) hands one `TenantPolicy` to its sub-RLM runner, which asks it before it runs
anything:

- **environments**: a run may name one of `environments` (default `pyodide`, `remote`) or the
  host's own `RLM_ENVIRONMENT` (the operator's choice). `local` runs model code inside the
  process that holds the API keys and tokens: it is allowed from metadata only when the
  operator lists it in `RLM_POLLER_SUB_RLM_ENVIRONMENTS`.
- **depth**: sub-RLMs run only below `max_depth` (`RLM_SUB_RLM_MAX_DEPTH`), whatever
  max_depth the run claims; the wire model already refuses negative depths.
- **iterations**: each sub-RLM gets at most `max_iterations` (`RLM_SUB_RLM_MAX_ITERATIONS`).

The metadata itself is bounded by the wire model (`rlm_wire.run_info.RunInfo`: fixed
alphabets and lengths for identifiers, bounded numbers) and by the broker's size limit.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from host_poller.poller.errors import BudgetExceeded, RequestFailed
from rlm_wire.codes import ErrorCode

if TYPE_CHECKING:
    from host_poller.settings import HostSettings

#: Environments a run may name unless the operator says otherwise: both run model code in the
#: sandbox runtime, never in this process.
DEFAULT_ENVIRONMENTS = ("pyodide", "remote")
#: The defaults of RLM_SUB_RLM_MAX_DEPTH and RLM_SUB_RLM_MAX_ITERATIONS.
DEFAULT_MAX_DEPTH = 4
DEFAULT_MAX_ITERATIONS = 50


@dataclass(frozen=True)
class TenantPolicy:
    """The operator's bounds on what a tenant's session metadata may ask; see the module."""

    own_environment: str = "pyodide"
    """The host's `RLM_ENVIRONMENT`: the operator chose it, so it is always allowed."""
    environments: frozenset[str] = frozenset(DEFAULT_ENVIRONMENTS)
    """Environments a run's metadata may name besides `own_environment`."""
    max_depth: int = DEFAULT_MAX_DEPTH
    max_iterations: int = DEFAULT_MAX_ITERATIONS

    def __post_init__(self) -> None:
        if self.max_depth < 1 or self.max_iterations < 1:
            raise ValueError("TenantPolicy needs max_depth >= 1 and max_iterations >= 1")

    @classmethod
    def from_settings(
        cls, host: HostSettings, environments: Collection[str] = DEFAULT_ENVIRONMENTS
    ) -> TenantPolicy:
        """The policy of a host: its settings' caps; `environments` from
        `PollerSettings.poller_sub_rlm_environments` (RLM_POLLER_SUB_RLM_ENVIRONMENTS)."""
        return cls(
            own_environment=host.environment,
            environments=frozenset(environments),
            max_depth=host.sub_rlm_max_depth,
            max_iterations=host.sub_rlm_max_iterations,
        )

    def environment_for(self, requested: str | None) -> str:
        """The environment a sub-RLM runs in; raises `RequestFailed` for one not allowed."""
        if requested is None or requested == self.own_environment:
            return self.own_environment
        if requested in self.environments:
            return requested
        allowed = ", ".join(sorted(self.environments | {self.own_environment}))
        raise RequestFailed(
            f"this poller does not run sub-RLMs in the {requested!r} environment that the "
            f"run's session metadata asks for (allowed: {allowed}; the operator sets "
            "RLM_POLLER_SUB_RLM_ENVIRONMENTS)",
            code=ErrorCode.SUB_RLM_UNAVAILABLE,
        )

    def check_depth(self, depth: int) -> None:
        """Refuse a sub-RLM at `depth` when it is not below the operator's cap."""
        if depth >= self.max_depth:
            raise BudgetExceeded(
                f"sub-RLM at depth {depth}: this host runs sub-RLMs only below depth "
                f"{self.max_depth} (RLM_SUB_RLM_MAX_DEPTH)"
            )

    def sub_max_depth(self, requested: int | None, default: int) -> int:
        """The max_depth a sub-RLM's run is given: the run's (else `default`), capped."""
        return min(requested if requested is not None else default, self.max_depth)

    def sub_max_iterations(self, requested: int | None, default: int) -> int:
        """The root turns a sub-RLM is given: the run's (else `default`), capped."""
        return min(requested or default, self.max_iterations)
