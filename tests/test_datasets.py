"""Results that know their dataset: every experiment names the content identity of its
category (``stages.dataset.dataset_infos``); the report and ``query`` show the current
params' dataset and count the others; switching datasets and back never mixes rows."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from benchmarks.chaos import build_project, chaos_params, env
from stages.dataset import dataset_infos, scan_dataset, write_index
from stages.results_db import Experiment, dataset_rows, open_db, record_datasets
from tests.mvtec_fixtures import make_mvtec, save_png


def _infos(root: Path, index: Path) -> dict:
    write_index(scan_dataset(root, ["alpha"], show_progress=False), index)
    return dataset_infos(index, str(root), ["alpha"])


def test_identity_is_the_content_not_the_place(tmp_path):
    root = make_mvtec(tmp_path / "a", {"alpha": "RGB"})
    first = _infos(root, tmp_path / "i1.parquet")["alpha"]
    assert (first.n_images, first.n_test, first.n_anomalous) == (10, 6, 4)
    moved = shutil.copytree(root, tmp_path / "elsewhere" / "b")
    assert _infos(moved, tmp_path / "i2.parquet")["alpha"].id == first.id  # same bytes
    # One mask pixel changes the dataset (its pixel metrics would differ).
    mask_file = moved / "alpha" / "ground_truth" / "scratch" / "000_mask.png"
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:9, :16] = 255
    save_png(mask_file, mask, "L")
    assert _infos(moved, tmp_path / "i3.parquet")["alpha"].id != first.id
    # Another image seed: another dataset under the same category name.
    other = make_mvtec(tmp_path / "c", {"alpha": "RGB"}, seed=1)
    assert _infos(other, tmp_path / "i4.parquet")["alpha"].id != first.id


def test_record_datasets_marks_current_and_names_old_rows(tmp_path):
    engine = open_db(f"sqlite:///{tmp_path / 'r.sqlite'}")
    root = make_mvtec(tmp_path / "a", {"alpha": "RGB"})
    info = _infos(root, tmp_path / "i.parquet")["alpha"]
    other = _infos(make_mvtec(tmp_path / "b", {"alpha": "RGB"}, seed=1), tmp_path / "j.parquet")
    with engine.begin() as conn:  # two rows stored before datasets were recorded
        for key in ("k1", "k2"):
            conn.execute(Experiment.__table__.insert().values(
                key=key, category="alpha", augmented=False, backbone="b", init="i", layer="l",
                representation="avg", detector="d", hyperparams="{}", detector_name="d",
                seed=0, feature_hash="h", status="done", attempts=1,
                created_at=np.datetime64("2026-01-01").astype(object),
                updated_at=np.datetime64("2026-01-01").astype(object), code_version="v"))  # fmt: skip
    assert record_datasets(engine, [other["alpha"]], {}) == 0
    assert record_datasets(engine, [info], {info.id: ["k1", "missing"]}) == 1  # k1 only
    rows = {r["id"]: r for r in dataset_rows(engine)}
    assert rows[info.id]["current"] and not rows[other["alpha"].id]["current"]
    assert rows[info.id]["experiments"] == 1 and rows[None]["experiments"] == 1  # k2 unknown
    assert dataset_rows(engine)[0]["id"] == info.id  # current first
    engine.dispose()


# --- switching datasets in one project, end to end -----------------------------------------


def _params(seed: int) -> dict:
    params = chaos_params(("weave",))
    params["synth"]["seed"] = seed
    params["augment"]["transforms"]["weave"] = []
    params["extract"]["extractors"] = [
        {"backbone": "resnet18", "init": "random", "layers": ["layer4"], "representations": ["avg"]}
    ]
    params["evaluate"]["detectors"] = [
        {"family": "KernelDensity", "grid": {"bandwidth": [1.0, 2.0], "kernel": ["gaussian"]}}
    ]
    return params


def _repro(project: Path, seed: int) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump(_params(seed), sort_keys=False))
    run = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env(),
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]


def _query(project: Path, *args: str) -> str:
    run = subprocess.run([sys.executable, "-m", "stages.query", *args], cwd=project, env=env(),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def _report_keys(project: Path) -> set[str]:
    with open(project / "results" / "experiments.csv", encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    key = lines[0].split(",").index("key")
    return {line.split(",")[key] for line in lines[1:]}


def _dataset_of(project: Path) -> str:
    metrics = json.loads((project / "results" / "metrics.json").read_text())
    (entry,) = metrics["datasets"]
    return entry["id"]


def test_switching_datasets_and_back_never_mixes_rows(tmp_path):
    project = build_project(tmp_path / "project", _params(0))
    _repro(project, 0)
    first, first_keys = _dataset_of(project), _report_keys(project)
    assert len(first_keys) == 2
    _repro(project, 1)  # the same category name, other images
    second, second_keys = _dataset_of(project), _report_keys(project)
    assert second != first and len(second_keys) == 2 and not first_keys & second_keys
    db = sqlite3.connect(project / "results" / "results.sqlite")
    stored = dict(db.execute("SELECT dataset, count(*) FROM experiments GROUP BY dataset"))
    assert stored == {first: 2, second: 2}
    report = (project / "results" / "report.md").read_text()
    assert f"weave ({second[:8]})" in report and "2 experiments of 1 other dataset" in report
    top = _query(project, "top")
    assert top.splitlines()[0] == f"dataset: data/synthetic: weave ({second[:8]})"
    assert "(2 experiments)" in top and "2 experiments of 1 other dataset" in top
    assert "(4 experiments)" in _query(project, "top", "--dataset", "all")
    assert "(2 experiments)" in _query(project, "top", "--dataset", first[:6])
    listing = _query(project, "datasets")
    lines = {line.split()[0]: line for line in listing.splitlines()[2:-1]}
    assert set(lines) == {first, second} and " yes " in lines[second]
    assert " yes " not in lines[first]
    # README's SQL selects the current dataset through the datasets table.
    current = db.execute("SELECT count(*) FROM experiments WHERE dataset IN "
                         "(SELECT id FROM datasets WHERE current)").fetchone()  # fmt: skip
    assert current == (2,)
    db.close()
    _repro(project, 0)  # back: nothing reruns, the report shows the first rows only
    assert _dataset_of(project) == first and _report_keys(project) == first_keys
    summary = json.loads((project / "results" / "evaluate_summary.json").read_text())
    assert summary["ran"] == 0
