"""The report's section "With a few labels": methods that learn from labelled defects
(``Family.labelled``; the few-labels protocol of ``stages.few_labels``) next to the best
one-class detector, on the same held-out test images.

Their rows are evaluated on the protocol's held-out part only, so they never enter the
one-class tables (Table 4, the top experiments, ...), which are over all test images. Here,
per category, protocol (``eval_fraction``, ``split_seed``) and label fraction:

- each labelled experiment: ROC-AUC, PR-AUC, and at its own threshold (a classifier's 0.5)
  accuracy, precision, recall, F1, specificity and the confusion matrix;
- the *one-class pick*: among the category's done one-class experiments, the one with the
  best AUROC on the labelled pool images (the labels the labelled methods learn from, so
  the comparison uses the same labels and no held-out one), scored on the held-out images
  from its stored test scores, at its honest threshold (``threshold_honest``);
- ``figures/few_labels_<category>.png``: ROC and precision-recall curves of those rows on
  the held-out images;
- ``figures/tsne_<category>.png``: t-SNE of each labelled family's (best config by F1)
  embeddings of the held-out images, coloured by defect type;
- ``figures/gradcam_<category>.png``: the best labelled config's Grad-CAM over held-out
  images (its least and most anomalous good and defective ones).

``metrics.json`` gets ``few_labels``: per category the best labelled row and the one-class
pick at each label fraction (F1 and ROC-AUC).
"""

from __future__ import annotations

import json
import re
import textwrap
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from stages.errors import UserError
from stages.few_labels import FewLabelsHyper, split
from stages.methods import FAMILIES
from stages.metrics import confusion_metrics, predict, ranking_metrics, ranking_scores
from stages.palette import family_shades
from stages.report import _save, _section, fmt, md_table
from stages.results_db import Experiment, Image, Score


def is_labelled(row: dict[str, Any]) -> bool:
    """Whether a stored experiment's family learns from labelled test images."""
    family = FAMILIES.get(str(row.get("detector")))
    return bool(family is not None and family.labelled)


def protocol(row: dict[str, Any]) -> FewLabelsHyper:
    """The protocol values a labelled experiment ran with (defaults filled in)."""
    params = json.loads(row["hyperparams"])
    names = FewLabelsHyper.model_fields
    return FewLabelsHyper.model_validate({k: v for k, v in params.items() if k in names})


@dataclass
class Line:
    """One row of the section's table, with the held-out images' labels and scores."""

    name: str
    kind: str  # "labelled" or "one-class pick"
    label_fraction: float
    n_labelled: int
    key: str
    y: np.ndarray
    scores: np.ndarray
    threshold: float | None
    metrics: dict[str, Any] = field(default_factory=dict)


def _metrics(y: np.ndarray, scores: np.ndarray, threshold: float | None) -> dict[str, Any]:
    out: dict[str, Any] = dict(ranking_metrics(y, scores))
    if threshold is not None:
        counts = confusion_metrics(y, predict(scores, threshold))
        negatives = counts["tn"] + counts["fp"]
        out.update(counts, specificity=counts["tn"] / negatives if negatives else None)
    return out


def _images(engine: Engine, category: str) -> tuple[list[str], list[str], dict[str, bool]]:
    query = select(Image.image_id, Image.defect_type, Image.is_anomaly).where(
        Image.category == category).order_by(Image.image_id)  # fmt: skip
    with Session(engine) as session:
        rows = list(session.execute(query))
    return [r[0] for r in rows], [r[1] for r in rows], {r[0]: bool(r[2]) for r in rows}


