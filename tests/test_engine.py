"""The Dask engine: a real ``dask scheduler`` + two ``dask worker`` processes via engine.address."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.engine import THREAD_ENV_VARS, thread_env
from stages.evaluate import evaluate
from stages.results_db import experiments, open_db
from tests.eval_fixtures import make_workspace

REPO = Path(__file__).resolve().parents[1]
DASK = Path(sys.executable).with_name("dask")


def test_thread_env_caps_every_pool():
    assert thread_env(2) == dict.fromkeys(THREAD_ENV_VARS, "2")


@pytest.mark.slow
@pytest.mark.skipif(not DASK.exists() and not shutil.which("dask"), reason="no dask CLI")
def test_external_scheduler_and_two_workers_run_a_small_grid(tmp_path):
    dask = str(DASK) if DASK.exists() else "dask"
    scheduler_file = tmp_path / "scheduler.json"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),  # workers import stages.* (shared code, shared filesystem)
        "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0",
        "DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION": "1.0",
        **thread_env(1),
    }
    common = ["--scheduler-file", str(scheduler_file), "--no-dashboard"]
    procs = [
        subprocess.Popen(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", "0", *common],
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        for _ in range(2):
            procs.append(
                subprocess.Popen([dask, "worker", "--nthreads", "1", "--memory-limit", "2GiB",
                                  "--host", "127.0.0.1", *common], env=env, cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )  # fmt: skip
        detectors = [
            {"family": "OneClassSVM", "grid": {"kernel": ["linear", "rbf"]}},
            {"family": "LocalOutlierFactor", "grid": {"n_neighbors": [4, 8]}},
            {"family": "IsolationForest", "grid": {"n_estimators": [10]}},
        ]
        params = make_workspace(
            tmp_path,
            categories={"bottle": ["hflip"], "screw": []},
            extractors=[("resnet18", "imagenet", "layer2", "flatten")],
            evaluate={"detectors": detectors, "engine": {"address": address}},
        )
        summary = evaluate(params)
        assert summary["experiments"] == summary["done"] == (2 + 1) * 5
        db_url = f"sqlite:///{tmp_path / 'results' / 'results.sqlite'}"
        rows = experiments(open_db(db_url))
        assert len(rows) == 15 and {r["status"] for r in rows} == {"done"}
        assert {r["augmented"] for r in rows if r["category"] == "bottle"} == {False, True}
        assert {r["augmented"] for r in rows if r["category"] == "screw"} == {False}
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
