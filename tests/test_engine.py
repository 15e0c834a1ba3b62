"""The Dask engine: a real ``dask scheduler`` + two ``dask worker`` processes via engine.address."""

from __future__ import annotations

import os

import pytest
from distributed import Client

from stages.engine import THREAD_ENV_VARS, EngineParams, dask_client, thread_env
from stages.evaluate import evaluate
from stages.results_db import experiments, open_db
from tests.eval_fixtures import make_workspace
from tests.test_scale_out import DASK, dask_cluster


def test_thread_env_caps_every_pool():
    assert thread_env(2) == dict.fromkeys(THREAD_ENV_VARS, "2")


@pytest.mark.slow
@pytest.mark.skipif(not DASK.exists(), reason="no dask CLI")
def test_external_scheduler_and_two_workers_run_a_small_grid(tmp_path):
    detectors = [
        {"family": "OneClassSVM", "grid": {"kernel": ["linear", "rbf"]}},
        {"family": "LocalOutlierFactor", "grid": {"n_neighbors": [4, 8]}},
        {"family": "IsolationForest", "grid": {"n_estimators": [10]}},
    ]
    with dask_cluster(tmp_path) as (address, _workers):
        params = make_workspace(
            tmp_path,
            categories={"bottle": ["hflip"], "screw": []},
            extractors=[("resnet18", "imagenet", "layer2", "flatten")],
            evaluate={"detectors": detectors, "engine": {"address": address}},
        )
        summary = evaluate(params)
        with Client(address) as client:  # README's .dask config reached the workers
            envs = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        assert list(envs.values()) == [None, None]
    assert summary["experiments"] == summary["done"] == (2 + 1) * 5
    db_url = f"sqlite:///{tmp_path / 'results' / 'results.sqlite'}"
    rows = experiments(open_db(db_url))
    assert len(rows) == 15 and {r["status"] for r in rows} == {"done"}
    assert {r["augmented"] for r in rows if r["category"] == "bottle"} == {False, True}
    assert {r["augmented"] for r in rows if r["category"] == "screw"} == {False}


def _malloc_env() -> str | None:
    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def test_local_workers_keep_glibcs_dynamic_malloc_thresholds() -> None:
    """Dask's MALLOC_TRIM_THRESHOLD_ freezes glibc's mmap threshold: every large array is
    mapped anew, which doubled the extraction's wall time. The stages' workers unset it."""
    with dask_client(EngineParams(n_workers=1)) as client:
        assert client.submit(_malloc_env, pure=False).result() is None
