"""The report's section "Trained models": the experiments whose family trains a network.

Which experiments: the done ones (of the report's scope) that have a learning curve in the
``epochs`` table, whatever their family (today the reconstruction families). Per category:

- a table, best image AUROC first (ties by config name, then key): config, augmented, image
  AUROC, F1 and accuracy at the honest threshold, pixel AUROC, AUPRO, epochs, the last
  epoch's training and held-out loss, fit seconds;
- ``figures/curves_<category>.png``: learning curves of the best ``MAX_CURVES`` by image
  AUROC (training loss solid, held-out loss dashed, one colour per experiment);
- ``figures/reconstructions_<category>.png``: the best one's stored example test images
  (``stages.anomaly_maps.read_examples``): input, reconstruction and its residual map (the
  evaluated anomaly map, on one colour scale over all its test maps, mask outlined). A run
  stored before examples existed gets a one-line note instead.

``metrics.json`` gets ``trained``: per category the best experiment's numbers.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from stages.errors import UserError
from stages.palette import family_shades
from stages.report import _save, _section, fmt, md_table
from stages.results_db import Epoch, Experiment

log = logging.getLogger("stages.report")

MAX_CURVES = 8  # experiments drawn per learning-curve figure (legible colours)
LOG_RANGE = 10.0  # log-scale y when the losses span more than this factor
SECTION_TITLE = "Trained models"


@dataclass(frozen=True)
class Trained:
    """One done experiment of a family that trains, and its learning curve (by epoch)."""

    row: dict[str, Any]
    curve: list[dict[str, Any]]

    @property
    def last(self) -> dict[str, Any]:
        return self.curve[-1]


def read_curves(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """``key -> epochs rows`` (by epoch) of every experiment with a learning curve."""
    query = (
        select(Experiment.key, Epoch.epoch, Epoch.train_loss, Epoch.val_loss, Epoch.seconds)
        .join(Experiment, Experiment.id == Epoch.experiment)
        .order_by(Experiment.key, Epoch.epoch)
    )
    curves: dict[str, list[dict[str, Any]]] = {}
    with Session(engine) as session:
        for r in session.execute(query).mappings():
            curves.setdefault(r["key"], []).append({k: r[k] for k in r if k != "key"})
    return curves


def trained_selection(engine: Engine, done: Sequence[dict[str, Any]],
                      categories: Sequence[str]) -> dict[str, list[Trained]]:  # fmt: skip
    """Per category (in ``categories`` order, only those with any) the done experiments that
    have a learning curve, best image AUROC first; ties by config name, then key."""
    curves = read_curves(engine)
    out: dict[str, list[Trained]] = {}
    for category in categories:
        here = [Trained(r, curves[r["key"]]) for r in done
                if r["category"] == category and r["key"] in curves]  # fmt: skip
        if here:
            out[category] = sorted(
                here, key=lambda t: (-t.row["auroc"], t.row["detector_name"], t.row["key"])
            )
    return out


def trained_metrics(selection: dict[str, list[Trained]]) -> dict[str, dict[str, Any]]:
    """``metrics.json``'s ``trained``: per category the best trained experiment (by image
    AUROC, the oracle pick) and how many were trained."""
    out = {}
    for category, trained in selection.items():
        r = trained[0].row
        out[category] = {"name": r["detector_name"], "key": r["key"], "augmented": r["augmented"],
                         "auroc": r["auroc"], "f1_honest": r["f1_honest"],
                         "accuracy_honest": r["accuracy_honest"],
                         "pixel_auroc": r["pixel_auroc"], "experiments": len(trained)}  # fmt: skip
    return out


# --- Markdown -------------------------------------------------------------------------------

TABLE_HEADER = ["config", "augmented", "image AUROC", "F1 (honest)", "accuracy (honest)",
                "pixel AUROC", "AUPRO", "epochs", "final train loss", "final val loss",
                "fit s", "key"]  # fmt: skip


def loss_text(value: float | None) -> str:
    """A loss to 4 significant digits (they are small: ``fmt``'s 4 decimals lose them)."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:#.4g}"


def table_rows(trained: Sequence[Trained]) -> list[list[Any]]:
    """The category table's rows, in ``TABLE_HEADER`` order."""
    return [[t.row["detector_name"], t.row["augmented"], t.row["auroc"], t.row["f1_honest"],
             t.row["accuracy_honest"], t.row["pixel_auroc"], t.row["aupro"], len(t.curve),
             loss_text(t.last["train_loss"]), loss_text(t.last["val_loss"]),
             fmt(t.row["fit_s"], 2), f"`{t.row['key'][:12]}`"]
            for t in trained]  # fmt: skip


def file_name(kind: str, category: str) -> str:
    return f"{kind}_{re.sub(r'[^A-Za-z0-9_.-]', '_', category)}.png"


def trained_section(selection: dict[str, list[Trained]], engine: Engine, figures: Path,
                    maps_dir: Path, index: Path) -> str:  # fmt: skip
    """Markdown of the section (``""`` when nothing was trained); draws its figures."""
    if not selection:
        return ""
    n = sum(len(t) for t in selection.values())
    parts = [
        f"{n} done experiment{'s' if n != 1 else ''} of families that train a network (those "
        "with a learning curve in the `epochs` table), per category best image AUROC first. "
        "*F1* and *accuracy* at the honest threshold (a quantile of the held-out good "
        "training images' scores; no test label). *Final train / val loss*: the last "
        "epoch's mean training loss and its loss on the held-out good training images; "
        "each family's own objective (the VAE's includes its KL term), so compare curves "
        "within a family. *fit s*: seconds to train (`fit_s`)."
    ]
    for category, trained in selection.items():
        parts.append(f"### {category}\n\n" + md_table(TABLE_HEADER, table_rows(trained),
                                                      "llrrrrrrrrrl"))  # fmt: skip
        curves = file_name("curves", category)
        shown = trained[:MAX_CURVES]
        figure_curves(category, shown, figures / curves)
        cap = (f"the {len(shown)} best by image AUROC of {len(trained)} (capped at {MAX_CURVES})"
               if len(trained) > MAX_CURVES
               else f"all {len(trained)}" if len(trained) > 1 else "the one experiment")  # fmt: skip
        parts.append(f"![learning curves of {category}](figures/{curves})\n\nLearning curves "
                     f"of {cap}: training loss solid, held-out loss dashed.")  # fmt: skip
        best = trained[0].row
        name = file_name("reconstructions", category)
        try:
            caption = draw_reconstructions(engine, best, maps_dir, index, figures / name)
        except UserError as exc:
            log.warning("%s: no reconstruction figure: %s", category, exc)
            parts.append(f"No reconstruction figure for {category}: {exc}")
            continue
        parts.append(f"![reconstructions of {category}](figures/{name})\n\nReconstructions of "
                     f"the best trained experiment by image AUROC (an oracle pick: chosen "
                     f"with the test labels), `{best['key'][:12]}` "
                     f"{best['detector_name']}. {caption}")  # fmt: skip
    return _section(SECTION_TITLE, *parts)


# --- figures ------------------------------------------------------------------------------


def wrap_name(text: str, width: int = 90) -> str:
    """A config name on lines of at most ``width`` characters, broken after its commas
    (a long name stays whole, never cut, so the legend names the config)."""
    lines = [""]
    for part in re.split(r"(?<=,)", text):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("    ")
        lines[-1] += part
    return "\n".join(lines)


def legend_label(row: dict[str, Any]) -> str:
    """An experiment in a legend: its AUROC and full config name."""
    aug = ", augmented" if row["augmented"] else ""
    return wrap_name(f"AUROC {fmt(row['auroc'], 3)}: {row['detector_name']}{aug}")


def legend_labels(rows: Sequence[dict[str, Any]]) -> list[str]:
    """``legend_label`` of each row, with the feature set, then the key's start, added
    where two would read the same."""
    labels = [legend_label(r) for r in rows]
    for extra in (lambda r: f" on {r['backbone']}-{r['init']}/{r['layer']} "
                            f"{r['representation']}",
                  lambda r: f", key {r['key'][:8]}"):  # fmt: skip
        counts = Counter(labels)
        labels = [lab + extra(r) if counts[lab] > 1 else lab
                  for lab, r in zip(labels, rows, strict=True)]  # fmt: skip
    return labels


def figure_curves(category: str, trained: Sequence[Trained], path: Path) -> None:
    """Learning curves: per experiment one colour, training loss solid, held-out dashed;
    log-scale y when the losses span more than ``LOG_RANGE``; legend below the axes."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8.5, 4.2 + 0.45 * len(trained)), layout="constrained")
    ax = fig.subplots()
    per_family = Counter(t.row["detector"] for t in trained)
    seen: Counter[str] = Counter()
    colours = []  # the family's colour (as in every figure), a shade per experiment of it
    for t in trained:
        family = t.row["detector"]
        colours.append(family_shades(family, per_family[family])[seen[family]])
        seen[family] += 1
    handles = [Line2D([], [], color="0.3", linestyle="-", label="training loss")]
    values: list[float] = []
    labels = legend_labels([t.row for t in trained])
    for i, t in enumerate(trained):
        epochs = [e["epoch"] for e in t.curve]
        markers = {"marker": "o", "markersize": 3} if len(epochs) <= 30 else {}
        for field, style in (("train_loss", "-"), ("val_loss", "--")):
            y = np.array([np.nan if e[field] is None else e[field] for e in t.curve], float)
            if np.isfinite(y).any():
                ax.plot(epochs, y, color=colours[i], linestyle=style, linewidth=1.6,
                        **markers)  # fmt: skip
                values += [float(v) for v in y[np.isfinite(y)]]
        handles.append(Line2D([], [], color=colours[i], linewidth=2.5,
                              label=labels[i]))  # fmt: skip
    if any(e["val_loss"] is not None for t in trained for e in t.curve):
        handles.insert(1, Line2D([], [], color="0.3", linestyle="--",
                                 label="held-out loss (good images)"))  # fmt: skip
    if values and min(values) > 0 and max(values) / min(values) > LOG_RANGE:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (each family's objective)")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"{category}: learning curves of the trained models (best image AUROC first)")
    fig.legend(handles=handles, loc="outside lower left", fontsize=9, frameon=False)
    _save(fig, path)


def example_rows(labels: dict[str, tuple[str, bool, float | None]], image_ids: Sequence[str],
                 threshold: float | None) -> list[str]:  # fmt: skip
    """Each example image's row title: id, defect type, score, its rank among the
    experiment's test images (1 = most anomalous; NaN last) and the honest verdict."""

    def value(s: float | None) -> float:
        return -math.inf if s is None or math.isnan(s) else s

    scores = [value(s) for _, _, s in labels.values()]
    titles = []
    for image_id in image_ids:
        if image_id not in labels:
            titles.append(f"{image_id} (no score stored)")
            continue
        defect, anomalous, score = labels[image_id]
        s = value(score)
        rank = 1 + sum(other > s for other in scores)
        verdict = ""
        if threshold is not None and math.isfinite(s):
            verdict = ", flagged" if s > threshold else ", not flagged"
        kind = "good" if not anomalous else f"defect: {defect}"
        score_s = "n/a" if not math.isfinite(s) else f"{s:.4g}"
        titles.append(f"{image_id} ({kind}): score {score_s}, rank {rank} of "
                      f"{len(scores)}{verdict}")  # fmt: skip
    return titles


def draw_reconstructions(engine: Engine, exp: dict[str, Any], maps_dir: Path, index: Path,
                         path: Path) -> str:  # fmt: skip
    """Draw ``path`` for experiment ``exp``: per stored example test image its input, its
    reconstruction and its residual map. ``UserError`` when the examples or maps are not
    stored. Returns the caption's last sentences."""
    from stages.anomaly_maps import read_examples
    from stages.query import experiment_maps, image_labels, index_rows, map_index, picture

    ids, inputs, recons = read_examples(maps_dir, exp["key"])
    if not ids:
        raise UserError(f"experiment {exp['key'][:12]}: no example images stored")
    maps = experiment_maps(exp, maps_dir)
    residuals = [maps.maps[map_index(maps, i)] for i in ids]
    masks: list[np.ndarray | None] = [None] * len(ids)
    try:
        rows = index_rows(index, maps.category)
        masks = [picture(rows, i, maps, index)[1] for i in ids]
    except UserError as exc:  # no outline then, the rest still says what it should
        log.warning("%s: reconstruction figure without mask outlines: %s", maps.category, exc)
    labels = image_labels(engine, exp["key"])
    titles = example_rows(labels, ids, exp.get("threshold_honest"))
    figure_reconstructions(exp, inputs, recons, residuals, masks, titles, maps.vmin,
                           maps.vmax, len(maps.image_ids), path)  # fmt: skip
    outlines = "" if any(m is None for m in masks) else "; the defect mask outlined in white"
    return (f"Rows: {len(ids)} stored test images (a good one, then one per defect type); "
            "columns: the network's input, its reconstruction, and the residual map (the "
            f"evaluated anomaly map, one colour scale over its {len(maps.image_ids)} test "
            f"maps{outlines}). Rank: among its test images by score, 1 = most anomalous; "
            "flagged: above the honest threshold.")  # fmt: skip


def figure_reconstructions(exp: dict[str, Any], inputs: np.ndarray, recons: np.ndarray,
                           residuals: Sequence[np.ndarray], masks: Sequence[np.ndarray | None],
                           titles: Sequence[str], vmin: float, vmax: float, n_maps: int,
                           path: Path) -> None:  # fmt: skip
    """Rows = example images (each titled), columns = input / reconstruction / residual."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from stages.query import outline

    n = len(titles)
    fig = Figure(figsize=(9.0, 0.9 + 3.0 * n), layout="constrained")
    rows = fig.subfigures(n, 1, squeeze=False)[:, 0]
    norm, cmap = Normalize(vmin, vmax), colormaps["jet"]
    for i, sub in enumerate(rows):
        axes = sub.subplots(1, 3)
        axes[0].imshow(np.transpose(inputs[i], (1, 2, 0)), interpolation="nearest")
        axes[1].imshow(np.transpose(recons[i], (1, 2, 0)), interpolation="nearest")
        axes[2].imshow(residuals[i], cmap=cmap, norm=norm)
        if masks[i] is not None:
            outline(axes[2], masks[i])
        for ax, name in zip(axes, ("input", "reconstruction", "residual map"), strict=True):
            ax.set_title(name, fontsize=9)
            ax.set_axis_off()
        sub.colorbar(ScalarMappable(norm, cmap), ax=axes[2], shrink=0.85, label="residual")
        sub.suptitle(titles[i], fontsize=10, fontweight="bold")
    name = wrap_name(f"{exp['category']}: {exp['detector_name']}"
                     f"{', augmented' if exp['augmented'] else ''}")  # fmt: skip
    fig.suptitle(f"{name}\nbest trained model by image AUROC ({fmt(exp['auroc'], 3)}, oracle "
                 f"pick); residual scale: min to max of its {n_maps} test maps\nrank: by "
                 "score among its test images, 1 = most anomalous; flagged: above the honest "
                 "threshold", fontsize=10)  # fmt: skip
    _save(fig, path)
