"""Query the results database from the terminal: best configs, failures, one experiment, exports.

    python -m stages.query top --category bottle --n 10
    python -m stages.query top --detector KernelDensity --where dim=512 --where augmented=true
    python -m stages.query failed --status crashed
    python -m stages.query show KEY            # a unique prefix of the key is enough
    python -m stages.query export-submission KEY out.csv
    python -m stages.query map KEY test/crack/003 --out map.png   # one test image's anomaly map
    python -m stages.query datasets           # the datasets in the database, current first

The database is ``evaluate.db_url`` of ``--params`` (default params.yaml), or ``--db URL``.
Filters: one option per config field (``--category``, ``--augmented``, ``--backbone``,
``--init``, ``--layer``, ``--representation``, ``--detector``, ``--hyperparams``,
``--seed``) and ``--where COLUMN=VALUE`` (repeatable) for any column of ``experiments``.
``top`` and ``failed`` show the current params' dataset (the content identity of
``data.root`` x each category, from the image index ``data.index``; without it, the
datasets of the last evaluate run), say so, and count what the database holds besides;
``--dataset all`` shows every dataset, ``--dataset ID`` those whose id starts so.

Submission file (the Kaggle format of the MVTec course assignment): CSV with the header
``id,prediction`` and one row per test image of the experiment's category, ordered by
``image_id`` as a string (code point order, the same as SQLite's ``ORDER BY image_id``,
e.g. ``test/broken_large/000.png`` first); ``id`` counts from 0 in that order and
``prediction`` is 1 (anomaly) iff the image's score > the experiment's honest threshold
(``threshold_honest``, from the training scores only), else 0; a NaN score is 0.

Anomaly map (``map``, experiments of patch families only): a PNG of one test image in the
model's input geometry with its defect mask outlined, next to the experiment's anomaly map
over it (``stages.anomaly_maps.overlay``), coloured on one scale for all the experiment's
test maps (their min to max), so colours compare across images. Maps are read from
``--maps``, else ``evaluate.maps`` (``results/maps``); images and masks through the image
index ``data.index``, whose paths are relative to the project folder (run from there).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Boolean, Float, Integer, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from stages.errors import UserError, run_cli
from stages.io import atomic_path
from stages.metrics import predict
from stages.params import DEFAULT_PARAMS, load_params, path_problem
from stages.results_db import FINAL_NOT_DONE, Experiment, Image, Score, dataset_rows, open_db
from stages.scope import DatasetScope, current_ids, scope

DEFAULT_DB_URL = "sqlite:///results/results.sqlite"
FIELD_FILTERS = ("category", "augmented", "backbone", "init", "layer", "representation",
                 "detector", "hyperparams", "seed")  # fmt: skip
COLUMNS = {c.name: c for c in Experiment.__table__.columns}


# --- database access -----------------------------------------------------------------------


def db_url(params_path: str | Path, override: str | None) -> str:
    """``--db`` if given, else ``evaluate.db_url`` of the params file (or its default when
    the default params file is absent; a ``--params`` file named that is absent is an error)."""
    if override:
        return override
    if str(params_path) == DEFAULT_PARAMS and not Path(params_path).exists():
        return DEFAULT_DB_URL
    return (load_params(params_path).evaluate or {}).get("db_url", DEFAULT_DB_URL)


def typed(column: str, value: str) -> Any:
    """A filter's text value as the column's type (``--where augmented=yes`` -> True)."""
    kind = COLUMNS[column].type
    try:
        if isinstance(kind, Boolean):
            lowered = value.lower()
            if lowered not in ("true", "false", "yes", "no", "1", "0"):
                raise ValueError
            return lowered in ("true", "yes", "1")
        if isinstance(kind, Integer):
            return int(value)
        if isinstance(kind, Float):
            return float(value)
    except ValueError:
        raise UserError(
            f"filter {column}: {value!r} is not a {kind.python_type.__name__}"
        ) from None
    return value


def parse_filters(fields: dict[str, str | None], where: Sequence[str]) -> dict[str, Any]:
    """Named field options plus ``COLUMN=VALUE`` pairs, typed; unknown columns are errors."""
    filters = {k: typed(k, v) for k, v in fields.items() if v is not None}
    for item in where:
        column, sep, value = item.partition("=")
        column = column.strip()
        if not sep:
            raise UserError(f"--where {item!r}: expected COLUMN=VALUE")
        if column not in COLUMNS:
            raise UserError(f"--where {column}: no such column (known: {', '.join(COLUMNS)})")
        filters[column] = typed(column, value.strip())
    return filters


def find_experiments(
    engine: Engine,
    filters: dict[str, Any],
    statuses: Sequence[str] | None = None,
    order_by_auroc: bool = False,
    limit: int | None = None,
    datasets: set[str] | None = None,
) -> list[dict[str, Any]]:
    """Experiment rows matching every filter (and one of ``statuses``; of one of
    ``datasets`` unless None), as dicts."""
    query = select(*Experiment.__table__.columns)
    if datasets is not None:
        query = query.where(Experiment.dataset.in_(sorted(datasets)))
    for column, value in filters.items():
        query = query.where(COLUMNS[column] == value)
    if statuses:
        query = query.where(Experiment.status.in_(statuses))
    if order_by_auroc:
        query = query.where(Experiment.auroc.is_not(None))
        query = query.order_by(Experiment.auroc.desc(), Experiment.key)
    else:
        query = query.order_by(Experiment.category, Experiment.key)
    if limit is not None:
        query = query.limit(limit)
    with Session(engine) as session:
        return [dict(r) for r in session.execute(query).mappings()]


def params_dataset_ids(params_path: str | Path, db_override: str | None) -> set[str] | None:
    """The current params' dataset ids, or None when they cannot be known here (no params
    file, or ``--db`` names another database, or no image index yet)."""
    if db_override or not Path(params_path).is_file():
        return None
    data = load_params(params_path).data
    return current_ids(data.index, data.root, data.categories)


def query_scope(engine: Engine, params_path: str | Path, choice: str,
                db_override: str | None) -> DatasetScope:  # fmt: skip
    """The datasets ``top``/``failed`` show for ``--dataset choice``."""
    ids = params_dataset_ids(params_path, db_override) if choice == "current" else None
    return scope(engine, choice, ids, str(params_path))


def datasets_text(engine: Engine, params_path: str | Path, db_override: str | None) -> str:
    """The ``datasets`` table: one row per recorded dataset, the params' marked."""
    params_ids = params_dataset_ids(params_path, db_override)
    rows = []
    for r in dataset_rows(engine):
        if r["id"] is None:
            rows.append(["(none)", "-", "-", "-", "-", r["experiments"], r["done"], "-", "-",
                         "written before datasets were recorded"])  # fmt: skip
            continue
        mark = "yes" if (r["id"] in params_ids if params_ids is not None else r["current"]) else ""
        rows.append([r["id"], r["root"], r["category"], r["n_images"], r["n_test"],
                     r["experiments"], r["done"], mark,
                     r["last_seen"].strftime("%Y-%m-%d %H:%M") if r["last_seen"] else "-",
                     ""])  # fmt: skip
    header = ["dataset", "root", "category", "images", "test", "experiments", "done",
              "current", "last evaluated", "note"]  # fmt: skip
    which = f"current = named by {params_path}" if params_ids is not None else (
        "current = named by the last evaluate run")  # fmt: skip
    return f"{text_table(header, rows)}\n({len(rows)} rows; {which})"


