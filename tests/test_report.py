"""Report stage, threshold metrics, honest selection, query CLI and submission, on a real run.

One small evaluation (3 categories, one augmented; 2 extractors; KDE, LOF and an
IsolationForest config that always fails) feeds every test; numbers are checked against
direct SQL on the database and against scikit-learn.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
)
from sklearn.neighbors import KernelDensity

from stages.dataset import ImageRecord, dataset_stats
from stages.engine import EngineParams, dask_client
from stages.errors import UserError
from stages.evaluate import evaluate
from stages.features import load_feature_set
from stages.methods import FAMILIES
from stages.methods.unit import fold_assignment, image_groups
from stages.metrics import (
    CONFIG_FIELDS,
    category_ranks,
    config_id,
    honest_threshold,
    loco_selection,
    oracle_threshold,
    predict,
    threshold_metrics,
)
from stages.palette import family_colour, family_shades
from stages.query import main as query_main
from stages.query import submission, write_submission
from stages.report import (
    NEEDS_TWO,
    experiment_labels,
    heatmap_table,
    report,
    top_with_ties,
)
from stages.results_db import open_db, scores_of
from tests.eval_fixtures import make_workspace

REPO = Path(__file__).resolve().parents[1]
EXTRACTORS = [
    ("resnet18", "imagenet", "layer2", "flatten"),
    ("resnet18", "random", "layer3", "avg"),
]
CATEGORIES = {"bottle": ["rot90"], "screw": [], "pill": []}
DETECTORS = [
    {"family": "KernelDensity", "grid": {"bandwidth": [0.5, 1.0, "scott"]}},
    {"family": "LocalOutlierFactor", "grid": {"n_neighbors": [2, 4]}},
    # max_features > dim: fails at fit for every feature set (a family with nothing done).
    {"family": "IsolationForest", "fixed": {"max_features": 1000, "n_estimators": 10}},
]
N_EXPERIMENTS = (2 + 1 + 1) * 2 * 6


def _with_report_section(params: Path, root: Path) -> Path:
    raw = yaml.safe_load(params.read_text())
    raw["data"]["stats_dir"] = str(root / "results" / "dataset")
    raw["report"] = {"out": str(root / "results"), "top_n": 5, "roc_best_per_category": 2}
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    return params


def _write_stats(root: Path, categories: list[str]) -> None:
    """The dataset stage's stats.json, from its own function on a few image records."""
    records = [
        ImageRecord(category=c, image_id=f"{split}/{defect}/{i:03d}.png", split=split,
                    defect_type=defect, is_anomaly=defect != "good", path="-",
                    mask_path=None if defect == "good" else "-", width=8, height=8,
                    mode="RGB", sha256="-", mask_coverage=None if defect == "good" else 0.1)
        for c in categories
        for split, defect, n in (("train", "good", 3), ("test", "good", 2), ("test", "crack", 2))
        for i in range(n)
    ]  # fmt: skip
    folder = root / "results" / "dataset"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stats.json").write_text(json.dumps(dataset_stats(records)))


@pytest.fixture(scope="module")
def client():
    with dask_client(EngineParams(n_workers=2, memory_limit="2GiB")) as c:
        yield c


@pytest.fixture(scope="module")
def run(tmp_path_factory, client):
    """The evaluated workspace and the report computed on it: (params, root, Report)."""
    root = tmp_path_factory.mktemp("report")
    params = make_workspace(root, categories=CATEGORIES, extractors=EXTRACTORS,
                            evaluate={"detectors": DETECTORS}, dims=(16, 8))  # fmt: skip
    summary = evaluate(params, client=client)
    assert (summary["done"], summary["failed"]) == (N_EXPERIMENTS * 5 // 6, N_EXPERIMENTS // 6)
    _with_report_section(params, root)
    _write_stats(root, list(CATEGORIES))
    return params, root, report(params)


def _sql(root: Path, query: str, *args) -> list[tuple]:
    with sqlite3.connect(root / "results" / "results.sqlite") as con:
        return con.execute(query, args).fetchall()


def _engine(root: Path):
    return open_db(f"sqlite:///{root / 'results' / 'results.sqlite'}", read_only=True)


def _md_rows(text: str, heading: str, table: int = 0) -> list[list[str]]:
    """Cells of a table (the first by default) under the ``## heading`` section of report.md."""
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    blocks = [b for b in section.split("\n\n") if b.startswith("|")]
    lines = blocks[table].splitlines()[2:]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]


