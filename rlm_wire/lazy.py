"""A package's public names loaded on first use (PEP 562), for packages whose submodules are
heavy: `import rlm_wire.codes` or `import host_poller.llm.errors` runs the package's
`__init__` first, and an `__init__` that imported every public name would import httpx2, the
openai SDK or the whole poller with it (docs/performance.md, "Start-up").

    _HOMES = {"ApiClient": "api_client", ...}      # public name -> its submodule
    __getattr__, __dir__ = lazy_names(__name__, _HOMES)

with the same names imported under `if TYPE_CHECKING:` for type checkers.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(
    package: str, homes: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level `__getattr__` and `__dir__` of `package`: each name in `homes` is
    imported from its submodule on first use, then kept in the package's namespace (later
    lookups do not come here)."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{home}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted([*namespace, *homes])

    return __getattr__, __dir__
