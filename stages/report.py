"""Stage ``report``: the study's tables and figures from the results database, read only.

Writes, under ``report.out``:

- ``report.md``: counts and error kinds, the dataset statistics, Table 4 (best AUROC per
  category, the oracle, next to the honest leave-one-category-out choice and the gap),
  Table 5 (seconds per detector family: measured per work unit and per config, and the
  amortised mean fit/score), Table 6 (the best config per
  category, every field), the threshold metrics of those configs, the top experiments,
  the seed spread of the stochastic detectors (AUROC mean, std, min, max over
  ``evaluate.seeds`` per config), the augmentation benefit, a family x backbone/layer
  heatmap, Figure 4 (family time per work unit against feature dimension and training-set
  size) and ROC
  curves of each category's best configs; PNG figures in ``figures/``. When experiments
  made anomaly maps (patch families, anomalib's models), the section "Where is the defect": per category the
  image AUROC, pixel AUROC and AUPRO of four picks among them (oracle by image AUROC, by
  AUPRO; honest LOCO by each), and ``figures/maps_<category>.png``: the best-AUPRO
  experiment's maps over the least and most anomalous good and defective test images
  (maps from ``evaluate.maps``, images and masks through ``data.index``). When done
  experiments have learning curves (families that train a network), the section "Trained
  models" (``stages/report_trained.py``): per category their table,
  ``figures/curves_<category>.png`` and ``figures/reconstructions_<category>.png``;
- with experiments of families that learn from labelled test images (the few-labels
  protocol), the section "With a few labels" (``stages/report_few_labels.py``): per
  category those rows and the best one-class experiment by AUROC on the same labelled
  images, all on the protocol's held-out images, and ``figures/few_labels_<category>.png``
  (ROC and PR curves); such rows are in no other table (theirs is a subset of the test
  images);
- ``metrics.json`` (for ``dvc metrics show``; ``seed_spread`` per stochastic family;
  ``pixel`` when experiments made maps; ``trained`` when experiments trained a network;
  ``few_labels`` with labelled experiments),
  ``experiments.csv`` (every experiment, every column) and ``plots/roc/<category>.csv``
  (``fpr,tpr`` of the category's best config, for ``dvc plots``).

The database is the evaluate stage's output and is never written here.

    python -m stages.report [--params params.yaml]

Params (section ``report``; the database URL is ``evaluate.db_url``, the dataset
statistics come from ``data.stats_dir``):

- ``out`` (``results``): folder of the outputs above.
- ``top_n`` (10): rows of the top-experiments table.
- ``roc_best_per_category`` (3): ROC curves drawn per category (its best configs).
- ``scope`` (``grid``): ``grid`` = only the experiments of the current grid (as the
  evaluate stage plans it from ``feature_sets.json`` and ``evaluate``), like the evaluate
  summary; ``all`` = every stored experiment (for a config stored under several feature
  hashes, the most recently updated one is used in the tables).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from matplotlib.figure import Figure
from pydantic import Field
from sklearn.metrics import roc_curve
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from stages.dataset import stats_markdown
from stages.errors import UserError, run_cli, setup_logging
from stages.evaluate import (
    FEATURE_SETS_FILE,
    EvaluateParams,
    plan,
    read_feature_sets,
    resolved_detectors,
)
from stages.io import atomic_path, remove_stale_temps, write_json_atomic, write_text_atomic
from stages.methods import FAMILIES
from stages.metrics import (
    THRESHOLD_FIELDS,
    LocoChoice,
    config_id,
    describe_config,
    loco_selection,
    ranking_scores,
    tie_safe_scores,
)
from stages.palette import LINE_STYLES, family_colour, family_shades
from stages.params import OutputFolder, Section, load_params, load_section, stage_args
from stages.query import (
    ExperimentMaps,
    experiment_maps,
    image_labels,
    index_rows,
    picture,
    score_text,
)
from stages.report_html import write_html
from stages.results_db import STATUSES, Experiment, Image, Score, open_db
from stages.scope import DatasetScope, current_ids, scope

log = logging.getLogger("stages.report")

DEFAULT_DB_URL = "sqlite:///results/results.sqlite"
NEEDS_TWO = "n/a (needs >= 2 categories)"
# Families whose result depends on the seed (``random_state``).
STOCHASTIC = tuple(name for name, family in FAMILIES.items() if family.seeded)
SEEDS_HINT = "`evaluate.seeds: [0, 1, 2, 3, 4]`"


class ReportParams(Section):
    """The ``report`` section of params.yaml."""

    out: OutputFolder = "results"
    top_n: Annotated[int, Field(ge=1)] = 10
    roc_best_per_category: Annotated[int, Field(ge=1)] = 3
    scope: Literal["grid", "all"] = "grid"


# --- reading -------------------------------------------------------------------------------


def grid_keys(params_path: str | Path) -> set[str]:
    """Keys of the experiments the evaluate stage plans for the current params."""
    params = load_section(params_path, "evaluate", EvaluateParams)
    assert isinstance(params, EvaluateParams)
    root = load_params(params_path)
    extract_out = Path((root.extract or {}).get("out", "cache/features"))
    feature_sets = read_feature_sets(extract_out / FEATURE_SETS_FILE)
    detectors, _ = resolved_detectors(params, root, params_path)
    units = plan(feature_sets, root.augment.transforms, detectors, params.seeds,
                 params.augmentation)  # fmt: skip
    return {e.key for _, exps in units for e in exps}


def read_experiments(engine: Engine, keys: set[str] | None = None) -> list[dict[str, Any]]:
    """Experiment rows (all, or those among ``keys``), ordered by key, without ``id``."""
    columns = [c for c in Experiment.__table__.columns if c.name != "id"]
    with Session(engine) as session:
        rows = session.execute(select(*columns).order_by(Experiment.key)).mappings().all()
    return [dict(r) for r in rows if keys is None or r["key"] in keys]


def latest_done(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Done rows with an AUROC, one per (category, config): the most recently updated."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        if row["status"] != "done" or row["auroc"] is None:
            continue
        slot = (row["category"], config_id(row))
        if slot not in best or row["updated_at"] > best[slot]["updated_at"]:
            best[slot] = row
    return sorted(best.values(), key=lambda r: r["key"])


def labelled_scores(engine: Engine, key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(is_anomaly, score)`` of one done experiment's test images (NaN for NULL)."""
    query = (
        select(Image.is_anomaly, Score.score)
        .join(Score, Score.image == Image.id)
        .join(Experiment, Experiment.id == Score.experiment)
        .where(Experiment.key == key)
        .order_by(Image.image_id)
    )
    with Session(engine) as session:
        pairs = [tuple(r) for r in session.execute(query)]
    y = np.array([bool(a) for a, _ in pairs], dtype=bool)
    s = np.array([np.nan if v is None else v for _, v in pairs], dtype=np.float64)
    return y, s


# --- tables --------------------------------------------------------------------------------


def ordered_categories(rows: Iterable[dict[str, Any]], preferred: Sequence[str]) -> list[str]:
    """Categories present in ``rows``: those of ``data.categories`` first, in that order."""
    present = {r["category"] for r in rows}
    return [c for c in preferred if c in present] + sorted(present - set(preferred))