def experiment_by_key(engine: Engine, key: str) -> dict[str, Any]:
    """The experiment whose key is ``key`` or starts with it (a unique prefix)."""
    query = select(*Experiment.__table__.columns).where(Experiment.key.startswith(key))
    with Session(engine) as session:
        rows = [dict(r) for r in session.execute(query.limit(2)).mappings()]
    if not rows:
        raise UserError(f"no experiment with key {key!r}")
    if len(rows) > 1:
        raise UserError(f"key prefix {key!r} is ambiguous; give more characters")
    return rows[0]


def submission(engine: Engine, key: str) -> list[tuple[int, str, int]]:
    """``(id, image_id, prediction)`` per test image, in the documented stable order."""
    exp = experiment_by_key(engine, key)
    if exp["status"] != "done":
        raise UserError(f"experiment {exp['key'][:12]} is {exp['status']}, not done: no scores")
    if exp["threshold_honest"] is None:
        raise UserError(f"experiment {exp['key'][:12]} has no honest threshold (stored by an "
                        "older evaluate stage or no training scores); rerun evaluate")  # fmt: skip
    query = (
        select(Image.image_id, Score.score)
        .join(Score, Score.image == Image.id)
        .where(Score.experiment == exp["id"])
    )
    with Session(engine) as session:
        pairs = sorted(tuple(r) for r in session.execute(query))
    if len(pairs) != exp["n_test"]:
        raise UserError(f"experiment {exp['key'][:12]}: {len(pairs)} stored scores for "
                        f"{exp['n_test']} test images")  # fmt: skip
    scores = [float("nan") if s is None else s for _, s in pairs]
    predicted = predict(scores, exp["threshold_honest"])
    return [(i, image, int(p)) for i, ((image, _), p) in enumerate(zip(pairs, predicted,
                                                                      strict=True))]  # fmt: skip


