"""Files holding tenants' data (trajectories, the usage ledger): private to this user.

Created with mode 0600 in directories created 0700, never through a symbolic link, so a
tenant's prompts and outputs are not readable by other users of the host and a planted link
cannot redirect them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TextIO


def private_dirs(path: Path) -> None:
    """Create `path` and its missing parents with mode 0700 (existing ones are left alone:
    a shared parent like ~/.local/share is not ours to change)."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(directory, 0o700)  # mkdir's mode is cut by the umask; this one is not


def open_private(path: Path, mode: str) -> TextIO:
    """Open a text file for writing or appending, created 0600, refusing a symbolic link
    (a planted link must not redirect tenants' data); an existing file is made 0600."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_APPEND if mode == "a" else os.O_TRUNC
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        handle: TextIO = os.fdopen(fd, mode, encoding="utf-8")  # type: ignore[assignment]
        return handle
    except BaseException:
        os.close(fd)
        raise


def create_private(path: Path) -> None:
    """Make sure `path` exists as a private regular file (0600), not a symbolic link."""
    private_dirs(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