def best_per_category(done: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The highest-AUROC experiment per category (ties: the smallest key)."""
    best: dict[str, dict[str, Any]] = {}
    for row in done:  # ordered by key, so a later tie does not replace
        cur = best.get(row["category"])
        if cur is None or row["auroc"] > cur["auroc"]:
            best[row["category"]] = row
    return best


def top_per_category(done: Sequence[dict[str, Any]], n: int) -> dict[str, list[dict[str, Any]]]:
    by_category: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in done:
        by_category[row["category"]].append(row)
    return {
        c: sorted(rows, key=lambda r: (-r["auroc"], r["key"]))[:n]
        for c, rows in by_category.items()
    }


GROUP_FIELDS = ("category", "backbone", "init", "layer", "representation", "augmented", "seed",
                "detector")  # fmt: skip


def flag_all(row: dict[str, Any]) -> list[Any]:
    """Threshold metrics of flagging every test image (the trivial baseline), in
    ``THRESHOLD_FIELDS`` order, from the experiment's confusion counts."""
    if row["tp_oracle"] is None:
        return [None] * len(THRESHOLD_FIELDS)
    pos = row["tp_oracle"] + row["fn_oracle"]
    neg = row["fp_oracle"] + row["tn_oracle"]
    n = pos + neg
    return ["-inf", 2 * pos / (2 * pos + neg) if pos + neg else 0.0, pos / n if n else 0.0,
            1.0 if pos else 0.0, pos / n if n else 0.0, pos, neg, 0, 0]  # fmt: skip


def family_groups(done: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per family call (work unit x augmented x seed x family) of done experiments:
    its measured own seconds (``group_s``), its size, its total with the shared quantities'
    shares (the sum of its experiments' ``fit_s + score_s``), dimension and training size.
    Rows stored before ``group_s`` existed count as calls of one config."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in done:
        if row["group_size"] and row["group_size"] > 1:
            groups[tuple(row[f] for f in GROUP_FIELDS)].append(row)
        else:
            groups[(row["key"],)].append(row)
    out = []
    for members in groups.values():
        first = members[0]
        own = first["group_s"] if first["group_s"] is not None else (first["fit_s"] or 0.0)
        out.append({
            "detector": first["detector"], "unit": tuple(first[f] for f in GROUP_FIELDS[:5]),
            "own_s": own, "size": len(members), "dim": first["dim"], "n_train": first["n_train"],
            "total_s": sum((r["fit_s"] or 0.0) + (r["score_s"] or 0.0) for r in members),
        })  # fmt: skip
    return out


def family_times(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per detector family: counts by status, the measured seconds of its calls per work unit
    and per config, and the mean amortised fit/score seconds of done experiments."""
    by_family: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_family[row["detector"]].append(row)
    table = []
    for family in sorted(by_family):
        fam = by_family[family]
        done = [r for r in fam if r["status"] == "done"]
        counts = Counter(r["status"] for r in fam)
        calls = family_groups(done)
        per_unit: dict[tuple, float] = defaultdict(float)
        for call in calls:
            per_unit[call["unit"]] += call["own_s"]
        n_configs = sum(c["size"] for c in calls)
        table.append({
            "family": family,
            **{s: counts.get(s, 0) for s in STATUSES},
            "unit_s": float(np.median(list(per_unit.values()))) if per_unit else None,
            "config_s": sum(c["own_s"] for c in calls) / n_configs if n_configs else None,
            "mean_fit_s": _mean(r["fit_s"] for r in done),
            "mean_score_s": _mean(r["score_s"] for r in done),
            "mean_auroc": _mean(r["auroc"] for r in done),
            "best_auroc": max((r["auroc"] for r in done if r["auroc"] is not None), default=None),
        })  # fmt: skip
    return table


def augmentation_benefit(
    done: Sequence[dict[str, Any]], categories: Sequence[str]
) -> list[dict[str, Any]]:
    """Per category the best AUROC with and without augmentation (None where not run)."""
    table = []
    for category in categories:
        best = {
            aug: max(
                (r["auroc"] for r in done if r["category"] == category and r["augmented"] == aug),
                default=None,
            )
            for aug in (True, False)
        }
        gain = None if None in best.values() else best[True] - best[False]
        table.append({"category": category, "with": best[True], "without": best[False],
                      "gain": gain})  # fmt: skip
    return table


def extractor_label(row: dict[str, Any]) -> str:
    return f"{row['backbone']}-{row['init']}/{row['layer']}"


def heatmap_table(
    done: Sequence[dict[str, Any]], categories: Sequence[str]
) -> tuple[list[str], list[str], dict[str, np.ndarray]]:
    """Family x backbone/layer per category: the best AUROC among the cell's configs (NaN:
    none run). Families in the palette's order, categories in ``categories`` order."""
    cells: dict[tuple[str, str, str], float] = {}
    for row in done:
        slot = (row["category"], row["detector"], extractor_label(row))
        cells[slot] = max(cells.get(slot, -math.inf), row["auroc"])
    families = family_order({f for _, f, _ in cells})
    extractors = sorted({e for _, _, e in cells})
    grids = {}
    for category in [c for c in categories if any(k[0] == c for k in cells)]:
        grid = np.full((len(families), len(extractors)), np.nan)
        for (c, family, extractor), value in cells.items():
            if c == category:
                grid[families.index(family), extractors.index(extractor)] = value
        grids[category] = grid
    return families, extractors, grids


def top_with_ties(
    done: Sequence[dict[str, Any]], categories: Sequence[str], n: int
) -> dict[str, tuple[list[dict[str, Any]], int]]:
    """Per category its ``n`` best experiments by AUROC and how many more share the last
    one's AUROC. AUROCs equal within their numerical error are ties (the project's tie
    rule, ``tie_safe_scores``); tied rows are listed by key."""
    out = {}
    for category in categories:
        here = [r for r in done if r["category"] == category]
        if not here:
            continue
        tied = tie_safe_scores(np.array([r["auroc"] for r in here], dtype=np.float64))
        order = sorted(range(len(here)), key=lambda i: (-tied[i], here[i]["key"]))
        shown = order[:n]
        more = sum(1 for i in order[n:] if tied[i] == tied[shown[-1]])
        out[category] = ([here[i] for i in shown], more)
    return out


def seed_spread(done: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """AUROC over the seeds of each stochastic config per category (those with >= 2 seeds
    done), largest range first. ``std`` is the population one (ddof=0), as in the README's
    SQL; ``row`` is one of the config's experiments (for every field but the seed)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in done:
        if row["detector"] in STOCHASTIC:
            groups[(row["category"], config_id({**row, "seed": None}))].append(row)
    table = []
    for (category, config), rows in groups.items():
        if len(rows) < 2:
            continue
        auroc = np.array([r["auroc"] for r in rows], dtype=np.float64)
        table.append({"category": category, "config": config, "row": rows[0],
                      "family": rows[0]["detector"], "seeds": len(rows),
                      "mean": float(auroc.mean()), "std": float(auroc.std()),
                      "min": float(auroc.min()), "max": float(auroc.max()),
                      "range": float(auroc.max() - auroc.min())})  # fmt: skip
    return sorted(table, key=lambda s: (-s["range"], s["category"], s["config"]))


def spread_label(spread: dict[str, Any]) -> str:
    """Where a seed spread is: category, extractor, augmentation and detector."""
    r = spread["row"]
    aug = "aug" if r["augmented"] else "no-aug"
    return f"{r['category']} {extractor_label(r)} {r['representation']} {aug} {r['detector_name']}"


def seed_spread_summary(spread: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per stochastic family: configs with >= 2 seeds, mean AUROC std, the largest range."""
    by_family: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in spread:  # largest range first, so each family's first is its largest
        by_family[s["family"]].append(s)
    return {
        family: {"configs": len(group), "mean_auroc_std": _mean(s["std"] for s in group),
                 "max_auroc_range": group[0]["range"], "max_range_at": spread_label(group[0])}
        for family, group in sorted(by_family.items())
    }  # fmt: skip


def error_kind(status: str, error: str | None) -> str:
    """A short class of an error: the exception type, the signal, or ``timeout``."""
    if status == "timeout":
        return "timeout"
    text = error or ""
    if status == "crashed":
        signal = re.search(r"SIG[A-Z]+", text)
        return signal.group(0) if signal else "worker died"
    match = re.match(r"\s*([A-Za-z_][\w.]*)\s*:", text)
    return match.group(1) if match else (text.split("\n")[0][:60] or "unknown")


def error_kinds(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, str, int]]:
    """``(status, family, kind, count)`` of the experiments that are not done."""
    counts = Counter(
        (r["status"], r["detector"], error_kind(r["status"], r["error"]))
        for r in rows
        if r["status"] != "done"
    )
    return sorted(((*k, n) for k, n in counts.items()), key=lambda t: (t[0], t[1], -t[3]))


# --- Markdown -----------------------------------------------------------------------------


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: floats rounded, None as ``n/a``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "\\|")


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A Markdown table; ``align`` has one of ``l``/``r`` per column (default: left)."""
    align = align or "l" * len(header)
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
    ]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def loco_cell(choice: LocoChoice, n_categories: int) -> str:
    if n_categories < 2:
        return NEEDS_TWO
    if choice.config is None:
        return "n/a (no config done in all other categories)"
    if choice.auroc is None:
        return "n/a (chosen config not done here)"
    return fmt(choice.auroc)


# --- figures -------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> None:
    """PNG through Matplotlib's object API (Agg canvas; no pyplot state, no display)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def figure_fit_time(done: Sequence[dict[str, Any]], path: Path) -> None:
    """Figure 4: a family's time per work unit and augmentation choice (its call, plus its
    share of the shared quantities; one config's fit + score on the per-config path)
    against feature dimension and training-set size (log-log); family colours as in every
    figure, legend beside the panels."""
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    axes = fig.subplots(1, 2)
    calls = family_groups(done)
    families = family_order({c["detector"] for c in calls})
    for ax, x_field, label in ((axes[0], "dim", "feature dimension"),
                               (axes[1], "n_train", "training images")):  # fmt: skip
        for family in families:
            rows = [c for c in calls if c["detector"] == family and c[x_field]]
            if not rows:
                continue
            x = np.array([r[x_field] for r in rows], dtype=float)
            y = np.maximum(np.array([r["total_s"] for r in rows], dtype=float), 1e-6)
            colour = family_colour(family)
            ax.scatter(x, y, s=14, alpha=0.35, color=colour)
            xs = np.unique(x)
            ax.plot(xs, [np.median(y[x == v]) for v in xs], color=colour, linewidth=2,
                    marker="o", markersize=4, label=family)  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label, fontsize=11)
        ax.set_ylabel("seconds per call (log)", fontsize=11)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=10,
               title="detector family\n(line: median)", frameon=False)  # fmt: skip
    fig.suptitle(
        "Figure 4: seconds of each detector family's call (all its configs on one work unit "
        "and augmentation choice,\nwith its share of the shared quantities) against feature "
        "dimension and training-set size; points: calls",
        fontsize=11,
    )
    _save(fig, path)


