"""`rlm view`: a real RLM run (real broker, Redis, poller, sub-RLM, the scripted LLM) writes
its trajectory; the viewer serves it over real HTTP on loopback; chromium shows it.

The run: the root asks three `llm_query_batched` sub-calls (they overlap), one `rlm_query`
(a sub-RLM at depth 1 that makes its own `llm_query` at depth 2), prints hostile markup, and
ends with FINAL on its second turn.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from click.testing import CliRunner

from broker.redis_server import RedisServer, free_port
from host_poller.rlm import RLMResult
from host_poller.viewer import create_app
from host_poller.viewer.reader import TrajectoryDir, TrajectoryFile, parse_lines
from host_poller.viewer.settings import ViewerSettings
from rlm_cli.main import cli
from rlm_wire.serving import ThreadedServer, uvicorn_config
from tests.support.runs import scripted_stack

ROOT = "You are the root of a Recursive Language Model"
CHILD = "(?s)(?=.*You are the root of a Recursive Language Model)(?=.*depth: [1-9])"
HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'

SCENARIO: dict[str, Any] = {
    "name": "viewer",
    "faults": {"delay_s": 0.05},  # so the batched sub-calls overlap at the LLM
    "rules": [
        {
            "name": "child",
            "match": {"system": CHILD, "iteration": 0},
            "reply": {
                "kind": "code",
                "code": [
                    "inner = llm_query('Say the word: inner')",
                    "FINAL('child heard ' + inner)",
                ],
            },
        },
        {
            "name": "root-work",
            "match": {"system": ROOT, "iteration": 0},
            "reply": {
                "kind": "code",
                "code": [
                    "parts = llm_query_batched(['Say: one', 'Say: two', 'Say: three'])",
                    "child = rlm_query('Ask a sub-model for a word')",
                    f"print({HOSTILE!r})",
                    "print(len(parts), child)",
                ],
            },
        },
        {
            "name": "root-final",
            "match": {"system": ROOT, "min_iteration": 1},
            "reply": {"kind": "code", "code": ["FINAL('viewer done: ' + child)"]},
        },
        {"name": "sub", "match": {}, "reply": {"kind": "text", "text": "word"}},
    ],
}


@dataclass(frozen=True)
class Recorded:
    directory: Path
    result: RLMResult


async def _record(redis_url: str, root: Path) -> RLMResult:
    # The root model priced, so the run has a cost to show.
    async with scripted_stack(redis_url, root, SCENARIO, root_prices=(3.0, 15.0)) as run:
        return await run.rlm().acompletion("the context", "Gather words")


@pytest.fixture(scope="module")
def recorded(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    """One real run for the whole module (a run takes seconds; the tests only read it)."""
    if not redis_server.running:
        redis_server.start()
    root = tmp_path_factory.mktemp("viewer")
    result = asyncio.run(_record(redis_server.url, root))
    assert result.answer == "viewer done: child heard word"
    return Recorded(root / "trajectories", result)


def _serve(directory: Path, **settings: Any) -> ThreadedServer:
    config = ViewerSettings(**{"host": "127.0.0.1", "port": 0, "token": None, **settings})
    app = create_app(directory, config)
    return ThreadedServer(uvicorn_config(app, "127.0.0.1", 0), name="view")


@pytest.fixture
def viewer(recorded: Recorded) -> Iterator[ThreadedServer]:
    server = _serve(recorded.directory).start()
    try:
        yield server
    finally:
        server.stop()


# --- the JSON API ------------------------------------------------------------------------


def test_the_run_is_listed_with_its_numbers(recorded: Recorded, viewer: ThreadedServer) -> None:
    body = httpx.get(f"{viewer.url}/api/runs").json()
    assert body["total"] == 1
    (run,) = body["runs"]
    result = recorded.result
    assert run["run_id"] == result.run_id
    assert run["status"] == "final"
    assert run["answer"] == "viewer done: child heard word"
    assert run["iterations"] == 2
    assert run["sub_calls"] == 5  # three llm, one rlm, the child's llm
    assert run["depth"] == 2
    assert run["tokens"] == result.usage.total_tokens > 0
    assert run["cost_usd"] == pytest.approx(result.usage.cost_usd)
    assert run["cost_usd"] > 0
    assert run["model"] == "fake-root"


def test_the_run_is_a_tree_with_the_sub_rlm_under_its_iteration(
    recorded: Recorded, viewer: ThreadedServer
) -> None:
    body = httpx.get(f"{viewer.url}/api/runs/{recorded.result.run_id}").json()
    root = body["root"]
    assert [it["index"] for it in root["iterations"]] == [0, 1]
    first = root["iterations"][0]
    assert "llm_query_batched" in first["code"][0]["code"]
    assert HOSTILE in first["code"][0]["stdout"]
    assert root["answer"] == {"value": "viewer done: child heard word", "source": "FINAL"}
    assert body["end"]["answer"] == "viewer done: child heard word"
    # the sub-RLM: under the root's first iteration, with its own sub-call at depth 2
    (child,) = root["children"]
    assert child["depth"] == 1
    assert child["request_id"]
    assert child["parent_iteration"] == 0
    assert child["answer"]["value"] == "child heard word"
    assert child["latency_s"] > 0
    assert child["subtree_usage"]["calls"] >= 2  # its root call and its llm_query
    (inner,) = child["sub_calls"]
    assert (inner["kind"], inner["depth"], inner["iteration"]) == ("llm", 2, 0)
    # the root's own sub-calls, all in its first iteration
    kinds = sorted(c["kind"] for c in root["sub_calls"])
    assert kinds == ["llm", "llm", "llm", "rlm"]
    assert {c["iteration"] for c in root["sub_calls"]} == {0}
    rlm_call = next(c for c in root["sub_calls"] if c["kind"] == "rlm")
    assert rlm_call["node"] == child["id"]
    # the timeline: the three batched calls overlap, so they take three lanes
    bars = body["timeline"]["bars"]
    assert len(bars) == 5
    batched = [b for b in bars if b["kind"] == "llm" and b["depth"] == 1]
    assert len({b["lane"] for b in batched}) == 3
    assert all(b["end"] >= b["start"] >= 0 for b in bars)


def test_parts_in_several_files_and_a_torn_line_make_one_tree(
    recorded: Recorded, tmp_path: Path
) -> None:
    """A sub-RLM run by another poller writes `<tenant>/<run>.d1.<request>.jsonl`: the viewer
    gathers it with the root's file by the events' run id; a torn last line is skipped."""
    run_id = recorded.result.run_id
    events = [
        json.loads(line)
        for line in (recorded.directory / f"{run_id}.jsonl").read_text().splitlines()
    ]
    child = [e for e in events if e.get("request_id")]
    request_id = child[0]["request_id"]
    split = tmp_path / "split"
    (split / "tenant-a").mkdir(parents=True)
    own = "\n".join(json.dumps(e) for e in events if not e.get("request_id"))
    (split / f"{run_id}.jsonl").write_text(own + '\n{"event": "iteration", "t": 1')
    (split / "tenant-a" / f"{run_id}.d1.{request_id}.jsonl").write_text(
        "".join(json.dumps(e) + "\n" for e in child)
    )
    with _serve(split) as server:
        body = httpx.get(f"{server.url}/api/runs/{run_id}").json()
        listing = httpx.get(f"{server.url}/api/runs").json()
    assert listing["total"] == 1
    assert listing["runs"][0]["files"] == 2
    (node,) = body["root"]["children"]
    assert (node["tenant"], node["parent_iteration"]) == ("tenant-a", 0)
    assert node["answer"]["value"] == "child heard word"
    assert sorted(f["bad_lines"] for f in body["files"]) == [0, 1]
    assert any("tenant" in note for note in body["notes"])


def test_truncated_reads_keep_whole_lines_only() -> None:
    file = TrajectoryFile(0, 0, None, "r.jsonl")
    data = b'{"event": "a", "run_id": "r"}\n{"event": "b", "run_id": "r"}\n'
    part = parse_lines(data, file, limit=40)
    assert [e["event"] for e in part.events] == ["a"]
    assert (part.truncated, part.bad_lines) == (True, 0)
    deep = b"[" * 100_000 + b"\n" + b'{"event": 1}\n' + b"[1]\n"
    assert parse_lines(deep, file, limit=1 << 20).bad_lines == 3


def test_bad_requests_are_clear_errors(viewer: ThreadedServer) -> None:
    cases = {
        "/api/runs/..%2F..%2Fetc%2Fpasswd": (404, "not_found"),  # no such route
        "/api/runs/-starts-with-a-dash": (400, "bad_request"),
        "/api/runs/" + "x" * 65: (400, "bad_request"),
        "/api/runs/.hidden": (400, "bad_request"),
        "/api/runs/nosuchrun": (404, "not_found"),
        "/api/runs?limit=0": (400, "bad_request"),
        "/api/runs?limit=abc": (400, "bad_request"),
        "/api/runs?offset=-1": (400, "bad_request"),
        "/static/app.py": (404, "not_found"),
        "/static/..%2Fapp.py": (404, "not_found"),
        "/runs/a%20b": (400, "bad_request"),
    }
    for path, (status, code) in cases.items():
        response = httpx.get(viewer.url + path)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), path
    response = httpx.post(f"{viewer.url}/api/runs")
    assert (response.status_code, response.json()["error"]["code"]) == (405, "method_not_allowed")


# --- who may look ------------------------------------------------------------------------


def test_symbolic_links_out_of_the_directory_are_not_followed(
    recorded: Recorded, tmp_path: Path
) -> None:
    secret = tmp_path / "outside"
    secret.mkdir()
    (secret / "stolen.jsonl").write_text('{"event": "run_start", "run_id": "stolen", "t": 1}\n')
    directory = tmp_path / "trajectories"
    directory.mkdir()
    os.symlink(secret / "stolen.jsonl", directory / "stolen.jsonl")
    os.symlink(secret, directory / "tenant-link")
    os.mkfifo(directory / "fifo.jsonl")
    found = TrajectoryDir(directory, max_files=10, max_file_bytes=1 << 20).scan()
    assert found.files == []
    with _serve(directory) as server:
        assert httpx.get(f"{server.url}/api/runs").json()["total"] == 0
        assert httpx.get(f"{server.url}/api/runs/stolen").status_code == 404


def test_without_a_token_only_loopback_hosts_are_answered(viewer: ThreadedServer) -> None:
    rebound = httpx.get(f"{viewer.url}/api/runs", headers={"Host": "evil.example:8300"})
    assert rebound.status_code == 400
    assert rebound.json()["error"]["code"] == "host_not_allowed"
    page = httpx.get(f"{viewer.url}/", headers={"Host": "localhost:8300"})
    assert page.status_code == 200
    # only the viewer's own script may run, whatever a page ends up holding
    assert "script-src 'self';" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    with pytest.raises(ValueError, match="RLM_VIEW_TOKEN"):
        ViewerSettings(host="0.0.0.0", token=None).check()


def test_with_a_token_every_request_needs_it(recorded: Recorded) -> None:
    token = "t" * 24
    with _serve(recorded.directory, token=token) as server:
        assert httpx.get(f"{server.url}/api/runs").status_code == 401
        wrong = httpx.get(f"{server.url}/api/runs", headers={"Authorization": "Bearer nope"})
        assert wrong.json()["error"]["code"] == "unauthorized"
        bearer = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"{server.url}/api/runs", headers=bearer).json()["total"] == 1
        with httpx.Client(base_url=server.url) as client:
            first = client.get(f"/runs/x?token={token}&offset=3")
            assert first.status_code == 303
            assert first.headers["location"] == "/runs/x?offset=3"  # the token left the address
            assert "httponly" in first.headers["set-cookie"].lower()
            assert client.get("/api/runs").json()["total"] == 1  # the cookie
        # the redirect never leaves the site ("//host/" would)
        head = _raw_get(server.port, f"//evil.example/?token={token}")
        assert head.startswith("HTTP/1.1 303") and "location: /evil.example/\r\n" in head.lower()
        # any Host is fine with a token: the token is the guard
        assert httpx.get(f"{server.url}/", headers={**bearer, "Host": "viewer.internal"}).is_success


def _raw_get(port: int, target: str) -> str:
    """The head of the answer to a GET of `target` exactly as written (no client rewrites)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n\r\n")[0].decode() + "\r\n"


