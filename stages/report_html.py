"""``report.html``: the report as one self-contained page, readable offline in a browser.

The report stage writes it next to ``report.md``, from the same Markdown (converted with
markdown-it-py): the tables (long ones sortable by a click on a column header, by a few
lines of our own JavaScript), the figures embedded as base64 PNG ``data:`` URIs, and a
contents list of the sections. Nothing is fetched from the network: no script, style, font
or image has a URL, so the page renders the same with no connection at all (unlike
``dvc plots show``, whose page loads its JavaScript from a CDN).

    python -m stages.report_html [--report results] [--screenshot docs/report_top.png]

regenerates ``<report>/report.html`` from ``<report>/report.md`` and its ``figures/``, and
with ``--screenshot`` saves the top of the page (1200 x 900) as seen by headless Chromium
(Debian's ``chromium`` package, driven by Playwright; README shows that picture).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt

from stages.errors import UserError, run_cli, setup_logging
from stages.io import write_text_atomic

SORTABLE_ROWS = 6  # tables with more body rows than this get sortable headers
CHROMIUM = Path("/usr/bin/chromium")
# Headless Chromium on a closed network: no sandbox (root in a container), and none of its
# own background connections (they would be refused and logged as errors).
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync")  # fmt: skip

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: #1f2328; margin: 0; background: #f6f8fa; }
main { max-width: 1500px; margin: 0 auto; padding: 1.2em 2em 4em; background: #fff; }
h1 { margin: 0.2em 0 0.3em; font-size: 1.9em; }
h2 { margin-top: 2.2em; padding-bottom: 0.25em; border-bottom: 1px solid #d0d7de; }
h3 { margin-top: 1.6em; }
nav { background: #f6f8fa; border: 1px solid #d0d7de; border-radius: 6px;
  padding: 0.5em 1em; margin: 1em 0; columns: 2; font-size: 0.95em; }
nav a { display: block; padding: 0.1em 0; color: #0969da; text-decoration: none; }
nav strong { column-span: all; display: block; margin-bottom: 0.3em; }
.scroll { overflow-x: auto; margin: 0.8em 0; }
table { border-collapse: collapse; font-size: 0.88em; }
th, td { border: 1px solid #d0d7de; padding: 0.3em 0.6em; vertical-align: top; }
th { background: #f6f8fa; position: sticky; top: 0; }
tbody tr:nth-child(even) { background: #fafbfc; }
tbody tr:hover { background: #fff8c5; }
td[style*="right"] { font-variant-numeric: tabular-nums; white-space: nowrap; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th::after { content: " \\2195"; color: #8c959f; }
table.sortable th[aria-sort="ascending"]::after { content: " \\25B2"; color: #1f2328; }
table.sortable th[aria-sort="descending"]::after { content: " \\25BC"; color: #1f2328; }
img { max-width: 100%; height: auto; border: 1px solid #d0d7de; margin: 0.5em 0; }
code { background: #eff1f3; padding: 0.1em 0.3em; border-radius: 4px; font-size: 0.9em; }
.headline { background: #ddf4ff; border: 1px solid #54aeff; border-radius: 6px;
  padding: 0.6em 1em; font-size: 1.05em; }
"""

