"""Dataset stage: scan an MVTec AD layout, validate every image and mask, write index and stats.

Layout understood (as in the official archive):
``<root>/<category>/train/good/*.png``, ``<root>/<category>/test/<defect_type>/*.png``,
``<root>/<category>/ground_truth/<defect_type>/<stem>_mask.png``. Files at the root
(``license.txt``, ``readme.txt``) are ignored. Grayscale categories are indexed with mode
``L`` and read as RGB by later stages (``load_rgb``).

What the scanner counts as an image, strictly and visibly:

- Hidden entries are skipped at every level (their contents unread) and listed in
  ``stats.json`` (``hidden``) and the log: names starting with ``.`` (``.DS_Store``,
  ``.ipynb_checkpoints``, AppleDouble ``._000.png``) and system clutter (``__MACOSX``,
  ``Thumbs.db``, ``desktop.ini``, ...; see ``HIDDEN_NAMES``).
- An image is a file (or a link to one) named ``*.png`` (any case) directly in
  ``train/good`` or in ``test/<defect_type>``; its id is ``<split>/<defect_type>/<stem>``.
  Everything else met on the way (other files, sub-folders of image folders, broken links,
  unexpected folders, masks with no image) is never read and is listed in ``stats.json``
  (``ignored``, with the reason) and counted in the log.
- One-line errors naming the paths: a defect-type folder whose name is ``good`` up to case
  or spaces (``test/Good``: its good images would be labelled anomalous); two defect-type
  folders whose names differ only in case; two files giving one image id up to case and
  extension (``000.png`` and ``000.PNG``, or ``000.png`` and ``000.jpg``); two masks for one
  image; an image or mask over ``data.max_pixels`` (width x height, read from the PNG
  header before anything is decoded; Pillow's decompression-bomb error never escapes).

Masks: ``ground_truth/<defect_type>/<stem>_mask.png`` (``_mask.png`` in any case), 8-bit
``L`` or 1-bit, the size of its image. The rule: a mask holds 0 (background) and at most
one other value, the defect, which may be any of 1..255 (MVTec writes 255, other tools 1
or 128). A second non-zero value (near-zero noise around the background, grey edge levels
of a resized mask, JPEG noise) is an error naming the file and the values found, e.g.
``values 0..19 and 255``. An all-zero mask on a defect image is kept (coverage 0) and
reported as a warning (``stats.json`` ``empty_masks``, the log).

Outputs: the image index (Parquet, one row per image, read by later stages) and dataset
statistics as JSON (machines) and Markdown (people).

``--files FOLDER --out FILE`` instead writes the listing of everything under one category
folder (kind, path, size, mtime; folders followed through links). ``dvc.yaml``
runs it once per category with the category folder as its dependency: DVC follows a
dependency path that is itself a link (a category folder linked into another disk) but no
link inside a folder, so ``data.root`` alone would be 0 files. The dataset stage depends on
the listings, which change exactly when a file under a category was added, removed or
changed. Links to folders *below* a category folder stay invisible to DVC: the stage warns
about each (``stats.json`` ``linked_folders``).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import struct
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from stages.errors import UserError, run_cli, setup_logging
from stages.images import PNG_SIGNATURE
from stages.io import (
    atomic_path,
    remove_stale_temps,
    sha256_file,
    stable_hash,
    write_json_atomic,
    write_text_atomic,
)
from stages.params import DEFAULT_PARAMS, load_params
from stages.progress import progress

IMAGE_MODES = ("RGB", "L")
MASK_MODES = ("L", "1")
DEFAULT_MAX_PIXELS = 50_000_000  # data.max_pixels: 50 megapixels (MVTec's largest: 1 MP)
MASK_SUFFIX = "_mask.png"
# Skipped wherever they appear (compared in lower case), like every name starting with ".".
HIDDEN_NAMES = frozenset(
    {
        "__macosx",
        "__pycache__",
        "thumbs.db",
        "ehthumbs.db",
        "ehthumbs_vista.db",
        "desktop.ini",
        "$recycle.bin",
        "system volume information",
        "@eadir",
        "icon\r",
    }
)
# Other image formats: ``000.jpg`` beside ``000.png`` is an ambiguous image, not a side file.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"})


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
    mask_sha256: str | None = None  # the mask file's, part of the dataset's identity


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
        ("mask_sha256", pa.string()),
    ]
)


@dataclass
class ScanNotes:
    """What the scan of one category met besides images: paths relative to the root."""

    hidden: list[str] = field(default_factory=list)
    ignored: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    linked_folders: list[str] = field(default_factory=list)  # links DVC does not look into


@dataclass
class Scan:
    records: list[ImageRecord]
    notes: dict[str, ScanNotes]


def is_hidden(name: str) -> bool:
    """Dot-names and system clutter (``__MACOSX``, ``Thumbs.db``, ...): never data."""
    return name.startswith((".", "~$")) or name.lower() in HIDDEN_NAMES


def _png_size(path: Path) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR chunk (24 bytes read); None if it is not one."""
    with open(path, "rb") as fh:
        head = fh.read(24)
    if len(head) < 24 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def _check_pixels(path: Path, what: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise UserError(
            f"{path}: {what} is {width}x{height} = {width * height:,} pixels, over "
            f"data.max_pixels = {max_pixels:,} (downscale it, or raise data.max_pixels)"
        )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__


def open_image(
    path: Path, modes: Sequence[str], what: str, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Open and fully decode a PNG; a one-line ``UserError`` if it is unreadable or odd.

    Format, size (against ``max_pixels``, from the header) and mode are checked before
    anything is decoded.
    """
    try:
        size = _png_size(path)
        if size is not None:
            _check_pixels(path, what, *size, max_pixels)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.format != "PNG":
                    raise UserError(f"{path}: {what} is {img.format}, expected PNG")
                _check_pixels(path, what, *img.size, max_pixels)
                if img.mode not in modes:
                    raise UserError(
                        f"{path}: {what} has mode {img.mode} ({_mode_words(img.mode)}), "
                        f"expected 8-bit {' or '.join(modes)}"
                    )
                img.load()  # decode all of it: truncation shows up here, not later
                return img.copy()
    except UserError:
        raise
    except Image.DecompressionBombError as exc:
        raise UserError(f"{path}: {what} too large for Pillow to decode ({_reason(exc)})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path}: unreadable {what} ({_reason(exc)})") from None


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


def describe_values(values: Iterable[int]) -> str:
    """Sorted integer values as runs: ``0..19 and 255``, ``0, 3 and 255``."""
    runs: list[list[int]] = []
    for v in sorted(values):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    parts = [str(a) if a == b else f"{a}..{b}" for a, b in runs]
    if len(parts) > 8:
        parts = [*parts[:6], f"... ({len(parts) - 7} more runs)", parts[-1]]
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def mask_coverage(mask: Image.Image, path: Path) -> float:
    """Fraction of defect pixels of a clean mask (0 and one other value); ``UserError`` else."""
    array = np.asarray(mask)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    levels = np.flatnonzero(np.bincount(array.ravel(), minlength=256))
    if np.count_nonzero(levels) > 1:
        raise UserError(
            f"{path}: mask is not binary: values {describe_values(levels.tolist())} (expected "
            "0 for background and one defect value, e.g. 0 and 255; a resized or "
            "JPEG-saved mask has grey levels: redraw or threshold it)"
        )
    return float((array > 0).mean())


class _Walker:
    """Folder listing that skips hidden entries and notes what it skipped or ignored."""

    def __init__(self, root: Path, notes: ScanNotes) -> None:
        self.root = root
        self.notes = notes

    def rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def ignore(self, path: Path, reason: str) -> None:
        self.notes.ignored.append({"path": self.rel(path), "reason": reason})

    def children(self, folder: Path) -> list[Path]:
        """Entries of ``folder``, sorted; hidden ones and broken links noted, not returned."""
        try:
            entries = sorted(folder.iterdir())
        except OSError as exc:
            raise UserError(f"{folder}: cannot read this folder ({_reason(exc)})") from None
        visible = []
        for entry in entries:
            if is_hidden(entry.name):
                self.notes.hidden.append(self.rel(entry))
            elif entry.is_symlink() and not entry.exists():
                self.ignore(entry, "broken link")
            else:
                visible.append(entry)
        return visible

    def folder(self, path: Path) -> None:
        """Note a folder the scan reads whose content DVC cannot see (a link)."""
        if path.is_symlink():
            self.notes.linked_folders.append(self.rel(path))

    def files(self, folder: Path, where: str) -> list[Path]:
        """The regular files directly in ``folder``; sub-folders and others are ignored."""
        files = []
        for entry in self.children(folder):
            if entry.is_dir():
                self.ignore(entry, f"folder inside {where}")
            elif not entry.is_file():
                self.ignore(entry, "not a regular file")
            else:
                files.append(entry)
        return files

    def images(self, folder: Path, split: str, defect: str) -> list[Path]:
        """The PNG images of an image folder; one image id per file, up to case."""
        self.folder(folder)
        groups: dict[str, list[Path]] = defaultdict(list)
        images = []
        before = len(self.notes.ignored)
        for path in self.files(folder, "an image folder"):
            suffix = path.suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                groups[path.stem.lower()].append(path)
            if suffix == ".png":
                images.append(path)
            else:
                self.ignore(path, f"not a PNG: {path.suffix or 'no'} extension")
        for same in groups.values():
            if len(same) > 1 and any(p.suffix.lower() == ".png" for p in same):
                a, b = same[:2]
                raise UserError(
                    f"{a} and {b}: two files for one image id ({split}/{defect}/{a.stem}: "
                    "names differ only in case or extension); keep one"
                )
        if not images:
            others = [Path(item["path"]).name for item in self.notes.ignored[before:]]
            found = f"; found {len(others)} other entries, e.g. {others[0]}" if others else ""
            raise UserError(f"{folder}: no PNG images (expected at least one *.png{found})")
        return images

    def masks(self, folder: Path, defect: str) -> dict[str, Path]:
        """``{image stem in lower case: mask}`` of a ``ground_truth/<defect>`` folder."""
        self.folder(folder)
        masks: dict[str, Path] = {}
        for path in self.files(folder, "a mask folder"):
            if not path.name.lower().endswith(MASK_SUFFIX) or len(path.name) == len(MASK_SUFFIX):
                self.ignore(path, f"not a mask (expected <image stem>{MASK_SUFFIX})")
                continue
            key = path.name[: -len(MASK_SUFFIX)].lower()
            if key in masks:
                raise UserError(
                    f"{masks[key]} and {path}: two masks for one image (test/{defect}/"
                    f"{path.name[: -len(MASK_SUFFIX)]}: names differ only in case); keep one"
                )
            masks[key] = path
        return masks


def _case_hint(folder: Path, name: str) -> str:
    """`` (found 'Train': folder names are case-sensitive)`` if a sibling differs in case."""
    try:
        near = [
            p.name for p in folder.iterdir() if p.name.lower() == name.lower() and p.name != name
        ]
    except OSError:
        return ""
    return f" (found '{near[0]}': folder names are case-sensitive)" if near else ""


def _scan_category(
    root: Path, category: str, notes: ScanNotes
) -> list[tuple[str, str, Path, Path | None]]:
    """(split, defect_type, image path, mask path or None) for every image of a category."""
    walk = _Walker(root, notes)
    cat_dir = root / category
    if not cat_dir.is_dir():
        if cat_dir.is_symlink():
            raise UserError(
                f"{cat_dir}: category folder is a link to {os.readlink(cat_dir)}, which does "
                "not exist (check the link and data.categories)"
            )
        raise UserError(
            f"{cat_dir}: category folder missing "
            f"(expected {cat_dir}/train/good with PNG images; check data.categories)"
        )
    expected = {"train", "test", "ground_truth"}
    for entry in walk.children(cat_dir):
        if entry.name not in expected:
            walk.ignore(entry, "not train, test or ground_truth")
    train = cat_dir / "train"
    train_good = train / "good"
    if not train_good.is_dir():
        hint = _case_hint(train, "good") if train.is_dir() else _case_hint(cat_dir, "train")
        raise UserError(
            f"{train_good}: folder missing (expected the good training images here){hint}"
        )
    walk.folder(train)
    for entry in walk.children(train):
        if entry.name != "good":
            walk.ignore(entry, "train holds only good")
    entries: list[tuple[str, str, Path, Path | None]] = [
        ("train", "good", p, None) for p in walk.images(train_good, "train", "good")
    ]
    test_dir = cat_dir / "test"
    if not test_dir.is_dir():
        raise UserError(
            f"{test_dir}: folder missing (expected test/<defect_type>/*.png)"
            f"{_case_hint(cat_dir, 'test')}"
        )
    walk.folder(test_dir)
    defect_dirs = []
    for entry in walk.children(test_dir):
        if entry.is_dir():
            defect_dirs.append(entry)
        else:
            walk.ignore(entry, "file in test (expected test/<defect_type>/ folders)")
    if not defect_dirs:
        raise UserError(f"{test_dir}: no defect-type folders (expected test/good, test/<defect>)")
    by_name: dict[str, Path] = {}
    for folder in defect_dirs:
        name = folder.name
        if name != "good" and name.strip().lower() == "good":
            raise UserError(
                f"{folder}: defect-type folder named '{name}': only 'good' (exactly) holds the "
                "good test images, so its images would be labelled anomalous; rename it to good"
            )
        if name.lower() in by_name:
            raise UserError(
                f"{by_name[name.lower()]} and {folder}: two defect-type folders whose names "
                "differ only in case; merge them"
            )
        by_name[name.lower()] = folder
    gt_dir = cat_dir / "ground_truth"
    gt_folders: dict[str, Path] = {}
    if gt_dir.is_dir():
        walk.folder(gt_dir)
        names = {d.name for d in defect_dirs}
        for entry in walk.children(gt_dir):
            if not entry.is_dir():
                walk.ignore(entry, "file in ground_truth (expected ground_truth/<defect_type>/)")
            elif entry.name == "good":
                walk.ignore(entry, "good images have no masks")
            elif entry.name not in names:
                walk.ignore(entry, f"no test/{entry.name} folder (names are case-sensitive)")
            else:
                gt_folders[entry.name] = entry
    elif gt_dir.exists() or gt_dir.is_symlink():
        walk.ignore(gt_dir, "not a folder")
    for folder in defect_dirs:
        images = walk.images(folder, "test", folder.name)
        masks = (
            walk.masks(gt_folders[folder.name], folder.name) if folder.name in gt_folders else {}
        )
        for image in images:
            mask = masks.pop(image.stem.lower(), None) if folder.name != "good" else None
            entries.append(("test", folder.name, image, mask))
        for orphan in masks.values():
            stem = orphan.name[: -len(MASK_SUFFIX)]
            walk.ignore(orphan, f"mask of no image (no test/{folder.name}/{stem}.png)")
    return entries


def _check_entry(
    category: str,
    split: str,
    defect: str,
    path: Path,
    mask_path: Path | None,
    max_pixels: int,
) -> ImageRecord:
    """Decode one image (and its mask) completely and describe it; ``UserError`` if bad."""
    img = open_image(path, IMAGE_MODES, "image", max_pixels)
    coverage = None
    if mask_path is not None:
        mask = open_image(mask_path, MASK_MODES, "mask", max_pixels)
        if mask.size != img.size:
            raise UserError(
                f"{mask_path}: mask is {mask.size[0]}x{mask.size[1]}, expected "
                f"{img.size[0]}x{img.size[1]} like its image {path}"
            )
        coverage = mask_coverage(mask, mask_path)
    return ImageRecord(
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
        mask_sha256=None if mask_path is None else sha256_file(mask_path),
    )


def scan(
    root: str | Path,
    categories: Sequence[str],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    show_progress: bool = True,
) -> Scan:
    """Validate the MVTec layout under ``root``; every image of ``categories`` and the notes."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"{root}: dataset root does not exist (data.root; expected a folder with one "
            "sub-folder per category in the MVTec AD layout)"
        )
    notes = {c: ScanNotes() for c in categories}
    entries = []
    for category in categories:
        try:
            entries += [(category, *e) for e in _scan_category(root, category, notes[category])]
        except OSError as exc:  # e.g. a folder that can be listed but not entered
            where = exc.filename or root / category
            raise UserError(f"{where}: cannot read ({_reason(exc)})") from None
    # Two threads: Pillow's decoder and hashing release the GIL. In order, so the
    # first bad file in scan order is the one reported; the rest are then dropped.
    pool = ThreadPoolExecutor(2, thread_name_prefix="dataset-check")
    try:
        checked = pool.map(lambda entry: _check_entry(*entry, max_pixels), entries)
        records = list(
            progress(
                checked,
                total=len(entries),
                desc="dataset: check images",
                unit="img",
                disable=not show_progress,
            )
        )
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return Scan(records, notes)


def scan_dataset(
    root: str | Path,
    categories: Sequence[str],
    show_progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[ImageRecord]:
    """Validate the MVTec layout under ``root`` and describe every image of ``categories``."""
    return scan(root, categories, max_pixels, show_progress).records


def dataset_stats(
    records: Sequence[ImageRecord], notes: dict[str, ScanNotes] | None = None
) -> dict[str, Any]:
    """The questions of a first look at MVTec, per category, and what the scan skipped."""
    by_cat: dict[str, list[ImageRecord]] = defaultdict(list)
    for r in records:
        by_cat[r.category].append(r)
    notes = notes or {}
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
        note = notes.get(category, ScanNotes())
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
            # Warnings: defect images whose mask marks no pixel (kept, coverage 0).
            "empty_masks": sorted(
                r.image_id for r in recs if r.is_anomaly and r.mask_coverage == 0.0
            ),
            # Not read: hidden entries, and everything else that is not an image or mask.
            "hidden": sorted(note.hidden),
            "ignored": sorted(note.ignored, key=lambda item: item["path"]),
            # Folders below the category folder that are links: DVC does not see into them.
            "linked_folders": sorted(note.linked_folders),
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
    notes = [(cat, what, text) for cat, s in stats.items() for what, text in _note_lines(s)]
    if notes:
        lines += [
            "",
            "Not indexed, and warnings:",
            "",
            "| category | what | path |",
            "|---|---|---|",
        ]
        lines += [f"| {cat} | {what} | {text} |" for cat, what, text in notes]
    return "\n".join(lines) + "\n"


def _note_lines(s: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, path) rows of a category's scan notes (absent in older stats files)."""
    rows = [("all-zero mask (warning)", f"`{i}`") for i in s.get("empty_masks", [])]
    rows += [("linked folder: DVC does not see changes (warning)", f"`{p}`")
             for p in s.get("linked_folders", [])]  # fmt: skip
    rows += [("hidden, skipped", f"`{p}`") for p in s.get("hidden", [])]
    rows += [(f"ignored: {i['reason']}", f"`{i['path']}`") for i in s.get("ignored", [])]
    return rows


def write_index(records: Sequence[ImageRecord], path: str | Path) -> None:
    table = pa.Table.from_pylist([asdict(r) for r in records], schema=INDEX_SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_index(path: str | Path) -> pa.Table:
    """The image index written by this stage (``UserError`` if the stage has not run)."""
    if not Path(path).exists():
        raise UserError(f"{path}: image index missing (run the dataset stage: dvc repro dataset)")
    return pq.read_table(path)


# --- dataset identity ---------------------------------------------------------------------

IDENTITY_FIELDS = ("image_id", "split", "defect_type", "sha256", "mask_sha256")


@dataclass(frozen=True)
class DatasetInfo:
    """One category of one dataset root, identified by its content: ``id`` is a hash of
    the category's name and, per image, its id, split, defect type and the SHA-256 of its
    file and mask. Moving the root keeps the id; changing, adding or removing any image or
    mask changes it, so results of two versions of a category never mix."""

    id: str
    root: str
    category: str
    n_images: int
    n_test: int
    n_anomalous: int


def dataset_infos(
    index: str | Path, root: str, categories: Sequence[str]
) -> dict[str, DatasetInfo]:
    """The identity of each of ``categories`` in the image index (``root``: ``data.root``
    as the params write it, recorded beside the id for people)."""
    table = read_index(index)
    names = [n for n in IDENTITY_FIELDS if n in table.column_names]  # older index: no masks
    rows: dict[str, list[dict[str, Any]]] = {c: [] for c in categories}
    for row in table.select(["category", "is_anomaly", *names]).to_pylist():
        if row["category"] in rows:
            rows[row["category"]].append(row)
    out = {}
    for category, items in rows.items():
        items.sort(key=lambda r: r["image_id"])
        content = [[r.get(n) for n in IDENTITY_FIELDS] for r in items]
        out[category] = DatasetInfo(
            id=stable_hash({"category": category, "images": content})[:16],
            root=str(root),
            category=category,
            n_images=len(items),
            n_test=sum(r["split"] == "test" for r in items),
            n_anomalous=sum(bool(r["is_anomaly"]) for r in items),
        )
    return out


def list_files(folder: Path) -> list[list[Any]]:
    """``[kind, path, size, mtime_ns]`` of every entry under ``folder``, links followed.

    Kinds: ``file``, ``folder``, ``hidden`` (not descended into), ``broken`` (link),
    ``loop`` (a link to a folder above it), ``other`` (fifo, socket, device).
    """
    rows: list[list[Any]] = []

    def walk(path: Path, rel: str, above: frozenset[str]) -> None:
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as exc:
            raise UserError(f"{path}: cannot read this folder ({_reason(exc)})") from None
        for entry in entries:
            name = f"{rel}{entry.name}"
            if is_hidden(entry.name):
                rows.append(["hidden", name, None, None])
                continue
            try:
                st = os.stat(entry.path)  # through links
            except OSError:
                rows.append(["broken", name, None, None])
                continue
            if stat.S_ISDIR(st.st_mode):
                real = os.path.realpath(entry.path)
                if real in above:
                    rows.append(["loop", name, None, None])
                    continue
                rows.append(["folder", name, None, None])
                walk(Path(entry.path), f"{name}/", above | {real})
            elif stat.S_ISREG(st.st_mode):
                rows.append(["file", name, st.st_size, st.st_mtime_ns])
            else:
                rows.append(["other", name, None, None])

    walk(folder, "", frozenset({os.path.realpath(folder)}))
    return rows


def write_file_listing(folder: str | Path, out: str | Path) -> int:
    """Write the listing of a category ``folder`` to ``out`` (JSON lines); its row count."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(
            f"{folder}: category folder missing "
            f"(expected {folder}/train/good with PNG images; check data.root and data.categories)"
        )
    rows = list_files(folder)
    out = Path(out)
    remove_stale_temps(out.parent, recursive=False)  # of a killed run
    write_text_atomic(out, "".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)


def _shown(items: Sequence[str], limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _log_notes(log: Any, stats: dict[str, Any], stats_json: Path) -> None:
    hidden = [p for s in stats.values() for p in s["hidden"]]
    if hidden:
        log.info("skipped %d hidden files/folders: %s", len(hidden), _shown(hidden))
    ignored = [f"{i['path']} ({i['reason']})" for s in stats.values() for i in s["ignored"]]
    if ignored:
        log.info("ignored %d entries (listed in %s): %s", len(ignored), stats_json, _shown(ignored))
    empty = [f"{c}/{i}" for c, s in stats.items() for i in s["empty_masks"]]
    if empty:
        log.warning(
            "warning: %d defect image(s) with an all-zero mask (kept, coverage 0): %s",
            len(empty),
            _shown(empty),
        )
    linked = [p for s in stats.values() for p in s["linked_folders"]]
    if linked:
        log.warning(
            "warning: %d folder(s) below a category folder are links, which DVC does not look "
            "into (dvc status misses changes there; link the category folder instead): %s",
            len(linked),
            _shown(linked),
        )


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="params file (params.yaml)")
    parser.add_argument(
        "--files",
        metavar="FOLDER",
        help="only list what is under this category folder, into --out (DVC's view of it)",
    )
    parser.add_argument("--out", metavar="FILE", help="the listing that --files writes")
    args = parser.parse_args(argv)
    if (args.files is None) != (args.out is None):
        parser.error("--files and --out go together")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = _args(argv)
    log = setup_logging("dataset")
    if args.files is not None:
        n = write_file_listing(args.files, args.out)
        log.info("%s: %d entries listed in %s", args.files, n, args.out)
        return
    params = load_params(args.params).data
    result = scan(params.root, params.categories, params.max_pixels)
    stats = dataset_stats(result.records, result.notes)
    # Everything is validated before anything is written: no half-written outputs.
    out = Path(params.stats_dir)
    for folder in (Path(params.index).parent, out):  # temp files of a killed run
        remove_stale_temps(folder, recursive=False)
    write_index(result.records, params.index)
    write_json_atomic(out / "stats.json", stats)
    write_text_atomic(out / "stats.md", stats_markdown(stats))
    _log_notes(log, stats, out / "stats.json")
    missing = sum(s["missing_masks"] for s in stats.values())
    log.info(
        "%d images in %d categories indexed; %d defect images without a mask (pixel metrics skip them)",
        len(result.records),
        len(stats),
        missing,
    )


if __name__ == "__main__":
    run_cli(main)