def _scores(engine: Engine, keys: Sequence[str]) -> dict[str, dict[str, float]]:
    """``key -> image_id -> score`` (NaN for NULL) of the given experiments."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    query = (select(Experiment.key, Image.image_id, Score.score)
             .join(Score, Score.experiment == Experiment.id).join(Image, Image.id == Score.image)
             .where(Experiment.key.in_(list(keys))))  # fmt: skip
    with Session(engine) as session:
        for key, image, score in session.execute(query):
            out[key][image] = np.nan if score is None else score
    return out


def _pick(candidates: Sequence[dict[str, Any]], scores: dict[str, dict[str, float]],
          labelled: list[str], y_of: dict[str, bool]) -> dict[str, Any] | None:  # fmt: skip
    """The one-class experiment with the best AUROC on the labelled images (ties: key)."""
    y = np.array([y_of[i] for i in labelled])
    if not 0 < y.sum() < len(y):
        return None  # one class among the labels: nothing to choose by
    best, best_auroc = None, -1.0
    for row in candidates:  # ordered by key
        got = scores.get(row["key"], {})
        if not all(i in got for i in labelled):
            continue
        auroc = ranking_metrics(y, np.array([got[i] for i in labelled]))["auroc"]
        if auroc is not None and auroc > best_auroc:
            best, best_auroc = row, auroc
    return best


def few_labels_lines(engine: Engine, few: Sequence[dict[str, Any]],
                     one_class: Sequence[dict[str, Any]]) -> dict[str, list[Line]]:  # fmt: skip
    """Per category, its table's lines: each labelled experiment, then per protocol and
    label fraction the one-class pick, all on the held-out images of their protocol."""
    out: dict[str, list[Line]] = {}
    for category in sorted({r["category"] for r in few}):
        ids, types, y_of = _images(engine, category)
        rows = sorted((r for r in few if r["category"] == category), key=lambda r: r["key"])
        candidates = [r for r in one_class if r["category"] == category]
        scores = _scores(engine, [r["key"] for r in rows + candidates])
        lines, picks = [], {}
        for row in rows:
            hp = protocol(row)
            part = split(ids, types, hp.label_fraction, hp.eval_fraction, hp.split_seed)
            held = [ids[i] for i in part.held]
            y = np.array([y_of[i] for i in held])
            got = scores.get(row["key"], {})
            s = np.array([got.get(i, np.nan) for i in held])
            name = f"{row['detector_name']}{', augmented' if row['augmented'] else ''}"
            lines.append(Line(name, "labelled", hp.label_fraction,
                              len(part.labelled), row["key"], y, s, row["threshold_honest"]))  # fmt: skip
            slot = (hp.label_fraction, hp.eval_fraction, hp.split_seed)
            if slot not in picks:
                labelled = [ids[i] for i in part.labelled]
                pick = _pick(candidates, scores, labelled, y_of)
                if pick is not None:
                    s = np.array([scores[pick["key"]].get(i, np.nan) for i in held])
                    picks[slot] = Line(f"{pick['detector_name']} on {pick['backbone']}-"
                                       f"{pick['init']} {pick['layer']} {pick['representation']}"
                                       f"{', augmented' if pick['augmented'] else ''}",
                                       "one-class pick", hp.label_fraction, len(labelled),
                                       pick["key"], y, s, pick["threshold_honest"])  # fmt: skip
        for line in [*lines, *picks.values()]:
            line.metrics = _metrics(line.y, line.scores, line.threshold)
        out[category] = sorted([*lines, *picks.values()],
                               key=lambda ln: (ln.label_fraction, ln.kind, ln.name))  # fmt: skip
    return out


def figure_curves(category: str, lines: Sequence[Line], families: Sequence[str],
                  path: Path) -> None:  # fmt: skip
    """ROC and precision-recall curves of the lines on the held-out images; colour: the
    line's detector family (``families``, as in every figure), shades within one family."""
    fig = Figure(figsize=(11, 4.4 + 0.3 * len(lines)), layout="constrained")
    roc_ax, pr_ax = fig.subplots(1, 2)
    per_family = Counter(families)
    seen: Counter[str] = Counter()
    for k, (line, family) in enumerate(zip(lines, families, strict=True)):
        colour = family_shades(family, per_family[family])[seen[family]]
        seen[family] += 1
        if not 0 < line.y.sum() < len(line.y):
            continue
        ranked = ranking_scores(line.scores)
        fpr, tpr, _ = roc_curve(line.y, ranked)
        precision, recall, _ = precision_recall_curve(line.y, ranked)
        style = "-" if line.kind == "labelled" else "--"
        label = (f"{line.kind}, label fraction {line.label_fraction:g}: ROC-AUC "
                 f"{fmt(line.metrics.get('auroc'), 3)}, {line.name}")  # fmt: skip
        # earlier lines wider, so a curve that coincides with a later one still shows
        width = max(1.2, 3.6 - 0.6 * k)
        roc_ax.plot(fpr, tpr, style, color=colour, label=label, linewidth=width)
        pr_ax.plot(recall, precision, style, color=colour, linewidth=width)
    roc_ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=0.8)
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    pr_ax.set(xlabel="recall", ylabel="precision", title="precision-recall", ylim=(0, 1.02))
    fig.suptitle(f"{category}: held-out test images (dashed: one-class pick)")
    fig.legend(loc="outside lower center", ncol=1, fontsize=8, frameon=False)
    _save(fig, path)