def family_order(names: Iterable[str]) -> list[str]:
    """Families in ``FAMILIES`` order (the palette's), unknown ones last by name."""
    names = set(names)
    return [f for f in FAMILIES if f in names] + sorted(names - set(FAMILIES))


def _panel_grid(n: int, max_cols: int) -> tuple[int, int]:
    cols = min(max_cols, n)
    return math.ceil(n / cols), cols


def figure_heatmap(families: list[str], extractors: list[str], grids: dict[str, np.ndarray],
                   path: Path) -> None:  # fmt: skip
    """One panel per category (a mean over categories of AUROC ~1.0 and ~0.7 describes
    neither): family x backbone/layer, each cell the best AUROC with its value printed."""
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    n_rows, n_cols = _panel_grid(len(grids), 2 if len(extractors) > 3 else 3)
    width = 2.2 + 0.95 * max(len(extractors), 2)
    height = 1.6 + 0.42 * len(families)
    fig = Figure(figsize=(width * n_cols + 1.2, height * n_rows + 0.6), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    cmap = colormaps["viridis"]
    image = None
    for k, (ax, (category, grid)) in enumerate(zip(axes.flat, grids.items(), strict=False)):
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.5, vmax=1.0,
                          aspect="auto")  # fmt: skip
        ax.set_xticks(range(len(extractors)), extractors, rotation=30, ha="right", fontsize=9)
        ax.set_yticks(range(len(families)), families if k % n_cols == 0 else [], fontsize=10)
        for i in range(len(families)):
            for j in range(len(extractors)):
                v = grid[i, j]
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=9,
                            color="white" if v < 0.8 else "black")  # fmt: skip
                    if v == np.nanmax(grid):
                        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False,
                                               edgecolor="#d62728", linewidth=2.5))  # fmt: skip
        ax.set_title(f"{category} (best {np.nanmax(grid):.3f})", fontsize=11)
    for ax in list(axes.flat)[len(grids) :]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=list(axes.flat), shrink=0.6, label="best AUROC in the cell")
    fig.suptitle("Best AUROC per detector family x backbone/layer, one panel per category\n"
                 "(red outline: the category's best; blank: not run)", fontsize=11)  # fmt: skip
    _save(fig, path)


