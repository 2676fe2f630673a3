"""The env file of `rlm up`: its stack's URLs and tokens, for `rlm ask` and for other shells.

`rlm up` creates the file exclusively (O_EXCL), never through a symbolic link (O_NOFOLLOW),
readable by its owner only (0600), and removes it at stop if it is still its own. `rlm ask`
reads it only when it is a private regular file of the current user, and uses it only when
its broker answers `/health`: a file left by a killed `rlm up` is ignored, and the next
`rlm up` replaces it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shlex
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import click

from rlm_wire.broker_client import BrokerClient
from rlm_wire.errors import WireError

#: How long a stack's broker has to answer `/health` before its env file counts as stale.
HEALTH_TIMEOUT_S = 2.0
#: An env file holds a handful of lines; anything larger is not one.
_MAX_BYTES = 64 * 1024


class StackFileError(click.ClickException):
    """The env file cannot be used safely; the message says why and what to do."""


@dataclass(frozen=True)
class WrittenEnvFile:
    """The file `write_env_file` created, known by its inode and the digest of its content
    (inode numbers are reused), so that a stop removes this file and no other."""

    path: Path
    inode: tuple[int, int]
    digest: str

    def remove(self) -> None:
        """Remove the file unless it is gone or is another one by now."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            same = (info.st_dev, info.st_ino) == self.inode and _digest(
                handle.read(_MAX_BYTES)
            ) == self.digest
        if same:
            self.path.unlink(missing_ok=True)


def _digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


@dataclass(frozen=True)
class RunningStack:
    """A stack of `rlm up` whose broker answered: its env file and the variables in it."""

    env_file: Path
    variables: Mapping[str, str]

    @property
    def broker_url(self) -> str:
        return self.variables["RLM_BROKER_URL"]


def write_env_file(path: Path, variables: Mapping[str, str]) -> WrittenEnvFile:
    """Create `path` with shell-quoted `NAME=value` lines (for `set -a; . FILE`), mode 0600.

    Never over an existing file and never through a symbolic link: either is a
    `StackFileError`.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError as exc:
        what = "a symbolic link" if path.is_symlink() else "an existing file"
        raise StackFileError(
            f"refusing to write {path}: it is {what} (remove it, or pass another --env-file)"
        ) from exc
    content = "".join(f"{name}={shlex.quote(value)}\n" for name, value in variables.items())
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)  # the umask may have taken bits off, never added
        handle.write(content.encode())
        info = os.fstat(handle.fileno())
    return WrittenEnvFile(path, (info.st_dev, info.st_ino), _digest(content.encode()))


def read_env_file(path: Path) -> dict[str, str] | None:
    """The variables of the env file at `path`; None when there is none.

    A symbolic link, or a file that is not a private (0600) regular file of this user, is a
    `StackFileError`: its URLs would receive the context and its tokens would be used.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StackFileError(
                f"refusing to use {path}: it is a symbolic link (remove it)"
            ) from exc
        raise StackFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if (
            not stat.S_ISREG(info.st_mode)
            or info.st_uid != os.geteuid()
            or info.st_mode & 0o077
            or info.st_size > _MAX_BYTES
        ):
            raise StackFileError(
                f"refusing to use {path}: not a private file of yours (mode 0600); remove it"
            )
        text = handle.read(_MAX_BYTES).decode("utf-8", "replace")
    variables: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if not sep or not name.strip() or name.lstrip().startswith("#"):
            continue
        try:
            variables[name.strip()] = "".join(shlex.split(value))
        except ValueError:
            continue  # not a line `write_env_file` wrote
    return variables


async def broker_answers(url: str, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
    """True when a broker at `url` says it is healthy within `timeout_s`."""
    if not url.startswith(("http://", "https://")):
        return False
    async with BrokerClient(url, None, timeout_s=timeout_s, retry=None) as client:
        try:
            health = await client.health()
        except (WireError, ValueError):
            return False
    return isinstance(health, dict) and health.get("status") == "ok"


async def running_stack(path: Path) -> RunningStack | None:
    """The stack the env file at `path` describes, if its broker answers; else None."""
    variables = read_env_file(path)
    if not variables or not await broker_answers(variables.get("RLM_BROKER_URL", "")):
        return None
    return RunningStack(path, variables)


async def make_way_for_env_file(path: Path) -> None:
    """Before `rlm up` starts: refuse a symbolic link or the file of a stack that is still up;
    remove a file left by a stack that is gone."""
    stack = await running_stack(path)
    if stack is not None:
        raise StackFileError(
            f"a stack of `rlm up` is already running at {stack.broker_url} (see {path}): "
            "stop it first, or pass another --env-file"
        )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
