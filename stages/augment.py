"""Augmentation stage: lossless rotations and flips of the good training images, per category.

Which transforms apply is set per category in ``augment.transforms`` (an empty list means
none: orientation is part of what "good" means for that category). Outputs are PNGs under
``<augment.out>/<category>/<transform>/<stem>.png``, a per-category ``manifest.json`` and
``<augment.out>/index.parquet`` (one row per augmented image) for the extraction stage.

Resumable: every finished image is appended to ``journal.jsonl`` after its PNG was renamed
into place, so a killed run redoes at most the images in flight. A category whose manifest
matches its sources and transforms is skipped whole.

The index records, per augmented image, the SHA-256 of the training image it was made from
(``source_sha256``), so later stages check it belongs with the dataset index and the
transforms they are asked for (``check_augment_index``) instead of training an
``augmented`` experiment on anything else.

Speed (benchmarks/augment_throughput.py): a source is decoded once by libspng
(``stages.images.read_image``), transposed by Pillow (a pixel copy, no numpy round trip) and
encoded by ``encode_png`` (PNG's Up filter, zlib level 1, run-length strategy): about 10x
less CPU than Pillow's encoder at its default level on MVTec's 900x900 images, for files
about 1.25x larger. PNG is lossless, so the pixels are the same; the bytes differ from the
old encoder's. The sources are spread over threads, one per core: libspng, zlib, numpy,
Pillow and hashlib release the GIL for the heavy parts (measured: both cores busy).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import struct
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from stages.dataset import read_index
from stages.errors import UserError, run_cli, setup_logging
from stages.images import PNG_SIGNATURE, read_image
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
        ("source_sha256", pa.string()),
    ]
)
JOURNAL = "journal.jsonl"
MANIFEST = "manifest.json"
INDEX = "index.parquet"
RERUN = "rerun the augment stage (dvc repro augment)"


# The same transforms as Pillow's pixel copies (``TRANSFORM_FUNCS`` is what tests compare to).
TRANSPOSE: dict[str, Image.Transpose] = {
    "rot90": Image.Transpose.ROTATE_90,
    "rot180": Image.Transpose.ROTATE_180,
    "rot270": Image.Transpose.ROTATE_270,
    "hflip": Image.Transpose.FLIP_LEFT_RIGHT,
    "vflip": Image.Transpose.FLIP_TOP_BOTTOM,
}
# PNG colour type and channels of the 8-bit modes ``encode_png`` writes itself; any other
# mode goes to Pillow's encoder with ``PNG_OPTIONS``.
PNG_MODES = {"L": (0, 1), "LA": (4, 2), "RGB": (2, 3), "RGBA": (6, 4)}
PNG_OPTIONS = {"compress_level": 1, "compress_type": zlib.Z_RLE}


def apply_transform(image: Image.Image, transform: str) -> Image.Image:
    """The transformed image, same mode (and palette), pixel for pixel."""
    return image.transpose(TRANSPOSE[transform])


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image: Image.Image) -> bytes:
    """Lossless PNG bytes of ``image``.

    8-bit L, LA, RGB and RGBA (MVTec's images) are written here: every row with PNG's "Up"
    filter (the difference to the row above, modulo 256: one numpy subtraction) and
    deflated by zlib at level 1 with the run-length strategy. On MVTec's 900x900 images
    that is about 17 ms of CPU against Pillow's 185 ms at its default level (which tries
    five filters per row), for files about 1.25x larger; zlib and numpy release the GIL.
    Other modes (palette, 1-bit, 16-bit) go to Pillow's encoder (``PNG_OPTIONS``).
    """
    if image.mode not in PNG_MODES:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", **PNG_OPTIONS)
        return buffer.getvalue()
    colour, channels = PNG_MODES[image.mode]
    width, height = image.size
    pixels = np.asarray(image).reshape(height, width * channels)
    rows = np.empty((height, width * channels + 1), dtype=np.uint8)
    rows[:, 0] = 2  # filter type Up (the first row's "row above" is zeros: the row itself)
    rows[0, 1:] = pixels[0]
    np.subtract(pixels[1:], pixels[:-1], out=rows[1:, 1:])
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    data = deflate.compress(rows) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def augment_source(
    items: list[dict[str, Any]],
    decode: Callable[[str], Any] = read_image,
    transform: Callable[[Any, str], Any] = apply_transform,
    encode: Callable[[Any], bytes] = encode_png,
) -> list[dict[str, Any]]:
    """Decode one training image once and write each of its planned transforms
    (``items``: the ``_plan`` entries of one source) atomically; their manifest entries.
    ``decode``/``transform``/``encode``: the stage's own (a benchmark passes the old ones)."""
    image = decode(items[0]["source_path"])
    finished = []
    for item in items:
        data = encode(transform(image, item["transform"]))
        write_bytes_atomic(item["path"], data)
        finished.append({**item, "sha256": hashlib.sha256(data).hexdigest()})
    return finished


class Workers:
    """The worker threads (one per core by default), started at first use and stopped on
    exit; calling it gives the executor."""

    def __init__(self, n: int | None = None) -> None:
        self.n = n or len(os.sched_getaffinity(0))
        self._pool: ThreadPoolExecutor | None = None

    def __call__(self) -> Executor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.n)
        return self._pool

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


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
    pool: Callable[[], Executor] | None = None,
) -> list[dict[str, Any]]:
    """Make the category's augmented images; returns its manifest entries. ``pool`` gives
    the executor the sources are spread over (default: ``Workers()``, one thread per core)."""
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
        lost = next((it for it in todo if not Path(it["source_path"]).is_file()), None)
        if lost is not None:
            raise UserError(f"{lost['source_path']}: training image listed in the image index "
                            "not found (rerun the dataset stage: dvc repro dataset)")  # fmt: skip
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

        with (
            open(journal_path, "a", encoding="utf-8") as journal,
            contextlib.nullcontext(pool) if pool is not None else Workers() as executor,
            progress(total=len(todo), desc=f"augment {category}", unit="img") as bar,
        ):
            for finished in executor().map(augment_source, by_source.values()):
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