def write_submission(engine: Engine, key: str, out: str | Path) -> int:
    """Write the submission CSV (``-``: stdout); returns the number of rows."""
    problem = None if str(out) == "-" else path_problem(str(out), "output-file")
    if problem:
        raise UserError(f"{out}: {problem} (the output CSV of export-submission)")
    rows = submission(engine, key)
    if str(out) == "-":
        _write_rows(sys.stdout, rows)
    else:
        with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            _write_rows(fh, rows)
    return len(rows)


def _write_rows(fh: Any, rows: Sequence[tuple[int, str, int]]) -> None:
    writer = csv.writer(fh, lineterminator="\n")
    writer.writerow(["id", "prediction"])
    writer.writerows((i, p) for i, _, p in rows)


# --- anomaly maps --------------------------------------------------------------------------

DEFAULT_MAPS = "results/maps"
DEFAULT_INDEX = "cache/dataset/index.parquet"
MAP_FIGSIZE = (10.0, 5.4)  # inches; at MAP_DPI the PNG of ``map`` is 1000 x 540 pixels
MAP_DPI = 100
INDEX_COLUMNS = ("category", "image_id", "path", "mask_path")


def map_settings(params_path: str | Path, maps_override: str | None) -> tuple[Path, Path]:
    """``(maps folder, image index)``: ``--maps`` or ``evaluate.maps``, and ``data.index``
    of the params file (their defaults when the default params file is absent)."""
    if str(params_path) == DEFAULT_PARAMS and not Path(params_path).exists():
        return Path(maps_override or DEFAULT_MAPS), Path(DEFAULT_INDEX)
    params = load_params(params_path)
    maps = maps_override or (params.evaluate or {}).get("maps", DEFAULT_MAPS)
    return Path(maps), Path(params.data.index)


@dataclass
class ExperimentMaps:
    """One done patch experiment's test-image anomaly maps and their geometry."""

    exp: dict[str, Any]  # the experiment's row
    image_ids: list[str]
    maps: np.ndarray  # (n, 224, 224) float32, as the pixel metrics saw them
    category: str
    backbone: str
    crop: bool
    vmin: float  # the colour scale: min and max over every finite pixel of every map
    vmax: float