# --- tables against direct SQL ---------------------------------------------------------------


def test_table4_and_metrics_match_sql(run):
    _, root, result = run
    text = (root / "results" / "report.md").read_text()
    best = dict(_sql(root, "select category, max(auroc) from experiments where status='done' "
                           "group by category"))  # fmt: skip
    rows = {r[0]: r for r in _md_rows(text, "Table 4")}
    metrics = json.loads((root / "results" / "metrics.json").read_text())
    for category, auroc in best.items():
        assert rows[category][1] == f"{auroc:.4f}"
        assert metrics["per_category"][category]["best_auroc_oracle"] == pytest.approx(auroc)
        honest = result.loco[category].auroc
        assert rows[category][3] == f"{honest:.4f}"
        assert rows[category][6] == f"{auroc - honest:.4f}"
        low, mid, high = result.loco[category].spread()
        assert low <= honest <= high
        assert (
            rows[category][5] == f"{result.loco[category].tied}: {low:.4f} / {mid:.4f} / {high:.4f}"
        )
    assert metrics["mean_best_auroc_oracle"] == pytest.approx(np.mean(list(best.values())))
    assert rows["**mean**"][1] == f"{np.mean(list(best.values())):.4f}"
    counts = dict(_sql(root, "select status, count(*) from experiments group by status"))
    assert (metrics["done"], metrics["failed"], metrics["crashed"]) == (counts["done"],
                                                                       counts["failed"], 0)  # fmt: skip
    assert metrics["experiments"] == N_EXPERIMENTS
    assert "| failed | IsolationForest | ValueError | 8 |" in text


def test_table5_and_table6_match_sql(run):
    _, root, result = run
    text = (root / "results" / "report.md").read_text()
    table5 = {r[0]: r for r in _md_rows(text, "Table 5")}
    # s per config: each call's group_s once over the configs it served (a member carries
    # group_s / group_size of it)
    sql = _sql(root, "select detector, count(*), avg(fit_s), avg(score_s), "
                     "sum(group_s / group_size) / count(*), min(group_size), max(group_size) "
                     "from experiments where status='done' group by detector")  # fmt: skip
    for family, n, fit_s, score_s, config_s, smallest, largest in sql:
        assert table5[family][1] == str(n)
        assert table5[family][6] == f"{config_s:.4f}"
        assert table5[family][7] == f"{fit_s:.4f}" and table5[family][8] == f"{score_s:.4f}"
        assert smallest >= 1 and largest <= n
    assert table5["IsolationForest"][1:3] == ["0", "8"] and table5["IsolationForest"][5] == "n/a"
    table6 = {r[0]: r for r in _md_rows(text, "Table 6")}
    for category in CATEGORIES:
        ((key, auroc, aug, layer, hyper),) = _sql(
            root, "select key, auroc, augmented, layer, hyperparams from experiments where "
            "status='done' and category=? order by auroc desc, key limit 1", category)  # fmt: skip
        assert result.best[category]["key"] == key
        row = table6[category]
        assert row[1] == ("yes" if aug else "no") and row[4] == layer
        assert row[7] == f"`{hyper}`" and row[9] == f"{auroc:.4f}" and row[-1] == f"`{key[:12]}`"
    aug = dict(_sql(root, "select category, max(auroc) from experiments where status='done' "
                          "and augmented=1 group by category"))  # fmt: skip
    benefit = {r[0]: r for r in _md_rows(text, "Augmentation benefit")}
    assert benefit["bottle"][1] == f"{aug['bottle']:.4f}"
    assert benefit["screw"][1] == "n/a" and benefit["screw"][3] == "n/a"


