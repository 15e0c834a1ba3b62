"""The results store: SQLAlchemy 2.0 models, engine creation, the single writer's upsert.

Tables:

* ``experiments``: one row per experiment, unique on ``key`` (hash of the canonical config
  and the feature set's content hash), one typed, indexed column per config field, the
  matrix shape, the final status (done, failed, crashed, timeout) and the metrics: AUROC,
  average precision, and F1/precision/recall/accuracy/TP/FP/TN/FN at three thresholds,
  ``*_honest`` (a quantile ``threshold_quantile`` of the training images' out-of-fold
  scores, ``threshold_folds`` folds, no test label used), ``*_insample`` (the same quantile
  of their in-sample scores) and ``*_oracle`` (the test set's max-F1 threshold, an upper
  bound); see
  ``stages.metrics``. An image is predicted anomalous iff its score > the threshold.
* ``datasets``: one row per category of a dataset root, by content identity (a hash of the
  category's image ids, labels and image and mask file hashes; ``stages.dataset``), with
  the root as written, image counts, first and last use and ``current``: whether the last
  evaluate run's params name it. Every experiment names its ``dataset``.
* ``images``: one row per test image of a category (shared by all its experiments; an
  image id names its split and defect type, so two datasets that share one agree on it).
* ``scores``: the per-image test score of every done experiment (NULL where the score was
  NaN, since SQLite cannot store NaN; ``±inf`` are stored as they are).
* ``epochs``: the learning curve of every done experiment whose family trains a network
  (one row per epoch: training loss, held-out good images' loss, seconds).

Only the stage process writes (workers return results to it), so upserts are plain
select-then-insert/update inside one transaction per work unit, which works the same on
SQLite and PostgreSQL and is idempotent on ``key``. ``open_db`` adds columns that a
database written by an older version lacks (all such columns are nullable).

One evaluate run per database at a time (``single_writer``): for a SQLite file an
exclusive ``flock`` on ``<database>.lock`` next to it (the kernel releases it when the
process ends, however it ends, so a killed run never leaves it behind; the file holds the
holder's pid and host for the refusal message); for PostgreSQL a session advisory lock
(released when the connection closes). A second run refuses with one line naming the
first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import socket
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from stages.errors import UserError
from stages.metrics import THRESHOLD_FIELDS, THRESHOLD_KINDS

STATUSES = ("done", "failed", "crashed", "timeout")
THRESHOLD_COLUMNS = (
    "threshold_quantile",
    "threshold_folds",
    *(f"{name}_{kind}" for kind in THRESHOLD_KINDS for name in THRESHOLD_FIELDS),
)
FINAL_NOT_DONE = ("failed", "crashed", "timeout")
# Pixel-level metrics of the experiments that make anomaly maps (NULL for the others).
PIXEL_COLUMNS = (
    "pixel_auroc",
    "aupro",
    "pixel_threshold_honest",
    "pixel_f1_honest",
    "pixel_precision_honest",
    "pixel_recall_honest",
    "pixel_threshold_oracle",
    "pixel_f1_oracle",
)


class Base(DeclarativeBase):
    pass


class Experiment(Base):
    """One experiment: config fields, matrix shape, outcome and bookkeeping."""

    __tablename__ = "experiments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    # Config fields, one typed and indexed column each.
    category: Mapped[str] = mapped_column(String(64), index=True)
    augmented: Mapped[bool] = mapped_column(Boolean, index=True)
    backbone: Mapped[str] = mapped_column(String(64), index=True)
    init: Mapped[str] = mapped_column(String(32), index=True)
    layer: Mapped[str] = mapped_column(String(64), index=True)
    representation: Mapped[str] = mapped_column(String(64), index=True)
    detector: Mapped[str] = mapped_column(String(64), index=True)
    hyperparams: Mapped[str] = mapped_column(String(512), index=True)  # canonical JSON
    detector_name: Mapped[str] = mapped_column(String(600), index=True)  # readable label
    seed: Mapped[int] = mapped_column(Integer, index=True)
    feature_hash: Mapped[str] = mapped_column(String(128), index=True)
    # The dataset (``datasets.id``: the category's content identity); NULL for rows written
    # before it was recorded, until an evaluate run that plans them fills it in.
    dataset: Mapped[str | None] = mapped_column(String(64), index=True)
    # Shape of the matrices the detector saw.
    n_train: Mapped[int | None] = mapped_column(Integer)
    n_test: Mapped[int | None] = mapped_column(Integer)
    dim: Mapped[int | None] = mapped_column(Integer)
    # Outcome.
    status: Mapped[str] = mapped_column(String(16), index=True)
    auroc: Mapped[float | None] = mapped_column(Float)
    average_precision: Mapped[float | None] = mapped_column(Float)
    fit_s: Mapped[float | None] = mapped_column(Float)
    score_s: Mapped[float | None] = mapped_column(Float)
    # The family call that served this experiment: its own measured seconds and how many
    # configs it served (1 on the per-config path, where it is fit_s + score_s).
    group_s: Mapped[float | None] = mapped_column(Float)
    group_size: Mapped[int | None] = mapped_column(Integer)
    n_nan: Mapped[int | None] = mapped_column(Integer)
    n_posinf: Mapped[int | None] = mapped_column(Integer)
    n_neginf: Mapped[int | None] = mapped_column(Integer)
    # Threshold metrics (done only); predicted anomalous iff score > threshold.
    threshold_quantile: Mapped[float | None] = mapped_column(Float)
    # folds of the out-of-fold honest threshold (NULL: written before it existed, in-sample)
    threshold_folds: Mapped[int | None] = mapped_column(Integer)
    threshold_honest: Mapped[float | None] = mapped_column(Float)
    f1_honest: Mapped[float | None] = mapped_column(Float)
    precision_honest: Mapped[float | None] = mapped_column(Float)
    recall_honest: Mapped[float | None] = mapped_column(Float)
    accuracy_honest: Mapped[float | None] = mapped_column(Float)
    tp_honest: Mapped[int | None] = mapped_column(Integer)
    fp_honest: Mapped[int | None] = mapped_column(Integer)
    tn_honest: Mapped[int | None] = mapped_column(Integer)
    fn_honest: Mapped[int | None] = mapped_column(Integer)
    threshold_oracle: Mapped[float | None] = mapped_column(Float)
    f1_oracle: Mapped[float | None] = mapped_column(Float)
    precision_oracle: Mapped[float | None] = mapped_column(Float)
    recall_oracle: Mapped[float | None] = mapped_column(Float)
    accuracy_oracle: Mapped[float | None] = mapped_column(Float)
    tp_oracle: Mapped[int | None] = mapped_column(Integer)
    fp_oracle: Mapped[int | None] = mapped_column(Integer)
    tn_oracle: Mapped[int | None] = mapped_column(Integer)
    fn_oracle: Mapped[int | None] = mapped_column(Integer)
    threshold_insample: Mapped[float | None] = mapped_column(Float)
    f1_insample: Mapped[float | None] = mapped_column(Float)
    precision_insample: Mapped[float | None] = mapped_column(Float)
    recall_insample: Mapped[float | None] = mapped_column(Float)
    accuracy_insample: Mapped[float | None] = mapped_column(Float)
    tp_insample: Mapped[int | None] = mapped_column(Integer)
    fp_insample: Mapped[int | None] = mapped_column(Integer)
    tn_insample: Mapped[int | None] = mapped_column(Integer)
    fn_insample: Mapped[int | None] = mapped_column(Integer)
    # Pixel level (experiments with anomaly maps only; stages.pixel_metrics): over every
    # pixel of every test image in the model's geometry; AUPRO up to FPR 0.3; F1 of
    # ``map > threshold`` at the honest threshold (``threshold_quantile`` of the training
    # images' out-of-fold map pixels) and at the oracle max-F1 threshold.
    pixel_auroc: Mapped[float | None] = mapped_column(Float)
    aupro: Mapped[float | None] = mapped_column(Float)
    pixel_threshold_honest: Mapped[float | None] = mapped_column(Float)
    pixel_f1_honest: Mapped[float | None] = mapped_column(Float)
    pixel_precision_honest: Mapped[float | None] = mapped_column(Float)
    pixel_recall_honest: Mapped[float | None] = mapped_column(Float)
    pixel_threshold_oracle: Mapped[float | None] = mapped_column(Float)
    pixel_f1_oracle: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    code_version: Mapped[str] = mapped_column(String(64))
    # Where a family that trains ran its network (cpu or cuda: evaluate.device); NULL for
    # the other families and for rows written before it was recorded.
    device: Mapped[str | None] = mapped_column(String(16))


class Dataset(Base):
    """One category of one dataset root, identified by content (``stages.dataset``)."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    root: Mapped[str] = mapped_column(String(1024))  # data.root as the params wrote it
    category: Mapped[str] = mapped_column(String(64), index=True)
    n_images: Mapped[int] = mapped_column(Integer)
    n_test: Mapped[int] = mapped_column(Integer)
    n_anomalous: Mapped[int] = mapped_column(Integer)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    current: Mapped[bool] = mapped_column(Boolean, index=True)  # named by the last run


