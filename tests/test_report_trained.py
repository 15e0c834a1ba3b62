"""The report's "Trained models" section (``stages/report_trained.py``).

End to end: a tiny synthetic project (one category; ConvAutoencoder, VAE and
EncoderAutoencoder of a few epochs, ``tests.recon_fixtures``) through ``dvc repro``; the section's table equals the
database's numbers (direct SQL), both figures are drawn, ``metrics.json`` names the best.
On the hand-made workspace of ``tests/test_query_map.py``: no section without learning
curves, and a one-line note (no crash) for a trained experiment whose examples are missing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.report import report
from stages.report_trained import example_rows, legend_labels
from stages.results_db import open_db, upsert
from tests.recon_fixtures import CATEGORY, EPOCHS
from tests.test_query_map import IMAGES, _row, key_of, pixel_workspace

SECTION = "## Trained models"


def _section(root: Path) -> str:
    text = (root / "results" / "report.md").read_text()
    assert text.count(SECTION) == 1
    return text.split(SECTION, 1)[1].split("\n## ", 1)[0]


def _table(section: str, heading: str) -> list[list[str]]:
    """Cells of the first table after ``### heading``."""
    part = section.split(f"### {heading}\n", 1)[1]
    block = next(b.strip() for b in part.split("\n\n") if b.strip().startswith("|"))
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in block.splitlines()[2:]]


@pytest.fixture
def project(trained: Path) -> Path:
    """The session's project that trained the three families (``tests.recon_fixtures``)."""
    return trained


def _expected(root: Path) -> list[tuple]:
    """Per trained experiment (best image AUROC first, ties by name): the table's values
    straight from the database."""
    with sqlite3.connect(root / "results" / "results.sqlite") as db:
        rows = db.execute("""
            SELECT e.key, e.detector, e.detector_name, e.augmented, e.auroc, e.f1_honest,
                   e.accuracy_honest, e.pixel_auroc, e.aupro, e.fit_s,
                   (SELECT COUNT(*) FROM epochs p WHERE p.experiment = e.id),
                   (SELECT train_loss FROM epochs p WHERE p.experiment = e.id
                    ORDER BY epoch DESC LIMIT 1),
                   (SELECT val_loss FROM epochs p WHERE p.experiment = e.id
                    ORDER BY epoch DESC LIMIT 1)
            FROM experiments e
            WHERE e.status = 'done' AND e.category = ?
              AND EXISTS (SELECT 1 FROM epochs p WHERE p.experiment = e.id)
            ORDER BY e.auroc DESC, e.detector_name, e.key""", (CATEGORY,)).fetchall()  # fmt: skip
    return rows


def test_trained_section_equals_the_database(project: Path) -> None:
    """One row per trained experiment, in AUROC order, every number the stored one; the
    curves and reconstruction figures are drawn and linked; metrics.json names the best."""
    expected = _expected(project)
    assert sorted(r[1] for r in expected) == sorted(EPOCHS)
    section = _section(project)
    rows = _table(section, CATEGORY)
    assert len(rows) == 3
    for cells, r in zip(rows, expected, strict=True):
        key, family, name, aug, auroc, f1, acc, pix, aupro, fit_s, n_epochs, train, val = r
        assert n_epochs == EPOCHS[family] and val is not None
        assert cells == [name, "yes" if aug else "no", *(f"{v:.4f}" for v in
                         (auroc, f1, acc, pix, aupro)), str(n_epochs), f"{train:#.4g}",
                         f"{val:#.4g}", f"{fit_s:.2f}", f"`{key[:12]}`"]  # fmt: skip
    figures = project / "results" / "figures"
    for kind in ("curves", "reconstructions"):
        path = figures / f"{kind}_{CATEGORY}.png"
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 400
        assert f"(figures/{kind}_{CATEGORY}.png)" in section
    assert "Learning curves of all 3: training loss solid" in section
    best = expected[0]
    assert (f"best trained experiment by image AUROC (an oracle pick: chosen with the test "
            f"labels), `{best[0][:12]}`") in section  # fmt: skip
    assert "Rows: 4 stored test images" in section and "No reconstruction figure" not in section
    metrics = json.loads((project / "results" / "metrics.json").read_text())["trained"]
    assert metrics == {CATEGORY: {
        "name": best[2], "key": best[0], "augmented": bool(best[3]), "auroc": best[4],
        "f1_honest": best[5], "accuracy_honest": best[6], "pixel_auroc": best[7],
        "experiments": 3,
    }}  # fmt: skip