def test_figures_exports_and_plots_are_written(run):
    _, root, _ = run
    out = root / "results"
    for name in ("fit_time", "heatmap", "roc", "augmentation"):
        data = (out / "figures" / f"{name}.png").read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, name
        assert f"](figures/{name}.png)" in (out / "report.md").read_text()
    for category in CATEGORIES:
        lines = (out / "plots" / "roc" / f"{category}.csv").read_text().splitlines()
        assert lines[0] == "fpr,tpr" and lines[1] == "0,0" and lines[-1] == "1,1"
    with open(out / "experiments.csv", newline="") as fh:
        exported = list(csv.DictReader(fh))
    assert len(exported) == _sql(root, "select count(*) from experiments")[0][0]
    assert {"key", "auroc", "f1_honest", "tp_oracle", "error"} <= set(exported[0])
    text = (out / "report.md").read_text()
    assert "| bottle | 3 | 2 | 2 | 1 |" in text  # the dataset statistics table


def test_top_table_is_per_category_with_ties_noted(run):
    _, root, _ = run
    text = (root / "results" / "report.md").read_text()
    shown = _md_rows(text, "Top 5 experiments by AUROC, per category")
    for category in CATEGORIES:
        expected = _sql(root, "select key, auroc from experiments where status='done' and "
                              "category=? order by auroc desc, key", category)  # fmt: skip
        rows = [r for r in shown if r[0] == category and r[-1]]
        assert [r[-1] for r in rows] == [f"`{k[:12]}`" for k, _ in expected[:5]]
        assert [r[5] for r in rows] == [f"{a:.4f}" for _, a in expected[:5]]
        # ties with the last one shown (AUROCs equal within rounding) that are not shown
        last = expected[4][1]
        more = sum(1 for _, a in expected[5:] if abs(a - last) <= 1e-9)
        notes = [r for r in shown if r[0] == category and not r[-1]]
        assert notes == ([[category, "", "", "", f"*and {more} more at this AUROC*",
                           f"{last:.4f}", "", "", "", ""]] if more else [])  # fmt: skip


def test_top_with_ties_counts_near_equal_aurocs_as_one():
    rows = [{"category": "A", "key": f"k{i}", "auroc": a}
            for i, a in enumerate([0.9, 0.8, 0.8 + 1e-15, 0.8 - 1e-15, 0.8, 0.7])]  # fmt: skip
    ((shown, more),) = top_with_ties(rows, ["A", "B"], 2).values()
    assert [r["key"] for r in shown] == ["k0", "k1"] and more == 3
    ((shown, more),) = top_with_ties(rows, ["A"], 5).values()
    assert [r["key"] for r in shown] == ["k0", "k1", "k2", "k3", "k4"] and more == 0


def test_heatmap_is_per_category_and_matches_sql(run):
    _, root, result = run
    families, extractors, grids = heatmap_table(result.done, result.categories)
    assert list(grids) == list(CATEGORIES)
    assert families == [f for f in FAMILIES if f in {"KernelDensity", "LocalOutlierFactor"}]
    for category, grid in grids.items():
        sql = _sql(root, "select detector, backbone || '-' || init || '/' || layer, max(auroc) "
                         "from experiments where status='done' and category=? group by 1, 2",
                   category)  # fmt: skip
        assert np.isfinite(grid).sum() == len(sql)
        for family, extractor, auroc in sql:
            assert grid[families.index(family), extractors.index(extractor)] == auroc
    text = (root / "results" / "report.md").read_text()
    table = _md_rows(text, "Best AUROC per detector family x backbone/layer")
    assert len(table) == len(families) * len(CATEGORIES)