class Image(Base):
    """A test image of a category, as named in the feature shards."""

    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("category", "image_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    category: Mapped[str] = mapped_column(String(64))
    image_id: Mapped[str] = mapped_column(String(256))
    defect_type: Mapped[str] = mapped_column(String(64))
    is_anomaly: Mapped[bool] = mapped_column(Boolean)


class Score(Base):
    """The anomaly score (higher = more anomalous) of one test image in one experiment."""

    __tablename__ = "scores"
    __table_args__ = (Index("ix_scores_image", "image"),)

    experiment: Mapped[int] = mapped_column(
        ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True
    )
    image: Mapped[int] = mapped_column(ForeignKey("images.id"), primary_key=True)
    score: Mapped[float | None] = mapped_column(Float)


class Epoch(Base):
    """One finished training epoch of an experiment whose family trains a network: the
    learning curve (``val_loss``: the held-out good training images', NULL without them)."""

    __tablename__ = "epochs"

    experiment: Mapped[int] = mapped_column(
        ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True
    )
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)  # 1-based
    train_loss: Mapped[float | None] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float)
    seconds: Mapped[float | None] = mapped_column(Float)


@dataclass
class ExperimentRow:
    """What the stage writes for one experiment (config fields + outcome)."""

    key: str
    config: dict[str, Any]  # category, augmented, backbone, ..., seed, feature_hash
    status: str
    n_train: int | None = None
    n_test: int | None = None
    dim: int | None = None
    auroc: float | None = None
    average_precision: float | None = None
    fit_s: float | None = None
    score_s: float | None = None
    group_s: float | None = None
    group_size: int | None = None
    n_nan: int | None = None
    n_posinf: int | None = None
    n_neginf: int | None = None
    error: str | None = None
    # ``threshold_quantile`` and ``<field>_<honest|oracle>`` (``THRESHOLD_COLUMNS``).
    thresholds: dict[str, float | int | None] = field(default_factory=dict)
    # Per test image (done only): image ids, defect types, labels, scores.
    image_ids: Sequence[str] = field(default_factory=list)
    defect_types: Sequence[str] = field(default_factory=list)
    is_anomaly: Sequence[bool] = field(default_factory=list)
    scores: Sequence[float] = field(default_factory=list)
    # ``PIXEL_COLUMNS`` of an experiment with anomaly maps, and its test images' patch-score
    # grids (n_test, h, w), which the stage stores beside the database (``stages.anomaly_maps``).
    pixel: dict[str, float | None] = field(default_factory=dict)
    grids: Any = None
    grid_meta: dict[str, Any] = field(default_factory=dict)  # stored with the grids
    # A family that trains: its learning curve (``epochs`` table) and a few test images'
    # inputs and reconstructions, stored beside the grids (``stages.anomaly_maps``).
    curve: list[dict[str, Any]] = field(default_factory=list)
    examples: dict[str, Any] = field(default_factory=dict)
    embeddings: dict[str, Any] = field(default_factory=dict)  # image_ids, values (n, d)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the one writer
    cursor.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, safe
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def open_db(url: str, read_only: bool = False) -> Engine:
    """Engine for ``url`` (SQLite in WAL mode, or any SQLAlchemy URL); creates the tables.

    ``read_only``: for readers of the evaluate stage's output (report, queries): the
    database must exist with every table and column; nothing is created or altered.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(f"evaluate.db_url: not a database URL: {url!r}") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        _check_sqlite_file(Path(parsed.database))
        if read_only and not Path(parsed.database).is_file():
            raise UserError(f"{parsed.database}: results database not found (evaluate.db_url; "
                            "run the evaluate stage first)")  # fmt: skip
        folder = Path(parsed.database).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)  # a missing folder is created
        except OSError as exc:
            raise UserError(f"{folder}: cannot create the folder of the results database "
                            f"(evaluate.db_url): {exc.strerror or exc}") from None  # fmt: skip
    try:
        engine = create_engine(parsed)
    except (ImportError, ArgumentError) as exc:
        raise UserError(f"evaluate.db_url: cannot use {url!r}: {exc}") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    try:
        problem = _schema_problem(engine, read_only)
        if problem:
            raise UserError(problem)
        if not read_only:
            Base.metadata.create_all(engine)
            _add_missing_columns(engine)
            if engine.dialect.name == "sqlite":
                _check_writable(engine)
    except OperationalError as exc:
        if engine.dialect.name == "sqlite" and not read_only:
            raise _not_writable(engine, str(exc.orig or exc)) from None
        raise _unusable(engine, exc) from None
    except SQLAlchemyError as exc:
        raise _unusable(engine, exc) from None
    return engine


def _check_writable(engine: Engine) -> None:
    """Create a table in a transaction rolled back, so a read-only file fails before any work.

    On the raw connection in autocommit mode: pysqlite would commit DDL on its own otherwise.
    """
    raw = engine.raw_connection()
    try:
        dbapi = raw.driver_connection
        previous = dbapi.isolation_level
        dbapi.isolation_level = None  # no implicit transactions: BEGIN and ROLLBACK are ours
        try:
            dbapi.execute("BEGIN IMMEDIATE")
            try:
                dbapi.execute("CREATE TABLE IF NOT EXISTS _write_probe (x INTEGER)")
            finally:
                dbapi.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise _not_writable(engine, str(exc)) from None
        finally:
            dbapi.isolation_level = previous
    finally:
        raw.close()


def _not_writable(engine: Engine, reason: str) -> UserError:
    """One line naming the SQLite file the stage cannot write, and what to do."""
    return UserError(
        f"{engine.url.database}: results database is not writable ({reason}; evaluate.db_url): "
        "make the file and its folder writable, or point evaluate.db_url elsewhere; "
        "finished experiments in it are kept"
    )


SQLITE_HEADER = b"SQLite format 3\x00"
NEW_DATABASE = ("move it away or point evaluate.db_url at another file, then run the evaluate "
                "stage (it creates a new database)")  # fmt: skip


def _db_name(engine: Engine) -> str:
    """The SQLite file, or the URL without its password: what messages name."""
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return url.database
    return url.render_as_string(hide_password=True)


def _check_sqlite_file(path: Path) -> None:
    """One line when a SQLite database path is a folder, or a file that is not SQLite."""
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a SQLite database file "
                        f"(evaluate.db_url): {NEW_DATABASE}")  # fmt: skip
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserError(f"{path}: cannot read the results database ({exc.strerror or exc}; "
                        "evaluate.db_url)") from None  # fmt: skip
    if head and head != SQLITE_HEADER:  # an empty file is an empty database
        raise UserError(f"{path}: not a SQLite database (evaluate.db_url): {NEW_DATABASE}")


def _unusable(engine: Engine, exc: SQLAlchemyError) -> UserError:
    """One line for a database the driver refuses (corrupt file, server down, ...)."""
    reason = " ".join(str(getattr(exc, "orig", None) or exc).split())[:200]
    if engine.dialect.name == "sqlite" and ("not a database" in reason or "malformed" in reason):
        return UserError(f"{_db_name(engine)}: not a usable SQLite database ({reason}; "
                         f"evaluate.db_url): {NEW_DATABASE}")  # fmt: skip
    return UserError(f"{_db_name(engine)}: cannot open the results database ({reason}; "
                     "evaluate.db_url)")  # fmt: skip


def _schema_problem(engine: Engine, read_only: bool) -> str | None:
    """What is wrong with the tables of an existing database, as one line, or None.

    The one piece of advice the evaluate stage (the writer) and its readers (report, query)
    give: columns an older evaluate stage did not write are nullable and the evaluate stage
    adds them (so only readers complain); a table lacking a required column was written by
    an incompatible version or another program, and no stage can use it.
    """
    inspector = inspect(engine)
    name = _db_name(engine)
    older = absent = None
    for table in Base.metadata.sorted_tables:
        if not inspector.has_table(table.name):
            if read_only and absent is None:  # said after any incompatible table
                absent = f"{name}: no table {table.name}; run the evaluate stage first"
            continue
        present = {c["name"] for c in inspector.get_columns(table.name)}
        missing = [c for c in table.columns if c.name not in present]
        required = [c.name for c in missing if not c.nullable]
        if required:
            return (f"{name}: table {table.name} lacks {', '.join(required)} (not written by "
                    "this pipeline's evaluate stage, or by an incompatible version; "
                    f"evaluate.db_url): {NEW_DATABASE}")  # fmt: skip
        if missing and read_only and older is None:
            older = (f"{name}: table {table.name} lacks {', '.join(c.name for c in missing)} "
                     "(written by an older evaluate stage; evaluate.db_url): run the evaluate "
                     "stage, which adds them and keeps the finished experiments")  # fmt: skip
    return absent or older


def _add_missing_columns(engine: Engine) -> None:
    """``ALTER TABLE ... ADD COLUMN`` for the nullable columns an older database lacks
    (``_schema_problem`` has refused a database lacking a required one)."""
    for table in Base.metadata.sorted_tables:
        present = {c["name"] for c in inspect(engine).get_columns(table.name)}
        missing = [c for c in table.columns if c.name not in present]
        if not missing:
            continue
        with engine.begin() as conn:
            for column in missing:
                kind = column.type.compile(dialect=engine.dialect)
                conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}"))


def threshold_settings(
    engine: Engine, keys: Iterable[str]
) -> dict[str, tuple[float | None, int | None]]:
    """``key -> (threshold_quantile, threshold_folds)`` of stored done experiments among
    ``keys``: what their honest threshold was computed with."""
    wanted = set(keys)
    query = select(Experiment.key, Experiment.threshold_quantile,
                   Experiment.threshold_folds).where(Experiment.status == "done")  # fmt: skip
    with Session(engine) as session:
        return {k: (q, f) for k, q, f in session.execute(query) if k in wanted}


def failed_errors(engine: Engine, keys: Iterable[str]) -> dict[str, str]:
    """``key -> error`` of the stored ``failed`` experiments among ``keys``."""
    wanted = set(keys)
    query = select(Experiment.key, Experiment.error).where(Experiment.status == "failed")
    with Session(engine) as session:
        return {k: e or "" for k, e in session.execute(query) if k in wanted}


def statuses(engine: Engine, keys: Iterable[str] | None = None) -> dict[str, str]:
    """``key -> status`` of stored experiments (all, or those among ``keys``)."""
    with Session(engine) as session:
        rows = session.execute(select(Experiment.key, Experiment.status)).all()
    wanted = None if keys is None else set(keys)
    return {k: s for k, s in rows if wanted is None or k in wanted}


def status_counts(engine: Engine, keys: Iterable[str] | None = None) -> dict[str, int]:
    """Number of experiments per status (all, or those among ``keys``)."""
    counts = dict.fromkeys(STATUSES, 0)
    for status in statuses(engine, keys).values():
        counts[status] = counts.get(status, 0) + 1
    return counts


def experiments(engine: Engine) -> list[dict[str, Any]]:
    """Every experiment row as a dict (ordered by key)."""
    cols = Experiment.__table__.columns
    with Session(engine) as session:
        rows = session.execute(select(*cols).order_by(Experiment.key)).mappings().all()
    return [dict(r) for r in rows]


def scores_of(engine: Engine, key: str) -> dict[str, float | None]:
    """``image_id -> score`` of one experiment (empty unless it is done)."""
    query = (
        select(Image.image_id, Score.score)
        .join(Score, Score.image == Image.id)
        .join(Experiment, Experiment.id == Score.experiment)
        .where(Experiment.key == key)
    )
    with Session(engine) as session:
        return {image: score for image, score in session.execute(query)}


def curve_of(engine: Engine, key: str) -> list[dict[str, Any]]:
    """The learning curve of one experiment (``epochs`` rows by epoch; empty if none)."""
    query = (
        select(Epoch.epoch, Epoch.train_loss, Epoch.val_loss, Epoch.seconds)
        .join(Experiment, Experiment.id == Epoch.experiment)
        .where(Experiment.key == key)
        .order_by(Epoch.epoch)
    )
    with Session(engine) as session:
        return [dict(r) for r in session.execute(query).mappings()]


def record_datasets(engine: Engine, infos: Iterable[Any], keys: dict[str, Sequence[str]]) -> int:
    """Record the datasets of this run (``stages.dataset.DatasetInfo``) as the current ones
    (every other one is no longer current), and name the dataset of its planned experiments
    stored without one (``keys``: dataset id -> planned keys; a key hashes the features'
    content, hence the images', so it belongs to that dataset). Returns how many rows were
    filled in."""
    now = datetime.now(UTC)
    infos = list(infos)
    filled = 0
    with Session(engine) as session, session.begin():
        session.execute(Dataset.__table__.update().values(current=False))
        for info in infos:
            row = session.get(Dataset, info.id)
            values = {"root": info.root, "category": info.category, "n_images": info.n_images,
                      "n_test": info.n_test, "n_anomalous": info.n_anomalous,
                      "last_seen": now, "current": True}  # fmt: skip
            if row is None:
                session.add(Dataset(id=info.id, first_seen=now, **values))
            else:
                for name, value in values.items():
                    setattr(row, name, value)
        for dataset, planned in keys.items():
            planned = list(planned)
            for start in range(0, len(planned), 500):  # bound the IN list
                result = session.execute(
                    Experiment.__table__.update()
                    .where(Experiment.key.in_(planned[start : start + 500]))
                    .where(Experiment.dataset.is_(None))
                    .values(dataset=dataset)
                )
                filled += result.rowcount or 0
    return filled


def dataset_rows(engine: Engine) -> list[dict[str, Any]]:
    """Every recorded dataset with its experiment counts (``experiments``, ``done``), the
    current ones first; plus one row with id ``None`` for experiments of no recorded dataset."""
    done = func.sum(func.cast(Experiment.status == "done", Integer))
    query = select(Experiment.dataset, func.count(), done).group_by(Experiment.dataset)
    with Session(engine) as session:
        counts = {d: (n, int(k or 0)) for d, n, k in session.execute(query)}
        datasets = session.scalars(select(Dataset)).all()
        out = [
            {"id": d.id, "root": d.root, "category": d.category, "n_images": d.n_images,
             "n_test": d.n_test, "n_anomalous": d.n_anomalous, "current": d.current,
             "first_seen": d.first_seen, "last_seen": d.last_seen,
             "experiments": counts.get(d.id, (0, 0))[0], "done": counts.get(d.id, (0, 0))[1]}
            for d in datasets
        ]  # fmt: skip
    out.sort(key=lambda r: (not r["current"], r["root"], r["category"]))
    if None in counts:
        out.append({"id": None, "root": None, "category": None, "n_images": None,
                    "n_test": None, "n_anomalous": None, "current": False, "first_seen": None,
                    "last_seen": None, "experiments": counts[None][0],
                    "done": counts[None][1]})  # fmt: skip
    return out


def score_row_count(engine: Engine) -> int:
    with Session(engine) as session:
        return session.execute(select(func.count()).select_from(Score)).scalar_one()


def _image_ids(session: Session, rows: Sequence[ExperimentRow]) -> dict[tuple[str, str], int]:
    wanted: dict[tuple[str, str], tuple[str, bool]] = {}
    for row in rows:
        category = row.config["category"]
        for image, defect, label in zip(row.image_ids, row.defect_types, row.is_anomaly,
                                        strict=True):  # fmt: skip
            wanted[(category, image)] = (defect, bool(label))
    if not wanted:
        return {}
    query = select(Image.id, Image.category, Image.image_id).where(
        Image.category.in_({c for c, _ in wanted})
    )
    known = {(c, i): pk for pk, c, i in session.execute(query)}
    missing = [k for k in wanted if k not in known]
    if missing:
        session.execute(insert(Image), [
            {"category": c, "image_id": i, "defect_type": wanted[(c, i)][0],
             "is_anomaly": wanted[(c, i)][1]}
            for c, i in missing
        ])  # fmt: skip
        known = {(c, i): pk for pk, c, i in session.execute(query)}
    return known


def _db_float(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _db_value(value: float | int | None) -> float | int | None:
    return _db_float(value) if isinstance(value, float) else value


def upsert(engine: Engine, rows: Sequence[ExperimentRow], code_version: str) -> None:
    """Insert or update experiments (by key) and replace their scores, in one transaction."""
    if not rows:
        return
    try:
        _upsert(engine, rows, code_version)
    except OperationalError as exc:
        if engine.dialect.name == "sqlite" and "readonly" in str(exc.orig):
            raise _not_writable(engine, str(exc.orig)) from None  # made read-only during the run
        raise


def _upsert(engine: Engine, rows: Sequence[ExperimentRow], code_version: str) -> None:
    now = datetime.now(UTC)
    with Session(engine) as session, session.begin():
        keys = [r.key for r in rows]
        existing = {
            e.key: e for e in session.scalars(select(Experiment).where(Experiment.key.in_(keys)))
        }
        images = _image_ids(session, [r for r in rows if r.status == "done"])
        by_key: dict[str, Experiment] = {}
        for row in rows:
            values = {
                **row.config,
                "status": row.status,
                "n_train": row.n_train,
                "n_test": row.n_test,
                "dim": row.dim,
                "auroc": _db_float(row.auroc),
                "average_precision": _db_float(row.average_precision),
                "fit_s": row.fit_s,
                "score_s": row.score_s,
                "group_s": row.group_s,
                "group_size": row.group_size,
                "n_nan": row.n_nan,
                "n_posinf": row.n_posinf,
                "n_neginf": row.n_neginf,
                "error": row.error,
                **{name: _db_value(row.thresholds.get(name)) for name in THRESHOLD_COLUMNS},
                **{name: _db_value(row.pixel.get(name)) for name in PIXEL_COLUMNS},
                "updated_at": now,
                "code_version": code_version,
            }
            exp = existing.get(row.key)
            if exp is None:
                exp = Experiment(key=row.key, attempts=1, created_at=now, **values)
                session.add(exp)
            else:
                for name, value in values.items():
                    setattr(exp, name, value)
                exp.attempts = (exp.attempts or 0) + 1
            by_key[row.key] = exp
        session.flush()
        ids = [by_key[r.key].id for r in rows]
        session.execute(delete(Score).where(Score.experiment.in_(ids)))
        score_rows = [
            {"experiment": by_key[r.key].id, "image": images[(r.config["category"], image)],
             "score": _db_float(value)}
            for r in rows
            if r.status == "done"
            for image, value in zip(r.image_ids, r.scores, strict=True)
        ]  # fmt: skip
        if score_rows:
            session.execute(insert(Score), score_rows)
        session.execute(delete(Epoch).where(Epoch.experiment.in_(ids)))
        epoch_rows = [
            {"experiment": by_key[r.key].id, "epoch": int(e["epoch"]),
             "train_loss": _db_float(e.get("train_loss")), "val_loss": _db_float(e.get("val_loss")),
             "seconds": e.get("seconds")}
            for r in rows
            if r.status == "done"
            for e in r.curve
        ]  # fmt: skip
        if epoch_rows:
            session.execute(insert(Epoch), epoch_rows)


# --- one writer at a time ---------------------------------------------------------------------

LOCK_SUFFIX = ".lock"
PG_LOCK_KEY = 0x00D_E7A1  # the advisory lock id of "an evaluate run writes this database"


def lock_path(url: str) -> Path | None:
    """The lock file of a SQLite database file (``<database>.lock``), else None."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(f"evaluate.db_url: not a database URL: {url!r}") from None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database + LOCK_SUFFIX)


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


@contextlib.contextmanager
def single_writer(url: str, what: str = "evaluate") -> Iterator[None]:
    """Hold the database's writer lock for the body, or refuse with one line (``UserError``)
    naming the run that holds it. No lock for other backends (logged by the caller)."""
    path = lock_path(url)
    if path is None:
        if make_url(url).get_backend_name() == "postgresql":
            with _pg_lock(url, what):
                yield
        else:
            yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # a missing folder is created
    except OSError as exc:
        raise UserError(f"{path.parent}: cannot create the folder of the results database "
                        f"(evaluate.db_url): {exc.strerror or exc}") from None  # fmt: skip
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise UserError(f"{path}: cannot create the lock file of the results database "
                        f"(evaluate.db_url): {exc.strerror or exc}") from None  # fmt: skip
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            raise UserError(
                f"{path.with_suffix('')}: another {what} run is writing this results database "
                f"({holder}; lock {path}): wait for it to finish or stop it, then rerun "
                "(a stopped or killed run releases the lock at once)"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock (and so does the kernel, if the process dies)


@contextlib.contextmanager
def _pg_lock(url: str, what: str) -> Iterator[None]:
    """A session advisory lock on PostgreSQL, held by one connection for the body (the
    server releases it when that connection ends, e.g. when the run is killed)."""
    engine = create_engine(make_url(url))
    try:
        try:
            conn = engine.connect()
            got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": PG_LOCK_KEY})
            locked = bool(got.scalar())
            row = None
            if not locked:
                row = conn.execute(text(
                    "SELECT a.pid, a.client_addr FROM pg_locks l JOIN pg_stat_activity a "
                    "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
                    "AND l.objid = :k"), {"k": PG_LOCK_KEY}).first()  # fmt: skip
                conn.close()
        except SQLAlchemyError as exc:
            raise UserError(f"evaluate.db_url: cannot open {url!r}: "
                            f"{exc.__class__.__name__}") from None  # fmt: skip
        if not locked:
            holder = "holder unknown" if row is None else f"server pid {row[0]} from {row[1]}"
            raise UserError(f"evaluate.db_url: another {what} run is writing {url!r} "
                            f"({holder}): wait for it to finish or stop it, then rerun")  # fmt: skip
        try:
            yield
        finally:
            with contextlib.suppress(SQLAlchemyError):
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PG_LOCK_KEY})
            conn.close()
    finally:
        engine.dispose()