# --- the command -------------------------------------------------------------------------


def _environ(**extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RLM_", "OPENAI_"))}
    return {**clean, "RLM_LOG_FORMAT": "json", **extra}


def test_rlm_view_serves_the_hosts_trajectory_dir_until_sigterm(
    recorded: Recorded, tmp_path: Path
) -> None:
    port = free_port()
    rlm = str(Path(sys.executable).with_name("rlm"))
    log = tmp_path / "view.log"
    env = _environ(RLM_TRAJECTORY_DIR=str(recorded.directory))
    with log.open("wb") as out:
        child = subprocess.Popen(
            [rlm, "view", "--port", str(port)], env=env, stdout=out, stderr=out
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                assert child.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "rlm view did not come up"
                try:
                    listing = httpx.get(f"http://127.0.0.1:{port}/api/runs", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            assert listing.json()["runs"][0]["run_id"] == recorded.result.run_id
            child.send_signal(signal.SIGTERM)
            assert child.wait(timeout=30) == 0, log.read_text()[-3000:]
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=30)
    assert f"http://127.0.0.1:{port}/" in log.read_text()


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--host", "0.0.0.0"], {}, "RLM_VIEW_TOKEN"),
        (["--host", "0.0.0.0"], {"RLM_VIEW_TOKEN": "short"}, "at least 16"),
        (["--port", "0"], {"RLM_VIEW_PAGE_SIZE": "0"}, "RLM_VIEW_PAGE_SIZE"),
    ],
)
def test_rlm_view_refuses_unsafe_settings_in_one_line(
    args: list[str], env: dict[str, str], says: str
) -> None:
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("RLM_VIEW_")}
    result = CliRunner().invoke(cli, ["view", *args], env={**unset, **env})
    assert result.exit_code != 0
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: ") and says in line
    assert result.exception is None or isinstance(result.exception, SystemExit)


