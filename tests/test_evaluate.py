"""Evaluate stage: grid size, parity with plain scikit-learn, crash/timeout isolation, resume."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.covariance import EllipticEnvelope
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.neighbors import KernelDensity, LocalOutlierFactor
from sklearn.pipeline import make_pipeline
from sklearn.svm import OneClassSVM

from stages.engine import EngineParams, dask_client
from stages.errors import UserError
from stages.evaluate import FeatureSetEntry, evaluate, plan
from stages.features import load_feature_set
from stages.methods import expand_detectors
from stages.metrics import ranking_metrics
from stages.params import load_params
from stages.results_db import ExperimentRow, experiments, open_db, score_row_count, scores_of
from stages.results_db import upsert as db_upsert
from tests.eval_fixtures import make_workspace, study_detectors

REPO = Path(__file__).resolve().parents[1]
EXTRACTOR = ("resnet18", "imagenet", "layer2", "flatten")


@pytest.fixture(scope="module")
def client():
    """One LocalCluster for the in-process tests (the stage's own engine settings)."""
    with dask_client(EngineParams(n_workers=2, memory_limit="2GiB")) as c:
        yield c


def _db(params: Path):
    return open_db(yaml.safe_load(params.read_text())["evaluate"]["db_url"])


# --- grid ------------------------------------------------------------------------------------


def test_study_grid_is_the_studys_71_configs():
    configs = expand_detectors(study_detectors())
    by_family = {f: sum(c.family == f for c in configs) for f in {c.family for c in configs}}
    assert len(configs) == len(set(configs)) == 71
    assert by_family == {"OneClassSVM": 10, "IsolationForest": 19, "KernelDensity": 24,
                         "LocalOutlierFactor": 14, "EllipticEnvelope": 4}  # fmt: skip


def test_study_preset_expands_to_68160_experiments():
    path = REPO / "params" / "study.yaml"
    params = load_params(path)
    evaluate_section = params.evaluate or {}
    configs = expand_detectors(evaluate_section["detectors"])
    feature_sets = [
        FeatureSetEntry(category=c, backbone=x["backbone"], init=x["init"], layer=layer,
                        representation=r, folder="-", content_hash="-")
        for c in params.data.categories
        for x in (params.extract or {})["extractors"]
        for layer in x["layers"]
        for r in x.get("representations", ["flatten"])
    ]  # fmt: skip
    assert len(params.data.categories) == 15 and len(feature_sets) == 15 * 32
    for policy, expected in (("auto", 68_160), ("both", 68_160), ("off", 34_080)):
        units = plan(feature_sets, params.augment.transforms, configs, [0], policy)
        keys = {e.key for _, exps in units for e in exps}
        assert len(keys) == sum(len(exps) for _, exps in units) == expected
    assert evaluate_section["augmentation"] == "auto"


def test_more_seeds_repeat_only_the_stochastic_families():
    configs = expand_detectors(study_detectors())
    fs = FeatureSetEntry(category="disc", backbone="resnet18", init="random", layer="layer4",
                         representation="avg", folder="-", content_hash="-")  # fmt: skip
    [(_, experiments)] = plan([fs], {"disc": []}, configs, [3, 1, 2])
    seeds_of: dict[str, list[int]] = {}
    for exp in experiments:
        seeds_of.setdefault(exp.detector.family, []).append(exp.seed)
    # IsolationForest (19) and EllipticEnvelope (4) per seed; the rest once, under seed 3
    assert len(experiments) == 71 + 2 * (19 + 4)
    assert sorted(set(seeds_of["IsolationForest"])) == [1, 2, 3]
    assert set(seeds_of["EllipticEnvelope"]) == {1, 2, 3}
    for family in ("OneClassSVM", "KernelDensity", "LocalOutlierFactor"):
        assert set(seeds_of[family]) == {3}


@pytest.mark.parametrize(
    ("detectors", "message"),
    [
        ([{"family": "LocalOutlierFactor", "grid": {"n_neighbors": [2, 2.5]}}],
         r"evaluate\.detectors\[0\]\.grid\.n_neighbors: .*integer.*2\.5"),
        ([{"family": "KernelDensity"}, {"family": "IsolationForest", "grid": {"trees": [1]}}],
         r"evaluate\.detectors\[1\]\.grid\.trees: unknown hyperparameter of IsolationForest"),
        ([{"family": "SVDD"}], r"unknown detector family 'SVDD' \(known: OneClassSVM, "),
        ([{"family": "crash"}], r"evaluate\.detectors\[0\]\.family: 'crash' is a test-only"),
        ([{"family": "OneClassSVM", "grid": {"kernel": ["rbf"]}},
          {"family": "OneClassSVM", "fixed": {"kernel": "rbf"}}], r"already in"),
    ],
)  # fmt: skip
def test_bad_detector_grids_are_one_line_errors(tmp_path, detectors, message):
    params = make_workspace(tmp_path, categories={"screw": []}, extractors=[EXTRACTOR],
                            evaluate={"detectors": detectors})  # fmt: skip
    with pytest.raises(UserError, match=message) as info:
        evaluate(params)
    assert "\n" not in str(info.value)


# --- parity with plain scikit-learn ----------------------------------------------------------


def _plain_sklearn(family: str, kw: dict, seed: int, n_train: int, dim: int):
    """The per-config estimator written out by hand, as the study did."""
    if family == "OneClassSVM":
        return OneClassSVM(**kw)
    if family == "IsolationForest":
        return IsolationForest(**kw, random_state=seed)
    if family == "KernelDensity":
        return KernelDensity(**kw)
    if family == "LocalOutlierFactor":
        return LocalOutlierFactor(**kw)
    assert family == "EllipticEnvelope"
    k = min(kw["pca_components"], n_train, dim)
    return make_pipeline(PCA(n_components=k, svd_solver="full", random_state=seed),
                         EllipticEnvelope(random_state=seed))  # fmt: skip


def test_stored_auroc_equals_plain_sklearn_for_all_71_configs(tmp_path, client):
    params = make_workspace(tmp_path, categories={"bottle": ["rot90"]}, extractors=[EXTRACTOR],
                            evaluate={"seeds": [3], "augmentation": "off", "shared": False},
                            n_train=40, n_test=24, dims=(12,))  # fmt: skip
    folder = json.loads((tmp_path / "features" / "feature_sets.json").read_text())[0]["folder"]
    fs = load_feature_set(folder)
    X_train, X_test = fs.X[fs.rows("train", False)], fs.X[fs.rows("test")]
    y = fs.is_anomaly[fs.rows("test")]
    test_ids = fs.image_id[fs.rows("test")]
    with ThreadPoolExecutor(1) as pool:  # the stage runs on a worker while we compute here
        stage = pool.submit(evaluate, params, client)
        expected_scores = {}
        for config in expand_detectors(study_detectors()):
            model = _plain_sklearn(config.family, config.kwargs, 3, *X_train.shape)
            expected_scores[config.name] = -model.fit(X_train).score_samples(X_test)
        summary = stage.result()
    assert summary["experiments"] == summary["done"] == 71
    db = _db(params)
    rows = experiments(db)
    assert len(rows) == 71 and score_row_count(db) == 71 * 24
    nonfinite = 0
    for row in rows:
        expected = expected_scores[row["detector_name"]]
        assert row["status"] == "done", row
        # the same estimators on the same features (the stage's in a worker): the same
        # scores to rounding, so the same metrics under the tie rule, exactly
        metrics = {"auroc": row["auroc"], "average_precision": row["average_precision"]}
        assert metrics == ranking_metrics(y, expected), row
        stored = scores_of(db, row["key"])
        got = np.array([np.nan if stored[i] is None else stored[i] for i in test_ids])
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
        assert row["n_posinf"] == np.isposinf(expected).sum()
        nonfinite += row["n_posinf"] + row["n_neginf"] + row["n_nan"]
        assert (row["n_train"], row["n_test"], row["dim"]) == (40, 24, 12)
    assert nonfinite > 0  # compact KDE kernels give +inf: the explicit policy was exercised
    db.dispose()


# --- crash and timeout isolation -------------------------------------------------------------


def test_crash_and_hang_give_one_crashed_and_one_timeout_row(tmp_path, client):
    detectors = [
        {"family": "OneClassSVM", "grid": {"kernel": ["linear", "rbf"]}},
        {"family": "crash"},
        {"family": "KernelDensity", "grid": {"bandwidth": [0.5, 1.0]}},
        {"family": "hang"},
        {"family": "LocalOutlierFactor", "grid": {"n_neighbors": [2, 4]}},
    ]
    params = make_workspace(tmp_path, categories={"screw": []}, extractors=[EXTRACTOR],
                            evaluate={"detectors": detectors, "allow_test_detectors": True,
                                      "timeout_s": 1.5})  # fmt: skip
    summary = evaluate(params, client=client)
    assert (summary["done"], summary["crashed"], summary["timeout"]) == (6, 1, 1)
    rows = {r["detector"]: r for r in experiments(_db(params))}
    assert "SIGABRT" in rows["crash"]["error"] and rows["crash"]["status"] == "crashed"
    assert rows["hang"]["status"] == "timeout" and "timeout_s=1.5" in rows["hang"]["error"]
    # A rerun has nothing left to do: crashed/timeout are final unless a retry is asked.
    again = evaluate(params, client=client)
    assert again["ran"] == 0 and again["done"] == 6
    assert all(r["attempts"] == 1 for r in experiments(_db(params)))


def test_failed_experiments_are_retried_only_when_asked(tmp_path, client, monkeypatch):
    # max_features > the 16 feature dimensions: valid for scikit-learn's parameter check, so
    # planned, but the fit fails on these features (an outcome of the experiment). A value
    # scikit-learn rejects outright (e.g. metric: no-such-metric) is a params error instead.
    detectors = [{"family": "IsolationForest", "grid": {"max_features": [1, 1000]},
                  "fixed": {"n_estimators": 10}}]  # fmt: skip
    params = make_workspace(tmp_path, categories={"screw": []}, extractors=[EXTRACTOR],
                            evaluate={"detectors": detectors})  # fmt: skip
    first = evaluate(params, client=client)
    assert (first["done"], first["failed"]) == (1, 1)
    assert evaluate(params, client=client)["ran"] == 0
    monkeypatch.setenv("OOD_RETRY_FAILED", "1")
    retried = evaluate(params, client=client)
    assert (retried["ran"], retried["done"], retried["failed"]) == (1, 1, 1)
    rows = {r["status"]: r for r in experiments(_db(params))}
    assert rows["failed"]["attempts"] == 2 and rows["done"]["attempts"] == 1
    assert "max_features" in rows["failed"]["error"]


# --- resume after SIGKILL --------------------------------------------------------------------

RESUME_GRID = {
    "detectors": [
        {"family": "KernelDensity", "grid": {"bandwidth": [0.5, 1.0]}},
        {"family": "hang", "grid": {"seconds": [0.15, 0.25]}},  # slow but finite
    ],
    "allow_test_detectors": True,
}


def _count_done(db_file: Path) -> int:
    if not db_file.exists():
        return 0
    try:
        with sqlite3.connect(db_file, timeout=1) as con:
            return con.execute("select count(*) from experiments where status='done'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _comparable(params: Path) -> list[tuple]:
    return sorted((r["key"], r["status"], r["auroc"]) for r in experiments(_db(params)))


@pytest.mark.slow
def test_sigkill_and_resume_matches_an_uninterrupted_run(tmp_path, client):
    categories = {"bottle": ["rot90"], "screw": [], "pill": []}
    extractors = [EXTRACTOR, ("resnet18", "random", "layer3", "flatten")]
    total = (2 + 1 + 1) * 2 * 4
    killed = make_workspace(tmp_path / "killed", categories=categories, extractors=extractors,
                            evaluate=RESUME_GRID)  # fmt: skip
    reference = make_workspace(tmp_path / "reference", categories=categories,
                               extractors=extractors, evaluate=RESUME_GRID)  # fmt: skip
    command = [sys.executable, "-m", "stages.evaluate", "--params", str(killed)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    db_file = tmp_path / "killed" / "results" / "results.sqlite"
    proc = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while _count_done(db_file) == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        done_at_kill = _count_done(db_file)
        os.killpg(proc.pid, signal.SIGKILL)  # the stage and its Dask workers, like `dvc repro`
    finally:
        proc.wait()
    assert 0 < done_at_kill < total, "the kill should land mid-run"
    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert "skip " in finished.stderr and "done" in finished.stderr
    assert evaluate(reference, client=client)["done"] == total
    resumed_rows = _comparable(killed)
    assert len(resumed_rows) == len({r[0] for r in resumed_rows}) == total
    assert resumed_rows == _comparable(reference)
    summary = json.loads((tmp_path / "killed" / "results" / "evaluate_summary.json").read_text())
    assert summary["done"] == total and summary["pending"] == 0


# --- the store -------------------------------------------------------------------------------


def test_upsert_is_idempotent_on_the_key(tmp_path):
    db = open_db(f"sqlite:///{tmp_path / 'r.sqlite'}")
    config = {"category": "screw", "augmented": False, "backbone": "b", "init": "i",
              "layer": "l", "representation": "flatten", "detector": "KernelDensity",
              "hyperparams": "{}", "detector_name": "KernelDensity()", "seed": 0,
              "feature_hash": "h"}  # fmt: skip
    row = ExperimentRow("k1", config, "done", auroc=0.75, image_ids=["a", "b"],
                        defect_types=["good", "crack"], is_anomaly=[False, True],
                        scores=[0.1, float("inf")])  # fmt: skip
    db_upsert(db, [row], "v")
    db_upsert(db, [row], "v")
    db_upsert(db, [ExperimentRow("k2", config | {"seed": 1}, "failed", error="boom")], "v")
    rows = experiments(db)
    assert [(r["key"], r["attempts"], r["status"]) for r in rows] == [
        ("k1", 2, "done"),
        ("k2", 1, "failed"),
    ]
    assert score_row_count(db) == 2 and scores_of(db, "k1") == {"a": 0.1, "b": float("inf")}
    with open(tmp_path / "r.sqlite-wal", "rb"):  # WAL mode is on
        pass


@pytest.mark.skipif(not os.environ.get("OOD_TEST_POSTGRES_URL"), reason="no PostgreSQL server")
def test_postgresql_store(tmp_path, client):
    """Optional: set OOD_TEST_POSTGRES_URL=postgresql+psycopg://user@host/db (emptied first)."""
    from sqlalchemy import create_engine

    from stages.results_db import Base

    url = os.environ["OOD_TEST_POSTGRES_URL"]
    Base.metadata.drop_all(create_engine(url))
    params = make_workspace(
        tmp_path,
        categories={"screw": []},
        extractors=[EXTRACTOR],
        evaluate={"db_url": url, "detectors": RESUME_GRID["detectors"][:1]},
    )
    assert evaluate(params, client=client)["done"] == 2
    assert evaluate(params, client=client)["ran"] == 0
    with pytest.raises(UserError):
        # sanity: a wrong URL is a one-line error, not a traceback
        open_db("nosuchdialect://x")
    assert len(experiments(open_db(url))) == 2
