"""The real DVC pipeline on a tiny params set: repro runs every stage, a second repro is a no-op."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from benchmarks.chaos import build_project, chaos_params
from tests.mvtec_fixtures import dvc

pytestmark = pytest.mark.slow

STAGES = ("synth", "dataset", "augment", "extract", "evaluate", "report")


def test_repro_twice_second_is_noop(tmp_path: Path) -> None:
    # The chaos harness's tiny params: 2 categories, resnet18 layer3+layer4, 5 detectors.
    project = build_project(tmp_path / "project", chaos_params(("weave", "chip")))
    first = dvc(project, "repro")
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    assert (project / "results/dataset/stats.md").exists()
    assert len(list((project / "cache/augment/weave").rglob("*.png"))) == 6 * 5
    assert not (project / "cache/augment/chip").exists()
    # weave: augmented and not; chip: not augmented (a rotated chip is a defect).
    # 2 feature sets per category x 5 detector configs, 1 patch set x 2 PatchCore configs.
    with sqlite3.connect(project / "results/results.sqlite") as db:
        rows = db.execute("SELECT category, augmented, status FROM experiments").fetchall()
        patch = db.execute("SELECT key, pixel_auroc, aupro FROM experiments "
                           "WHERE detector = 'PatchCore'").fetchall()  # fmt: skip
    assert len(rows) == (2 + 1) * (2 * 5 + 2) and {r[2] for r in rows} == {"done"}
    assert len(patch) == 3 * 2 and all(0 <= r[1] <= 1 and 0 <= r[2] <= 1 for r in patch)
    assert all((project / "results/maps" / k[:2] / f"{k}.parquet").is_file() for k, *_ in patch)
    metrics = json.loads((project / "results/metrics.json").read_text())
    assert metrics  # the report's metrics for `dvc metrics show`
    assert "Table 4" in (project / "results/report.md").read_text()

    second = dvc(project, "repro")
    assert "Running stage" not in second.stdout
    assert "didn't change, skipping" in second.stdout
    assert "Data and pipelines are up to date" in dvc(project, "status").stdout
