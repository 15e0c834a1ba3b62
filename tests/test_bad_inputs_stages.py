"""Inputs that do not belong together, failures that are not outcomes, one run per database.

Each case runs the real stages end to end on a tiny dataset (issue "Bad input, round two"):
a stale or missing upstream output is one line saying which stage to rerun, exit 2, nothing
written; after the fix the same command continues. Only what an experiment hits on valid
input is a stored ``failed`` row; a hyperparameter scikit-learn rejects is a params error;
``report`` with nothing done says so; a second evaluate on one database is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from stages.features import MANIFEST
from tests.eval_fixtures import make_workspace
from tests.extract_fixtures import CATEGORIES, make_dataset
from tests.mvtec_fixtures import error_line, run_stage

ALPHA = {"alpha": CATEGORIES["alpha"]}  # RGB, transforms [rot90, hflip]; 6 train, 4 test
ONE_WORKER = {"n_workers": 1, "threads_per_worker": 1, "memory_limit": "2GiB"}
LOF = {"family": "LocalOutlierFactor", "grid": {"n_neighbors": [2, 4]}, "fixed": {"novelty": True}}
# The no-network baseline: two feature sets of one value each (fast, same dimension).
PIXELS = {"backbone": "pixels", "init": "none", "layers": ["gray16", "gray32"],
          "representations": ["avg"]}  # fmt: skip
N_TRAIN, N_AUGMENTED = 6, 12


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr
    return result


def pipeline(root: Path, **evaluate: Any) -> Path:
    """The tiny dataset's image and augment indexes, and params for extract (pixels) and
    evaluate (LOF); every path relative to ``root``, where the stages run."""
    sections = make_dataset(root, ALPHA)
    params = {
        **sections,
        "extract": {"num_workers": 0, "decoded_cache": False, "extractors": [PIXELS],
                    "engine": ONE_WORKER},
        "evaluate": {"db_url": "sqlite:///results/results.sqlite",
                     "summary": "results/evaluate_summary.json", "scratch": "cache/evaluate",
                     "threshold_folds": 0, "engine": ONE_WORKER, "detectors": [LOF],
                     **evaluate},
    }  # fmt: skip
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def edit(params: Path, section: str, **values: Any) -> None:
    raw = yaml.safe_load(params.read_text())
    raw[section].update(values)
    params.write_text(yaml.safe_dump(raw, sort_keys=False))


def rows(db: Path, columns: str = "augmented, n_train, status") -> list[tuple]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(f"SELECT {columns} FROM experiments ORDER BY key").fetchall()


def snapshot(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` with its modification time (to prove nothing was written)."""
    if not folder.exists():
        return {}
    return {str(p): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def feature_folder(root: Path, layer: str = "gray16") -> Path:
    return root / "cache/features/alpha/pixels-none" / layer / "avg"


# --- the augmented index: missing, other transforms, another category, other images ---------


@pytest.mark.slow
def test_missing_augment_index_stops_extract_and_evaluate_then_both_continue(tmp_path: Path):
    """The issue's example: without the augment index, extract and evaluate run directly must
    not make ``augmented`` experiments that trained on the originals only."""
    params = pipeline(tmp_path)
    index = tmp_path / "cache/augment/index.parquet"
    index.unlink()
    line = error_line(run_stage("extract", tmp_path))
    assert "cache/augment/index.parquet: augmented image index missing" in line, line
    assert "augment.transforms.alpha" in line and "augment stage" in line, line
    assert not (tmp_path / "cache/features").exists()

    ok(run_stage("augment", tmp_path))  # the fix the line names: the same command continues
    ok(run_stage("extract", tmp_path))

    index.unlink()  # gone again, now between extract and evaluate
    line = error_line(run_stage("evaluate", tmp_path))
    assert "cache/augment/index.parquet: augmented image index missing" in line, line
    assert not (tmp_path / "results").exists()

    ok(run_stage("augment", tmp_path))
    ok(run_stage("evaluate", tmp_path))
    stored = rows(tmp_path / "results/results.sqlite")
    assert {r[2] for r in stored} == {"done"} and len(stored) == 2 * 2 * 2
    assert {(r[0], r[1]) for r in stored} == {(0, N_TRAIN), (1, N_TRAIN + N_AUGMENTED)}
    assert params.exists()


@pytest.mark.parametrize("case", ["other transforms", "category missing", "other images"])
def test_augment_index_not_matching_the_params_or_the_image_index(tmp_path: Path, case: str):
    params = pipeline(tmp_path)
    index = tmp_path / "cache/augment/index.parquet"
    table = pq.read_table(index)
    if case == "other transforms":
        edit(params, "augment", transforms={"alpha": ["rot90", "vflip"]})
        expect = "are for transforms ['rot90', 'hflip'], but augment.transforms.alpha is ['rot90', 'vflip']"
    elif case == "category missing":
        pq.write_table(table.slice(0, 0), index)
        expect = "no augmented images of category 'alpha', but augment.transforms.alpha"
    else:  # a training image replaced after augmenting (the image index lists the new one)
        dataset = tmp_path / "cache/dataset/index.parquet"
        images = pq.read_table(dataset).to_pylist()
        images[0]["sha256"] = "0" * 64
        pq.write_table(pq.read_table(dataset).from_pylist(images), dataset)
        expect = f"was not made from the training image cache/dataset/index.parquet lists as {images[0]['image_id']}"
    line = error_line(run_stage("extract", tmp_path))
    assert line.startswith("error: cache/augment/index.parquet: "), line
    assert expect in line and line.endswith("rerun the augment stage (dvc repro augment)"), line
    assert not (tmp_path / "cache/features").exists()


@pytest.mark.parametrize("stage", ["augment", "extract"])
def test_image_index_without_a_configured_category(tmp_path: Path, stage: str):
    params = pipeline(tmp_path)
    raw = yaml.safe_load(params.read_text())
    raw["data"]["categories"] = ["alpha", "gamma"]
    raw["augment"]["transforms"]["gamma"] = []
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    before = snapshot(tmp_path / "cache")
    line = error_line(run_stage(stage, tmp_path))
    assert line == ("error: cache/dataset/index.parquet: no training images of category 'gamma' "
                    "(data.categories lists it); rerun the dataset stage (dvc repro dataset)")  # fmt: skip
    assert snapshot(tmp_path / "cache") == before  # nothing written, nothing removed


@pytest.mark.slow
def test_features_older_than_the_augment_index_stop_evaluate(tmp_path: Path):
    """The augment stage reran with other transforms after extract: evaluate run directly
    must not train ``augmented`` experiments on the old copies."""
    params = pipeline(tmp_path)
    ok(run_stage("extract", tmp_path))
    edit(params, "augment", transforms={"alpha": ["rot90"]})
    ok(run_stage("augment", tmp_path))
    line = error_line(run_stage("evaluate", tmp_path))
    assert str(feature_folder(tmp_path).relative_to(tmp_path)) in line, line
    assert "content hash differs" in line and "rerun the extract stage" in line, line
    assert not (tmp_path / "results").exists()

    ok(run_stage("extract", tmp_path))
    ok(run_stage("evaluate", tmp_path))
    stored = rows(tmp_path / "results/results.sqlite")
    assert {(r[0], r[1]) for r in stored} == {(0, N_TRAIN), (1, N_TRAIN + N_TRAIN)}


# --- feature sets that do not agree with their manifest ---------------------------------------


def _break_features(root: Path, case: str) -> str:
    """Damage the extract stage's output; returns what the error line must contain."""
    folder = feature_folder(root)
    shard = folder / "part-00000.parquet"
    if case == "truncated shard":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
        return f"{shard.relative_to(root)}: unreadable feature shard"
    if case == "deleted manifest":
        (folder / MANIFEST).unlink()
        return f"{folder.relative_to(root)}: feature set incomplete (no manifest.json)"
    if case == "deleted shard":
        shard.unlink()
        return f"{shard.relative_to(root)}: feature shard missing"
    if case == "shard of another feature set":
        shutil.copyfile(feature_folder(root, "gray32") / "part-00000.parquet", shard)
        return (
            f"{shard.relative_to(root)}: feature shard not the one manifest.json was written with"
        )
    if case == "manifest not JSON":
        (folder / MANIFEST).write_text("{not json")
        return f"{(folder / MANIFEST).relative_to(root)}: unreadable feature-set manifest"
    manifest = json.loads((folder / MANIFEST).read_text())  # rows edited by hand
    (folder / MANIFEST).write_text(json.dumps({**manifest, "n_rows": manifest["n_rows"] + 1}))
    return "n_rows"


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pipeline's project after one extract run (every path in it relative), which each
    damage case copies instead of extracting again."""
    root = tmp_path_factory.mktemp("extracted")
    pipeline(root)
    ok(run_stage("extract", root))
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    ["truncated shard", "deleted manifest", "deleted shard", "shard of another feature set",
     "manifest not JSON", "manifest rows edited"],
)  # fmt: skip
def test_damaged_feature_set_stops_evaluate_then_extract_repairs_it(
    extracted: Path, tmp_path: Path, case: str
):
    shutil.copytree(extracted, tmp_path, symlinks=True, dirs_exist_ok=True)
    expect = _break_features(tmp_path, case)
    line = error_line(run_stage("evaluate", tmp_path))
    assert expect in line and "rerun the extract stage" in line, line
    assert not (tmp_path / "results").exists()  # no failed row, no summary, no database

    ok(run_stage("extract", tmp_path))  # the line's fix; then the same command continues
    ok(run_stage("evaluate", tmp_path))
    assert {r[2] for r in rows(tmp_path / "results/results.sqlite")} == {"done"}


def _workspace(root: Path, **evaluate: Any) -> Path:
    """Feature sets written directly (no images), params with absolute paths."""
    return make_workspace(root, categories={"alpha": []},
                          extractors=[("resnet18", "random", "layer4", "avg")],
                          evaluate={"detectors": [LOF], "engine": ONE_WORKER,
                                    "threshold_folds": 0, **evaluate})  # fmt: skip


def _evaluate(params: Path, **env: str) -> subprocess.CompletedProcess:
    return run_stage("evaluate", params.parent, "--params", str(params), env=env)


@pytest.mark.slow
def test_shard_unreadable_when_a_worker_reads_it_stops_the_stage(tmp_path: Path):
    """The footer is intact (the plan-time check passes), the feature column's page is not:
    the worker's read error stops the stage instead of becoming failed rows."""
    params = _workspace(tmp_path)
    shard = next((tmp_path / "features").rglob("part-00000.parquet"))
    original = shard.read_bytes()
    column = pq.read_metadata(shard).row_group(0).column(5)  # the feature column
    start = column.data_page_offset
    damaged = bytearray(original)
    damaged[start : start + 64] = b"\xff" * 64
    shard.write_bytes(bytes(damaged))
    line = error_line(_evaluate(params))
    assert f"{shard}: unreadable feature shard" in line and "rerun the extract stage" in line
    db = tmp_path / "results/results.sqlite"
    assert not db.exists() or rows(db) == []

    shard.write_bytes(original)
    ok(_evaluate(params))
    assert {r[2] for r in rows(db)} == {"done"}


@pytest.mark.slow
def test_rows_stored_failed_for_an_input_problem_are_run_again(tmp_path: Path):
    """A database from before inputs were checked: experiments stored ``failed`` because a
    manifest or shard could not be read are not final; a real failure stays final."""
    params = _workspace(tmp_path, detectors=[{**LOF, "grid": {"n_neighbors": [2, 4, 6]}}])
    ok(_evaluate(params))
    db = tmp_path / "results/results.sqlite"
    keys = [k for (k,) in rows(db, "key")]
    folder = next((tmp_path / "features").rglob(MANIFEST)).parent
    stored_errors = {
        keys[0]: f"stages.errors.UserError: {folder}: feature set incomplete (no manifest.json); "
                 "rerun the extract stage (at /x/stages/features.py:84)",
        keys[1]: "pyarrow.lib.ArrowInvalid: Parquet magic bytes not found in footer. Either the "
                 "file is corrupted or this is not a parquet file. (at pyarrow/error.pxi:92)",
        keys[2]: "ValueError: the covariance matrix is singular (at /x/sklearn/covariance.py:1)",
    }  # fmt: skip
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        for key, error in stored_errors.items():
            conn.execute("UPDATE experiments SET status='failed', auroc=NULL, error=? "
                         "WHERE key=?", (error, key))  # fmt: skip
    rerun = ok(_evaluate(params))  # no OOD_RETRY_FAILED
    assert "2 experiments stored as failed because their input could not be read" in rerun.stderr
    after = {k: (s, a) for k, s, a in rows(db, "key, status, attempts")}
    assert after[keys[0]] == ("done", 2) and after[keys[1]] == ("done", 2)
    assert after[keys[2]] == ("failed", 1)  # an outcome of the experiment: final


# --- the listing, the augmentation policy ------------------------------------------------------


def test_feature_sets_not_covering_a_configured_category(tmp_path: Path):
    params = _workspace(tmp_path)
    raw = yaml.safe_load(params.read_text())
    raw["data"]["categories"] = ["alpha", "beta"]
    raw["augment"]["transforms"]["beta"] = []
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    line = error_line(_evaluate(params))
    listing = tmp_path / "features/feature_sets.json"
    assert f"{listing}: no feature sets of category 'beta'" in line, line
    assert "rerun the extract stage" in line and not (tmp_path / "results").exists()


def test_augmentation_both_without_transforms_is_refused(tmp_path: Path):
    params = _workspace(tmp_path, augmentation="both")
    line = error_line(_evaluate(params))
    assert "evaluate.augmentation: both plans augmented experiments for 'alpha'" in line, line
    assert "augment.transforms.alpha is []" in line and not (tmp_path / "results").exists()


# --- hyperparameters scikit-learn rejects: params errors at plan time --------------------------


@pytest.mark.parametrize(
    ("detector", "key", "shown"),
    [
        ({**LOF, "fixed": {"novelty": True, "metric": "foo"}}, "[0].fixed.metric", "Got 'foo'"),
        ({"family": "KernelDensity", "grid": {"metric": ["euclidean", "mahalanobis"]}},
         "[0].grid.metric", "metric='mahalanobis'"),
        ({"family": "OneClassSVM", "fixed": {"max_iter": -2}}, "[0].fixed.max_iter", "Got -2"),
        ({"family": "LocalOutlierFactor", "grid": {"metric": ["seuclidean"]}},
         "[0].grid.metric", "metric='seuclidean'"),
    ],
)  # fmt: skip
def test_hyperparameter_scikit_learn_rejects_fails_the_plan(
    tmp_path: Path, detector: dict, key: str, shown: str
):
    params = _workspace(tmp_path, detectors=[detector])
    line = error_line(_evaluate(params))
    assert line.startswith(f"error: {params}: evaluate.detectors{key}: scikit-learn's "), line
    assert shown in line, line
    assert not (tmp_path / "results").exists()  # nothing stored as failed


@pytest.mark.slow
def test_rejected_hyperparameter_fixed_then_the_same_command_runs(tmp_path: Path):
    params = _workspace(tmp_path, detectors=[{**LOF, "fixed": {"novelty": True, "metric": "foo"}}])
    error_line(_evaluate(params))
    edit(params, "evaluate", detectors=[{**LOF, "fixed": {"novelty": True, "metric": "l1"}}])
    ok(_evaluate(params))
    assert {r[2] for r in rows(tmp_path / "results/results.sqlite")} == {"done"}


# --- report with nothing done --------------------------------------------------------------------


def _with_report(params: Path, root: Path) -> None:
    raw = yaml.safe_load(params.read_text())
    raw["data"]["stats_dir"] = str(root / "results/dataset")
    raw["report"] = {"out": str(root / "report")}
    params.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.mark.slow
def test_report_with_no_done_experiment_writes_its_outputs_saying_so(tmp_path: Path):
    # max_features > 16 dimensions: every experiment fails on these features (an outcome)
    failing = {"family": "IsolationForest", "fixed": {"max_features": 1000, "n_estimators": 5}}
    params = _workspace(tmp_path, detectors=[failing])
    ok(_evaluate(params))
    assert {r[2] for r in rows(tmp_path / "results/results.sqlite")} == {"failed"}
    _with_report(params, tmp_path)
    ok(run_stage("report", tmp_path, "--params", str(params)))
    out = tmp_path / "report"
    assert "No experiment is done" in (out / "report.md").read_text()
    assert (out / "figures").is_dir() and (out / "plots/roc").is_dir()  # DVC's declared outs
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["done"], metrics["failed"]) == (0, 1)
    assert (out / "experiments.csv").read_text().count("\n") == 2  # header and the row

    # None of the current grid stored at all (the grid changed): said so too, exit 0.
    edit(params, "evaluate", detectors=[LOF])
    ok(run_stage("report", tmp_path, "--params", str(params)))
    assert "No experiments of the current grid are stored" in (out / "report.md").read_text()
    assert (out / "figures").is_dir()


# --- two evaluate runs on one database -------------------------------------------------------------


@pytest.mark.slow
def test_second_evaluate_on_one_database_is_refused_and_a_killed_run_leaves_no_lock(
    tmp_path: Path,
):
    slow = {"family": "hang", "grid": {"seconds": [3.0, 3.5, 4.0]}}
    params = _workspace(tmp_path, detectors=[slow], allow_test_detectors=True)
    lock = tmp_path / "results/results.sqlite.lock"
    command = [sys.executable, "-m", "stages.evaluate", "--params", str(params)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    first = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and first.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                if json.loads(lock.read_text())["pid"] == first.pid:
                    break
            time.sleep(0.05)
        assert first.poll() is None, "the first run should still be running"
        line = error_line(_evaluate(params))
        assert f"{tmp_path / 'results/results.sqlite'}: another evaluate run" in line, line
        assert f"pid {first.pid} on " in line and str(lock) in line, line

        os.kill(first.pid, signal.SIGKILL)  # the stage only: its workers may outlive it
        first.wait()
        ok(_evaluate(params))  # the kernel released the lock with the killed process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert {r[2] for r in rows(tmp_path / "results/results.sqlite")} == {"done"}
