"""Benchmark: the augment stage against the way it wrote images before, in one run.

On the real MVTec AD bottle training images (900x900 RGB PNGs), all five transforms:

- before (the reference, implemented here as the stage had it): Pillow decode, numpy
  rotate/flip and ``Image.fromarray``, Pillow's PNG encoder at its default level (zlib 6),
  atomic write with fsync, 2 threads, one journal line per image fsynced per source;
- after: the stage's own ``augment_category`` (libspng decode, Pillow transpose, its own
  PNG writer: Up filter, zlib level 1 with the run-length strategy; one thread per core).

Prints images/s for both and the ratio, bytes on disk for both, that every output decodes
to the same pixels, and a per-part breakdown on one core (CPU ms per image for decode,
transform and encode, wall ms for write+fsync; a source's decode is shared by its 5
transforms and shown per image).

    .venv/bin/python benchmarks/augment_throughput.py --images 24
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.augment import (
    TRANSFORM_FUNCS,
    Workers,
    _plan,
    apply_transform,
    augment_category,
    augment_source,
    encode_png,
)
from stages.images import read_image
from stages.io import write_bytes_atomic

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"
TRANSFORMS = list(TRANSFORM_FUNCS)


# --- before: the stage's code as it was, kept here as the reference ------------------------
def old_transform(image: Image.Image, transform: str) -> Image.Image:
    array = np.ascontiguousarray(TRANSFORM_FUNCS[transform](np.asarray(image)))
    return Image.fromarray(array, mode=image.mode)


def old_encode(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def old_decode(path: str) -> Image.Image:
    with Image.open(path) as img:
        return img.copy()


def old_work(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return augment_source(items, old_decode, old_transform, old_encode)


def old_stage(sources: list[dict], out: Path) -> list[dict]:
    """The old stage's loop: sources on 2 threads, a journal line per image, fsync per source."""
    plan = _plan("bottle", sources, TRANSFORMS, out)
    by_source: dict[str, list[dict]] = {}
    for item in plan:
        by_source.setdefault(item["source_path"], []).append(item)
    (out / "bottle").mkdir(parents=True, exist_ok=True)
    entries = []
    with (
        open(out / "bottle" / "journal.jsonl", "a", encoding="utf-8") as journal,
        ThreadPoolExecutor(max_workers=2) as pool,
    ):
        for finished in pool.map(old_work, by_source.values()):
            for entry in finished:
                journal.write(json.dumps(entry) + "\n")
            journal.flush()
            os.fsync(journal.fileno())
            entries += finished
    return entries


# --- after: the stage's own code -------------------------------------------------------------
def stage_run(sources: list[dict], out: Path, workers: int | None = None) -> list[dict]:
    """The augment stage's ``augment_category`` on ``sources`` (all five transforms)."""
    log = logging.getLogger("augment_throughput")
    with Workers(workers) as pool:
        return augment_category("bottle", sources, TRANSFORMS, out, log, pool)


def bottle_sources(n: int, data: Path = DATA) -> list[dict]:
    paths = sorted((data / "train" / "good").glob("*.png"))[:n]
    return [{"image_id": f"bottle/{p.stem}", "path": str(p), "sha256": p.stem} for p in paths]


def stage_images_per_second(n_sources: int = 6, data: Path = DATA) -> float:
    """Images/s of the stage's own code on ``n_sources`` bottle images x 5 transforms, its
    workers started first on other images (a run starts them once for all categories), for
    benchmarks/ood_speedup.py's projection."""
    log = logging.getLogger("augment_throughput")
    with tempfile.TemporaryDirectory(prefix="augment_rate_") as tmp, Workers() as pool:
        sources = bottle_sources(n_sources + pool.n, data)
        warm, timed = sources[n_sources:], sources[:n_sources]
        augment_category("bottle", warm, TRANSFORMS, Path(tmp) / "warm", log, pool)
        t0 = time.perf_counter()
        entries = augment_category("bottle", timed, TRANSFORMS, Path(tmp), log, pool)
        return len(entries) / (time.perf_counter() - t0)


def disk_bytes(entries: list[dict]) -> int:
    return sum(Path(e["path"]).stat().st_size for e in entries)


