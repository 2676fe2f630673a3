"""The Starlette application of `rlm view`: the pages, their files, and the JSON they read.

    GET /                    the list of runs (static/index.html)
    GET /runs/{run_id}       one run as a tree (static/run.html)
    GET /static/{name}       viewer.js, viewer.css: a fixed set, read at start
    GET /api/runs            ?offset=&limit= -> {"runs", "total", "offset", "limit", ...}
    GET /api/runs/{run_id}   the run's tree, sub-calls and timeline (`tree.RunTree`)

Read-only; who may read is decided by `guard.ViewerGuard`. File reads run on worker threads.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from host_poller.viewer.guard import ViewerGuard
from host_poller.viewer.reader import FileEvents, TrajectoryDir
from host_poller.viewer.runs import RunIndex
from host_poller.viewer.settings import ViewerSettings
from host_poller.viewer.tree import RunTree
from rlm_wire.codes import ErrorCode
from rlm_wire.errors import ApiError
from rlm_wire.responses import exception_handlers, json_response
from rlm_wire.run_info import ID_PATTERN

logger = logging.getLogger(__name__)

_RUN_ID = re.compile(ID_PATTERN)
#: The assets the app serves by name: nothing else of the package is reachable.
_ASSETS = {
    "viewer.js": "text/javascript; charset=utf-8",
    "viewer.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
_MAX_OFFSET = 1_000_000
T = TypeVar("T")


def _static(name: str) -> bytes:
    return resources.files("host_poller.viewer").joinpath("static", name).read_bytes()


class Viewer:
    """The routes' state: the directory, its run index, the bounds."""

    def __init__(self, trajectory_dir: Path, settings: ViewerSettings) -> None:
        self.settings = settings
        self.directory = TrajectoryDir(
            trajectory_dir,
            max_files=settings.max_files,
            max_file_bytes=settings.max_file_bytes,
        )
        self.index = RunIndex(self.directory)
        self.files = {name: _static(name) for name in ("index.html", "run.html", *_ASSETS)}

    async def index_page(self, request: Request) -> Response:
        return self._html("index.html")

    async def run_page(self, request: Request) -> Response:
        _run_id(request)
        return self._html("run.html")

    async def asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _ASSETS:
            raise ApiError(404, ErrorCode.NOT_FOUND, "no such file")
        return Response(self.files[name], media_type=_ASSETS[name])

    async def list_runs(self, request: Request) -> Response:
        limit = _int_param(request, "limit", self.settings.page_size, 1, self.settings.page_size)
        offset = _int_param(request, "offset", 0, 0, _MAX_OFFSET)
        page = await self._read(self.index.page, offset, limit)
        return json_response(
            {
                "runs": page.runs,
                "total": page.total,
                "offset": offset,
                "limit": limit,
                "files_left_out": page.files_left_out,
                "trajectory_dir": str(self.directory.root),
            }
        )

    async def get_run(self, request: Request) -> Response:
        run_id = _run_id(request)
        body = await self._read(self._run, run_id)
        if body is None:
            raise ApiError(404, ErrorCode.NOT_FOUND, f"no run {run_id!r} in the trajectory dir")
        return json_response(body)

    async def _read(self, read: Callable[..., T], *args: Any) -> T:
        """`read(*args)` on a worker thread; a directory it cannot read is a 503."""
        try:
            return await run_in_threadpool(read, *args)
        except OSError as exc:
            raise ApiError(
                503,
                ErrorCode.UNAVAILABLE,
                f"cannot read the trajectory dir: {exc.strerror or exc}",
            ) from exc

    def _run(self, run_id: str) -> dict[str, Any] | None:
        summary, files = self.index.files_of(run_id)
        if summary is None:
            return None
        tree = RunTree(run_id, max_chars=self.settings.max_field_chars)
        parts: list[FileEvents] = []
        budget = self.settings.max_run_bytes
        # The root's file first (top level), then the sub-RLMs' by name.
        for file in sorted(files, key=lambda f: (f.tenant is not None, f.tenant or "", f.name)):
            if budget <= 0:
                break
            part = self.directory.read(file, budget)
            if part is None:
                continue
            budget -= min(file.size, budget)
            tree.add_file(part)
            parts.append(part)
        body = tree.to_json(parts, summary.to_json())
        left_out = len(files) - len(parts)
        if left_out:
            body["notes"].append(f"{left_out} files of the run not read (RLM_VIEW_MAX_RUN_BYTES)")
        return body

    def _html(self, name: str) -> Response:
        return Response(self.files[name], media_type="text/html; charset=utf-8")


def _run_id(request: Request) -> str:
    run_id: str = request.path_params["run_id"]
    if not _RUN_ID.fullmatch(run_id):
        raise ApiError(
            400,
            ErrorCode.BAD_REQUEST,
            "a run id is 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
    return run_id


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high or len(raw) > 12:
        raise ApiError(
            400, ErrorCode.BAD_REQUEST, f"{name} must be an integer from {low} to {high}"
        )
    return value


def create_app(trajectory_dir: Path, settings: ViewerSettings | None = None) -> Starlette:
    """The viewer of `trajectory_dir` (the host's RLM_TRAJECTORY_DIR); read-only."""
    settings = settings if settings is not None else ViewerSettings()
    settings.check()
    viewer = Viewer(trajectory_dir, settings)
    token = settings.token.get_secret_value() if settings.token is not None else None
    return Starlette(
        routes=[
            Route("/", viewer.index_page, methods=["GET"]),
            Route("/runs/{run_id}", viewer.run_page, methods=["GET"]),
            Route("/static/{name}", viewer.asset, methods=["GET"]),
            Route("/api/runs", viewer.list_runs, methods=["GET"]),
            Route("/api/runs/{run_id}", viewer.get_run, methods=["GET"]),
        ],
        middleware=[Middleware(ViewerGuard, token=token)],
        exception_handlers=dict(exception_handlers(logger)),
    )
