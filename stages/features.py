"""Feature sets on disk: Parquet shards plus a manifest that marks the set complete.

A feature set is one folder ``<root>/<category>/<backbone>-<init>/<layer>/<representation>/``
holding ``part-NNNNN.parquet`` shards and ``manifest.json``. The manifest is written last
(atomically), so a folder without it is never read as complete. Each row is one image:
``image_id`` (e.g. ``train/good/000`` or ``train/good/000@rot90``), ``split`` (train/test),
``source`` (``original`` or the augmentation transform), ``defect_type``, ``is_anomaly``,
and ``feature``, a fixed-size list of float32 (or float16).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages.errors import UserError

MANIFEST = "manifest.json"
META_COLUMNS = ("image_id", "split", "source", "defect_type", "is_anomaly")


def feature_set_dir(
    root: str | Path, category: str, backbone: str, init: str, layer: str, representation: str
) -> Path:
    safe_repr = representation.replace(":", "")
    return Path(root) / category / f"{backbone}-{init}" / layer / safe_repr


def shard_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("split", pa.string()),
            ("source", pa.string()),
            ("defect_type", pa.string()),
            ("is_anomaly", pa.bool_()),
            ("feature", pa.list_(value, dim)),
        ]
    )


@dataclass(frozen=True)
class FeatureSet:
    """One feature set in memory: row metadata and the (n_rows, dim) matrix."""

    manifest: dict[str, Any]
    image_id: np.ndarray
    split: np.ndarray
    source: np.ndarray
    defect_type: np.ndarray
    is_anomaly: np.ndarray
    X: np.ndarray

    def rows(self, split: str, augmented: bool | None = None) -> np.ndarray:
        """Boolean mask of rows: ``split`` and, for train, originals only unless augmented."""
        mask = self.split == split
        if split == "train" and not augmented:
            mask &= self.source == "original"
        return mask


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The manifest of a complete feature set, or None when the set is absent or partial."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def iter_shard_tables(folder: str | Path, columns: list[str] | None = None):
    """Yield the shards of a complete feature set one by one (bounded memory)."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise UserError(f"{folder}: feature set incomplete (no {MANIFEST}); rerun the extract stage")
    for name in manifest["shards"]:
        yield pq.read_table(Path(folder) / name, columns=columns)


def feature_matrix(table: pa.Table, dtype: type = np.float32) -> np.ndarray:
    """The ``feature`` column of a shard table as a dense (rows, dim) array."""
    column = table.column("feature").combine_chunks()
    dim = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(-1, dim).astype(dtype, copy=False)


def load_feature_set(folder: str | Path, dtype: type = np.float32) -> FeatureSet:
    """Read a whole complete feature set into memory."""
    tables = list(iter_shard_tables(folder))
    manifest = read_manifest(folder)
    assert manifest is not None
    table = pa.concat_tables(tables)
    meta = {c: table.column(c).to_numpy(zero_copy_only=False) for c in META_COLUMNS}
    return FeatureSet(
        manifest=manifest,
        image_id=meta["image_id"].astype(str),
        split=meta["split"].astype(str),
        source=meta["source"].astype(str),
        defect_type=meta["defect_type"].astype(str),
        is_anomaly=meta["is_anomaly"].astype(bool),
        X=feature_matrix(table, dtype),
    )