def experiment_maps(exp: dict[str, Any], maps_dir: str | Path) -> ExperimentMaps:
    """The stored maps of experiment ``exp``; one-line ``UserError`` when it has none."""
    from stages.anomaly_maps import MAP_SIZE, grid_meta, grid_path, read_grids
    from stages.features import has_maps
    from stages.patch.maps import SIGMA, anomaly_maps

    short = exp["key"][:12]
    if not has_maps(exp["representation"]):
        raise UserError(f"experiment {short} ({exp['detector_name']}, representation "
                        f"{exp['representation']}) is an image-level detector: it scores whole "
                        "images and has no anomaly maps (patch families such as PatchCore "
                        "and PaDiM have, and anomalib's models)")  # fmt: skip
    if exp["status"] != "done":
        raise UserError(f"experiment {short} is {exp['status']}, not done: no anomaly maps")
    path = grid_path(maps_dir, exp["key"])
    if not path.is_file():
        raise UserError(f"{path}: anomaly maps of experiment {short} not found (maps folder "
                        f"{maps_dir}: evaluate.maps or --maps); rerun the evaluate stage, "
                        "which stores them again")  # fmt: skip
    ids, grids = read_grids(maps_dir, exp["key"])
    meta = grid_meta(maps_dir, exp["key"])
    maps = anomaly_maps(grids, MAP_SIZE, float(meta.get("sigma", SIGMA)))
    finite = maps[np.isfinite(maps)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    return ExperimentMaps(exp, ids, maps, str(meta.get("category", exp["category"])),
                          str(meta.get("backbone", exp["backbone"])),
                          bool(meta.get("crop", True)), vmin, vmax)  # fmt: skip


def map_index(maps: ExperimentMaps, image_id: str) -> int:
    """Position of ``image_id`` among the experiment's test images (a ``.png`` suffix is
    ignored); ``UserError`` listing a few valid ids."""
    for candidate in (image_id, image_id.removesuffix(".png")):
        if candidate in maps.image_ids:
            return maps.image_ids.index(candidate)
    ids = sorted(maps.image_ids)
    good = [i for i in ids if "/good/" in i]
    shown = ", ".join([*good[:2], *[i for i in ids if i not in good][:3]])
    raise UserError(f"image {image_id!r} is not a test image of experiment "
                    f"{maps.exp['key'][:12]} ({maps.category}, {len(ids)} test images; "
                    f"e.g. {shown})")  # fmt: skip


def index_rows(index: str | Path, category: str) -> dict[str, dict[str, Any]]:
    """``image_id -> {path, mask_path, ...}`` of one category in the image index."""
    from stages.dataset import read_index

    table = read_index(index)
    missing = [c for c in INDEX_COLUMNS if c not in table.column_names]
    if missing:
        raise UserError(f"{index}: not an image index (no column {missing[0]}); rerun the "
                        "dataset stage (dvc repro dataset)")  # fmt: skip
    rows = table.select(list(INDEX_COLUMNS)).to_pylist()
    return {r["image_id"]: r for r in rows if r["category"] == category}


def picture(
    rows: dict[str, dict[str, Any]], image_id: str, maps: ExperimentMaps, index: str | Path
) -> tuple[np.ndarray, np.ndarray]:
    """``(image HxWx3 uint8, mask HxW bool)`` of one test image in the model's geometry.

    Paths in the index are relative to the project folder (the working directory)."""
    from PIL import Image

    from stages.anomaly_maps import load_masks
    from stages.images import read_image, resize_crop

    row = rows.get(image_id)
    if row is None:
        raise UserError(f"{index}: no image {image_id} of category {maps.category} in the "
                        "image index (rerun the dataset stage: dvc repro dataset)")  # fmt: skip
    path = Path(row["path"])
    try:
        with read_image(path) as image, image.convert("RGB") as rgb:
            pixels = np.asarray(
                resize_crop(rgb, maps.backbone, maps.crop, Image.Resampling.BILINEAR)
            )
    except OSError as exc:
        raise UserError(f"{path}: cannot read this image ({exc.strerror or exc}; listed in "
                        f"{index}); run from the project folder, or rerun the dataset "
                        "stage") from None  # fmt: skip
    mask = load_masks([row["mask_path"]], [str(path)], maps.backbone, maps.crop)[0]
    return pixels, mask


def image_labels(engine: Engine, key: str) -> dict[str, tuple[str, bool, float | None]]:
    """``image_id -> (defect_type, is_anomaly, score)`` of one experiment's test images."""
    query = (
        select(Image.image_id, Image.defect_type, Image.is_anomaly, Score.score)
        .join(Score, Score.image == Image.id)
        .join(Experiment, Experiment.id == Score.experiment)
        .where(Experiment.key == key)
    )
    with Session(engine) as session:
        return {i: (d, bool(a), s) for i, d, a, s in session.execute(query)}


def score_text(score: float | None) -> str:
    return "n/a" if score is None or math.isnan(score) else f"{score:.4g}"


def outline(ax: Any, mask: np.ndarray) -> None:
    """The mask's outline on an image axis: white, stroked in black (visible on any image)."""
    if mask.any():
        from matplotlib import patheffects

        ax.contour(mask.astype(np.float32), levels=[0.5], colors="white", linewidths=1.3,
                   path_effects=[patheffects.withStroke(linewidth=2.6, foreground="black")])  # fmt: skip


def write_map_figure(maps: ExperimentMaps, engine: Engine, image_id: str, index: str | Path,
                     out: str | Path) -> Path:  # fmt: skip
    """The ``map`` command's PNG: the image with its mask outline, and the anomaly map over
    it on the experiment's colour scale (``MAP_FIGSIZE`` at ``MAP_DPI``)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    from stages.anomaly_maps import overlay

    i = map_index(maps, image_id)
    image_id = maps.image_ids[i]
    image, mask = picture(index_rows(index, maps.category), image_id, maps, index)
    defect, _, score = image_labels(engine, maps.exp["key"]).get(image_id, ("?", False, None))
    fig = Figure(figsize=MAP_FIGSIZE, dpi=MAP_DPI, layout="constrained")
    left, right = fig.subplots(1, 2)
    left.imshow(image)
    outline(left, mask)
    left.set_title("model input" + (", defect outlined" if mask.any() else f" ({defect})"))
    right.imshow(overlay(image, maps.maps[i], mask, maps.vmin, maps.vmax))
    right.set_title("anomaly map")
    for ax in (left, right):
        ax.set_axis_off()
    scale = ScalarMappable(Normalize(maps.vmin, maps.vmax), colormaps["jet"])
    fig.colorbar(scale, ax=right, shrink=0.85,
                 label=f"map value (min to max over all {len(maps.image_ids)} test maps)")  # fmt: skip
    name = textwrap.shorten(maps.exp["detector_name"], 70, placeholder="...")
    fig.suptitle(f"{name} | {image_id} | image score {score_text(score)}\ncolour scale "
                 f"{maps.vmin:.4g} (blue) to {maps.vmax:.4g} (red), experiment "
                 f"{maps.exp['key'][:12]}", fontsize=11)  # fmt: skip
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=MAP_DPI)
    return Path(out)


def write_map(engine: Engine, key: str, image_id: str, out: str | Path, maps_dir: str | Path,
              index: str | Path) -> Path:  # fmt: skip
    """``map``: one test image's anomaly-map PNG of experiment ``key`` (a unique prefix)."""
    problem = path_problem(str(out), "output-file")
    if problem:
        raise UserError(f"{out}: {problem} (the output PNG of map)")
    maps = experiment_maps(experiment_by_key(engine, key), maps_dir)
    return write_map_figure(maps, engine, image_id, index, out)


# --- terminal tables -----------------------------------------------------------------------


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]], max_width: int = 60) -> str:
    """Columns padded to their widest cell (cells cut at ``max_width``)."""
    cells = [[cell(v)[:max_width] for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


TOP_COLUMNS = ("key", "category", "augmented", "backbone", "init", "layer", "representation",
               "detector_name", "auroc", "average_precision", "f1_honest", "f1_oracle",
               "fit_s")  # fmt: skip
FAILED_COLUMNS = ("key", "category", "augmented", "backbone", "layer", "representation",
                  "detector_name", "status", "attempts", "error")  # fmt: skip


def show_text(exp: dict[str, Any]) -> str:
    """Every column of one experiment, one per line."""
    width = max(len(k) for k in exp)
    lines = [f"{k.ljust(width)}  {cell(v)}" for k, v in exp.items() if k != "id"]
    return "\n".join(lines)


# --- command line --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stages.query",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="params file (params.yaml)")
    parser.add_argument("--db", help="database URL (default: evaluate.db_url of --params)")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_filters(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        for name in FIELD_FILTERS:
            p.add_argument(f"--{name}", help=f"only experiments with this {name}")
        p.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                       help="filter on any column of experiments (repeatable)")  # fmt: skip
        p.add_argument("--dataset", default="current", metavar="current|all|ID",
                       help="the current params' dataset (default), every dataset, or one "
                       "(an id prefix; see the datasets command)")  # fmt: skip
        return p

    top = with_filters(sub.add_parser("top", help="best done experiments by AUROC"))
    top.add_argument("--n", type=int, default=10, help="how many (10)")
    failed = with_filters(sub.add_parser("failed", help="failed, crashed, timed-out experiments"))
    failed.add_argument("--status", choices=FINAL_NOT_DONE, help="only this status")
    sub.add_parser("datasets", help="the datasets in the database, with experiment counts")
    show = sub.add_parser("show", help="every field of one experiment")
    show.add_argument("key", help="experiment key or a unique prefix")
    export = sub.add_parser(
        "export-submission",
        help="submission CSV (id,prediction) at the honest threshold",
        description="CSV with header id,prediction; one row per test image of the category, "
        "ordered by image_id (code point order); id from 0; prediction 1 = anomaly "
        "(score > threshold_honest), 0 = normal.",
    )
    export.add_argument("key", help="experiment key or a unique prefix")
    export.add_argument("out", help="output CSV path, or - for stdout")
    amap = sub.add_parser(
        "map",
        help="PNG of one test image's anomaly map (patch experiments)",
        description="The image in the model's geometry with its mask outlined, and the "
        "anomaly map over it, coloured on the min-max scale of all the experiment's test maps.",
    )
    amap.add_argument("key", help="experiment key or a unique prefix")
    amap.add_argument("image_id", help="a test image id, e.g. test/crack/003")
    amap.add_argument("--out", required=True, help="output PNG path")
    amap.add_argument("--maps", help="maps folder (default: evaluate.maps of --params)")
    # also accepted after the command (the global ones are read before it)
    amap.add_argument("--params", default=argparse.SUPPRESS, help="params file (params.yaml)")
    amap.add_argument("--db", default=argparse.SUPPRESS, help="database URL")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    engine = open_db(db_url(args.params, args.db), read_only=True)
    try:
        if args.command in ("top", "failed"):
            fields = {name: getattr(args, name) for name in FIELD_FILTERS}
            filters = parse_filters(fields, args.where)
            shown = query_scope(engine, args.params, args.dataset, args.db)
            print(f"dataset: {shown.describe()}")
            if args.command == "top":
                rows = find_experiments(engine, filters, ["done"], order_by_auroc=True,
                                        limit=args.n, datasets=shown.ids)  # fmt: skip
                columns = TOP_COLUMNS
            else:
                wanted = [args.status] if args.status else list(FINAL_NOT_DONE)
                rows = find_experiments(engine, filters, wanted, datasets=shown.ids)
                columns = FAILED_COLUMNS
            table_rows = [[r["key"][:12], *(r[c] for c in columns[1:])] for r in rows]
            for r in table_rows:
                if columns is FAILED_COLUMNS and r[-1]:
                    r[-1] = " ".join(str(r[-1]).split())
            print(text_table(columns, table_rows))
            print(f"({len(rows)} experiments)")
            if note := shown.others_note():
                print(note)
        elif args.command == "datasets":
            print(datasets_text(engine, args.params, args.db))
        elif args.command == "show":
            exp = experiment_by_key(engine, args.key)
            exp["hyperparams"] = json.dumps(json.loads(exp["hyperparams"]), sort_keys=True)
            print(show_text(exp))
        elif args.command == "map":
            maps_dir, index = map_settings(args.params, args.maps)
            print(write_map(engine, args.key, args.image_id, args.out, maps_dir, index))
        else:
            n = write_submission(engine, args.key, args.out)
            if args.out != "-":
                print(f"{args.out}: {n} rows (id,prediction)", file=sys.stderr)
    finally:
        engine.dispose()


if __name__ == "__main__":
    run_cli(main)
