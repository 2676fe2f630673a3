"""Running the project's commands as an unprivileged user, as the container image does.

The image runs every component as the user `rlm`, which owns /data and nothing else; tests
here run as root, which may write anywhere and may `unshare -n`. `unprivileged_user` picks
`nobody` when running as root (else the current user, already unprivileged) and a venv that
user can execute: the project's own or, when its interpreter sits where the user cannot
reach (a pyenv build under a root-only /root), a venv of a hard-linked copy of that same
interpreter and its standard library, which reads the project's installed packages.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VERSION = f"python{sys.version_info.major}.{sys.version_info.minor}"


@dataclass(frozen=True)
class Unprivileged:
    """A user id without privileges, and a venv (bin/python, bin/rlm, bin/deno) it can run."""

    uid: int
    gid: int
    venv: Path
    #: what every process needs besides its own environment (the copy's LD_LIBRARY_PATH)
    env: dict[str, str]
    note: str

    def popen_kwargs(self) -> dict[str, Any]:
        """`subprocess` arguments that start a child as this user."""
        if os.geteuid() != 0:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def own(self, path: Path) -> Path:
        """Make `path` (a directory) this user's, as a volume in the image is `rlm`'s."""
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(path, self.uid, self.gid)
        return path

    def run(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=60, check=False,
            env={**kwargs.pop("env", {"PATH": "/usr/bin:/bin"}), **self.env},
            **self.popen_kwargs(), **kwargs,
        )  # fmt: skip


def _ids() -> tuple[int, int]:
    if os.geteuid() != 0:
        return os.getuid(), os.getgid()
    nobody = pwd.getpwnam("nobody")
    return nobody.pw_uid, nobody.pw_gid


def _works(user: Unprivileged, python: Path) -> bool:
    probe = "import rlm_cli.main, pydantic_core, redis.asyncio, uvloop"
    try:
        return user.run([str(python), "-c", probe], cwd="/").returncode == 0
    except PermissionError:
        return False


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _reachable_interpreter(base: Path) -> tuple[Path, Path]:
    """This interpreter and its standard library, hard-linked (else copied) under `base`:
    (the python binary, the directory of its libpython)."""
    source = Path(sys.base_prefix)
    target = base / "python"
    shutil.rmtree(target, ignore_errors=True)
    (target / "bin").mkdir(parents=True)
    python = target / "bin" / VERSION
    _link_or_copy(str((source / "bin" / VERSION).resolve()), str(python))
    shutil.copytree(
        source / "lib" / VERSION,
        target / "lib" / VERSION,
        ignore=shutil.ignore_patterns("site-packages", "test"),
        copy_function=_link_or_copy,
    )
    for library in (source / "lib").glob(f"lib{VERSION}.so*"):
        _link_or_copy(str(library.resolve()), str(target / "lib" / library.name))
    return python, target / "lib"


def _overlay_venv(user: Unprivileged, base: Path) -> Unprivileged | None:
    """A venv of a reachable copy of this interpreter whose site reads the project's packages."""
    python, libraries = _reachable_interpreter(base)
    env = {"LD_LIBRARY_PATH": str(libraries)}
    venv = base / "venv"
    done = subprocess.run(
        [str(python), "-m", "venv", "--without-pip", str(venv)],
        capture_output=True, check=False, env={**os.environ, **env},
    )  # fmt: skip
    if done.returncode != 0:
        return None
    site_packages = Path(sysconfig.get_paths()["purelib"])
    project_bin = Path(sys.prefix) / "bin"
    # addsitedir, not a bare path: the project's own .pth files (the editable install's
    # finder among them) must be processed too.
    (venv / "lib" / VERSION / "site-packages" / "_rlm_project.pth").write_text(
        f"import site; site.addsitedir({str(site_packages)!r})\n"
    )
    script = (project_bin / "rlm").read_text().split("\n", 1)[1]
    (venv / "bin" / "rlm").write_text(f"#!{venv / 'bin' / 'python'}\n{script}")
    (venv / "bin" / "rlm").chmod(0o755)
    (venv / "bin" / "deno").symlink_to(project_bin / "deno")
    overlay = Unprivileged(
        user.uid, user.gid, venv, env,
        f"{sys.prefix}/bin/python is out of uid {user.uid}'s reach: a venv of a hard-linked "
        "copy of the same interpreter, over the project's installed packages",
    )  # fmt: skip
    return overlay if _works(overlay, venv / "bin" / "python") else None


def unprivileged_user(base: Path) -> Unprivileged | str:
    """The user and venv to run commands with, or why there is none (a reason to skip).

    `base` must be a directory the user can traverse; an overlay venv may be made in it.
    """
    uid, gid = _ids()
    user = Unprivileged(uid, gid, Path(sys.prefix), {}, "the project's venv")
    if _works(user, user.venv / "bin" / "python"):
        return user
    overlay = _overlay_venv(user, base)
    if overlay is not None:
        return overlay
    return (
        f"uid {uid} can run neither {sys.prefix}/bin/python nor a copy of its interpreter; "
        "make the interpreter reachable by other users to run this test"
    )
