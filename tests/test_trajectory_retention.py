"""The trajectory directory kept within RLM_TRAJECTORY_MAX_BYTES: the least recently written
files go first, and nothing outside the directory or still being written is touched."""

from __future__ import annotations

import os
import time
from pathlib import Path

from host_poller.rlm.trajectory import TrajectoryWriter, prune_trajectories

KIB = 1024


def _written(path: Path, size: int, age_s: float) -> Path:
    """A trajectory file of `size` bytes last written `age_s` ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    at = time.time() - age_s
    os.utime(path, (at, at))
    return path


def test_the_least_recently_written_go_first_until_the_rest_fit(tmp_path: Path) -> None:
    root = tmp_path / "trajectories"
    oldest = _written(root / "a.jsonl", 400 * KIB, 5000)
    old_of_a_tenant = _written(root / "tenant1" / "b.d1.jsonl", 300 * KIB, 4000)
    middle = _written(root / "c.jsonl", 200 * KIB, 3000)
    recent_of_a_tenant = _written(root / "tenant2" / "d.d1.jsonl", 300 * KIB, 2000)
    newest = _written(root / "e.jsonl", 300 * KIB, 1000)
    not_a_trajectory = _written(root / "notes.txt", 900 * KIB, 9000)

    removed = prune_trajectories(root, 700 * KIB)

    # 1,500 KiB of trajectories: the oldest three go (900 KiB), 600 KiB are left.
    assert sorted(removed) == sorted([oldest, old_of_a_tenant, middle])
    for kept in (recent_of_a_tenant, newest, not_a_trajectory):
        assert kept.exists()
    assert prune_trajectories(root, 700 * KIB) == []


def test_no_link_is_followed_and_no_file_being_written_is_removed(tmp_path: Path) -> None:
    root = tmp_path / "trajectories"
    outside = tmp_path / "elsewhere"
    old_elsewhere = _written(outside / "x.jsonl", 600 * KIB, 9000)
    (root / "linked-tenant").parent.mkdir(parents=True, exist_ok=True)
    (root / "linked-tenant").symlink_to(outside, target_is_directory=True)
    (root / "linked.jsonl").symlink_to(old_elsewhere)
    being_written = TrajectoryWriter(root / "slow-run.jsonl")
    try:
        being_written.write("run_start", run_id="slow-run")
        at = time.time() - 8000  # written long ago, still open
        os.utime(being_written.path, (at, at))
        other = _written(root / "other.jsonl", 600 * KIB, 100)

        removed = prune_trajectories(root, 100 * KIB)

        assert removed == [other]
        assert being_written.path.exists()
        assert old_elsewhere.exists()
        assert (root / "linked.jsonl").is_symlink()
    finally:
        being_written.close()
    # Closed, it is a file like any other.
    assert prune_trajectories(root, 0) == [being_written.path]


def test_a_file_two_writers_have_open_stays_until_both_close(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    first, second = TrajectoryWriter(path), TrajectoryWriter(path)
    first.write("run_start")
    first.close()
    assert prune_trajectories(tmp_path, 0) == []
    second.close()
    assert prune_trajectories(tmp_path, 0) == [path]