def figure_augmentation(table: Sequence[dict[str, Any]], path: Path) -> None:
    """Best AUROC per category without and with augmentation, each bar's value printed and
    the gain above each pair (a 0.005 difference is invisible as bar heights)."""
    fig = Figure(figsize=(2.2 + 1.5 * len(table), 4.4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(table))
    for offset, key, label, colour in ((-0.2, "without", "no augmentation", "#9e9e9e"),
                                       (0.2, "with", "augmented", "#3b75af")):  # fmt: skip
        values = [np.nan if r[key] is None else r[key] for r in table]
        bars = ax.bar(x + offset, values, width=0.4, label=label, color=colour)
        ax.bar_label(bars, labels=[fmt(v, 3) if np.isfinite(v) else "" for v in values],
                     padding=2, fontsize=9)  # fmt: skip
        for xi, v in zip(x, values, strict=True):
            if not np.isfinite(v):  # e.g. a category without transforms
                ax.text(xi + offset, 0.03, f"{label}: not run", rotation=90, ha="center",
                        va="bottom", fontsize=9, color="#59636e")  # fmt: skip
    for xi, r in zip(x, table, strict=True):
        if r["gain"] is not None:
            ax.text(xi, 1.1, f"gain {r['gain']:+.3f}", ha="center", fontsize=10,
                    fontweight="bold", color="#1a7f37" if r["gain"] > 0 else
                    ("#b42318" if r["gain"] < 0 else "black"))  # fmt: skip
    ax.set_xticks(x, [r["category"] for r in table], fontsize=11)
    ax.set_ylim(0.0, 1.18)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("best AUROC")
    ax.legend(fontsize=9, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), frameon=False)  # fmt: skip
    ax.set_title("Augmentation benefit: best AUROC per category,\nwithout and with "
                 "augmenting the training images")  # fmt: skip
    _save(fig, path)


