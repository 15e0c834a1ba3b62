"""Which dataset the readers of the database (report, query) show: by default the current
params' (the content identity of ``data.root`` x each of ``data.categories``, from the
image index), so results of another dataset in the same database never mix in silently;
they are counted and named instead (``python -m stages.query datasets`` lists them)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from stages.dataset import dataset_infos
from stages.errors import UserError
from stages.results_db import dataset_rows

LIST_HINT = "python -m stages.query datasets"


@dataclass
class DatasetScope:
    """The datasets shown (``ids``; ``None``: every row) and what the database holds besides."""

    ids: set[str] | None
    shown: list[dict[str, Any]] = field(default_factory=list)  # their ``dataset_rows`` rows
    source: str = ""  # where ``ids`` came from, for people
    other_experiments: int = 0  # of recorded datasets not shown
    other_datasets: int = 0
    unrecorded: int = 0  # experiments of no recorded dataset (written before they were)

    def keep(self, row: Mapping[str, Any]) -> bool:
        return self.ids is None or row.get("dataset") in self.ids

    def filter(self, rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in rows if self.keep(r)]

    def describe(self) -> str:
        """One line: the roots and categories shown."""
        if self.ids is None:
            return "every dataset in the database"
        roots: dict[str, list[str]] = {}
        for row in self.shown:
            roots.setdefault(row["root"], []).append(f"{row['category']} ({row['id'][:8]})")
        if not roots:
            return f"no recorded dataset ({self.source})"
        return "; ".join(f"{root}: {', '.join(cats)}" for root, cats in roots.items())

    def others_note(self) -> str:
        """One line on the experiments not shown ('' when there are none)."""
        parts = []
        if self.other_experiments:
            parts.append(f"{self.other_experiments} experiments of {self.other_datasets} other "
                         "dataset(s)")  # fmt: skip
        if self.unrecorded:
            parts.append(f"{self.unrecorded} experiments with no dataset recorded (stored "
                         "before datasets were; the evaluate stage names those it plans)")  # fmt: skip
        if not parts:
            return ""
        return f"The database also holds {' and '.join(parts)}, not shown (`{LIST_HINT}`)."


def current_ids(index: str | Path, root: str, categories: Sequence[str]) -> set[str] | None:
    """The identities of the params' categories, or None when the image index is absent."""
    if not Path(index).is_file():
        return None
    return {info.id for info in dataset_infos(index, root, categories).values()}


def scope(engine: Engine, choice: str = "current", params_ids: set[str] | None = None,
          source: str = "") -> DatasetScope:  # fmt: skip
    """The scope for ``choice``: ``current`` (``params_ids``, else the datasets the last
    evaluate run marked current), ``all``, or a dataset id (a prefix selects every id it
    starts)."""
    rows = dataset_rows(engine)
    recorded = [r for r in rows if r["id"] is not None]
    unrecorded = sum(r["experiments"] for r in rows if r["id"] is None)
    if choice == "all":
        return DatasetScope(None, recorded, "all")
    if choice == "current":
        if not recorded:  # no evaluate run recorded one (hand-written results): every row
            return DatasetScope(None, recorded, "no dataset recorded")
        if params_ids is None:
            params_ids = {r["id"] for r in recorded if r["current"]}
            source = "the datasets of the last evaluate run"
        ids = params_ids
    else:
        ids = {r["id"] for r in recorded if r["id"].startswith(choice)}
        if not ids:
            known = ", ".join(r["id"][:12] for r in recorded) or "none"
            raise UserError(f"--dataset {choice}: no such dataset in the database (known: "
                            f"{known}; {LIST_HINT})")  # fmt: skip
        source = f"--dataset {choice}"
    others = [r for r in recorded if r["id"] not in ids and r["experiments"]]
    return DatasetScope(
        ids=ids,
        shown=[r for r in recorded if r["id"] in ids],
        source=source,
        other_experiments=sum(r["experiments"] for r in others),
        other_datasets=len(others),
        unrecorded=unrecorded,
    )
