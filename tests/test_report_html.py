"""report.html in a real headless browser (Debian's Chromium, driven by Playwright).

A small evaluated workspace, its report stage run for real, then the page opened from a
file:// URL with every request watched: nothing may fail and nothing may leave the
machine, no console error, every figure loaded and visible, a long table sorts on a click.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from stages.engine import EngineParams, dask_client
from stages.errors import UserError
from stages.evaluate import evaluate
from stages.report import report
from stages.report_html import CHROMIUM, render_html
from tests.eval_fixtures import make_workspace

CATEGORIES = {"bottle": ["rot90"], "screw": []}
EXTRACTORS = [("resnet18", "imagenet", "layer2", "avg"), ("resnet18", "random", "layer3", "avg")]
DETECTORS = [
    {"family": "KNNDistance", "grid": {"n_neighbors": [1, 2, 3, 5]}},
    {"family": "Mahalanobis"},
]


@pytest.fixture(scope="module")
def page_file(tmp_path_factory) -> Path:
    """The report folder of a small evaluated workspace, after the real report stage."""
    root = tmp_path_factory.mktemp("report_html")
    params = make_workspace(root, categories=CATEGORIES, extractors=EXTRACTORS,
                            evaluate={"detectors": DETECTORS}, dims=(8,))  # fmt: skip
    with dask_client(EngineParams(n_workers=1, memory_limit="2GiB")) as client:
        evaluate(params, client=client)
    raw = yaml.safe_load(params.read_text())
    raw["report"] = {"out": str(root / "results"), "top_n": 4}
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    report(params)
    return root / "results" / "report.html"


def test_page_is_self_contained(page_file):
    text = page_file.read_text(encoding="utf-8")
    figures = sorted((page_file.parent / "figures").glob("*.png"))
    assert len(figures) >= 4
    # every figure embedded, none referenced by path or URL
    assert text.count('src="data:image/png;base64,') == len(figures)
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", text)
    assert not re.search(r"https?://", text)
    assert 'class="sortable"' in text and "<nav>" in text


def test_missing_figure_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match=r"figures/gone\.png: figure missing"):
        render_html("# r\n\n![x](figures/gone.png)\n", tmp_path)
    with pytest.raises(UserError, match="not a file beside it"):
        render_html("# r\n\n![x](https://example.org/x.png)\n", tmp_path)


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} absent: apt-get install chromium")
def test_page_in_headless_chromium(page_file):
    from stages.report_html import chromium_page

    requests, failed, errors = [], [], []
    with chromium_page() as page:
        page.on("request", lambda r: requests.append(r.url))
        page.on("requestfailed", lambda r: failed.append(r.url))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(page_file.as_uri(), wait_until="load")
        images = page.eval_on_selector_all(
            "img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.getBoundingClientRect()"
            ".width, getComputedStyle(i).visibility])")  # fmt: skip
        assert images and all(ok and w > 0 and shown > 0 and vis == "visible"
                              for ok, w, shown, vis in images), images  # fmt: skip

        # The top table (per category, 4 each): sort by AUROC, ascending then descending.
        table = page.locator("h2:has-text('Top 4 experiments') ~ div.scroll table").first
        assert table.get_attribute("class") == "sortable"
        heads = table.locator("thead th").all_text_contents()
        col = heads.index("AUROC")

        def column() -> list[float]:
            cells = table.locator(f"tbody tr td:nth-child({col + 1})").all_text_contents()
            return [float(c) for c in cells]

        before = column()
        table.locator("thead th").nth(col).click()
        assert column() == sorted(before)
        table.locator("thead th").nth(col).click()
        assert column() == sorted(before, reverse=True)
        assert table.locator("thead th").nth(col).get_attribute("aria-sort") == "descending"
    assert not failed and not errors, (failed, errors)
    assert requests and all(u.startswith(("file://", "data:")) for u in requests), requests