def experiment_labels(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Legend entries of ``rows`` that name each experiment in full (detector with its
    hyperparameters, backbone-init/layer, representation, augmentation) and never read the
    same: the seed, then the key's start, are added where two would."""
    labels = [f"{r['detector_name']}\n{extractor_label(r)} {r['representation']}"
              f"{', augmented' if r['augmented'] else ''}" for r in rows]  # fmt: skip
    for extra in (lambda r: f", seed {r['seed']}", lambda r: f", key {r['key'][:8]}"):
        counts = Counter(labels)
        labels = [lab + extra(r) if counts[lab] > 1 else lab
                  for lab, r in zip(labels, rows, strict=True)]  # fmt: skip
    return [wrap_config(lab) for lab in labels]


def wrap_config(text: str, width: int = 58) -> str:
    """Lines of at most ``width`` characters, broken after commas: never cut."""
    out = []
    for line in text.split("\n"):
        parts, cur = re.split(r"(?<=,)", line), ""
        for part in parts:
            if cur and len(cur) + len(part) > width:
                out.append(cur)
                cur = "  " + part.lstrip()
            else:
                cur += part
        out.append(cur)
    return "\n".join(out)


def figure_roc(curves: dict[str, list[tuple[dict[str, Any], np.ndarray, np.ndarray]]],
               path: Path) -> None:  # fmt: skip
    """Per category a panel with its best configs' ROC curves; family colours, each panel's
    legend (rank, AUROC, the full config) below it, outside the curves."""
    n_rows, n_cols = _panel_grid(len(curves), 2)
    longest = max(sum(lab.count("\n") + 1 for lab in experiment_labels([r for r, _, _ in c]))
                  for c in curves.values())  # fmt: skip
    fig = Figure(figsize=(6.2 * n_cols, (4.2 + 0.2 * longest) * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for ax, (category, lines) in zip(axes.flat, curves.items(), strict=False):
        rows = [r for r, _, _ in lines]
        seen: Counter[str] = Counter()
        for rank, ((r, fpr, tpr), label) in enumerate(
            zip(lines, experiment_labels(rows), strict=True), start=1
        ):
            k = seen[r["detector"]]
            seen[r["detector"]] += 1
            ax.plot(fpr, tpr, linewidth=2.0 if rank == 1 else 1.5,
                    color=family_shades(r["detector"], k + 1)[k],
                    linestyle=LINE_STYLES[k % len(LINE_STYLES)],
                    label=f"{rank}. AUROC {r['auroc']:.4f}: {label}")  # fmt: skip
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(category, fontsize=12)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_aspect("equal")
        ax.legend(fontsize=8.5, loc="upper left", bbox_to_anchor=(0.0, -0.16),
                  frameon=False, borderaxespad=0)  # fmt: skip
    for ax in list(axes.flat)[len(curves) :]:
        ax.axis("off")
    fig.suptitle("ROC curves of each category's best configs (colour: detector family)",
                 fontsize=12)  # fmt: skip
    _save(fig, path)


# --- pixel level ---------------------------------------------------------------------------

# The four picks of the pixel-level section: (name, label in report.md).
PIXEL_PICKS = (
    ("oracle_auroc", "oracle: best image AUROC"),
    ("oracle_aupro", "oracle: best AUPRO"),
    ("loco_auroc", "honest (LOCO): best mean image-AUROC rank"),
    ("loco_aupro", "honest (LOCO): best mean AUPRO rank"),
)
PIXEL_VALUES = ("auroc", "pixel_auroc", "aupro")  # image AUROC, pixel AUROC, AUPRO


@dataclass(frozen=True)
class PixelPick:
    """One selection's experiment on a category (``row``), or why there is none (``note``);
    ``tied``: for a LOCO pick, how many configs shared the best mean rank."""

    row: dict[str, Any] | None
    note: str = ""
    tied: int | None = None


@dataclass
class PixelResults:
    """The pixel-level section: per category (those with maps) the four picks."""

    categories: list[str]
    experiments: int  # done experiments with pixel metrics
    picks: dict[str, dict[str, PixelPick]]  # category -> pick name -> pick


def with_maps(done: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Done experiments with pixel metrics: those that made anomaly maps."""
    return [r for r in done if r["pixel_auroc"] is not None or r["aupro"] is not None]


def _best_by(rows: Iterable[dict[str, Any]], field: str) -> dict[str, Any] | None:
    """The row with the highest ``field`` (ties: the smallest key), None if none has one."""
    return min((r for r in rows if r[field] is not None), key=lambda r: (-r[field], r["key"]),
               default=None)  # fmt: skip


def _by_aupro(row: dict[str, Any]) -> dict[str, Any]:
    """A row as ``loco_selection`` reads it, ranked by AUPRO: ties on the mean rank go to
    the higher mean AUPRO, then pixel AUROC, then honest pixel F1 on the other categories."""
    return {**row, "auroc": row["aupro"], "average_precision": row["pixel_auroc"],
            "f1_honest": row["pixel_f1_honest"]}  # fmt: skip


def _loco_pick(choice: LocoChoice, by_key: dict[str, dict[str, Any]], n: int) -> PixelPick:
    if n < 2:
        return PixelPick(None, NEEDS_TWO)
    if choice.config is None:
        return PixelPick(None, "n/a (no config with maps done in all other categories)")
    if choice.key is None:
        return PixelPick(None, "n/a (chosen config not done here)", choice.tied)
    return PixelPick(by_key[choice.key], "", choice.tied)


def pixel_selection(done: Sequence[dict[str, Any]], categories: Sequence[str]) -> PixelResults:
    """Per category with maps, among the experiments with maps: the oracle best by image
    AUROC and by AUPRO, and the honest leave-one-category-out choices by the mean rank of
    each on the other categories (``loco_selection``, as Table 4)."""
    rows = with_maps(done)
    present = {r["category"] for r in rows}
    cats = [c for c in categories if c in present]
    by_key = {r["key"]: r for r in rows}
    loco = {"loco_auroc": loco_selection(rows, cats),
            "loco_aupro": loco_selection([_by_aupro(r) for r in rows], cats)}  # fmt: skip
    picks = {}
    for c in cats:
        here = [r for r in rows if r["category"] == c]
        by_aupro = _best_by(here, "aupro")
        picks[c] = {
            "oracle_auroc": PixelPick(_best_by(here, "auroc")),
            "oracle_aupro": PixelPick(by_aupro, "" if by_aupro else "n/a (no AUPRO here)"),
            **{name: _loco_pick(choice[c], by_key, len(cats)) for name, choice in loco.items()},
        }
    return PixelResults(cats, len(rows), picks)


def pixel_means(pixel: PixelResults) -> dict[str, dict[str, Any]]:
    """Per pick: the mean image AUROC, pixel AUROC and AUPRO over the categories it has."""
    out = {}
    for name, _ in PIXEL_PICKS:
        chosen = [p[name].row for p in pixel.picks.values() if p[name].row is not None]
        out[name] = {"categories": len(chosen),
                     **{v: _mean(r[v] for r in chosen) for v in PIXEL_VALUES}}  # fmt: skip
    return out


def pixel_metrics_json(pixel: PixelResults) -> dict[str, Any]:
    """The pixel-level numbers of ``metrics.json``."""

    def entry(pick: PixelPick) -> dict[str, Any] | None:
        r = pick.row
        return None if r is None else {"key": r["key"], **{v: r[v] for v in PIXEL_VALUES}}

    return {
        "categories": len(pixel.categories),
        "experiments": pixel.experiments,
        "mean": pixel_means(pixel),
        "per_category": {
            c: {name: entry(p[name]) for name, _ in PIXEL_PICKS} for c, p in pixel.picks.items()
        },
    }


def map_panels(labels: dict[str, tuple[str, bool, float | None]],
               ids: Sequence[str]) -> list[tuple[str, str]]:  # fmt: skip
    """``(image_id, role)`` of the images a category's figure shows: the least and most
    anomalous good and defective test images (by image score; NaN as least anomalous)."""

    def rank(i: str) -> tuple[float, str]:
        s = labels[i][2]
        return (-math.inf if s is None or math.isnan(s) else s), i

    panels: list[tuple[str, str]] = []
    for anomalous, kind in ((False, "good"), (True, "defective")):
        group = sorted((i for i in ids if i in labels and labels[i][1] == anomalous), key=rank)
        for image, role in ((group[:1], f"least anomalous {kind}"),
                            (group[-1:], f"most anomalous {kind}")):  # fmt: skip
            if image and image[0] not in {p for p, _ in panels}:
                panels.append((image[0], role))
    return panels


def figure_maps(maps: ExperimentMaps, panels: Sequence[tuple[str, str]],
                labels: dict[str, tuple[str, bool, float | None]],
                pictures: Sequence[tuple[np.ndarray, np.ndarray]], path: Path) -> None:  # fmt: skip
    """One category's best map experiment over a few test images: each panel the anomaly
    map over the image with the mask outlined, all on one colour scale (its test maps')."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from stages.anomaly_maps import overlay

    fig = Figure(figsize=(3.2 * len(panels) + 1.0, 4.3), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (image_id, role), (image, mask) in zip(axes, panels, pictures, strict=True):
        ax.imshow(overlay(image, maps.maps[maps.image_ids.index(image_id)], mask, maps.vmin,
                          maps.vmax))  # fmt: skip
        name = "/".join(image_id.split("/")[-2:])
        ax.set_title(f"{name}, score {score_text(labels[image_id][2])}\n{role}", fontsize=10)
        ax.set_axis_off()
    fig.colorbar(ScalarMappable(Normalize(maps.vmin, maps.vmax), colormaps["jet"]),
                 ax=list(axes), shrink=0.8, pad=0.015, label="anomaly map value")  # fmt: skip
    exp = maps.exp
    detector = wrap_config(exp["detector_name"].replace(",", ", "), 100)
    fig.suptitle(f"{maps.category}: {detector}, {extractor_label(exp)} (AUPRO "
                 f"{fmt(exp['aupro'], 3)}); scale: min to max of its {len(maps.image_ids)} "
                 "test maps; mask outlined in white", fontsize=10)  # fmt: skip
    _save(fig, path)


def draw_category_maps(engine: Engine, exp: dict[str, Any], maps_dir: Path, index: Path,
                       path: Path) -> str:  # fmt: skip
    """Draw ``path`` for experiment ``exp``; return the caption naming the images shown."""
    maps = experiment_maps(exp, maps_dir)
    labels = image_labels(engine, exp["key"])
    panels = map_panels(labels, maps.image_ids)
    if not panels:
        raise UserError(f"experiment {exp['key'][:12]}: no scored test image with a map")
    rows = index_rows(index, maps.category)
    pictures = [picture(rows, image_id, maps, index) for image_id, _ in panels]
    figure_maps(maps, panels, labels, pictures, path)
    return "Shown (left to right): " + "; ".join(
        f"`{i}` ({role}, score {score_text(labels[i][2])})" for i, role in panels
    )


def _pixel_section(pixel: PixelResults, engine: Engine, figures: Path, maps_dir: Path,
                   index: Path) -> str:  # fmt: skip
    """Markdown of the pixel-level section; draws ``figures/maps_<category>.png``."""
    n_cat = len(pixel.categories)
    means = pixel_means(pixel)
    labels = dict(PIXEL_PICKS)
    parts = [
        f"{pixel.experiments} done experiments made anomaly maps (patch families, anomalib's "
        f"models, reconstruction families), in {n_cat} categor{'y' if n_cat == 1 else 'ies'}. "
        "They are scored per pixel in the "
        "model's 224 x 224 input: *pixel AUROC* over every pixel of every test image, "
        "*AUPRO* the mean overlap with each defect region up to a false positive rate of "
        "0.3 (normalised to [0, 1]). Four picks per category, among these experiments only: "
        "the *oracle* best by the category's own image AUROC or AUPRO (optimistic), and the "
        "*honest* leave-one-category-out choice by the best mean rank of image AUROC or of "
        "AUPRO on the other categories (as Table 4; ties on the rank: the higher mean of "
        "that metric there, then AP or pixel AUROC, then honest F1 or pixel F1; *tied*: "
        "configs sharing the rank).",
    ]
    if n_cat < 2:
        parts.append("Only one category has experiments with maps: leave-one-category-out "
                     "selection is not possible (it needs >= 2 categories).")  # fmt: skip
    parts.append(md_table(
        ["selection", "categories", "mean image AUROC", "mean pixel AUROC", "mean AUPRO"],
        [[labels[name], m["categories"], *(m[v] for v in PIXEL_VALUES)]
         for name, m in means.items()], "lrrrr"))  # fmt: skip
    for category in pixel.categories:
        table = []
        for name, label in PIXEL_PICKS:
            pick = pixel.picks[category][name]
            r = pick.row
            tied = "" if pick.tied is None else pick.tied
            if r is None:
                table.append([label, pick.note, "", "", "", "", tied, ""])
                continue
            table.append([label, r["auroc"], r["pixel_auroc"], r["aupro"], r["detector_name"],
                          f"{extractor_label(r)} {r['representation']}", tied,
                          f"`{r['key'][:12]}`"])  # fmt: skip
        parts.append(f"### {category}\n\n" + md_table(
            ["selection", "image AUROC", "pixel AUROC", "AUPRO", "detector", "extractor",
             "tied", "key"], table, "lrrrllrl"))  # fmt: skip
        best = pixel.picks[category]["oracle_aupro"].row
        if best is None:
            continue
        name = f"maps_{re.sub(r'[^A-Za-z0-9_.-]', '_', category)}.png"
        try:
            caption = draw_category_maps(engine, best, maps_dir, index, figures / name)
        except UserError as exc:
            log.warning("%s: no map figure: %s", category, exc)
            parts.append(f"No map figure for {category}: {exc}")
            continue
        parts.append(f"![anomaly maps of {category}](figures/{name})\n\nMaps of the best "
                     f"config by AUPRO (`{best['key'][:12]}`). {caption}.")  # fmt: skip
    return _section("Where is the defect: pixel-level results", *parts)


# --- the stage -----------------------------------------------------------------------------


@dataclass
class Report:
    """What the stage computed (also returned for tests and notebooks)."""

    rows: list[dict[str, Any]]
    done: list[dict[str, Any]]
    categories: list[str]
    best: dict[str, dict[str, Any]]
    loco: dict[str, LocoChoice]
    families: list[dict[str, Any]]
    augmentation: list[dict[str, Any]]
    seed_spread: list[dict[str, Any]]
    metrics: dict[str, Any]
    pixel: PixelResults | None = None  # None: no experiment made anomaly maps
    # Labelled families' rows (evaluated on a held-out part only: in no table above) as the
    # "With a few labels" section's lines per category (stages.report_few_labels).
    few_labels: dict[str, Any] = field(default_factory=dict)
    # The datasets shown (the current params') and what the database holds besides.
    datasets: DatasetScope = field(default_factory=lambda: DatasetScope(None))


def build_metrics(rows: Sequence[dict[str, Any]], categories: Sequence[str],
                  best: dict[str, dict[str, Any]], loco: dict[str, LocoChoice],
                  spread: Sequence[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """``metrics.json``: means over categories (honest: over those with a value), counts,
    the seed spread per stochastic family (``{}`` with one seed)."""
    counts = Counter(r["status"] for r in rows)
    oracle = {c: best[c]["auroc"] for c in categories}
    honest = {c: loco[c].auroc if len(categories) >= 2 else None for c in categories}
    with_both = [c for c in categories if honest[c] is not None]
    return {
        "categories": len(categories),
        "mean_best_auroc_oracle": _mean(oracle.values()),
        "mean_auroc_loco": _mean(honest[c] for c in with_both) if with_both else None,
        "mean_gap_oracle_minus_loco": (
            _mean(oracle[c] - honest[c] for c in with_both) if with_both else None
        ),
        "loco_categories": len(with_both),
        "experiments": len(rows),
        **{s: counts.get(s, 0) for s in STATUSES},
        "per_category": {
            c: {"best_auroc_oracle": oracle[c], "auroc_loco": honest[c]} for c in categories
        },
        "seed_spread": seed_spread_summary(spread),
    }


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Every experiment, every column (the database's names), ordered by key."""
    columns = [c.name for c in Experiment.__table__.columns if c.name != "id"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in columns})


def _clear(folder: Path, pattern: str) -> None:
    """Remove this stage's previous outputs (e.g. a dropped category's curve)."""
    if folder.exists():
        for old in folder.glob(pattern):
            old.unlink()


def _dataset_section(stats_dir: Path) -> str:
    path = stats_dir / "stats.json"
    if not path.exists():
        return f"Not available: {path} is missing (run the dataset stage).\n"
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
        body = stats_markdown(stats)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise UserError(f"{path}: not the dataset stage's statistics; rerun it") from None
    return "\n".join(line for line in body.splitlines() if not line.startswith("# ")).strip()


def _section(title: str, *parts: str) -> str:
    return "\n\n".join([f"## {title}", *[p for p in parts if p]])


def _seed_spread_section(spread: Sequence[dict[str, Any]], top_n: int) -> str:
    families = ", ".join(STOCHASTIC)
    if not spread:
        return _section("Seed spread", f"One seed per stochastic config ({families}): no "
                        "spread over seeds to report. To measure it, list several: "
                        f"{SEEDS_HINT}.")  # fmt: skip
    summary = seed_spread_summary(spread)
    return _section(
        "Seed spread",
        f"AUROC over the seeds of each stochastic config ({families}) in each category, "
        "over the configs with at least 2 seeds done; std is the population one (ddof=0). "
        "Deterministic families do not depend on the seed.",
        md_table(["family", "configs with >= 2 seeds", "mean AUROC std",
                  "largest AUROC range", "largest range at"],
                 [[f, s["configs"], s["mean_auroc_std"], s["max_auroc_range"], s["max_range_at"]]
                  for f, s in summary.items()], "lrrrl"),
        f"The {min(top_n, len(spread))} configs with the largest AUROC range (max - min):",
        md_table(["category", "augmented", "extractor", "detector", "seeds", "AUROC mean",
                  "std", "min", "max", "range"],
                 [[s["category"], s["row"]["augmented"],
                   f"{extractor_label(s['row'])} {s['row']['representation']}",
                   s["row"]["detector_name"], s["seeds"], s["mean"], s["std"], s["min"],
                   s["max"], s["range"]] for s in spread[:top_n]],
                 "llllrrrrrr"),
    )  # fmt: skip


def render(report: Report, params: ReportParams, engine: Engine, out: Path, stats_dir: Path,
           db_url: str, maps_dir: Path = Path("results/maps"),
           index: Path = Path("cache/dataset/index.parquet")) -> str:  # fmt: skip
    """Write the figures and plot data; return the Markdown of ``report.md``. ``maps_dir``
    and ``index``: where the pixel-level figures find the maps, images and masks."""
    rows, done, categories = report.rows, report.done, report.categories
    figures, roc_dir = out / "figures", out / "plots" / "roc"
    _clear(figures, "*.png")
    _clear(roc_dir, "*.csv")
    for folder in (figures, roc_dir):  # declared outputs: present even when empty
        folder.mkdir(parents=True, exist_ok=True)
    n_cat = len(categories)
    parts = [
        "# Results report",
        f"From `{db_url}` ({params.scope}: {len(rows)} experiments, {len(done)} done with an "
        f"AUROC, {n_cat} categories). AUROC and average precision take anomalies as the "
        "positive class; higher scores mean more anomalous.",
        f"Dataset: {report.datasets.describe()}. {report.datasets.others_note()}".strip(),
    ]
    counts = Counter(r["status"] for r in rows)
    kinds = error_kinds(rows)
    parts.append(_section(
        "Experiments",
        md_table(["experiments", *STATUSES], [[len(rows), *(counts.get(s, 0) for s in STATUSES)]],
                 "r" * 5),
        md_table(["status", "family", "error kind", "count"], kinds, "lllr")
        if kinds else "No failed, crashed or timed-out experiments.",
    ))  # fmt: skip
    parts.append(_section("Dataset", _dataset_section(stats_dir)))
    if not done:
        why = (
            "No experiments of the current grid are stored yet (run the evaluate stage)"
            if not rows
            else "No experiment is done (see the counts above)"
        )
        parts.append(f"{why}: no tables, figures or curves to report.")
        return "\n\n".join(parts) + "\n"

    # Table 4 with the honest column.
    t4 = []
    for c in categories:
        choice = report.loco[c]
        honest = choice.auroc if n_cat >= 2 else None
        gap = None if honest is None else report.best[c]["auroc"] - honest
        spread = choice.spread()
        tied = ("n/a" if spread is None else f"{choice.tied}: "
                + " / ".join(fmt(v) for v in spread))  # fmt: skip
        t4.append([c, report.best[c]["auroc"], report.best[c]["detector_name"],
                   loco_cell(choice, n_cat),
                   describe_config(choice.config) if choice.config else "n/a",
                   tied, gap])  # fmt: skip
    m = report.metrics
    mean_honest = m["mean_auroc_loco"] if m["mean_auroc_loco"] is not None else NEEDS_TWO
    if n_cat >= 2 and m["loco_categories"] < n_cat and m["mean_auroc_loco"] is not None:
        mean_honest = f"{fmt(m['mean_auroc_loco'])} (over {m['loco_categories']} categories)"
    t4.append(["**mean**", m["mean_best_auroc_oracle"], "", mean_honest, "", "",
               m["mean_gap_oracle_minus_loco"]])  # fmt: skip
    parts.append(_section(
        "Table 4: best AUROC per category, oracle and honest",
        "*Oracle*: the best of all configs by the category's own test AUROC (the study's "
        "number, optimistic). *Honest (LOCO)*: the config with the best mean AUROC rank on "
        "the other categories (candidates: configs done in all of them and run on this one; a config is every "
        "field but the category and the feature hash), evaluated on this category. "
        "*Tied*: how many configs share that best mean rank, and their AUROCs here (min / "
        "median / max): the spread is the luck of the tie-break (higher mean AUROC, then "
        "AP, then honest F1 on the other categories, then config id; no test label of "
        "this category)."
        + (" Each seed of a stochastic config counts as a config of its own, so the oracle "
           "also picks the luckiest seed (see *Seed spread*)." if report.seed_spread else ""),
        md_table(["category", "best AUROC (oracle)", "oracle detector", "AUROC (honest, LOCO)",
                  "LOCO config", "tied (AUROC here: min / median / max)", "oracle - honest"],
                 t4, "lrlrllr"),
    ))  # fmt: skip
    if report.pixel is not None:
        parts.append(_pixel_section(report.pixel, engine, figures, maps_dir, index))
    # imported here: stages.report_trained imports this module
    from stages.report_trained import trained_section, trained_selection

    trained = trained_selection(engine, done, categories)
    if trained:  # absent, not empty, when no done experiment has a learning curve
        parts.append(trained_section(trained, engine, figures, maps_dir, index))
    if report.few_labels:
        from stages.report_few_labels import few_labels_section

        few_rows = {r["key"]: r for r in report.rows}
        parts.append(few_labels_section(report.few_labels, few_rows, engine, figures,
                                        maps_dir, index))  # fmt: skip

    parts.append(_section(
        "Table 5: seconds per detector family",
        "Measured: *s per unit* is the median over work units of the family's own call "
        "seconds (all its configs, both augmentation choices; `group_s`), *s per config* "
        "those seconds over the configs they served. With shared computation the shared "
        "quantities (Gram, kNN table, PCA basis) are not in them; *mean fit s* is the "
        "amortised share per experiment, which includes them. The study's per-model "
        "seconds compare with `evaluate.shared: false` runs (one fit per config). Score "
        "seconds time the test images only (0 when fit and score are one computation).",
        md_table(["family", *STATUSES, "s per unit", "s per config", "mean fit s",
                  "mean score s", "mean AUROC", "best AUROC"],
                 [[f["family"], *(f[s] for s in STATUSES), f["unit_s"], f["config_s"],
                   f["mean_fit_s"], f["mean_score_s"], f["mean_auroc"], f["best_auroc"]]
                  for f in report.families],
                 "l" + "r" * 10),
    ))  # fmt: skip

    parts.append(_section(
        "Table 6: the best configuration per category",
        md_table(["category", "augmented", "backbone", "init", "layer", "representation",
                  "detector", "hyperparameters", "seed", "AUROC", "AP", "fit s", "score s",
                  "n train", "dim", "key"],
                 [[c, b["augmented"], b["backbone"], b["init"], b["layer"], b["representation"],
                   b["detector"], f"`{b['hyperparams']}`", b["seed"], b["auroc"],
                   b["average_precision"], b["fit_s"], b["score_s"], b["n_train"], b["dim"],
                   f"`{b['key'][:12]}`"]
                  for c in categories for b in [report.best[c]]],
                 "lllllllllrrrrrrl"),
    ))  # fmt: skip

    def threshold_rows(selected: Sequence[tuple[str, dict[str, Any]]]) -> list[list[Any]]:
        out_rows = []
        for label, r in selected:
            q = fmt(r["threshold_quantile"], 3)
            folds = r.get("threshold_folds")
            for kind, name in (
                ("honest", f"honest, out-of-fold ({folds} folds, q={q})" if folds
                 else f"honest, in-sample (stored before out-of-fold; q={q})"),
                ("insample", f"in-sample (q={q})"),
                ("oracle", "oracle max-F1"),
            ):  # fmt: skip
                if kind == "insample" and not folds:
                    continue
                out_rows.append([label, name, *(r[f"{f}_{kind}"] for f in THRESHOLD_FIELDS)])
            out_rows.append([label, "flag every test image", *flag_all(r)])
        return out_rows

    threshold_header = ["", "threshold", "value", "F1", "precision", "recall", "accuracy",
                        "TP", "FP", "TN", "FN"]  # fmt: skip
    parts.append(_section(
        "Threshold metrics of the best configs",
        "Predicted anomalous iff score > threshold. *Honest*: a quantile of the training "
        "images' out-of-fold scores (k-fold over the training images, augmented copies "
        "with their original; each scored by a model that did not see it; no test label). "
        "*In-sample*: the same quantile of the fitted model's scores of its own training "
        "images, for comparison: memorising detectors score those far lower than unseen "
        "good images, so it flags more than its nominal rate. *Oracle*: the test set's "
        "max-F1 threshold, an upper bound. *Flag every test image*: the trivial baseline "
        "an F1 has to beat.",
        md_table(["category", *threshold_header[1:]],
                 threshold_rows([(c, report.best[c]) for c in categories]), "ll" + "r" * 9),
    ))  # fmt: skip

    top_rows = []
    for category, (shown, more) in top_with_ties(done, categories, params.top_n).items():
        top_rows += [[r["category"], r["augmented"], extractor_label(r), r["representation"],
                      r["detector_name"], r["auroc"], r["average_precision"], r["f1_honest"],
                      r["f1_oracle"], f"`{r['key'][:12]}`"] for r in shown]  # fmt: skip
        if more:
            top_rows.append([category, "", "", "", f"*and {more} more at this AUROC*",
                             shown[-1]["auroc"], "", "", "", ""])  # fmt: skip
    parts.append(_section(
        f"Top {params.top_n} experiments by AUROC, per category",
        f"Each category's {params.top_n} best experiments (AUROCs equal within rounding "
        "are ties, listed by key; *and N more*: experiments not shown that tie with the "
        "last one shown).",
        md_table(["category", "augmented", "extractor", "representation", "detector", "AUROC",
                  "AP", "F1 honest", "F1 oracle", "key"], top_rows, "lllllrrrrl"),
    ))  # fmt: skip

    parts.append(_seed_spread_section(report.seed_spread, params.top_n))

    figure_augmentation(report.augmentation, figures / "augmentation.png")
    parts.append(_section(
        "Augmentation benefit",
        "Best AUROC per category with and without augmenting the training images "
        "(n/a: not run, e.g. a category without transforms).",
        md_table(["category", "with augmentation", "without", "gain"],
                 [[a["category"], a["with"], a["without"], a["gain"]]
                  for a in report.augmentation], "lrrr"),
        "![augmentation benefit](figures/augmentation.png)",
    ))  # fmt: skip

    fams, extractors, grids = heatmap_table(done, categories)
    figure_heatmap(fams, extractors, grids, figures / "heatmap.png")
    parts.append(_section(
        "Best AUROC per detector family x backbone/layer",
        "Per category the best AUROC among the cell's configs (one panel per category: "
        "categories differ too much for a mean to describe any of them).",
        "![heatmap](figures/heatmap.png)",
        md_table(["category", "family", *extractors],
                 [[c, f, *(None if np.isnan(v) else float(v) for v in grid[i])]
                  for c, grid in grids.items() for i, f in enumerate(fams)],
                 "ll" + "r" * len(extractors)),
    ))  # fmt: skip

    figure_fit_time(done, figures / "fit_time.png")
    parts.append(
        _section(
            "Figure 4: family time per work unit against feature dimension and training-set size",
            "![fit time](figures/fit_time.png)",
        )
    )

    curves: dict[str, list[tuple[dict[str, Any], np.ndarray, np.ndarray]]] = {}
    for category, best_rows in top_per_category(done, params.roc_best_per_category).items():
        lines = []
        for rank, r in enumerate(best_rows):
            y, s = labelled_scores(engine, r["key"])
            if not 0 < y.sum() < y.size:
                continue
            fpr, tpr, _ = roc_curve(y, ranking_scores(tie_safe_scores(s)))
            lines.append((r, fpr, tpr))
            if rank == 0:
                write_text_atomic(roc_dir / f"{category}.csv", "fpr,tpr\n" + "".join(
                    f"{a:.6g},{b:.6g}\n" for a, b in zip(fpr, tpr, strict=True)))  # fmt: skip
        if lines:
            curves[category] = lines
    curves = {c: curves[c] for c in categories if c in curves}
    if curves:
        figure_roc(curves, figures / "roc.png")
    parts.append(
        _section(
            f"ROC curves of each category's {params.roc_best_per_category} best configs",
            "![ROC curves](figures/roc.png)" if curves else "No curves (no scores stored).",
            "Legend (below each panel): rank, AUROC and the full config; colour: the "
            "detector family (the same in every figure). `plots/roc/<category>.csv` holds the best one's curve "
            "for `dvc plots`.",
        )
    )
    return "\n\n".join(parts) + "\n"


def report(params_path: str | Path) -> Report:
    """Run the stage: read the database, write report.md, figures, metrics, CSV, plots."""
    params = load_section(params_path, "report", ReportParams)
    assert isinstance(params, ReportParams)
    root = load_params(params_path)
    db_url = (root.evaluate or {}).get("db_url", DEFAULT_DB_URL)
    keys = grid_keys(params_path) if params.scope == "grid" else None
    engine = open_db(db_url, read_only=True)  # the evaluate stage's output: never written
    try:
        datasets = scope(engine, "current", current_ids(
            root.data.index, root.data.root, root.data.categories), str(params_path))  # fmt: skip
        rows = datasets.filter(read_experiments(engine, keys))
        if not rows:  # said in the report (and here), not a failure: nothing is done yet
            log.warning("%s: no experiments stored (scope %s); the report says so",
                        db_url, params.scope)  # fmt: skip
        from stages.report_few_labels import few_labels_lines, few_labels_metrics, is_labelled

        both = latest_done(rows)
        done = [r for r in both if not is_labelled(r)]  # all test images: the tables' rows
        few = [r for r in both if is_labelled(r)]  # a held-out part only: their own section
        categories = ordered_categories(done, root.data.categories)
        best = best_per_category(done)
        loco = loco_selection(done, categories)
        spread = seed_spread(done)
        pixel = pixel_selection(done, categories) if with_maps(done) else None
        result = Report(
            rows=rows, done=done, categories=categories, best=best, loco=loco,
            families=family_times(rows),
            augmentation=augmentation_benefit(done, categories),
            seed_spread=spread,
            metrics=build_metrics(rows, categories, best, loco, spread), pixel=pixel,
        )  # fmt: skip
        result.datasets = datasets
        result.metrics["datasets"] = [
            {k: d[k] for k in ("id", "root", "category", "n_images", "n_test")}
            for d in datasets.shown
        ]  # fmt: skip
        if pixel is not None:
            result.metrics["pixel"] = pixel_metrics_json(pixel)
        if few:
            result.few_labels = few_labels_lines(engine, few, done)
            result.metrics["few_labels"] = few_labels_metrics(result.few_labels)
        from stages.report_trained import trained_metrics, trained_selection

        if trained := trained_selection(engine, done, categories):
            result.metrics["trained"] = trained_metrics(trained)
        out = Path(params.out)
        maps_dir = Path((root.evaluate or {}).get("maps", "results/maps"))
        text = render(result, params, engine, out, Path(root.data.stats_dir), db_url,
                      maps_dir, Path(root.data.index))  # fmt: skip
    finally:
        engine.dispose()
    remove_stale_temps(out, recursive=False)  # a killed run's (figures/ and plots/ are redone)
    write_json_atomic(out / "metrics.json", result.metrics)
    write_csv(out / "experiments.csv", rows)
    write_text_atomic(out / "report.md", text)
    write_html(out)  # report.html: the same report as one offline page
    log.info("%s: %d experiments, %d categories; mean best AUROC %s (oracle), %s (honest)",
             out / "report.md", len(rows), len(categories),
             fmt(result.metrics["mean_best_auroc_oracle"]),
             fmt(result.metrics["mean_auroc_loco"]))  # fmt: skip
    return result


def main(argv: Sequence[str] | None = None) -> None:
    args = stage_args(__doc__.splitlines()[0], list(argv) if argv is not None else None)
    setup_logging("report")
    report(args.params)


if __name__ == "__main__":
    run_cli(main)
