"""Small feature sets on disk, as the extract stage writes them, for the evaluate tests.

Features are Gaussian blobs; anomalous test images are shifted, so detectors have something
to find. Augmented train rows are slightly perturbed copies named ``<id>@<transform>``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from stages.features import MANIFEST, feature_set_dir, shard_schema
from stages.io import sha256_file, sha256_text

REPO = Path(__file__).resolve().parents[1]


def grid_of(params_file: str) -> list[dict[str, Any]]:
    """``evaluate.detectors`` of one of the repository's params files: the grids are data,
    and tests read them from where the pipeline does (``params/study.yaml``: the study's 71)."""
    raw = yaml.safe_load((REPO / params_file).read_text(encoding="utf-8"))
    return raw["evaluate"]["detectors"]


def study_detectors() -> list[dict[str, Any]]:
    """The study's Table 3 (71 configs), from params/study.yaml."""
    return grid_of("params/study.yaml")


def write_feature_set(
    folder: Path,
    *,
    n_train: int = 30,
    n_test: int = 20,
    dim: int = 16,
    transforms: list[str] | tuple[str, ...] = (),
    seed: int = 0,
    shards: int = 2,
) -> dict[str, Any]:
    """Write Parquet shards and the manifest (last); returns the manifest."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    train = rng.normal(size=(n_train, dim))
    for i, x in enumerate(train):
        rows.append(dict(image_id=f"train/good/{i:03d}", split="train", source="original",
                         defect_type="good", is_anomaly=False, feature=x))  # fmt: skip
        for t in transforms:
            rows.append(dict(image_id=f"train/good/{i:03d}@{t}", split="train", source=t,
                             defect_type="good", is_anomaly=False,
                             feature=x + 0.1 * rng.normal(size=dim)))  # fmt: skip
    n_bad = max(1, n_test // 3)
    for i in range(n_test):
        bad = i < n_bad
        x = rng.normal(size=dim) + (1.5 if bad else 0.0)
        rows.append(dict(image_id=f"test/{'crack' if bad else 'good'}/{i:03d}", split="test",
                         source="original", defect_type="crack" if bad else "good",
                         is_anomaly=bad, feature=x))  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    schema = shard_schema(dim)
    names = []
    for k, chunk in enumerate(np.array_split(np.arange(len(rows)), shards)):
        part = [rows[j] for j in chunk]
        table = pa.table(
            {
                **{c: [r[c] for r in part] for c in ("image_id", "split", "source",
                                                      "defect_type", "is_anomaly")},
                "feature": [np.asarray(r["feature"], dtype=np.float32).tolist() for r in part],
            },
            schema=schema,
        )  # fmt: skip
        name = f"part-{k:05d}.parquet"
        pq.write_table(table, folder / name)
        names.append(name)
    manifest = {
        "content_hash": sha256_text("".join(sha256_file(folder / n) for n in names)),
        "shards": names,
        "dim": dim,
        "dtype": "float32",
        "n_rows": len(rows),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    return manifest


def make_workspace(
    root: Path,
    *,
    categories: dict[str, list[str]],
    extractors: list[tuple[str, str, str, str]],
    evaluate: dict[str, Any],
    dims: tuple[int, ...] = (16,),
    n_train: int = 30,
    n_test: int = 20,
) -> Path:
    """Feature sets for every category x extractor, ``feature_sets.json`` and a params file
    (``evaluate.detectors``: the study's 71 configs unless ``evaluate`` says otherwise).

    All paths in the params file are absolute, so any working directory works.
    """
    out = root / "features"
    listing = []
    for c, (category, transforms) in enumerate(categories.items()):
        for e, (backbone, init, layer, representation) in enumerate(extractors):
            folder = feature_set_dir(out, category, backbone, init, layer, representation)
            dim = dims[e % len(dims)]
            manifest = write_feature_set(folder, n_train=n_train, n_test=n_test, dim=dim,
                                         transforms=transforms, seed=100 * c + e)  # fmt: skip
            listing.append({"category": category, "backbone": backbone, "init": init,
                            "layer": layer, "representation": representation,
                            "folder": str(folder), "content_hash": manifest["content_hash"],
                            "n_rows": manifest["n_rows"], "dim": dim})  # fmt: skip
    (out / "feature_sets.json").write_text(json.dumps(listing, indent=1), encoding="utf-8")
    params = {
        # No image index (hand-written feature sets), named so no other folder's is read.
        "data": {
            "root": str(root / "data"),
            "categories": list(categories),
            "index": str(root / "dataset" / "index.parquet"),
        },
        "augment": {"out": str(root / "augment"), "transforms": categories},
        "extract": {"out": str(out)},
        "evaluate": {
            "db_url": f"sqlite:///{root / 'results' / 'results.sqlite'}",
            "summary": str(root / "results" / "evaluate_summary.json"),
            "scratch": str(root / "scratch"),
            "engine": {"n_workers": 2, "threads_per_worker": 1, "memory_limit": "2GiB"},
            "detectors": study_detectors(),
            **evaluate,
        },
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


N_ORIG, N_AUG, N_TEST, DIM = 30, 60, 20, 50


def gamma_rows(seed: int) -> dict[str, Any]:
    """In-memory rows of one unit: 30 train originals, 60 augmented copies (noisy), 20 test
    rows of which the last 10 are shifted (anomalous); ``train[augmented]`` index them."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 1.0, size=(N_ORIG, DIM))
    aug = np.concatenate([base + rng.normal(0, 0.3, base.shape) for _ in range(2)])
    test = rng.gamma(2.0, 1.0, size=(N_TEST, DIM))
    test[N_TEST // 2 :] += rng.normal(0.8, 0.5, size=(N_TEST // 2, DIM))
    index = np.arange(N_ORIG + N_AUG + N_TEST)
    return {
        "X": np.concatenate([base, aug, test]),
        "labels": np.r_[np.zeros(N_TEST // 2), np.ones(N_TEST // 2)],
        "test": index[N_ORIG + N_AUG :],
        "train": {False: index[:N_ORIG], True: index[: N_ORIG + N_AUG]},
    }
