"""Dataset stage: scan an MVTec AD layout, validate every image and mask, write index and stats.

Layout understood (as in the official archive):
``<root>/<category>/train/good/*.png``, ``<root>/<category>/test/<defect_type>/*.png``,
``<root>/<category>/ground_truth/<defect_type>/<stem>_mask.png``. Files at the root
(``license.txt``, ``readme.txt``) are ignored. Grayscale categories are indexed with mode
``L`` and read as RGB by later stages (``load_rgb``).

Outputs: the image index (Parquet, one row per image, read by later stages) and dataset
statistics as JSON (machines) and Markdown (people).
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from stages.errors import UserError, run_cli, setup_logging
from stages.io import (
    atomic_path,
    remove_stale_temps,
    sha256_file,
    write_json_atomic,
    write_text_atomic,
)
from stages.params import load_params, stage_args
from stages.progress import progress

IMAGE_MODES = ("RGB", "L")
MASK_MODES = ("L", "1")


@dataclass(frozen=True)
class ImageRecord:
    """One dataset image: where it is, what it shows, and what it looks like."""

    category: str
    image_id: str
    split: str
    defect_type: str
    is_anomaly: bool
    path: str
    mask_path: str | None
    width: int
    height: int
    mode: str
    sha256: str
    mask_coverage: float | None


INDEX_SCHEMA = pa.schema(
    [
        ("category", pa.string()),
        ("image_id", pa.string()),
        ("split", pa.string()),
        ("defect_type", pa.string()),
        ("is_anomaly", pa.bool_()),
        ("path", pa.string()),
        ("mask_path", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("mode", pa.string()),
        ("sha256", pa.string()),
        ("mask_coverage", pa.float64()),
    ]
)


def open_image(path: Path, modes: Sequence[str], what: str) -> Image.Image:
    """Open and fully decode a PNG; a one-line ``UserError`` if it is unreadable or odd."""
    try:
        with Image.open(path) as img:
            img.load()  # decode all of it: truncation shows up here, not later
            if img.format != "PNG":
                raise UserError(f"{path}: {what} is {img.format}, expected PNG")
            if img.mode not in modes:
                raise UserError(
                    f"{path}: {what} has mode {img.mode} ({_mode_words(img.mode)}), "
                    f"expected 8-bit {' or '.join(modes)}"
                )
            return img.copy()
    except UserError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(f"{path}: unreadable {what} ({reason})") from None


def _mode_words(mode: str) -> str:
    words = {
        "RGBA": "RGB with alpha",
        "I;16": "16-bit grayscale",
        "I;16B": "16-bit grayscale",
        "I": "32-bit integer",
        "P": "palette",
        "LA": "grayscale with alpha",
        "CMYK": "CMYK",
        "F": "float",
        "1": "1-bit",
    }
    return words.get(mode, "unsupported")


def load_rgb(path: str | Path) -> Image.Image:
    """An image as RGB (grayscale categories such as MVTec's grid, screw, zipper included)."""
    with Image.open(path) as img:
        return img.convert("RGB")


def _pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png")


def _scan_category(root: Path, category: str) -> list[tuple[str, str, Path, Path | None]]:
    """(split, defect_type, image path, mask path or None) for every image of a category."""
    cat_dir = root / category
    if not cat_dir.is_dir():
        raise UserError(
            f"{cat_dir}: category folder missing "
            f"(expected {cat_dir}/train/good with PNG images; check data.categories)"
        )
    train_good = cat_dir / "train" / "good"
    if not train_good.is_dir():
        raise UserError(f"{train_good}: folder missing (expected the good training images here)")
    entries: list[tuple[str, str, Path, Path | None]] = []
    train = _pngs(train_good)
    if not train:
        raise UserError(f"{train_good}: no PNG images (expected at least one *.png)")
    entries += [("train", "good", p, None) for p in train]
    test_dir = cat_dir / "test"
    if not test_dir.is_dir():
        raise UserError(f"{test_dir}: folder missing (expected test/<defect_type>/*.png)")
    defect_dirs = sorted(d for d in test_dir.iterdir() if d.is_dir())
    if not defect_dirs:
        raise UserError(f"{test_dir}: no defect-type folders (expected test/good, test/<defect>)")
    for folder in defect_dirs:
        images = _pngs(folder)
        if not images:
            raise UserError(f"{folder}: no PNG images (expected at least one *.png)")
        for image in images:
            mask = None
            if folder.name != "good":
                candidate = cat_dir / "ground_truth" / folder.name / f"{image.stem}_mask.png"
                mask = candidate if candidate.is_file() else None
            entries.append(("test", folder.name, image, mask))
    return entries


def scan_dataset(
    root: str | Path, categories: Sequence[str], show_progress: bool = True
) -> list[ImageRecord]:
    """Validate the MVTec layout under ``root`` and describe every image of ``categories``."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"{root}: dataset root does not exist (data.root; expected a folder with one "
            "sub-folder per category in the MVTec AD layout)"
        )
    entries = [(c, *e) for c in categories for e in _scan_category(root, c)]
    records = []
    for category, split, defect, path, mask_path in progress(
        entries, desc="dataset: check images", unit="img", disable=not show_progress
    ):
        img = open_image(path, IMAGE_MODES, "image")
        coverage = None
        if mask_path is not None:
            mask = open_image(mask_path, MASK_MODES, "mask")
            if mask.size != img.size:
                raise UserError(
                    f"{mask_path}: mask is {mask.size[0]}x{mask.size[1]}, expected "
                    f"{img.size[0]}x{img.size[1]} like its image {path}"
                )
            coverage = float((np.asarray(mask) > 0).mean())
        records.append(
            ImageRecord(
                category=category,
                image_id=f"{split}/{defect}/{path.stem}",
                split=split,
                defect_type=defect,
                is_anomaly=defect != "good",
                path=str(path),
                mask_path=None if mask_path is None else str(mask_path),
                width=img.size[0],
                height=img.size[1],
                mode=img.mode,
                sha256=sha256_file(path),
                mask_coverage=coverage,
            )
        )
    return records


def dataset_stats(records: Sequence[ImageRecord]) -> dict[str, Any]:
    """The questions of a first look at MVTec, per category."""
    by_cat: dict[str, list[ImageRecord]] = defaultdict(list)
    for r in records:
        by_cat[r.category].append(r)
    stats: dict[str, Any] = {}
    for category, recs in by_cat.items():
        test = [r for r in recs if r.split == "test"]
        defects = sorted({r.defect_type for r in test if r.is_anomaly})
        per_defect: dict[str, Any] = {}
        for defect in sorted({r.defect_type for r in test}):
            rows = [r for r in test if r.defect_type == defect]
            cov = [r.mask_coverage for r in rows if r.mask_coverage is not None]
            per_defect[defect] = {
                "images": len(rows),
                "masks": len(cov),
                "missing_masks": sorted(
                    r.image_id for r in rows if r.is_anomaly and r.mask_path is None
                ),
                "mask_coverage_mean": float(np.mean(cov)) if cov else None,
                "mask_coverage_min": float(np.min(cov)) if cov else None,
                "mask_coverage_max": float(np.max(cov)) if cov else None,
            }
        sizes = Counter(f"{r.width}x{r.height}" for r in recs)
        modes = Counter(r.mode for r in recs)
        stats[category] = {
            "defect_types": defects,
            "train_good": sum(r.split == "train" for r in recs),
            "test_good": sum(r.split == "test" and not r.is_anomaly for r in recs),
            "test_defect": sum(r.is_anomaly for r in recs),
            "masks": sum(r.mask_path is not None for r in recs),
            "missing_masks": sum(r.is_anomaly and r.mask_path is None for r in recs),
            "per_defect_type": per_defect,
            "sizes": dict(sorted(sizes.items())),
            "modes": dict(sorted(modes.items())),
        }
    return stats


def stats_markdown(stats: dict[str, Any]) -> str:
    """Two tables for people: one line per category, one line per defect type."""
    lines = [
        "# Dataset statistics",
        "",
        "| category | train good | test good | test defect | defect types | masks | missing masks "
        "| sizes | modes |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for cat, s in stats.items():
        sizes = ", ".join(f"{k} ({v})" for k, v in s["sizes"].items())
        modes = ", ".join(f"{k} ({v})" for k, v in s["modes"].items())
        lines.append(
            f"| {cat} | {s['train_good']} | {s['test_good']} | {s['test_defect']} "
            f"| {len(s['defect_types'])} | {s['masks']} | {s['missing_masks']} | {sizes} | {modes} |"
        )
    lines += [
        "",
        "Mask coverage is the fraction of the image's pixels marked defective.",
        "",
        "| category | defect type | images | masks | mask coverage mean | min | max |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]

    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.2f}%"

    for cat, s in stats.items():
        for defect, d in s["per_defect_type"].items():
            lines.append(
                f"| {cat} | {defect} | {d['images']} | {d['masks']} | "
                f"{pct(d['mask_coverage_mean'])} | {pct(d['mask_coverage_min'])} | "
                f"{pct(d['mask_coverage_max'])} |"
            )
    return "\n".join(lines) + "\n"


def write_index(records: Sequence[ImageRecord], path: str | Path) -> None:
    table = pa.Table.from_pylist([asdict(r) for r in records], schema=INDEX_SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_index(path: str | Path) -> pa.Table:
    """The image index written by this stage (``UserError`` if the stage has not run)."""
    if not Path(path).exists():
        raise UserError(f"{path}: image index missing (run the dataset stage: dvc repro dataset)")
    return pq.read_table(path)


def main(argv: Sequence[str] | None = None) -> None:
    args: argparse.Namespace = stage_args(__doc__.splitlines()[0], argv)
    log = setup_logging("dataset")
    params = load_params(args.params).data
    records = scan_dataset(params.root, params.categories)
    stats = dataset_stats(records)
    # Everything is validated before anything is written: no half-written outputs.
    out = Path(params.stats_dir)
    for folder in (Path(params.index).parent, out):  # temp files of a killed run
        remove_stale_temps(folder, recursive=False)
    write_index(records, params.index)
    write_json_atomic(out / "stats.json", stats)
    write_text_atomic(out / "stats.md", stats_markdown(stats))
    missing = sum(s["missing_masks"] for s in stats.values())
    log.info(
        "%d images in %d categories indexed; %d defect images without a mask (pixel metrics skip them)",
        len(records),
        len(stats),
        missing,
    )


if __name__ == "__main__":
    run_cli(main)
