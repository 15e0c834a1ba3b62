"""Augmentation stage: lossless rotations and flips of the good training images, per category.

Which transforms apply is set per category in ``augment.transforms`` (an empty list means
none: orientation is part of what "good" means for that category). Outputs are PNGs under
``<augment.out>/<category>/<transform>/<stem>.png``, a per-category ``manifest.json`` and
``<augment.out>/index.parquet`` (one row per augmented image) for the extraction stage.

Resumable: every finished image is appended to ``journal.jsonl`` after its PNG was renamed
into place, so a killed run redoes at most the images in flight. A category whose manifest
matches its sources and transforms is skipped whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from stages.dataset import read_index
from stages.errors import run_cli, setup_logging
from stages.io import atomic_path, remove_stale_temps, write_bytes_atomic, write_json_atomic
from stages.params import load_params, stage_args
from stages.progress import progress

# Pixel-exact transforms on the (H, W[, C]) array. Rotations are counter-clockwise.
TRANSFORM_FUNCS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "rot90": lambda a: np.rot90(a, 1),
    "rot180": lambda a: np.rot90(a, 2),
    "rot270": lambda a: np.rot90(a, 3),
    "hflip": lambda a: a[:, ::-1],
    "vflip": lambda a: a[::-1],
}

INDEX_SCHEMA = pa.schema(
    [
        ("category", pa.string()),
        ("image_id", pa.string()),
        ("source_image_id", pa.string()),
        ("transform", pa.string()),
        ("path", pa.string()),
        ("sha256", pa.string()),
    ]
)
JOURNAL = "journal.jsonl"
MANIFEST = "manifest.json"


def apply_transform(image: Image.Image, transform: str) -> Image.Image:
    """The transformed image, same mode, pixel for pixel."""
    array = np.ascontiguousarray(TRANSFORM_FUNCS[transform](np.asarray(image)))
    return Image.fromarray(array, mode=image.mode)


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _read_journal(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Finished entries of a killed run; a torn last line is ignored."""
    done: dict[tuple[str, str], dict[str, Any]] = {}
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        done[(entry["source_image_id"], entry["transform"])] = entry
    return done


def _plan(category: str, sources: list[dict[str, Any]], transforms: Sequence[str], out: Path):
    """Every (source, transform) the category needs, with its output path."""
    return [
        {
            "category": category,
            "image_id": f"{src['image_id']}@{t}",
            "source_image_id": src["image_id"],
            "source_path": src["path"],
            "source_sha256": src["sha256"],
            "transform": t,
            "path": str(out / category / t / f"{Path(src['path']).stem}.png"),
        }
        for src in sources
        for t in transforms
    ]


def _is_done(item: dict[str, Any], entry: dict[str, Any] | None) -> bool:
    return (
        entry is not None
        and entry["source_sha256"] == item["source_sha256"]
        and entry["path"] == item["path"]
        and Path(item["path"]).exists()
    )


def _remove_unplanned(category_dir: Path, planned: set[str]) -> int:
    """Delete outputs no longer asked for (a dropped transform or source image)."""
    removed = 0
    for png in category_dir.rglob("*.png"):
        if str(png) not in planned:
            png.unlink()
            removed += 1
    for folder in sorted(category_dir.iterdir()) if category_dir.exists() else []:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return removed


def augment_category(
    category: str,
    sources: list[dict[str, Any]],
    transforms: Sequence[str],
    out: Path,
    log: Any,
    threads: int = 2,
) -> list[dict[str, Any]]:
    """Make the category's augmented images; returns its manifest entries."""
    cat_dir = out / category
    plan = _plan(category, sources, transforms, out)
    manifest_path = cat_dir / MANIFEST
    journal_path = cat_dir / JOURNAL
    previous = {}
    if manifest_path.exists():
        for e in json.loads(manifest_path.read_text(encoding="utf-8"))["entries"]:
            previous[(e["source_image_id"], e["transform"])] = e
    previous.update(_read_journal(journal_path))
    planned = {(it["source_image_id"], it["transform"]): it for it in plan}
    done = {k: e for k, e in previous.items() if k in planned and _is_done(planned[k], e)}
    todo = [it for k, it in planned.items() if k not in done]
    removed = _remove_unplanned(cat_dir, {it["path"] for it in plan})
    if removed:
        log.info("%s: removed %d augmented images no longer configured", category, removed)
    if not plan:
        log.info("%s: no transforms configured (augment.transforms.%s: [])", category, category)
    elif not todo:
        log.info("%s: %d augmented images up to date, skipped", category, len(plan))
    else:
        if len(plan) > len(todo):
            log.info(
                "%s: %d of %d images already done, skipped",
                category,
                len(plan) - len(todo),
                len(plan),
            )
        cat_dir.mkdir(parents=True, exist_ok=True)
        by_source: dict[str, list[dict[str, Any]]] = {}
        for item in todo:
            by_source.setdefault(item["source_path"], []).append(item)

        def work(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
            with Image.open(items[0]["source_path"]) as img:
                image = img.copy()
            finished = []
            for item in items:
                data = encode_png(apply_transform(image, item["transform"]))
                write_bytes_atomic(item["path"], data)
                finished.append({**item, "sha256": hashlib.sha256(data).hexdigest()})
            return finished

        with (
            open(journal_path, "a", encoding="utf-8") as journal,
            ThreadPoolExecutor(max_workers=threads) as pool,
            progress(total=len(todo), desc=f"augment {category}", unit="img") as bar,
        ):
            for finished in pool.map(work, by_source.values()):
                for entry in finished:
                    journal.write(json.dumps(entry) + "\n")
                    done[(entry["source_image_id"], entry["transform"])] = entry
                journal.flush()
                os.fsync(journal.fileno())
                bar.update(len(finished))
    if not plan:
        shutil.rmtree(cat_dir, ignore_errors=True)
        return []
    entries = [done[(it["source_image_id"], it["transform"])] for it in plan]
    write_json_atomic(
        manifest_path, {"category": category, "transforms": list(transforms), "entries": entries}
    )
    journal_path.unlink(missing_ok=True)
    return entries


def main(argv: Sequence[str] | None = None) -> None:
    args = stage_args(__doc__.splitlines()[0], argv)
    log = setup_logging("augment")
    params = load_params(args.params)
    out = Path(params.augment.out)
    stale = remove_stale_temps(out)
    if stale:
        log.info("removed %d temp files left by an interrupted run", stale)
    index = read_index(params.data.index).to_pylist()
    rows = []
    for category in params.data.categories:
        sources = [r for r in index if r["category"] == category and r["split"] == "train"]
        transforms = params.augment.transforms[category]
        rows += augment_category(category, sources, transforms, out, log)
    table = pa.Table.from_pylist(
        [{k: r[k] for k in INDEX_SCHEMA.names} for r in rows], schema=INDEX_SCHEMA
    )
    with atomic_path(out / "index.parquet") as tmp:
        pq.write_table(table, tmp)
    log.info("%d augmented images in %d categories", len(rows), len(params.data.categories))


if __name__ == "__main__":
    run_cli(main)
