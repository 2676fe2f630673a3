"""What the Dockerfile's last stage gives a process: ENV, WORKDIR and USER, read from the file.

Enough of the Dockerfile grammar for our own file (line continuations, `KEY=value` pairs,
`$VAR` / `${VAR}` from earlier ENV lines and the base image's PATH); not a general parser.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

#: PATH of the official python:*-slim images the Dockerfile builds on.
BASE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


@dataclass
class ImageConfig:
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str = "root"


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        found.append((keyword.upper(), rest.strip()))
    return found


def _expand(value: str, scope: dict[str, str]) -> str:
    return _VAR.sub(lambda m: scope.get(m.group(1) or m.group(2), ""), value)


def last_stage(path: Path) -> ImageConfig:
    """ENV, WORKDIR and USER as the last stage of `path` leaves them."""
    config = ImageConfig()
    for keyword, rest in _instructions(path.read_text()):
        if keyword == "FROM":
            config = ImageConfig(env={"PATH": BASE_PATH})
        elif keyword == "ENV":
            scope = dict(config.env)
            for pair in shlex.split(rest):
                key, sep, value = pair.partition("=")
                if not sep:
                    raise ValueError(f"ENV without `=` is not supported: {rest!r}")
                config.env[key] = _expand(value, scope)
        elif keyword == "WORKDIR":
            config.workdir = rest
        elif keyword == "USER":
            config.user = rest
    return config
