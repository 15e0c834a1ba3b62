"""Bad inputs end to end through the stage CLIs: one line, exit 2, nothing half-written, and a
rerun after fixing the input continues where it stopped (README "Bad input")."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from stages.features import MANIFEST, SHARD_HASH_KEY, load_feature_set
from tests.eval_fixtures import make_workspace
from tests.extract_fixtures import CATEGORIES, make_dataset
from tests.extract_fixtures import write_params as write_extract_params
from tests.mvtec_fixtures import error_line, make_mvtec, run_stage, stage_env, write_params
from tests.test_dataset import BAD_LAYOUTS, break_dataset

ONE_CATEGORY = {"alpha": CATEGORIES["alpha"]}
LOF = {"family": "LocalOutlierFactor", "grid": {"n_neighbors": [2, 4]}, "fixed": {"novelty": True}}
ONE_WORKER = {"n_workers": 1, "threads_per_worker": 1, "memory_limit": "2GiB"}


# --- dataset: every bad layout through the CLI, then fixed and rerun ------------------------


@pytest.mark.parametrize("case", sorted(BAD_LAYOUTS))
def test_dataset_cli_bad_layout_then_fixed_rerun(tmp_path: Path, case: str) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    named = break_dataset(root, case)
    write_params(tmp_path / "params.yaml", root, ["alpha", "beta"])
    line = error_line(run_stage("dataset", tmp_path))
    assert str(named) in line and BAD_LAYOUTS[case] in line, line
    assert not (tmp_path / "cache").exists() and not (tmp_path / "results").exists()

    shutil.rmtree(root, ignore_errors=True)
    make_mvtec(root)  # the user restores the dataset
    rerun = run_stage("dataset", tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert pq.read_table(tmp_path / "cache/dataset/index.parquet").num_rows == 20


# --- params: typos, unknown backbone or layer, wrong types, missing weights ------------------


@pytest.mark.parametrize(
    ("stage", "edit", "message"),
    [
        ("augment", {"augment": {"transfroms": {}}}, "unknown key 'augment.transfroms'"),
        ("extract", {"backbone": "resnet19"}, "extract.extractors[0].backbone: unknown backbone 'resnet19'"),
        ("extract", {"layers": ["layer5"]}, "extract.extractors[0].layers: unknown layer 'layer5' for resnet18"),
        ("extract", {"init": "imagenet"}, "hub/checkpoints/resnet18-f37072fd.pth"),
    ],
)  # fmt: skip
def test_params_errors_through_the_cli(
    tmp_path: Path, stage: str, edit: dict, message: str
) -> None:
    sections = make_dataset(tmp_path, ONE_CATEGORY)
    extractor = {"backbone": "resnet18", "init": "random", "layers": ["layer4"]}
    if stage == "augment":
        sections["augment"] = {**sections["augment"], **edit["augment"]}
    else:
        extractor.update(edit)
    params = write_extract_params(tmp_path, sections, {"num_workers": 0, "extractors": [extractor]})
    env = {"TORCH_HOME": str(tmp_path / "torch")}  # no cached ImageNet weights, no network
    line = error_line(run_stage(stage, tmp_path, "--params", str(params), env=env))
    assert message in line, line
    if "checkpoints" in message:
        assert "init: random" in line and "https://download.pytorch.org/" in line
    assert not list((tmp_path / "cache/features").rglob("part-*"))
    assert not (tmp_path / "results").exists()


def test_detector_hyperparameter_of_the_wrong_type_through_the_cli(tmp_path: Path) -> None:
    detector = {**LOF, "grid": {"n_neighbors": [2, "eight"]}}
    params = make_workspace(tmp_path, categories={"alpha": []},
                            extractors=[("resnet18", "random", "layer4", "avg")],
                            evaluate={"detectors": [detector], "engine": ONE_WORKER})  # fmt: skip
    line = error_line(_evaluate(params))
    assert "evaluate.detectors[0].grid.n_neighbors" in line and "eight" in line, line
    assert line.startswith(f"error: {params}: "), line  # names the file, like every stage
    assert not (tmp_path / "results").exists()


def test_bad_detector_grid_is_reported_before_missing_features(tmp_path: Path) -> None:
    """A typo in the grid is named first, not hidden behind 'run the extract stage'."""
    detector = {**LOF, "grid": {"n_neighbors": ["eight"]}}
    params = write_params(tmp_path / "params.yaml", tmp_path / "mvtec", ["alpha"],
                          evaluate={"detectors": [detector]})  # fmt: skip
    line = error_line(run_stage("evaluate", tmp_path, "--params", str(params)))
    assert "evaluate.detectors[0].grid.n_neighbors" in line and "feature_sets" not in line, line


# --- the results database: read-only, and in a folder that does not exist --------------------


def _drop_file_permission_override() -> list[str]:
    """A command prefix under which root obeys file modes (no CAP_DAC_OVERRIDE)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root ignores file modes and setpriv (util-linux) is not installed")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"]