def test_no_trained_section_without_learning_curves(tmp_path: Path, monkeypatch) -> None:
    """Patch and image-level experiments only: no heading, no figures, no metrics entry."""
    params = pixel_workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    report(params)
    text = (tmp_path / "results" / "report.md").read_text()
    assert "## Table 4" in text and "Trained models" not in text
    assert "trained" not in json.loads((tmp_path / "results" / "metrics.json").read_text())
    figures = tmp_path / "results" / "figures"
    assert not list(figures.glob("curves_*.png")) and not list(figures.glob("reconstructions_*"))


def test_a_trained_experiment_without_examples_gets_a_note(tmp_path: Path, monkeypatch) -> None:
    """A learning curve but no stored examples (a run from before them): the table and the
    curves are there, the reconstruction figure is one line saying why, nothing crashes."""
    params = pixel_workspace(tmp_path, categories=("alpha",))
    base = _row("alpha", "X", np.random.default_rng(1))
    trained = dataclasses.replace(
        base, key=key_of("alpha", "AE"),
        config={**base.config, "detector": "ConvAutoencoder", "representation": "image",
                "hyperparams": '{"epochs": 2}', "detector_name": "ConvAutoencoder(epochs=2)"},
        curve=[{"epoch": 1, "train_loss": 0.5, "val_loss": None, "seconds": 1.0},
               {"epoch": 2, "train_loss": 0.25, "val_loss": None, "seconds": 1.0}],
    )  # fmt: skip
    engine = open_db(f"sqlite:///{tmp_path / 'results' / 'results.sqlite'}")
    try:
        upsert(engine, [trained], "test")
    finally:
        engine.dispose()
    monkeypatch.chdir(tmp_path)
    report(params)
    section = _section(tmp_path)
    rows = _table(section, "alpha")
    assert [r[0] for r in rows] == ["ConvAutoencoder(epochs=2)"]
    assert rows[0][7:10] == ["2", "0.2500", "n/a"]
    assert "No reconstruction figure for alpha: " in section
    assert "no stored reconstructions" in section
    figures = tmp_path / "results" / "figures"
    assert (figures / "curves_alpha.png").is_file()
    assert not (figures / "reconstructions_alpha.png").exists()
    metrics = json.loads((tmp_path / "results" / "metrics.json").read_text())["trained"]
    assert metrics["alpha"]["key"] == key_of("alpha", "AE")


def test_example_rows_rank_by_score_with_nan_last() -> None:
    labels = {IMAGES[0]: ("good", False, 0.2), IMAGES[1]: ("good", False, math.nan),
              IMAGES[3]: ("crack", True, 0.9), IMAGES[4]: ("crack", True, 0.2)}  # fmt: skip
    titles = example_rows(labels, [IMAGES[3], IMAGES[0], IMAGES[1], IMAGES[5]], 0.5)
    assert titles == [
        "test/crack/000 (defect: crack): score 0.9, rank 1 of 4, flagged",
        "test/good/000 (good): score 0.2, rank 2 of 4, not flagged",
        "test/good/001 (good): score n/a, rank 4 of 4",
        "test/crack/002 (no score stored)",
    ]


def test_learning_curve_legend_entries_never_read_the_same():
    base = {"auroc": 0.75, "detector_name": "ConvAutoencoder(depth=3,epochs=8)",
            "augmented": False, "backbone": "pixels", "init": "none", "layer": "rgb128",
            "representation": "image"}  # fmt: skip
    rows = [{**base, "key": "aaaa1111"}, {**base, "layer": "gray64", "key": "bbbb2222"},
            {**base, "key": "cccc3333"}, {**base, "augmented": True, "key": "dddd4444"}]  # fmt: skip
    labels = legend_labels(rows)
    assert len(set(labels)) == 4
    assert labels[1].endswith("on pixels-none/gray64 image") and "key aaaa1111" in labels[0]
    assert labels[3] == "AUROC 0.750: ConvAutoencoder(depth=3,epochs=8), augmented"