def test_family_colours_are_fixed_and_legend_labels_distinct():
    colours = [family_colour(f) for f in FAMILIES]
    assert len(set(colours)) == len(FAMILIES)  # one colour per family, whatever a run has
    assert family_colour("PatchCore") == family_colour("PatchCore") != family_colour("PaDiM")
    shades = family_shades("KNNDistance", 4)
    assert shades[0] == family_colour("KNNDistance") and len(set(shades)) == 4
    base = {"detector_name": "KNNDistance(n_neighbors=1)", "backbone": "resnet18",
            "init": "imagenet", "layer": "layer2", "representation": "avg", "augmented": False,
            "seed": 0}  # fmt: skip
    rows = [{**base, "key": "aaaa1111"}, {**base, "seed": 1, "key": "bbbb2222"},
            {**base, "augmented": True, "key": "cccc3333"},
            {**base, "key": "dddd4444"}]  # fmt: skip
    labels = experiment_labels(rows)
    assert len(set(labels)) == len(rows)
    assert "seed 1" in labels[1] and "key aaaa1111" in labels[0] and "augmented" in labels[2]
    assert all("KNNDistance(n_neighbors=1)" in lab and "resnet18-imagenet/layer2" in lab
               for lab in labels)  # fmt: skip


def test_report_stage_command_line(run):
    params, root, _ = run
    before = (root / "results" / "results.sqlite").read_bytes()
    done = subprocess.run([sys.executable, "-m", "stages.report", "--params", str(params)],
                          cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (root / "results" / "results.sqlite").read_bytes() == before  # read only
    raw = yaml.safe_load(params.read_text())
    raw["report"]["top_n"] = 0
    bad = root / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    failed = subprocess.run([sys.executable, "-m", "stages.report", "--params", str(bad)],
                            cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert failed.returncode == 2
    assert failed.stderr.strip().count("\n") == 0 and "report.top_n" in failed.stderr


def test_seed_spread_section_and_metrics(tmp_path, client):
    detectors = [
        {"family": "IsolationForest", "grid": {"n_estimators": [10, 20]}},
        {"family": "KernelDensity", "fixed": {"bandwidth": 1.0}},  # deterministic: left out
    ]
    params = make_workspace(tmp_path, categories={"bottle": ["rot90"], "screw": []},
                            extractors=EXTRACTORS[1:], evaluate={"detectors": detectors})  # fmt: skip
    _with_report_section(params, tmp_path)  # top_n 5
    evaluate(params, client=client)
    result = report(params)
    text = (tmp_path / "results" / "report.md").read_text()
    section = text.split("## Seed spread", 1)[1].split("\n## ", 1)[0]
    assert "evaluate.seeds: [0, 1, 2, 3, 4]" in section and "|" not in section
    assert result.seed_spread == [] and result.metrics["seed_spread"] == {}

    raw = yaml.safe_load(params.read_text())
    raw["evaluate"]["seeds"] = [0, 1, 2]
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    evaluate(params, client=client)
    report(params)
    text = (tmp_path / "results" / "report.md").read_text()
    # By hand: per (category, augmented, n_estimators) the AUROCs of the 3 seeds.
    groups: dict[tuple, list[float]] = {}
    for category, aug, name, auroc in _sql(
        tmp_path, "select category, augmented, detector_name, auroc from experiments "
        "where detector='IsolationForest' and status='done' order by seed"):  # fmt: skip
        groups.setdefault((category, "yes" if aug else "no", name), []).append(auroc)
    assert len(groups) == 6 and all(len(a) == 3 for a in groups.values())
    expected = {}
    for group, aurocs in groups.items():
        mean = sum(aurocs) / 3
        std = math.sqrt(sum((a - mean) ** 2 for a in aurocs) / 3)
        expected[group] = (mean, std, min(aurocs), max(aurocs))
    ranges = sorted((v[3] - v[2] for v in expected.values()), reverse=True)
    assert ranges[0] > 0  # the seed matters for a 10- or 20-tree forest

    (family,) = _md_rows(text, "Seed spread", 0)
    mean_std = sum(v[1] for v in expected.values()) / 6
    assert family[:4] == ["IsolationForest", "6", f"{mean_std:.4f}", f"{ranges[0]:.4f}"]
    top = _md_rows(text, "Seed spread", 1)
    assert len(top) == 5 and [float(r[-1]) for r in top] == pytest.approx(ranges[:5], abs=1e-4)
    for row in top:
        mean, std, lo, hi = expected[(row[0], row[1], row[3])]
        assert row[2] == "resnet18-random/layer3 avg" and row[4] == "3"
        assert row[5:9] == [f"{mean:.4f}", f"{std:.4f}", f"{lo:.4f}", f"{hi:.4f}"]
    category, aug, extractor, name = top[0][:4]  # the largest range (ties: by config)
    assert family[4] == f"{category} {extractor} {'aug' if aug == 'yes' else 'no-aug'} {name}"
    metrics = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert metrics["seed_spread"]["IsolationForest"]["configs"] == 6
    assert metrics["seed_spread"]["IsolationForest"]["mean_auroc_std"] == pytest.approx(mean_std)
    assert metrics["seed_spread"]["IsolationForest"]["max_auroc_range"] == pytest.approx(ranges[0])
    assert list(metrics["seed_spread"]) == ["IsolationForest"]  # KernelDensity is deterministic


# --- threshold metrics -----------------------------------------------------------------------


def test_stored_threshold_metrics_match_sklearn(run):
    """Honest: the quantile of out-of-fold training scores, each from a KernelDensity fitted
    on the other folds (5 folds of the experiment's seed, copies with their original);
    in-sample: of the fitted model's own training scores; both as plain scikit-learn gives
    them; F1 & co. at each as scikit-learn's metrics count them."""
    _, root, _ = run
    listing = json.loads((root / "features" / "feature_sets.json").read_text())
    folders = {(e["category"], e["layer"]): e["folder"] for e in listing}
    kinds = ("honest", "insample")
    fields = ("threshold", "f1", "precision", "recall", "accuracy", "tp", "fp", "tn", "fn")
    columns = ", ".join(f"{f}_{k}" for k in kinds for f in fields)
    rows = _sql(root, f"select key, category, augmented, layer, hyperparams, seed, "
                      f"threshold_folds, threshold_oracle, f1_oracle, {columns} from experiments "
                      "where detector='KernelDensity' and status='done'")  # fmt: skip
    assert len(rows) == 24
    for key, category, aug, layer, hyper, seed, folds, t_or, f1_or, *values in rows:
        assert folds == 5
        fs = load_feature_set(folders[(category, layer)])
        train = fs.rows("train", bool(aug))
        X_train = fs.X[train]
        test = fs.rows("test")
        ids, y = fs.image_id[test], fs.is_anomaly[test].astype(bool)
        params = json.loads(hyper)
        in_sample = -KernelDensity(**params).fit(X_train).score_samples(X_train)
        fold = fold_assignment(image_groups(fs.image_id[train]), 5, seed)
        oof = np.empty(len(X_train))
        for k in range(fold.max() + 1):
            model = KernelDensity(**params).fit(X_train[fold != k])
            oof[fold == k] = -model.score_samples(X_train[fold == k])
        stored = scores_of(_engine(root), key)
        scores = np.array([stored[i] for i in ids], dtype=float)
        for n, train_scores in enumerate((oof, in_sample)):
            t, f1, prec, rec, acc, tp, fp, tn, fn = values[9 * n : 9 * n + 9]
            threshold = np.quantile(train_scores, 0.99, method="inverted_cdf")
            assert t == pytest.approx(threshold, rel=1e-9), kinds[n]
            pred = scores > t
            assert f1 == pytest.approx(f1_score(y, pred, zero_division=0))
            assert prec == pytest.approx(precision_score(y, pred, zero_division=0))
            assert rec == pytest.approx(recall_score(y, pred, zero_division=0))
            assert acc == pytest.approx(accuracy_score(y, pred))
            assert [tn, fp, fn, tp] == confusion_matrix(
                y, pred, labels=[False, True]
            ).ravel().tolist()
        assert values[0] >= values[9]  # out of fold, the training images look less familiar
        brute = max(f1_score(y, scores > c, zero_division=0) for c in [-np.inf, *scores])
        assert f1_or == pytest.approx(brute)
        assert f1_score(y, scores > t_or, zero_division=0) == pytest.approx(f1_or)


def test_threshold_functions_handle_nonfinite_scores():
    rng = np.random.default_rng(1)
    y = rng.random(40) < 0.4
    scores = rng.normal(size=40) + y
    scores[[0, 1, 2, 3]] = [np.inf, -np.inf, np.nan, np.inf]
    pred = predict(scores, 0.0)
    assert pred[0] and not pred[1] and not pred[2]  # NaN and -inf are never flagged
    t = oracle_threshold(y, scores)
    brute = max(f1_score(y, predict(scores, c), zero_division=0)
                for c in [-np.inf, *scores[np.isfinite(scores)]])  # fmt: skip
    assert f1_score(y, predict(scores, t), zero_division=0) == pytest.approx(brute)
    train = np.array([np.nan, 1.0, 2.0, 3.0, np.inf])
    assert honest_threshold(train, 0.5) == 2.0 and honest_threshold(train, 0.99) == np.inf
    assert np.mean(predict(train, honest_threshold(train, 0.6))) <= 0.4  # NaN: never above
    m = threshold_metrics(y, scores, None, 0.9)
    assert m["f1_honest"] is None and m["f1_oracle"] == pytest.approx(brute)


def test_changed_threshold_quantile_reruns_done_experiments(tmp_path, client):
    params = make_workspace(tmp_path, categories={"screw": []}, extractors=EXTRACTORS[:1],
                            evaluate={"detectors": DETECTORS[:1]})  # fmt: skip
    assert evaluate(params, client=client)["ran"] == 3
    assert evaluate(params, client=client)["ran"] == 0
    raw = yaml.safe_load(params.read_text())
    raw["evaluate"]["threshold_quantile"] = 0.8
    params.write_text(yaml.safe_dump(raw))
    assert evaluate(params, client=client)["ran"] == 3
    assert {q for (q,) in _sql(tmp_path, "select threshold_quantile from experiments")} == {0.8}
    # One category: the honest selection has nothing to learn from.
    _with_report_section(params, tmp_path)
    result = report(params)
    assert result.metrics["mean_auroc_loco"] is None and result.metrics["loco_categories"] == 0
    rows = _md_rows((tmp_path / "results" / "report.md").read_text(), "Table 4")
    assert rows[0][3] == NEEDS_TWO and rows[-1][3] == NEEDS_TWO
    assert "Not available" in (tmp_path / "results" / "report.md").read_text()  # no stats.json


def test_rows_stored_before_out_of_fold_thresholds_are_brought_to_them(tmp_path, client, caplog):
    """A database whose done rows have in-sample honest thresholds (no threshold_folds, as
    written before out-of-fold scores existed): the next evaluate reruns exactly those,
    says how many, and then has nothing to do."""
    params = make_workspace(tmp_path, categories={"screw": []}, extractors=EXTRACTORS[:1],
                            evaluate={"detectors": DETECTORS[:1]})  # fmt: skip
    assert evaluate(params, client=client)["ran"] == 3
    with sqlite3.connect(tmp_path / "results" / "results.sqlite") as con:
        con.execute("update experiments set threshold_folds = null, "
                    "threshold_honest = threshold_insample where key in "
                    "(select key from experiments order by key limit 2)")  # fmt: skip
    with caplog.at_level(logging.INFO, logger="stages.evaluate"):
        assert evaluate(params, client=client)["ran"] == 2
    assert "2 done experiments have an honest threshold not from 5-fold out-of-fold scores " \
           "(2 from in-sample scores" in caplog.text  # fmt: skip
    assert {f for (f,) in _sql(tmp_path, "select threshold_folds from experiments")} == {5}
    assert evaluate(params, client=client)["ran"] == 0


# --- honest selection ------------------------------------------------------------------------


def _row(category: str, config: str, auroc: float) -> dict:
    fields = dict.fromkeys(CONFIG_FIELDS, "-") | {"detector": config, "augmented": False,
                                                  "hyperparams": "{}", "seed": 0}  # fmt: skip
    return {**fields, "category": category, "status": "done", "auroc": auroc,
            "key": f"{category}-{config}"}  # fmt: skip


def test_leave_one_category_out_on_a_hand_made_results_set():
    table = {
        "A": {"x": 0.9, "y": 0.8, "z": 0.7},
        "B": {"x": 0.6, "y": 0.9, "z": 0.8, "w": 0.95},
        "C": {"x": 0.9, "y": 0.7, "w": 0.95},
    }
    rows = [_row(c, k, a) for c, aurocs in table.items() for k, a in aurocs.items()]
    rows.append({**_row("C", "z", 0.99), "status": "failed", "auroc": None})
    cid = {k: config_id(_row("A", k, 0)) for k in "xyzw"}
    ranks = category_ranks(rows)
    assert ranks["B"] == {cid["w"]: 1, cid["y"]: 2, cid["z"]: 3, cid["x"]: 4}
    choice = loco_selection(rows, ["A", "B", "C"])
    # A: candidates (run in A, done in B and C) x, y; w was never run on A, so it cannot be
    # chosen there; mean ranks x 3, y 2.5 -> y.
    assert (choice["A"].config, choice["A"].auroc) == (cid["y"], 0.8)
    assert choice["A"].candidates == 2
    # A config run on the held-out category but not done there can win: its AUROC is None.
    failed_here = [_row("A", "x", 0.9), {**_row("A", "w", 0.0), "status": "failed",
                   "auroc": None}, _row("B", "x", 0.5), _row("B", "w", 0.9)]  # fmt: skip
    chosen = loco_selection(failed_here, ["A"])["A"]
    assert chosen.config == cid["w"] and chosen.auroc is None
    # B: candidates x, y (w is not in A); A ranks x1 y2, C ranks w1 x2 y3 -> x (1.5).
    assert (choice["B"].config, choice["B"].auroc, choice["B"].mean_rank) == (cid["x"], 0.6, 1.5)
    # C: candidates x, y, z (z failed in C: not a reason to drop it); A x1 y2 z3, B w1 y2 z3 x4.
    assert (choice["C"].config, choice["C"].auroc, choice["C"].key) == (cid["y"], 0.7, "C-y")
    ties = category_ranks([_row("A", "x", 0.5), _row("A", "y", 0.5), _row("A", "z", 0.9)])
    assert ties["A"] == {cid["z"]: 1.0, cid["x"]: 2.5, cid["y"]: 2.5}
    alone = loco_selection([_row("A", "x", 0.9)])
    assert alone["A"].config is None and alone["A"].auroc is None


def test_loco_ties_are_broken_without_the_held_out_labels_and_their_spread_is_kept():
    """Two categories: every config at AUROC 1.0 on B ties on the mean rank for A. The
    tie-break looks at B only (AUROC, then AP, then honest F1, then the id); the AUROCs on A
    of all tied configs are reported, whatever the choice."""
    rows = [
        {**_row("B", k, 1.0), "average_precision": ap, "f1_honest": f1}
        for k, ap, f1 in (("x", 1.0, 0.7), ("y", 1.0, 0.9), ("z", 0.95, 1.0), ("w", 1.0, 0.9))
    ] + [_row("B", "v", 0.8)]
    rows += [_row("A", k, a) for k, a in (("x", 0.55), ("y", 0.60), ("z", 0.66), ("w", 0.90),
                                          ("v", 0.99))]  # fmt: skip
    cid = {k: config_id(_row("A", k, 0)) for k in "vwxyz"}
    choice = loco_selection(rows, ["A", "B"])["A"]
    # tied on B: x, y, z, w (v ranks last); AP drops z; honest F1 keeps y, w; id order: w < y
    assert choice.tied == 4 and choice.config == min(cid["w"], cid["y"])
    assert choice.spread() == (0.55, pytest.approx(0.63), 0.90)
    # the held-out category's labels never enter: flip A's AUROCs, same choice
    flipped = [{**r, "auroc": 1.5 - r["auroc"]} if r["category"] == "A" else r for r in rows]
    assert loco_selection(flipped, ["A", "B"])["A"].config == choice.config


# --- query CLI and submission ----------------------------------------------------------------


def test_query_top_failed_and_show(run, capsys):
    params, root, _ = run
    query_main(["--params", str(params), "top", "--category", "bottle", "--n", "3"])
    lines = capsys.readouterr().out.splitlines()
    expected = _sql(root, "select key, auroc from experiments where category='bottle' and "
                          "status='done' order by auroc desc, key limit 3")  # fmt: skip
    assert lines[0] == "dataset: every dataset in the database"  # none recorded: no index
    assert [ln.split()[0] for ln in lines[3:6]] == [k[:12] for k, _ in expected]
    assert lines[-1] == "(3 experiments)"
    query_main(["--params", str(params), "top", "--augmented", "yes", "--where", "dim=8"])
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "(5 experiments)" and " no " not in out
    query_main(["--params", str(params), "failed", "--category", "screw"])
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "(2 experiments)" and "ValueError" in out
    query_main(["--params", str(params), "show", expected[0][0][:10]])
    out = capsys.readouterr().out
    assert expected[0][0] in out and "threshold_honest" in out
    with pytest.raises(UserError, match="no such column"):
        query_main(["--params", str(params), "top", "--where", "colour=red"])


def test_export_submission_shape_header_and_ids(run, tmp_path):
    params, root, _ = run
    ((key, n_test, t),) = _sql(root, "select key, n_test, threshold_honest from experiments "
                               "where category='pill' and status='done' order by key limit 1")  # fmt: skip
    out = tmp_path / "submission.csv"
    query_main(["--params", str(params), "export-submission", key[:16], str(out)])
    lines = out.read_text().splitlines()
    assert lines[0] == "id,prediction" and len(lines) == n_test + 1
    ids, predictions = zip(*(map(int, ln.split(",")) for ln in lines[1:]), strict=True)
    assert list(ids) == list(range(n_test)) and set(predictions) <= {0, 1}
    ordered = _sql(root, "select i.image_id, s.score from scores s join images i on "
                         "i.id = s.image join experiments e on e.id = s.experiment "
                         "where e.key = ? order by i.image_id", key)  # fmt: skip
    assert list(predictions) == [int(s is not None and s > t) for _, s in ordered]
    assert [image for _, image, _ in submission(_engine(root), key)] == [i for i, _ in ordered]
    ((failed_key,),) = _sql(root, "select key from experiments where status='failed' limit 1")
    with pytest.raises(UserError, match="not done"):
        write_submission(_engine(root), failed_key, tmp_path / "x.csv")


def test_older_database_is_upgraded_by_the_writer_only(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    open_db(url).dispose()
    with sqlite3.connect(tmp_path / "old.sqlite") as con:  # as written before the new columns
        con.execute("ALTER TABLE experiments DROP COLUMN f1_oracle")
    with pytest.raises(UserError, match="lacks f1_oracle"):
        open_db(url, read_only=True)
    open_db(url).dispose()  # the evaluate stage's open adds it back
    open_db(url, read_only=True).dispose()
    with pytest.raises(UserError, match="not found"):
        open_db(f"sqlite:///{tmp_path / 'missing.sqlite'}", read_only=True)
    assert not (tmp_path / "missing.sqlite").exists()
