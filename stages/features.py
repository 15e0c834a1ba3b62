"""Feature sets on disk: Parquet shards plus a manifest that marks the set complete.

A feature set is one folder ``<root>/<category>/<backbone>-<init>/<layer>/<representation>/``
(``<backbone>-<init>-bf16``, ``-cuda``, ``-cuda-bf16`` when not made on the CPU in float32)
holding ``part-NNNNN.parquet`` shards and ``manifest.json``. The manifest is written last
(atomically), so a folder without it is never read as complete. Each row is one image:
``image_id`` (e.g. ``train/good/000`` or ``train/good/000@rot90``), ``split`` (train/test),
``source`` (``original`` or the augmentation transform), ``defect_type``, ``is_anomaly``,
and ``feature``, a fixed-size list of float32 (or float16).

Reading checks what it reads: a missing, truncated or unreadable shard, a manifest that is
not valid JSON, or shards that disagree with their manifest (rows, dimension, the shard hash
each was written for) are one-line ``UserError``s saying to rerun the extract stage, never
data for an experiment. ``feature_set_inputs`` is the one definition of a category's rows
(train originals, test, then augmented copies) from the image indexes, so the evaluate stage
can recompute a feature set's content hash from them and tell stale features.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages.errors import UserError
from stages.io import atomic_path, is_disk_full, stable_hash, write_json_atomic

MANIFEST = "manifest.json"
META_COLUMNS = ("image_id", "split", "source", "defect_type", "is_anomaly")
RERUN = "rerun the extract stage (dvc repro extract)"
# What a feature set's values depend on besides its images (the extract stage's config,
# recorded in the manifest and hashed with the images into ``content_hash``).
CONFIG_KEYS = ("backbone", "init", "weights", "seed", "layer", "representation", "dtype", "crop",
               "code_version")  # fmt: skip
# How the network ran, recorded (and hashed) only when not the default (CPU, float32,
# contiguous), so feature sets made before these settings existed keep their content hash:
# ``precision`` (bfloat16), ``device`` (cuda: other kernels, other values) and
# ``memory_format`` (channels_last: another summation order).
RUN_KEYS = ("precision", "device", "memory_format")


def hashed_config(manifest: dict[str, Any]) -> dict[str, Any]:
    """The part of a manifest hashed into its ``content_hash``: ``CONFIG_KEYS`` and the
    ``RUN_KEYS`` it records."""
    return {k: manifest[k] for k in (*CONFIG_KEYS, *RUN_KEYS) if k in manifest}


def run_variant(device_type: str, precision: str) -> str:
    """The folder suffix of feature sets not made on the CPU in float32 (``cuda``, ``bf16``,
    ``cuda-bf16``; empty otherwise), so they never overwrite the float32 CPU ones."""
    parts = ["cuda"] if device_type == "cuda" else []
    return "-".join(parts + (["bf16"] if precision == "bfloat16" else []))


def is_patch(representation: str) -> bool:
    """A representation that keeps one vector per position (``patch``, ``patch:K``): its
    rows reshape to the manifest's ``feature_shape`` [h, w, c]."""
    return representation.partition(":")[0] == "patch"


def is_image(representation: str) -> bool:
    """A representation that keeps the (3, H, W) RGB input (``image``, the pixels backbone's
    ``rgbS`` layers): its rows reshape to the manifest's ``feature_shape`` [3, h, w]."""
    return representation == "image"


def has_maps(representation: str) -> bool:
    """Whether the experiments of such a feature set make anomaly maps (patch or image
    families), so the evaluate stage reads the test masks and stores the maps."""
    return is_patch(representation) or is_image(representation)