# --- in a real browser -------------------------------------------------------------------


def _browser_args() -> list[str]:
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
    ]


def test_the_pages_show_the_run_in_chromium(
    recorded: Recorded, viewer: ThreadedServer, tmp_path: Path
) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is missing: install it with `apt-get install -y chromium`")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "playwright is missing: install it with "
            "`.uv/bin/uv pip install --python .venv/bin/python playwright`"
        )
    run_id = recorded.result.run_id
    artifacts = Path(os.environ.get("RLM_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=_browser_args())
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

            page.goto(f"{viewer.url}/")
            row = page.locator(f'tr.run-row[data-run-id="{run_id}"]')
            row.wait_for()
            assert "viewer done: child heard word" in row.inner_text()
            assert "final" in row.inner_text()
            page.screenshot(path=str(artifacts / "viewer-runs.png"))
            row.locator("a").click()

            page.wait_for_url(f"**/runs/{run_id}")
            page.locator("details.node[data-depth='0']").wait_for()
            answer = page.locator("#final-answer").inner_text()
            assert answer == "viewer done: child heard word"
            assert (
                page.locator(
                    "details.node[data-depth='0'] > .node-body > details.iteration"
                ).count()
                == 2
            )
            # hostile output is shown as text, and never ran
            stdout = page.locator("pre.stdout").first.inner_text()
            assert HOSTILE in stdout
            assert page.evaluate("window.__pwned === undefined")
            # the timeline: five bars, the sub-RLM's among them
            assert page.locator("#timeline .bar").count() == 5
            assert page.locator("#timeline .bar-rlm").count() == 1
            # the sub-RLM node: closed until clicked
            child = page.locator("details.node[data-depth='1']")
            assert "depth 1" in child.locator(":scope > summary").inner_text()
            assert "tokens" in child.locator(":scope > summary").inner_text()
            child_iteration = child.locator("details.iteration").first
            assert not child_iteration.is_visible()
            child.locator(":scope > summary").click()
            child_iteration.wait_for(state="visible")
            assert "child heard " in child.locator(".node-answer").inner_text()
            assert "llm_query" in child.locator("table.calls").inner_text()
            summary = page.locator("#summary").inner_text()
            assert "$0.0" in summary and "Depth reached" in summary
            screenshot = artifacts / "viewer-run.png"
            page.screenshot(path=str(screenshot), full_page=True)
            print(f"screenshot: {screenshot}")
            assert not errors, errors
        finally:
            browser.close()