def _evaluate(params: Path, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    command = [*(prefix or []), sys.executable, "-m", "stages.evaluate", "--params", str(params)]
    return subprocess.run(
        command, cwd=params.parent, env=stage_env(), capture_output=True, text=True
    )


def _rows(db: Path) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(
            "SELECT key, status, auroc, attempts FROM experiments ORDER BY key"
        ).fetchall()


@pytest.mark.slow
def test_read_only_results_database_then_writable_rerun(tmp_path: Path) -> None:
    params = make_workspace(tmp_path, categories={"alpha": []},
                            extractors=[("resnet18", "random", "layer4", "avg")],
                            evaluate={"detectors": [LOF], "engine": ONE_WORKER})  # fmt: skip
    first = _evaluate(params)
    assert first.returncode == 0, first.stderr
    db = tmp_path / "results/results.sqlite"
    before = _rows(db)
    assert len(before) == 2

    raw = yaml.safe_load(params.read_text())  # the grid grows: one more experiment to run
    raw["evaluate"]["detectors"][0]["grid"]["n_neighbors"] = [2, 4, 6]
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    db.chmod(0o444)
    line = error_line(_evaluate(params, _drop_file_permission_override()))
    assert f"{db}: results database is not writable" in line and "evaluate.db_url" in line
    assert _rows(db) == before

    db.chmod(0o644)  # fixed
    rerun = _evaluate(params)
    assert rerun.returncode == 0, rerun.stderr
    assert "2 done of 3 (1 to run)" in rerun.stderr
    after = _rows(db)
    assert len(after) == 3 and {r[1] for r in after} == {"done"}
    assert set(before) <= set(after)  # the finished experiments were not recomputed
    with contextlib.closing(sqlite3.connect(db)) as conn:  # the write probe left nothing
        tables = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"experiments", "datasets", "images", "scores", "epochs"}


@pytest.mark.slow
def test_results_database_in_a_missing_folder_is_created(tmp_path: Path) -> None:
    db = tmp_path / "elsewhere" / "new" / "results.sqlite"
    params = make_workspace(tmp_path, categories={"alpha": []},
                            extractors=[("resnet18", "random", "layer4", "avg")],
                            evaluate={"detectors": [LOF], "engine": ONE_WORKER,
                                      "db_url": f"sqlite:///{db}"})  # fmt: skip
    blocker = tmp_path / "elsewhere"
    blocker.write_text("a file where the folder should be\n")
    line = error_line(_evaluate(params))
    assert f"{blocker / 'new'}: cannot create the folder of the results database" in line

    blocker.unlink()  # fixed: the folders are missing now, and the stage creates them
    result = _evaluate(params)
    assert result.returncode == 0, result.stderr
    assert [r[1] for r in _rows(db)] == ["done", "done"]


# --- disk full while writing a shard ----------------------------------------------------------

SHARDS = {  # resnet18 layer4 flattened: ~200 kB per 2-image shard, 11 shards for alpha
    "num_workers": 0,
    "decoded_cache": False,  # the shards alone fill the tiny disk, in a fixed order
    "batch_size": 2,
    "shard_rows": 2,
    "extractors": [
        {
            "backbone": "resnet18",
            "init": "random",
            "layers": ["layer4"],
            "representations": ["flatten"],
        }
    ],
}


@contextlib.contextmanager
def tiny_filesystem(folder: Path, size: str) -> Iterator[None]:
    """A tmpfs of ``size`` mounted on ``folder`` (skips where mounting is not allowed)."""
    folder.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"tiny-{uuid.uuid4().hex[:8]}",
                            str(folder)], capture_output=True, text=True)  # fmt: skip
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _extract(root: Path) -> subprocess.CompletedProcess:
    return run_stage("extract", root, "--params", str(root / "params.yaml"))


@pytest.mark.slow
def test_disk_full_while_writing_a_shard_then_rerun_continues(tmp_path: Path) -> None:
    root = tmp_path / "full"
    write_extract_params(root, make_dataset(root, ONE_CATEGORY), SHARDS)
    out = root / "cache/features"
    with tiny_filesystem(out, "640k"):
        line = error_line(_extract(root))
        assert "disk full while writing this feature shard" in line, line
        assert f"{out}/alpha/resnet18-random/layer4/flatten/part-" in line
        assert "No space left on device" in line
        shards = sorted(out.rglob("part-*.parquet"))
        assert shards, "some shards fit before the disk was full"
        for shard in shards:  # what is there is complete: it reads, and carries its hash
            assert pq.read_table(shard).num_rows == 2
            assert SHARD_HASH_KEY in (pq.read_schema(shard).metadata or {})
        assert not list(out.rglob("*.tmp-*")) and not list(out.rglob(MANIFEST))
        kept = {p: p.stat().st_mtime_ns for p in shards}

        remount = ["mount", "-o", "remount,size=64m", str(out)]
        subprocess.run(remount, check=True)  # space freed
        rerun = _extract(root)
        assert rerun.returncode == 0, rerun.stderr
        assert f"{len(shards)} of 11 shards already done, skipped" in rerun.stderr
        assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
        folder = out / "alpha/resnet18-random/layer4/flatten"
        resumed = load_feature_set(folder)

    fresh = tmp_path / "fresh"
    write_extract_params(fresh, make_dataset(fresh, ONE_CATEGORY), SHARDS)
    assert _extract(fresh).returncode == 0
    reference = load_feature_set(fresh / "cache/features/alpha/resnet18-random/layer4/flatten")
    assert list(resumed.image_id) == list(reference.image_id)
    assert np.array_equal(resumed.X, reference.X)

    # A decoded-image cache that cannot be written only costs time: same features, exit 0.
    cached = tmp_path / "cache-full"
    write_extract_params(cached, make_dataset(cached, ONE_CATEGORY),
                         {**SHARDS, "decoded_cache": True})  # fmt: skip
    decoded = cached / "cache/features/_decoded"
    with tiny_filesystem(decoded, "200k"):  # room for one decoded image, not 22
        result = _extract(cached)
        assert result.returncode == 0, result.stderr
        assert not list(decoded.rglob(".*"))  # no temp file left behind
    features = load_feature_set(cached / "cache/features/alpha/resnet18-random/layer4/flatten")
    assert np.array_equal(features.X, reference.X)
