"""Scale-out: `dask scheduler` + two `dask worker` processes; SIGKILL one mid-run, lose nothing."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from stages.engine import thread_env
from tests.eval_fixtures import make_workspace
from tests.mvtec_fixtures import REPO, stage_env

pytestmark = pytest.mark.slow

DASK = Path(sys.executable).with_name("dask")
CATEGORIES = {"bottle": ["hflip"], "screw": [], "grid": ["rot90"]}
EXTRACTORS = [
    ("resnet18", "random", "layer2", "avg"),
    ("resnet18", "random", "layer3", "avg"),
    ("resnet18", "random", "layer4", "avg"),
]
DETECTORS = [
    {"family": "OneClassSVM", "grid": {"kernel": ["linear", "rbf"]}},
    {"family": "LocalOutlierFactor", "grid": {"n_neighbors": [4, 8]}, "fixed": {"novelty": True}},
    {"family": "IsolationForest", "grid": {"n_estimators": [50, 200]}},
    {"family": "KernelDensity", "grid": {"bandwidth": [1.0], "kernel": ["gaussian"]}},
]


@contextlib.contextmanager
def dask_cluster(folder: Path) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """A scheduler and two workers, each its own process group; all killed on exit."""
    scheduler_file = folder / "scheduler.json"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),  # workers import stages.* (shared code, shared filesystem)
        "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0",
        "DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION": "1.0",
        "DASK_CONFIG": str(REPO / ".dask"),  # as README's worker command
        **thread_env(1),
    }
    common = ["--scheduler-file", str(scheduler_file), "--no-dashboard"]

    def start(*args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [str(DASK), *args, *common], env=env, cwd=folder, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    procs = [start("scheduler", "--host", "127.0.0.1", "--port", "0")]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():
            assert time.monotonic() < deadline, "the scheduler did not start"
            time.sleep(0.1)
        time.sleep(0.2)  # the file is complete once it parses
        address = json.loads(scheduler_file.read_text())["address"]
        workers = [
            start("worker", "--nthreads", "1", "--memory-limit", "2GiB", "--host", "127.0.0.1")
            for _ in range(2)
        ]
        procs += workers
        yield address, workers
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # nanny and worker alike
            proc.wait(timeout=30)


def _done(db: Path) -> int:
    if not db.exists():
        return 0
    with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT COUNT(*) FROM experiments WHERE status = 'done'").fetchone()[0]
    return 0


def _results(db: Path) -> tuple[dict[str, tuple[str, float]], int]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT key, status, auroc FROM experiments").fetchall()
        dup_scores = conn.execute(
            "SELECT COUNT(*) FROM (SELECT 1 FROM scores GROUP BY experiment, image "
            "HAVING COUNT(*) > 1)"
        ).fetchone()[0]
    results = {key: (status, auroc) for key, status, auroc in rows}
    assert len(results) == len(rows)  # no duplicate keys
    return results, dup_scores


def _workspace(root: Path, engine: dict) -> Path:
    return make_workspace(root, categories=CATEGORIES, extractors=EXTRACTORS, n_train=80,
                          dims=(64,), evaluate={"detectors": DETECTORS, "engine": engine})  # fmt: skip


def _evaluate(params: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stages.evaluate", "--params", str(params)], cwd=params.parent,
        env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs,
    )  # fmt: skip


@pytest.mark.skipif(not DASK.exists(), reason="no dask CLI in the venv")
def test_killing_one_worker_mid_run_loses_nothing(tmp_path: Path) -> None:
    local = _workspace(tmp_path / "local", {"n_workers": 1, "threads_per_worker": 1})
    reference = _evaluate(local)
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out
    expected, _ = _results(tmp_path / "local/results/results.sqlite")
    n_configs = 2 + 2 + 2 + 1
    assert len(expected) == n_configs * len(EXTRACTORS) * (len(CATEGORIES) + 2)

    remote = tmp_path / "remote"
    remote.mkdir()
    with dask_cluster(remote) as (address, workers):
        params = _workspace(remote, {"address": address})
        assert yaml.safe_load(params.read_text())["evaluate"]["engine"]["address"] == address
        db = remote / "results/results.sqlite"
        run = _evaluate(params)
        try:
            deadline = time.monotonic() + 120
            while _done(db) == 0:  # the first unit's results are in
                assert run.poll() is None, run.stdout.read() if run.stdout else ""
                assert time.monotonic() < deadline
                time.sleep(0.02)
            killed_at = _done(db)
            os.killpg(workers[0].pid, signal.SIGKILL)
            out, _ = run.communicate(timeout=300)
        finally:
            if run.poll() is None:
                run.kill()
        assert run.returncode == 0, out
        assert killed_at < len(expected), "the run finished before the worker was killed"
        assert workers[0].poll() is not None and workers[1].poll() is None
    results, dup_scores = _results(db)
    assert results == expected  # every experiment done, the same AUROCs, no duplicates
    assert {status for status, _ in results.values()} == {"done"} and dup_scores == 0