# --- what later stages check --------------------------------------------------------------


def train_originals(index_path: str | Path, categories: Sequence[str]) -> dict[str, list[dict]]:
    """The dataset index's training images per configured category; ``UserError`` naming
    the index (and the stage to rerun) when it is missing or lacks a category."""
    table = read_index(index_path)
    needed = ("category", "image_id", "split", "path", "sha256")
    absent = [c for c in needed if c not in table.column_names]
    if absent:
        raise UserError(f"{index_path}: not the dataset stage's image index (no column "
                        f"{absent[0]}); rerun the dataset stage (dvc repro dataset)")  # fmt: skip
    rows = table.select(list(needed)).to_pylist()
    by_category: dict[str, list[dict]] = {c: [] for c in categories}
    for row in rows:
        if row["category"] in by_category and row["split"] == "train":
            by_category[row["category"]].append(row)
    for category, train in by_category.items():
        if not train:
            raise UserError(f"{index_path}: no training images of category '{category}' "
                            "(data.categories lists it); rerun the dataset stage "
                            "(dvc repro dataset)")  # fmt: skip
    return by_category


def check_augment_index(
    path: str | Path,
    originals: dict[str, list[dict]],
    transforms: dict[str, Sequence[str]],
    dataset_index: str | Path,
) -> dict[str, list[dict[str, Any]]]:
    """The augmented images per category, after checking that ``path`` (the augment stage's
    index) is what the stage writes for ``originals`` (training images per category, from
    the dataset index) and ``transforms``: every category covered, the same transforms, made
    from the same training images (ids and SHA-256). ``UserError`` otherwise, naming the
    index and saying to rerun the augment stage. A missing index is fine only where no
    category asks for a transform."""
    path = Path(path)
    if not path.is_file():
        asking = [c for c in originals if transforms.get(c)]
        if asking:
            c = asking[0]
            raise UserError(f"{path}: augmented image index missing, but "
                            f"augment.transforms.{c} is {list(transforms[c])}; run the "
                            "augment stage (dvc repro augment)")  # fmt: skip
        return {c: [] for c in originals}
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise UserError(f"{path}: unreadable augmented image index ({reason}); {RERUN}") from None
    absent = [n for n in INDEX_SCHEMA.names if n not in table.column_names]
    if absent:
        raise UserError(f"{path}: augmented image index written by an older augment stage "
                        f"(no column {absent[0]}); {RERUN}")  # fmt: skip
    rows = table.select(INDEX_SCHEMA.names).to_pylist()
    out: dict[str, list[dict[str, Any]]] = {c: [] for c in originals}
    for row in rows:
        if row["category"] in out:
            out[row["category"]].append(row)
    for category, train in originals.items():
        wanted = list(transforms.get(category, []))
        got = out[category]
        if not got and wanted:
            raise UserError(f"{path}: no augmented images of category '{category}', but "
                            f"augment.transforms.{category} is {wanted}; {RERUN}")  # fmt: skip
        used = sorted({r["transform"] for r in got}, key=lambda t: (t not in wanted, t))
        if set(used) != set(wanted):
            raise UserError(f"{path}: augmented images of '{category}' are for transforms "
                            f"{used}, but augment.transforms.{category} is {wanted}; "
                            f"{RERUN}")  # fmt: skip
        sources = {r["image_id"]: r["sha256"] for r in train}
        expected = {(s, t) for s in sources for t in wanted}
        seen: set[tuple[str, str]] = set()
        for r in got:
            pair = (r["source_image_id"], r["transform"])
            if sources.get(pair[0]) != r["source_sha256"] or pair in seen:
                raise UserError(f"{path}: augmented image {r['image_id']} was not made from "
                                f"the training image {dataset_index} lists as "
                                f"{pair[0]}; {RERUN}")  # fmt: skip
            seen.add(pair)
        if seen != expected:
            lacking = sorted(expected - seen)[0]
            raise UserError(f"{path}: no augmented image {lacking[0]}@{lacking[1]} of "
                            f"category '{category}' ({dataset_index} lists {lacking[0]}); "
                            f"{RERUN}")  # fmt: skip
    return out


def main(argv: Sequence[str] | None = None) -> None:
    args = stage_args(__doc__.splitlines()[0], argv)
    log = setup_logging("augment")
    params = load_params(args.params)
    out = Path(params.augment.out)
    originals = train_originals(params.data.index, params.data.categories)  # before writing
    stale = remove_stale_temps(out)
    if stale:
        log.info("removed %d temp files left by an interrupted run", stale)
    rows = []
    with Workers() as pool:
        for category in params.data.categories:
            sources = originals[category]
            transforms = params.augment.transforms[category]
            rows += augment_category(category, sources, transforms, out, log, pool)
    table = pa.Table.from_pylist(
        [{k: r[k] for k in INDEX_SCHEMA.names} for r in rows], schema=INDEX_SCHEMA
    )
    with atomic_path(out / INDEX) as tmp:
        pq.write_table(table, tmp)
    log.info("%d augmented images in %d categories", len(rows), len(params.data.categories))


if __name__ == "__main__":
    run_cli(main)