def file_name(category: str, kind: str = "few_labels") -> str:
    return f"{kind}_{re.sub(r'[^A-Za-z0-9_.-]', '_', category)}.png"


def best_per_method(lines: Sequence[Line], rows: dict[str, dict[str, Any]]) -> list[Line]:
    """Each labelled family's best line by F1 (ties: ROC-AUC, key), best first."""
    best: dict[str, Line] = {}
    for ln in lines:
        if ln.kind != "labelled":
            continue
        family = rows[ln.key]["detector"]
        rank = (ln.metrics.get("f1") or -1.0, ln.metrics.get("auroc") or -1.0)
        cur = best.get(family)
        if cur is None or rank > (cur.metrics.get("f1") or -1.0, cur.metrics.get("auroc") or -1.0):
            best[family] = ln
    return sorted(best.values(), key=lambda ln: -(ln.metrics.get("f1") or -1.0))


def figure_tsne(category: str, panels: Sequence[tuple[str, list[str], np.ndarray]],
                types: dict[str, str], path: Path) -> None:  # fmt: skip
    """t-SNE (scikit-learn, seeded) of each method's held-out embeddings, by defect type."""
    from sklearn.manifold import TSNE

    names = sorted({types[i] for _, ids, _ in panels for i in ids})
    colours = {t: f"C{k % 10}" for k, t in enumerate(names)}
    fig = Figure(figsize=(4.6 * len(panels) + 1.6, 4.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, ids, values) in zip(axes, panels, strict=True):
        perplexity = float(min(30, max(2, (len(ids) - 1) // 3)))
        xy = TSNE(2, perplexity=perplexity, init="pca", random_state=0).fit_transform(values)
        for t in names:
            at = [k for k, i in enumerate(ids) if types[i] == t]
            if at:
                ax.scatter(xy[at, 0], xy[at, 1], s=22, color=colours[t], label=t,
                           marker="o" if t == "good" else "^")  # fmt: skip
        ax.set_title(textwrap.fill(title.replace(",", ", "), 56), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", title="defect type", fontsize=9)
    fig.suptitle(f"{category}: t-SNE of the held-out images' embeddings (perplexity "
                 f"<= 30, seed 0)", fontsize=10)  # fmt: skip
    _save(fig, path)


def _figures(category: str, lines: Sequence[Line], rows: dict[str, dict[str, Any]],
             engine: Engine, figures: Path, maps_dir: Path, index: Path) -> list[str]:  # fmt: skip
    """t-SNE and Grad-CAM figures of the category's best labelled line per method."""
    from stages.anomaly_maps import read_embeddings
    from stages.report import draw_category_maps

    parts = []
    best = best_per_method(lines, rows)
    types = dict(zip(*_images(engine, category)[:2], strict=True))
    panels = []
    for ln in best:
        try:
            ids, values = read_embeddings(maps_dir, ln.key)
        except UserError as exc:
            parts.append(f"No t-SNE panel for `{ln.key[:12]}`: {exc}")
            continue
        if len(ids) >= 4:
            panels.append((f"{ln.name} (F1 {fmt(ln.metrics.get('f1'), 3)})", ids, values))
    if panels:
        name = file_name(category, "tsne")
        figure_tsne(category, panels, types, figures / name)
        parts.append(f"![t-SNE of {category}](figures/{name})\n\nt-SNE of each labelled "
                     "method's embeddings of the held-out images (its best config by F1), "
                     "coloured by defect type.")  # fmt: skip
    if best:
        top = best[0]
        name = file_name(category, "gradcam")
        try:
            caption = draw_category_maps(engine, rows[top.key], maps_dir, index, figures / name)
        except UserError as exc:
            parts.append(f"No Grad-CAM figure for {category}: {exc}")
        else:
            parts.append(f"![Grad-CAM of {category}](figures/{name})\n\nGrad-CAM of the best "
                         f"labelled config by F1 (`{top.key[:12]}`, threshold "
                         f"{fmt(top.threshold, 2)}: a score above it is classified "
                         f"anomalous) over held-out images. {caption}.")  # fmt: skip
    return parts


def few_labels_section(by_category: dict[str, list[Line]], rows: dict[str, dict[str, Any]],
                       engine: Engine, figures: Path, maps_dir: Path, index: Path) -> str:  # fmt: skip
    """The section's Markdown; draws its figures into ``figures`` (``rows``: the labelled
    experiments by key)."""
    header = ["method", "kind", "label fraction", "n labelled", "n held-out", "ROC-AUC", "PR-AUC",
              "F1", "accuracy", "precision", "recall", "specificity", "TP/FP/TN/FN", "key"]  # fmt: skip
    parts = ["Methods that learn from labelled defects (the few-labels protocol: each "
             "category's test images split, stratified by defect type and seeded, into a "
             "pool and a held-out part; `label_fraction` of the pool is labelled), on the "
             "held-out images only, next to the *one-class pick*: the one-class experiment "
             "with the best AUROC on the same labelled pool images, scored on the same "
             "held-out images at its honest threshold. A labelled method's threshold is its "
             "own (probability 0.5). These rows are in no other table: those are over all "
             "test images."]  # fmt: skip
    for category, lines in by_category.items():
        table = []
        for ln in lines:
            m = ln.metrics
            counts = ("/".join(str(m[k]) for k in ("tp", "fp", "tn", "fn"))
                      if "tp" in m else "-")  # fmt: skip
            table.append([ln.name, ln.kind, f"{ln.label_fraction:g}", ln.n_labelled, len(ln.y),
                         fmt(m.get("auroc")), fmt(m.get("average_precision")), fmt(m.get("f1")),
                         fmt(m.get("accuracy")), fmt(m.get("precision")), fmt(m.get("recall")),
                         fmt(m.get("specificity")), counts, f"`{ln.key[:12]}`"])  # fmt: skip
        name = file_name(category)
        families = [rows[ln.key]["detector"] if ln.key in rows else "" for ln in lines]
        figure_curves(category, lines, families, figures / name)
        parts.append(f"### {category}\n\n{md_table(header, table)}\n\n"
                     f"![ROC and PR curves of {category}](figures/{name})")  # fmt: skip
        parts += _figures(category, lines, rows, engine, figures, maps_dir, index)
    return _section("With a few labels", *parts)


def few_labels_metrics(by_category: dict[str, list[Line]]) -> dict[str, Any]:
    """``metrics.json``'s ``few_labels``: per category and label fraction, the best
    labelled row (by F1) and the one-class pick."""
    out: dict[str, Any] = {}
    for category, lines in by_category.items():
        entry: dict[str, Any] = {}
        for fraction in sorted({ln.label_fraction for ln in lines}):
            at = [ln for ln in lines if ln.label_fraction == fraction]
            labelled = [ln for ln in at if ln.kind == "labelled"]
            pick = [ln for ln in at if ln.kind != "labelled"]
            best = max(labelled, key=lambda ln: ln.metrics.get("f1") or -1.0, default=None)
            entry[f"{fraction:g}"] = {
                "labelled": None if best is None else {"name": best.name, "f1": best.metrics.get(
                    "f1"), "auroc": best.metrics.get("auroc")},
                "one_class_pick": None if not pick else {"name": pick[0].name, "f1": pick[0]
                    .metrics.get("f1"), "auroc": pick[0].metrics.get("auroc")},
            }  # fmt: skip
        out[category] = entry
    return out