# A click on a header of a sortable table sorts its body by that column: numbers as
# numbers (n/a and blanks last), else as text; a second click reverses.
SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = table.querySelectorAll("thead th");
  heads.forEach(function (th, col) {
    th.title = "click to sort";
    th.addEventListener("click", function () {
      var asc = th.getAttribute("aria-sort") !== "ascending";
      heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var text = row.cells[col] ? row.cells[col].textContent.trim() : "";
        var num = parseFloat(text);
        return (text !== "" && /^[-+]?[0-9.]+(e[-+]?[0-9]+)?/i.test(text) && !isNaN(num))
          ? [0, num, text] : [text === "" || text === "n/a" ? 2 : 1, 0, text.toLowerCase()];
      }
      rows.sort(function (a, b) {
        var ka = key(a), kb = key(b);
        if (ka[0] !== kb[0]) { return ka[0] - kb[0]; }
        var c = ka[0] === 0 ? ka[1] - kb[1] : (ka[2] < kb[2] ? -1 : ka[2] > kb[2] ? 1 : 0);
        return asc ? c : -c;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def _slug(text: str, taken: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    slug, k = base, 2
    while slug in taken:
        slug, k = f"{base}-{k}", k + 1
    taken.add(slug)
    return slug


def _embed_images(body: str, folder: Path) -> str:
    """Every ``<img src="relative.png">`` as a base64 ``data:`` URI of the file under
    ``folder``; a missing file is a one-line error (the page would show a broken image)."""

    def inline(match: re.Match[str]) -> str:
        src = html.unescape(match.group(2))
        if src.startswith("data:"):
            return match.group(0)
        if re.match(r"^[a-z][a-z0-9+.-]*:", src, re.I) or src.startswith("/"):
            raise UserError(f"report.md: image {src!r} is not a file beside it; "
                            "report.html embeds only files under the report folder")  # fmt: skip
        path = folder / src
        if not path.is_file():
            raise UserError(f"{path}: figure missing (rerun the report stage)")
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'{match.group(1)}"data:image/png;base64,{data}"'

    return re.sub(r'(<img\s[^>]*?src=)"([^"]*)"', inline, body)


def _tables(body: str) -> str:
    """Each table in a horizontally scrolling box; long ones sortable."""

    def wrap(match: re.Match[str]) -> str:
        table = match.group(0)
        rows = table.split("<tbody>", 1)[-1].count("<tr")
        if rows > SORTABLE_ROWS:
            table = table.replace("<table>", '<table class="sortable">', 1)
        return f'<div class="scroll">{table}</div>'

    return re.sub(r"<table>.*?</table>", wrap, body, flags=re.S)


def _contents(body: str) -> tuple[str, str]:
    """Anchors on the ``<h2>`` headings and the contents list linking to them."""
    taken: set[str] = set()
    items: list[str] = []

    def anchor(match: re.Match[str]) -> str:
        title = re.sub(r"<[^>]+>", "", match.group(1))
        slug = _slug(html.unescape(title), taken)
        items.append(f'<a href="#{slug}">{match.group(1)}</a>')
        return f'<h2 id="{slug}">{match.group(1)}</h2>'

    body = re.sub(r"<h2>(.*?)</h2>", anchor, body)
    nav = "<nav><strong>Contents</strong>" + "".join(items) + "</nav>" if items else ""
    return body, nav


def _headline(folder: Path) -> str:
    """The study's headline numbers (from ``metrics.json``, when there) in one box."""
    path = folder / "metrics.json"
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
        oracle, honest = m["mean_best_auroc_oracle"], m["mean_auroc_loco"]
        n, done = m["categories"], m["done"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    if oracle is None:
        return ""

    def num(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    return ('<p class="headline">Mean best AUROC over ' f"{n} categor{'y' if n == 1 else 'ies'}: "
            f"<b>{num(oracle)}</b> oracle (chosen on each category's own test labels), "
            f"<b>{num(honest)}</b> honest (leave-one-category-out; Table 4); "
            f"{done} experiments done.</p>\n")  # fmt: skip


def render_html(markdown_text: str, folder: Path, title: str = "Results report") -> str:
    """The page of ``markdown_text`` (report.md), its images read from under ``folder``."""
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown_text)
    body, nav = _contents(_tables(_embed_images(body, folder)))
    # The headline and the contents list go after the first paragraph (the provenance).
    head, sep, rest = body.partition("</p>\n")
    nav = _headline(folder) + nav
    body = head + sep + nav + rest if sep else nav + body
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n"
        f"<body>\n<main>\n{body}</main>\n<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )


def write_html(folder: Path) -> Path:
    """Write ``folder/report.html`` from ``folder/report.md`` and its figures."""
    source = folder / "report.md"
    if not source.is_file():
        raise UserError(f"{source}: missing (run the report stage first)")
    out = folder / "report.html"
    write_text_atomic(out, render_html(source.read_text(encoding="utf-8"), folder))
    return out


@contextmanager
def chromium_page(width: int = 1200, height: int = 900) -> Iterator[Any]:
    """A Playwright page in Debian's headless Chromium (``CHROMIUM``), with the fresh
    temporary profile Playwright gives every launch; Playwright's own browser downloads
    are never used."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        raise UserError(f"{CHROMIUM}: not installed (apt-get install chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS))
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def screenshot(page_path: Path, png: Path) -> None:
    """The top of ``page_path`` (the viewport, 1200 x 900) as a PNG, as Chromium shows it."""
    with chromium_page() as page:
        page.goto(page_path.resolve().as_uri(), wait_until="load")
        png.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(png), full_page=False)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, default=Path("results"),
                        help="the report stage's folder (report.md, figures/)")  # fmt: skip
    parser.add_argument("--screenshot", type=Path, default=None,
                        help="also save the top of the page as this PNG")  # fmt: skip
    args = parser.parse_args(argv)
    setup_logging("report_html")
    out = write_html(args.report)
    print(f"report_html: wrote {out}")
    if args.screenshot is not None:
        screenshot(out, args.screenshot)
        print(f"report_html: wrote {args.screenshot}")


if __name__ == "__main__":
    run_cli(main)