def parts(sources: list[dict], out: Path) -> dict[str, tuple[float, float]]:
    """Median ms per image of each part, (before, after), on one core."""
    ms: dict[str, tuple[list[float], list[float]]] = {
        k: ([], []) for k in ("decode", "transform", "encode", "write+fsync")
    }
    ways: list[tuple[Callable, Callable, Callable]] = [
        (old_decode, old_transform, old_encode),
        (read_image, apply_transform, encode_png),
    ]
    for w, (decode, transform, encode) in enumerate(ways):
        for k, src in enumerate(sources):
            t = time.process_time()
            image = decode(src["path"])
            ms["decode"][w].append((time.process_time() - t) * 1e3 / len(TRANSFORMS))
            for name in TRANSFORMS:
                t = time.process_time()
                moved = transform(image, name)
                ms["transform"][w].append((time.process_time() - t) * 1e3)
                t = time.process_time()
                data = encode(moved)
                ms["encode"][w].append((time.process_time() - t) * 1e3)
                t = time.perf_counter()
                write_bytes_atomic(out / f"{w}_{k}_{name}.png", data)
                ms["write+fsync"][w].append((time.perf_counter() - t) * 1e3)
    return {k: (float(np.median(a)), float(np.median(b))) for k, (a, b) in ms.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--images", type=int, default=24, help="bottle training images (x5)")
    parser.add_argument("--parts-images", type=int, default=4,
                        help="images for the per-part breakdown")  # fmt: skip
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"skipped: MVTec bottle not found at {DATA}")
        return
    sources = bottle_sources(args.images)
    n = len(sources) * len(TRANSFORMS)
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               "unknown CPU")  # fmt: skip
    print(f"{cpu}, {os.cpu_count()} cores; {len(sources)} bottle images x {len(TRANSFORMS)} "
          f"transforms = {n} PNGs; load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    for src in sources:  # both ways read the sources from the page cache
        Path(src["path"]).read_bytes()
    with tempfile.TemporaryDirectory(prefix="augment_bench_", dir="/tmp") as tmp:
        root = Path(tmp)
        results = {}
        for name, run in (("before", old_stage), ("after", stage_run)):
            t0, c0 = time.perf_counter(), os.times()
            entries = run(sources, root / name)
            wall, c1 = time.perf_counter() - t0, os.times()
            cpu_s = sum(c1[:4]) - sum(c0[:4])  # self and children (the workers)
            results[name] = (entries, wall, cpu_s)
        before, after = results["before"], results["after"]
        for (a, b) in zip(before[0], after[0], strict=True):  # fmt: skip
            pixels_a = np.asarray(Image.open(a["path"]))
            pixels_b = np.asarray(Image.open(b["path"]))
            if not np.array_equal(pixels_a, pixels_b):
                raise SystemExit(f"pixels differ: {a['path']} vs {b['path']}")
        print(f"\n{'':8}{'images/s':>10}{'wall s':>9}{'CPU s':>8}{'MB on disk':>12}"
              f"{'KB/image':>10}")  # fmt: skip
        for name, (entries, wall, cpu_s) in results.items():
            size = disk_bytes(entries)
            print(f"{name:8}{len(entries) / wall:>10.1f}{wall:>9.2f}{cpu_s:>8.2f}"
                  f"{size / 1e6:>12.1f}{size / len(entries) / 1e3:>10.0f}")  # fmt: skip
        print(f"ratio   {before[1] / after[1]:>9.1f}x  (CPU {before[2] / after[2]:.1f}x, "
              f"bytes {disk_bytes(after[0]) / disk_bytes(before[0]):.3f}x); all {n} outputs "
              "decode to the same pixels")  # fmt: skip
        breakdown = parts(sources[: args.parts_images], root / "parts")
        print(f"\nper image on one core, median ms ({min(args.parts_images, len(sources))} "
              "images; decode shared by 5 transforms):")  # fmt: skip
        print(f"{'part':<14}{'before':>9}{'after':>9}{'ratio':>8}")
        for part, (b, a) in breakdown.items():
            print(f"{part:<14}{b:>9.1f}{a:>9.1f}{b / max(a, 1e-9):>7.1f}x")
        tb, ta = (sum(v[i] for v in breakdown.values()) for i in (0, 1))
        print(f"{'sum':<14}{tb:>9.1f}{ta:>9.1f}{tb / ta:>7.1f}x")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
