"""Throughput of the extract stage vs. the bare forward pass, and disk use of the study grid.

``python benchmarks/extract_throughput.py [--images 32]`` on MVTec AD's bottle images
(../shared/data/mvtec_ad/bottle; skipped when absent). For each backbone it runs the whole
stage work unit (decode in DataLoader workers, forward, flatten all 4 layers, Parquet
shards, manifests) and the bare model forward on pre-decoded tensors, and prints images/s
of both (target: stage >= 0.8x forward). It then prints bytes on disk per image (flatten,
all 4 layers, float32 and float16) and projects the disk use of the study's full grid.
Torchvision backbones run with random init (no ImageNet weights offline), efficientnet_lite0
with its bundled ImageNet weights.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.backbones import BACKBONES, build_extractor, preprocessing  # noqa: E402
from stages.extract import WorkUnit, extract_unit  # noqa: E402
from stages.features import ShardWriter, iter_shard_tables, read_manifest  # noqa: E402
from stages.io import sha256_file  # noqa: E402

BOTTLE = REPO.parent / "shared/data/mvtec_ad/bottle"
# MVTec AD image counts per category: (train good, test).
MVTEC_COUNTS = {
    "bottle": (209, 83),
    "cable": (224, 150),
    "capsule": (219, 132),
    "carpet": (280, 117),
    "grid": (264, 78),
    "hazelnut": (391, 110),
    "leather": (245, 124),
    "metal_nut": (220, 115),
    "pill": (267, 167),
    "screw": (320, 160),
    "tile": (230, 117),
    "toothbrush": (60, 42),
    "transistor": (213, 100),
    "wood": (247, 79),
    "zipper": (240, 151),
}
STUDY_BACKBONES = ("resnet18", "resnet50", "vit_b_16", "vit_b_32")  # x 2 inits x 4 layers


def bottle_index(root: Path, n_images: int) -> Path:
    """A dataset index of the first ``n_images`` bottle images (train, then test)."""
    paths = sorted((BOTTLE / "train").rglob("*.png")) + sorted((BOTTLE / "test").rglob("*.png"))
    rows = []
    for path in paths[:n_images]:
        split, defect = path.relative_to(BOTTLE).parts[:2]
        rows.append(
            {
                "category": "bottle",
                "image_id": f"{split}/{defect}/{path.stem}",
                "split": split,
                "defect_type": defect,
                "is_anomaly": defect != "good",
                "path": str(path),
                "sha256": sha256_file(path),
            }
        )
    index = root / "index.parquet"
    pq.write_table(pa.Table.from_pylist(rows), index)
    return index


def bare_forward(backbone: str, init: str, paths: list[str], batch_size: int) -> float:
    """Images/s of the model alone on pre-decoded, pre-resized tensors."""
    model = build_extractor(backbone, init, list(BACKBONES[backbone].layers))
    transform = preprocessing(backbone)
    tensors = torch.stack([transform(Image.open(p)) for p in paths])
    with torch.inference_mode():
        model(tensors[:1])  # warm-up
        started = time.perf_counter()
        for i in range(0, len(tensors), batch_size):
            model(tensors[i : i + batch_size])
    return len(tensors) / (time.perf_counter() - started)


def float16_bytes(folders: list[Path], root: Path) -> int:
    """Bytes the same feature sets take when stored as float16 (re-encoded, no forward)."""
    total = 0
    for k, folder in enumerate(folders):
        target = root / f"f16-{k}.parquet"
        for table in iter_shard_tables(folder):
            column = table.column("feature").combine_chunks()
            dim = column.type.list_size
            writer = ShardWriter(target, dim, "float16", "benchmark")
            values = column.flatten().to_numpy().reshape(-1, dim)
            meta = {c: table.column(c).to_pylist() for c in table.column_names if c != "feature"}
            writer.add(meta, values)
            writer.close()
            total += target.stat().st_size
    return total


def augmentation_counts() -> dict[str, int]:
    """Transforms per MVTec category from params.yaml (5 everywhere when unreadable)."""
    try:
        transforms = yaml.safe_load((REPO / "params.yaml").read_text())["augment"]["transforms"]
        return {c: len(transforms.get(c, [])) for c in MVTEC_COUNTS}
    except (OSError, KeyError, TypeError):
        return dict.fromkeys(MVTEC_COUNTS, 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="bottle images to use (max 292)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    args = parser.parse_args()
    if not BOTTLE.is_dir():
        print(f"skipped: {BOTTLE} not found (MVTec AD bottle images are needed)")
        return
    print(
        f"bottle: first {args.images} of 292 images (a subset keeps the run under 5 minutes on "
        f"{torch.get_num_threads()} CPU threads), batch {args.batch_size}, "
        f"{args.num_workers} workers, flatten of all 4 layers, float32"
    )
    per_image: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        index = bottle_index(root, args.images)
        paths = pq.read_table(index, columns=["path"]).column("path").to_pylist()
        print(f"{'backbone':<20}{'stage img/s':>12}{'forward img/s':>15}{'ratio':>7}"
              f"{'MB/img f32':>12}{'MB/img f16':>12}")  # fmt: skip
        for backbone in args.backbones:
            init = "imagenet" if backbone == "efficientnet_lite0" else "random"
            unit = WorkUnit(
                category="bottle",
                backbone=backbone,
                init=init,
                layers=tuple(BACKBONES[backbone].layers),
                representations=("flatten",),
                index=str(index),
                augment_index=str(root / "none.parquet"),
                out=str(root / "features"),
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                shard_rows=64,
            )
            started = time.perf_counter()
            summary = extract_unit(unit)
            stage = len(paths) / (time.perf_counter() - started)
            forward = bare_forward(backbone, init, paths, args.batch_size)
            folders = [Path(entry["folder"]) for entry in summary["feature_sets"]]
            f32 = sum(read_manifest(f)["bytes"] for f in folders) / len(paths)
            f16 = float16_bytes(folders, root) / len(paths)
            per_image[backbone] = (f32, f16)
            print(f"{backbone:<20}{stage:>12.1f}{forward:>15.1f}{stage / forward:>7.2f}"
                  f"{f32 / 1e6:>12.2f}{f16 / 1e6:>12.2f}")  # fmt: skip

    augment = augmentation_counts()
    images = sum(train * (1 + augment[c]) + test for c, (train, test) in MVTEC_COUNTS.items())
    missing = [b for b in STUDY_BACKBONES if b not in per_image]
    if missing:
        print(f"no projection: backbones {', '.join(missing)} were not measured")
        return
    f32 = sum(per_image[b][0] for b in STUDY_BACKBONES) * 2  # random + imagenet
    f16 = sum(per_image[b][1] for b in STUDY_BACKBONES) * 2
    print(
        f"study grid (15 categories, {images} images incl. augmentation per params.yaml, "
        f"4 backbones x 2 inits x 4 layers, flatten): {images * f32 / 1e9:.0f} GB float32, "
        f"{images * f16 / 1e9:.0f} GB float16 (imagenet sizes assumed equal to random init)"
    )
    print(f"(uncompressed float32 would be {images * _raw_floats() * 4 * 2 / 1e9:.0f} GB)")


def _raw_floats() -> int:
    """Floats per image over the study's 4 backbones x 4 layers (flatten)."""
    dims = {"resnet18": 376_320, "resnet50": 1_505_280, "vit_b_16": 605_184, "vit_b_32": 153_600}
    return int(np.sum(list(dims.values())))


if __name__ == "__main__":
    main()