def feature_set_inputs(
    originals: list[dict[str, Any]], augmented: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """A category's feature-set rows in stored order: train originals, then test images (each
    by image id), then the augmented training copies by image id, with ``source``
    (``original`` or the transform) and, for the copies, ``split``/``defect_type``/
    ``is_anomaly`` of a good training image."""
    rows = [{**r, "source": "original"} for r in sorted(
        originals, key=lambda r: (r["split"] != "train", r["image_id"]))]  # fmt: skip
    rows += [
        {**r, "split": "train", "source": r["transform"], "defect_type": "good",
         "is_anomaly": False}
        for r in sorted(augmented, key=lambda r: r["image_id"])
    ]  # fmt: skip
    return rows


def content_hash_of(config: dict[str, Any], image_ids: list[str], hashes: list[str]) -> str:
    """A feature set's content hash: its extractor config and its images, in row order."""
    return stable_hash({"config": config, "inputs": list(zip(image_ids, hashes, strict=True))})


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def feature_set_dir(
    root: str | Path,
    category: str,
    backbone: str,
    init: str,
    layer: str,
    representation: str,
    variant: str = "",
) -> Path:
    """``<root>/<category>/<backbone>-<init>[-<variant>]/<layer>/<representation>`` (the
    variant from :func:`run_variant`)."""
    safe_repr = representation.replace(":", "")
    extractor = f"{backbone}-{init}" + (f"-{variant}" if variant else "")
    return Path(root) / category / extractor / layer / safe_repr


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
    """The manifest of a complete feature set, or None when the set is absent or partial;
    ``UserError`` when it is not a manifest (not JSON, no shard list)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(
            f"{path}: unreadable feature-set manifest ({_reason(exc)}); {RERUN}"
        ) from None
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(shards, list) or not all(isinstance(n, str) for n in shards):
        raise UserError(f"{path}: not a feature-set manifest (no list of shards); {RERUN}")
    return manifest


def require_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a complete feature set; ``UserError`` when it is missing."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise UserError(f"{folder}: feature set incomplete (no {MANIFEST}); {RERUN}")
    return manifest


def read_shard(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One shard, or ``UserError`` naming it when it is missing or unreadable (truncated)."""
    try:
        return pq.read_table(path, columns=columns)
    except FileNotFoundError:
        raise UserError(f"{path}: feature shard missing (listed in {MANIFEST}); {RERUN}") from None
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise UserError(f"{path}: unreadable feature shard ({_reason(exc)}); {RERUN}") from None


def check_shards(folder: str | Path, manifest: dict[str, Any]) -> None:
    """The shards agree with the manifest, from their footers (no data read): each is there
    and readable, holds ``dim`` values per row and the ``shard_hash`` the manifest lists,
    and together the manifest's ``n_rows``. ``UserError`` naming the shard otherwise."""
    folder = Path(folder)
    total = 0
    hashes = manifest.get("shard_hashes")
    for k, name in enumerate(manifest["shards"]):
        path = folder / name
        try:
            meta = pq.read_metadata(path)
            schema = meta.schema.to_arrow_schema()
        except FileNotFoundError:
            raise UserError(
                f"{path}: feature shard missing (listed in {MANIFEST}); {RERUN}"
            ) from None
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise UserError(f"{path}: unreadable feature shard ({_reason(exc)}); {RERUN}") from None
        field = schema.field("feature") if "feature" in schema.names else None
        dim = manifest.get("dim")
        if field is None or (dim is not None and getattr(field.type, "list_size", None) != dim):
            raise UserError(f"{path}: feature shard does not hold the {dim}-value rows "
                            f"{MANIFEST} lists; {RERUN}")  # fmt: skip
        if isinstance(hashes, list) and k < len(hashes):
            stored = (schema.metadata or {}).get(SHARD_HASH_KEY)
            if stored is None or stored.decode() != hashes[k]:
                raise UserError(f"{path}: feature shard not the one {MANIFEST} was written "
                                f"with (another shard hash); {RERUN}")  # fmt: skip
        total += meta.num_rows
    if manifest.get("n_rows") is not None and total != int(manifest["n_rows"]):
        raise UserError(f"{folder}: shards hold {total} rows, {MANIFEST} says "
                        f"{manifest['n_rows']}; {RERUN}")  # fmt: skip


def iter_shard_tables(folder: str | Path, columns: list[str] | None = None):
    """Yield the shards of a complete feature set one by one (bounded memory)."""
    manifest = require_manifest(folder)
    for name in manifest["shards"]:
        yield read_shard(Path(folder) / name, columns=columns)


def feature_matrix(table: pa.Table, dtype: type = np.float32) -> np.ndarray:
    """The ``feature`` column of a shard table as a dense (rows, dim) array."""
    column = table.column("feature").combine_chunks()
    dim = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(-1, dim).astype(dtype, copy=False)


def load_feature_set(
    folder: str | Path,
    dtype: type = np.float32,
    *,
    with_features: bool = True,
    train_first: bool = False,
) -> FeatureSet:
    """Read a complete feature set into memory (only its row metadata: ``with_features=False``,
    then ``X`` has 0 columns).

    The vectors are copied shard by shard into one preallocated array, so the peak is the
    array plus one shard (not twice the feature set, which for resnet50 layer1 flatten on
    one category is 2 x 4.3 GB). ``train_first`` moves the test rows after the augmented
    ones (the stored order is train originals, test, augmented), so that both training
    sets are contiguous and a detector can train on a view instead of a copy.
    """
    manifest = require_manifest(folder)
    n_rows = int(manifest.get("n_rows") or 0)
    dim = int(manifest.get("dim") or 0) if with_features else 0
    table = pa.concat_tables(iter_shard_tables(folder, columns=list(META_COLUMNS)))
    meta = {c: table.column(c).to_numpy(zero_copy_only=False) for c in META_COLUMNS}
    mismatch = f"{folder}: shards do not match {MANIFEST}; {RERUN}"
    if table.num_rows != n_rows:
        raise UserError(mismatch)
    position = None  # stored row -> row in memory, where they differ
    if train_first:
        order = np.argsort(meta["split"].astype(str) != "train", kind="stable")
        meta = {c: v[order] for c, v in meta.items()}
        position = np.empty(n_rows, dtype=np.int64)
        position[order] = np.arange(n_rows)
    X = np.empty((n_rows, dim), dtype=dtype)
    if with_features:
        start = 0
        for shard in iter_shard_tables(folder, columns=["feature"]):
            block = feature_matrix(shard, dtype)
            if block.shape[1] != dim or start + len(block) > n_rows:
                raise UserError(mismatch)
            if position is None:
                X[start : start + len(block)] = block
            else:
                X[position[start : start + len(block)]] = block
            start += len(block)
            del shard, block
        pa.default_memory_pool().release_unused()
    return FeatureSet(
        manifest=manifest,
        image_id=meta["image_id"].astype(str),
        split=meta["split"].astype(str),
        source=meta["source"].astype(str),
        defect_type=meta["defect_type"].astype(str),
        is_anomaly=meta["is_anomaly"].astype(bool),
        X=X,
    )


SHARD_HASH_KEY = b"shard_hash"
ROW_GROUP_BYTES = 32 << 20  # buffer at most this many feature bytes before writing


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def shard_hash_of(path: str | Path) -> str | None:
    """The hash a finished shard was written for (Parquet metadata), or None when absent."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    value = metadata.get(SHARD_HASH_KEY)
    return value.decode() if value else None


@contextlib.contextmanager
def disk_full_is_user_error(path: Path) -> Iterator[None]:
    """Turn "no space left" (or a file size limit) while writing ``path`` into one line."""
    try:
        yield
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise UserError(
            f"{path}: disk full while writing this feature shard ({exc}); finished shards "
            "are kept: free space on that filesystem and rerun to continue"
        ) from None


class ShardWriter:
    """Stream rows into one shard; the file appears (atomically) only on ``close()``.

    Rows are buffered up to ``ROW_GROUP_BYTES`` and written as Parquet row groups to a temp
    file, so memory stays bounded by one batch plus that buffer whatever the shard size.
    ``shard_hash`` is stored in the file's metadata so a rerun can tell a finished shard
    of the same inputs and config from a stale one.
    """

    def __init__(self, path: str | Path, dim: int, dtype: str, shard_hash: str) -> None:
        self.path = Path(path)
        self.dim = dim
        self.dtype = dtype
        schema = shard_schema(dim, dtype).with_metadata({SHARD_HASH_KEY: shard_hash.encode()})
        self._stack = contextlib.ExitStack()
        with disk_full_is_user_error(self.path):
            tmp = self._stack.enter_context(atomic_path(self.path))
            try:
                self._writer = pq.ParquetWriter(
                    tmp,
                    schema,
                    compression="snappy",
                    use_dictionary=list(META_COLUMNS[:4]),
                    # min/max of the feature values would cost CPU and tell nobody anything
                    write_statistics=list(META_COLUMNS),
                )
            except BaseException as exc:
                self._stack.__exit__(type(exc), exc, exc.__traceback__)  # drop the temp file
                raise
        self._stack.callback(self._writer.close)
        self._meta: dict[str, list[Any]] = {c: [] for c in META_COLUMNS}
        self._features: list[np.ndarray] = []
        self._buffered = 0
        self.n_rows = 0

    def add(self, meta: dict[str, list[Any]], features: np.ndarray) -> None:
        """Append rows: ``meta`` holds one list per ``META_COLUMNS`` entry, ``features`` (n, dim)."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (n, {self.dim}), got {features.shape}")
        for column in META_COLUMNS:
            self._meta[column].extend(meta[column])
        self._features.append(np.ascontiguousarray(features, dtype=self.dtype))
        self._buffered += features.nbytes
        self.n_rows += len(features)
        if self._buffered >= ROW_GROUP_BYTES:
            with disk_full_is_user_error(self.path):
                self._flush()  # on an error the caller aborts the writer

    def _flush(self) -> None:
        if not self._features:
            return
        # One Arrow chunk per buffered batch, each a zero-copy view of its numpy buffer.
        feature = pa.chunked_array(
            [
                pa.FixedSizeListArray.from_arrays(pa.array(f.reshape(-1)), self.dim)
                for f in self._features
            ],
            type=self._writer.schema.field("feature").type,
        )
        columns = [pa.array(self._meta[c]) for c in META_COLUMNS]
        table = pa.Table.from_arrays([*columns, feature], schema=self._writer.schema)
        self._writer.write_table(table)
        self._meta = {c: [] for c in META_COLUMNS}
        self._features = []
        self._buffered = 0

    def close(self) -> None:
        """Write the last row group and rename the temp file onto the shard's name."""
        with disk_full_is_user_error(self.path):
            try:
                self._flush()
                self._writer.close()
            except BaseException:
                self.abort()
                raise
            self._stack.close()  # fsync and rename; the temp file is removed on an error

    def abort(self) -> None:
        """Drop the temp file; the shard stays absent (a full disk may fail the footer)."""
        with contextlib.suppress(Exception):
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> None:
    """Mark a feature set complete: drop shards it does not list, then write the manifest."""
    folder = Path(folder)
    listed = set(manifest["shards"])
    for stale in folder.glob("part-*.parquet"):
        if stale.name not in listed:
            stale.unlink()
    write_json_atomic(folder / MANIFEST, manifest)


def invalidate(folder: str | Path) -> None:
    """Remove a feature set's manifest so it is no longer read as complete."""
    (Path(folder) / MANIFEST).unlink(missing_ok=True)
