"""The real DVC pipeline on a tiny params set: repro runs every stage, a second repro is a no-op."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.mvtec_fixtures import REPO, stage_env

pytestmark = pytest.mark.slow

STAGES = ("synth", "dataset", "augment", "extract", "evaluate", "report")


def tiny_params() -> dict:
    """The default params, shrunk so the whole pipeline runs in well under a minute."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["synth"].update(image_size=48, n_train=6, n_test_good=3, n_test_per_defect=2)
    params["synth"]["categories"] = ["weave", "chip"]
    params["data"]["categories"] = ["weave", "chip"]
    params["extract"]["extractors"] = [
        {"backbone": "resnet18", "init": "random", "layers": ["layer4"], "representations": ["avg"]}
    ]
    params["evaluate"]["detectors"] = [
        {
            "family": "LocalOutlierFactor",
            "grid": {"n_neighbors": [2, 4]},
            "fixed": {"novelty": True},
        },
        {"family": "KernelDensity", "grid": {"bandwidth": [1.0], "kernel": ["gaussian"]}},
        {"family": "IsolationForest", "grid": {"n_estimators": [10, 20]}},
    ]
    params["evaluate"]["engine"]["n_workers"] = 1
    return params


def make_project(tmp_path: Path, params: dict) -> Path:
    """A DVC project in tmp_path with this repo's stages and dvc.yaml."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(
        REPO / "stages", project / "stages", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    shutil.copy(REPO / ".gitignore", project / ".gitignore")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # A git repository like this one, so DVC applies the same rules (e.g. an ignored dvc.lock).
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    dvc(project, "init", "-q")
    dvc(project, "config", "core.analytics", "false")
    return project


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = stage_env()
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    env["PYTHONPATH"] = str(project)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_repro_twice_second_is_noop(tmp_path: Path) -> None:
    project = make_project(tmp_path, tiny_params())
    first = dvc(project, "repro")
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    assert (project / "results/dataset/stats.md").exists()
    assert len(list((project / "cache/augment/weave").rglob("*.png"))) == 6 * 5
    assert not (project / "cache/augment/chip").exists()
    # weave: augmented and not; chip: not augmented (a rotated chip is a defect). 5 configs.
    with sqlite3.connect(project / "results/results.sqlite") as db:
        rows = db.execute("SELECT category, augmented, status FROM experiments").fetchall()
    assert len(rows) == (2 + 1) * 5 and {r[2] for r in rows} == {"done"}
    metrics = json.loads((project / "results/metrics.json").read_text())
    assert metrics  # the report's metrics for `dvc metrics show`
    assert "Table 4" in (project / "results/report.md").read_text()

    second = dvc(project, "repro")
    assert "Running stage" not in second.stdout
    assert "didn't change, skipping" in second.stdout
    assert "Data and pipelines are up to date" in dvc(project, "status").stdout
