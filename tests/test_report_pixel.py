"""The report's pixel-level section ("Where is the defect"), on a hand-made results set.

The workspace of ``tests/test_query_map.py``: two categories, three patch configs with
known image AUROC / pixel AUROC / AUPRO (X, Y, Z) and an image-level config (I) that is the
best by image AUROC everywhere but has no maps, so each of the four picks is a different
config somewhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from stages.report import map_panels, report
from tests.test_query_map import IMAGES, METRICS, key_of, pixel_workspace

SECTION = "## Where is the defect: pixel-level results"


def _section(root: Path) -> str:
    text = (root / "results" / "report.md").read_text()
    assert SECTION in text
    return text.split(SECTION, 1)[1].split("\n## ", 1)[0]


def _table(section: str, heading: str | None = None) -> list[list[str]]:
    """Cells of the first table after ``### heading`` (or of the section's first table)."""
    part = section.split(f"### {heading}\n", 1)[1] if heading else section
    block = next(b.strip() for b in part.split("\n\n") if b.strip().startswith("|"))
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in block.splitlines()[2:]]


def _expected(category: str, config: str) -> list[str]:
    return [f"{v:.4f}" for v in METRICS[category][config]]


@pytest.fixture(scope="module")
def two_categories(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("pixel_report")
    params = pixel_workspace(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the index's image paths are relative to the project folder
        result = report(params)
    return root, result


def test_pixel_section_picks_oracle_and_loco_configs(two_categories):
    root, result = two_categories
    section = _section(root)
    # alpha: oracle image AUROC -> X; oracle AUPRO -> Y; LOCO by image AUROC: beta ranks Y
    # best among the configs with maps (I, better there, has none) -> Y; LOCO by AUPRO:
    # beta ranks Z best -> Z. beta: Y, Z, and from alpha X (image AUROC) and Y (AUPRO).
    picks = {"alpha": "XYYZ", "beta": "YZXY"}
    for category, configs in picks.items():
        rows = _table(section, category)
        assert [r[0] for r in rows] == [
            "oracle: best image AUROC", "oracle: best AUPRO",
            "honest (LOCO): best mean image-AUROC rank", "honest (LOCO): best mean AUPRO rank",
        ]  # fmt: skip
        for row, config in zip(rows, configs, strict=True):
            assert row[1:4] == _expected(category, config), (category, row)
            assert row[-1] == f"`{key_of(category, config)[:12]}`"
        assert [r[6] for r in rows] == ["", "", "1", "1"]  # tied configs of the LOCO picks
    means = _table(section)
    assert means[0] == ["oracle: best image AUROC", "2", "0.9250", "0.8900", "0.6500"]
    assert means[3] == ["honest (LOCO): best mean AUPRO rank", "2", "0.8000", "0.9050", "0.7250"]
    assert "not possible" not in section
    metrics = json.loads((root / "results" / "metrics.json").read_text())["pixel"]
    assert metrics["categories"] == 2 and metrics["experiments"] == 6
    chosen = metrics["per_category"]["beta"]["loco_auroc"]
    assert chosen["key"] == key_of("beta", "X") and chosen["aupro"] == 0.5
    assert metrics["mean"]["oracle_aupro"]["aupro"] == pytest.approx(0.875)
    assert result.pixel is not None and result.pixel.categories == ["alpha", "beta"]
    # The image-level sections still see the image-level config (Table 4's oracle).
    assert result.best["alpha"]["key"] == key_of("alpha", "I")


def test_pixel_section_figures_show_the_extreme_images(two_categories):
    root, _ = two_categories
    section = _section(root)
    for category, best in (("alpha", "Y"), ("beta", "Z")):
        path = root / "results" / "figures" / f"maps_{category}.png"
        with Image.open(path) as image:
            assert image.format == "PNG"
            width, height = image.size
            pixels = np.asarray(image.convert("RGB"))
        assert 1000 < width < 2500 and 300 < height < 700  # four panels in a row
        red = (pixels[..., 0] > 180) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
        assert red.sum() > 500  # the hot spots of the defective panels
        assert f"![anomaly maps of {category}](figures/maps_{category}.png)" in section
        assert f"best config by AUPRO (`{key_of(category, best)[:12]}`)" in section
    # By image score: alpha Y scores good 0.3, 0.9, 0.1 and crack 2.0, 1.5, 0.5; beta Z
    # has NaN (stored NULL: least anomalous) for good/000.
    assert ("`test/good/002` (least anomalous good, score 0.1); `test/good/001` (most "
            "anomalous good, score 0.9); `test/crack/002` (least anomalous defective, score "
            "0.5); `test/crack/000` (most anomalous defective, score 2)") in section  # fmt: skip
    assert "`test/good/000` (least anomalous good, score n/a)" in section
    assert "`test/crack/001` (most anomalous defective, score 3)" in section


def test_map_panels_skip_repeats_and_missing_groups():
    labels = {"test/good/000": ("good", False, 1.0), "test/crack/000": ("crack", True, 0.5),
              "test/crack/001": ("crack", True, float("nan"))}  # fmt: skip
    panels = map_panels(labels, list(labels))
    assert panels == [("test/good/000", "least anomalous good"),
                      ("test/crack/001", "least anomalous defective"),
                      ("test/crack/000", "most anomalous defective")]  # fmt: skip
    assert map_panels({"test/good/000": ("good", False, 1.0)}, IMAGES[1:]) == []


def test_one_category_without_stored_maps_says_what_is_missing(tmp_path, monkeypatch):
    params = pixel_workspace(tmp_path, categories=("alpha",))
    raw = yaml.safe_load(params.read_text())
    raw["evaluate"]["maps"] = str(tmp_path / "elsewhere")
    params.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    report(params)
    section = _section(tmp_path)
    assert "leave-one-category-out selection is not possible" in section
    rows = _table(section, "alpha")
    assert [r[1] for r in rows[2:]] == ["n/a (needs >= 2 categories)"] * 2
    assert rows[1][1:4] == _expected("alpha", "Y")
    assert f"No map figure for alpha: {tmp_path / 'elsewhere'}" in section
    assert not list((tmp_path / "results" / "figures").glob("maps_*.png"))


def test_no_pixel_section_without_maps(tmp_path, monkeypatch):
    params = pixel_workspace(tmp_path, configs="I")
    monkeypatch.chdir(tmp_path)
    result = report(params)
    text = (tmp_path / "results" / "report.md").read_text()
    assert "## Table 4" in text and "Where is the defect" not in text and "AUPRO" not in text
    assert result.pixel is None
    assert "pixel" not in json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert not list((tmp_path / "results" / "figures").glob("maps_*.png"))
