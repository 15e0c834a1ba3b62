"""Throughput of the extract stage vs. the bare forward pass, and disk use of the study grid.

``python benchmarks/extract_throughput.py [--images 32] [--repeat 1]`` on MVTec AD's bottle
images (../shared/data/mvtec_ad/bottle; skipped when absent). For each backbone it runs the
whole stage work unit (``extract_unit``: model build, decode on its threads, forward,
flatten all 4 layers, Parquet shards written and fsynced, manifests) and the bare model
forward on tensors decoded and preprocessed beforehand (same model, batch size and batches;
warmed up with one full batch) in two ways: one forward pass at a time using every core
(``fwd 1xN``, torch's usual way) and as the stage runs it (``--streams`` passes at once,
``--threads`` each). It prints images/s of all and the stage's ratios to the faster bare
forward (target: >= 0.8x). The stage runs twice: cold (no decoded image cached: the first
backbone of a category decodes every PNG) and warm (``extract.decoded_cache`` filled: the
other backbones); ``study`` weighs them as the study's 8 units per category do (2 cold,
6 warm). With ``--repeat N`` the runs alternate N times and the medians are printed. CPU time that other processes used meanwhile is reported, since it slows both.
It then prints bytes on disk per image (flatten, all 4 layers, float32 and float16) and
projects the disk use of the study's full grid. Torchvision backbones run with random init
(no ImageNet weights offline), efficientnet_lite0 with its bundled ImageNet weights.

``--precision`` measures ``extract.precision`` instead: for each backbone and device (cpu;
cuda when PyTorch sees one) images/s of the stage's own forward pass (``forward_batch``:
model on the device, pinned batches, autocast, flatten of all 4 layers back on the CPU, as
``--streams`` x ``--threads``) in float32 and bfloat16, contiguous and channels_last (conv
backbones), and of the whole stage unit (``extract_unit``, decoded cache warm) in each
precision as configured (``backbones.CHANNELS_LAST``), with the bf16/fp32 ratios; then
the |AUROC difference| of bf16 vs fp32 features over the study's 71 detector configs
(params/study.yaml) on all 292 bottle images, both extracted by ``extract_unit`` (resnet18
random, layers 1-4 flatten; ``--auroc-backbone``) and scored by the evaluate stage's shared
path (``run_shared`` of benchmarks/ood_speedup.py). ``--json PATH`` writes the stage rates
as ``{"machine": ..., "rates": {backbone: {"cpu/float32": images_per_second, ...}}}`` (read
by ``benchmarks/ood_speedup.py --extract-rates``). On a GPU machine (the CPU side and the
AUROC comparison, which needs CPU bf16, measured on the development machine):

    .venv/bin/python benchmarks/extract_throughput.py --precision --devices cuda:0 \
        --backbones resnet18 resnet50 vit_b_16 vit_b_32 --images 64 --batch-size 32 \
        --repeat 3 --auroc-backbone none --json $OUT/rates_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.backbones import (  # noqa: E402
    BACKBONES,
    CONVOLUTIONAL,
    build_extractor,
    preprocessing,
    uses_channels_last,
)
from stages.device import bf16_supported  # noqa: E402
from stages.extract import (  # noqa: E402
    DECODED_DIR,
    WorkUnit,
    extract_unit,
    forward_batch,
    load_model,
)
from stages.features import (  # noqa: E402
    ShardWriter,
    iter_shard_tables,
    load_feature_set,
    read_manifest,
)
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


def decoded(backbone: str, paths: list[str]) -> torch.Tensor:
    """The images as the stage's decoding threads hand them to the model."""
    transform = preprocessing(backbone)
    return torch.stack([transform(Image.open(p)) for p in paths])


def bare_forward(
    backbone: str, init: str, tensors: torch.Tensor, batch_size: int, threads: int, streams: int
) -> float:
    """Images/s of the model alone on pre-decoded, pre-resized tensors: ``streams`` batches
    at once, each forwarded on its own thread with ``threads`` intra-op threads."""
    torch.set_num_threads(threads)
    model = build_extractor(backbone, init, list(BACKBONES[backbone].layers))

    def forward(batch: torch.Tensor) -> None:
        with torch.inference_mode():
            model(batch)

    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(forward, [tensors[:batch_size]] * streams))  # warm-up, timed shape
        started = time.perf_counter()
        batches = [tensors[i : i + batch_size] for i in range(0, len(tensors), batch_size)]
        list(pool.map(forward, batches))
    return len(tensors) / (time.perf_counter() - started)


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes of this machine used so far (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as fh:
            ticks = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # not idle/iowait


def own_cpu_seconds() -> float:
    """CPU seconds of this process (the decoding threads included) and its finished children."""
    own, children = os.times()[:2], os.times()[2:4]
    return sum(own) + sum(children)


def timed(function, *args) -> tuple[Any, float, float | None]:
    """``function(*args)``, its wall seconds, and the CPU seconds that other processes used
    meanwhile (None where unknown)."""
    busy, own = busy_cpu_seconds(), own_cpu_seconds()
    started = time.perf_counter()
    result = function(*args)
    wall = time.perf_counter() - started
    after = busy_cpu_seconds()
    if busy is None or after is None:
        return result, wall, None
    return result, wall, max(0.0, (after - busy) - (own_cpu_seconds() - own))


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
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--streams", type=int, default=2, help="forward passes at once")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; medians printed")
    networks = [b for b in BACKBONES if b != "pixels"]  # pixels: no forward pass to compare
    parser.add_argument("--backbones", nargs="+", default=networks)
    parser.add_argument("--precision", action="store_true",
                        help="float32 vs bfloat16 (and channels_last) per backbone and device")  # fmt: skip
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda:0"], choices=["cpu", "cuda:0"],
                        help="--precision: where to measure (cuda only when PyTorch sees it)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="--precision: write the stage rates here")
    parser.add_argument("--auroc-backbone", default="resnet18",
                        help="--precision: backbone of the AUROC comparison (none: skip it)")  # fmt: skip
    args = parser.parse_args()
    if not BOTTLE.is_dir():
        print(f"skipped: {BOTTLE} not found (MVTec AD bottle images are needed)")
        return
    if args.precision:
        precision_main(args)
        return
    print(
        f"bottle: first {args.images} of 292 images (a subset keeps the run under 5 minutes), "
        f"{os.cpu_count()} CPU cores, {args.streams} forward streams x {args.threads} torch "
        f"threads, batch {args.batch_size}, "
        f"{args.num_workers} workers, flatten of all 4 layers, float32"
        + (f", medians of {args.repeat} runs" if args.repeat > 1 else "")
    )
    foreign: list[float] = []
    per_image: dict[str, tuple[float, float]] = {}
    speeds: dict[str, tuple[float, float, float]] = {}  # cold, warm, faster bare forward
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        index = bottle_index(root, args.images)
        paths = pq.read_table(index, columns=["path"]).column("path").to_pylist()
        cores = args.streams * args.threads
        one, many = f"fwd 1x{cores}", f"fwd {args.streams}x{args.threads}"
        print(f"{'backbone':<20}{'cold img/s':>11}{'warm img/s':>11}{one:>10}{many:>10}"
              f"{'cold':>6}{'warm':>6}{'study':>7}{'MB/img f32':>12}{'MB/img f16':>12}")  # fmt: skip
        for backbone in args.backbones:
            init = "imagenet" if backbone == "efficientnet_lite0" else BACKBONES[backbone].inits[0]
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
                torch_threads=args.threads,
                forward_streams=args.streams,
            )
            tensors = decoded(backbone, paths)
            colds, warms = [], []
            forwards: dict[tuple[int, int], list[float]] = {
                (cores, 1): [],
                (args.threads, args.streams): [],
            }
            for _ in range(args.repeat):  # alternate, so a load that comes and goes hits both
                # Every run computes every shard: none is left from the previous one. Cold:
                # no decoded image cached (the first backbone of a category); warm: all are.
                for rates, drop_decoded in ((colds, True), (warms, False)):
                    shutil.rmtree(Path(unit.out, "bottle"), ignore_errors=True)
                    if drop_decoded:
                        shutil.rmtree(Path(unit.out, DECODED_DIR), ignore_errors=True)
                    summary, wall, other = timed(extract_unit, unit)
                    rates.append(len(paths) / wall)
                    foreign += [other] if other is not None else []
                for (threads, streams), rates in forwards.items():
                    rate, _, other = timed(
                        bare_forward, backbone, init, tensors, args.batch_size, threads, streams
                    )
                    rates.append(rate)
                    foreign += [other] if other is not None else []
            del tensors
            cold, warm = statistics.median(colds), statistics.median(warms)
            fwd_one, fwd_many = (statistics.median(rates) for rates in forwards.values())
            forward = max(fwd_one, fwd_many)  # ratios against the faster bare forward
            # The study's 8 units per category decode twice (resize 256 for resnet18 and the
            # ViTs, 232 for resnet50) and read the cache 6 times.
            study = 1.0 / (0.25 * forward / cold + 0.75 * forward / warm)
            folders = [Path(entry["folder"]) for entry in summary["feature_sets"]]
            f32 = sum(read_manifest(f)["bytes"] for f in folders) / len(paths)
            f16 = float16_bytes(folders, root) / len(paths)
            per_image[backbone] = (f32, f16)
            speeds[backbone] = (cold, warm, forward)
            print(f"{backbone:<20}{cold:>11.1f}{warm:>11.1f}{fwd_one:>10.1f}{fwd_many:>10.1f}"
                  f"{cold / forward:>6.2f}{warm / forward:>6.2f}{study:>7.2f}"
                  f"{f32 / 1e6:>12.2f}{f16 / 1e6:>12.2f}")  # fmt: skip
            if args.repeat > 1:
                print(f"  runs: cold {', '.join(f'{x:.1f}' for x in colds)}; "
                      f"warm {', '.join(f'{x:.1f}' for x in warms)}; "
                      f"{one} {', '.join(f'{x:.1f}' for x in forwards[cores, 1])}; "
                      f"{many} {', '.join(f'{x:.1f}' for x in forwards[args.threads, args.streams])}")  # fmt: skip
    if foreign:
        print(
            f"other processes used {sum(foreign):.1f} CPU s during these measurements "
            f"(at most {max(foreign):.1f} s in one run; 0 on an idle machine)"
        )

    augment = augmentation_counts()
    images = sum(train * (1 + augment[c]) + test for c, (train, test) in MVTEC_COUNTS.items())
    missing = [b for b in STUDY_BACKBONES if b not in per_image]
    if missing:
        print(f"no projection: backbones {', '.join(missing)} were not measured")
        return
    # Per category the study runs each backbone twice (random, imagenet: same speed). The
    # first resnet18 unit decodes for resize 256 (resnet18, ViTs), the first resnet50 unit
    # for 232; the other 6 units read the decoded cache.
    cold_units = {"resnet18": 1, "resnet50": 1}
    stage = sum(
        cold_units.get(b, 0) / speeds[b][0] + (2 - cold_units.get(b, 0)) / speeds[b][1]
        for b in STUDY_BACKBONES
    )
    bare = sum(2 / speeds[b][2] for b in STUDY_BACKBONES)
    print(
        f"study grid extraction ({images} images x 8 units) on this machine: stage "
        f"{images * stage / 3600:.1f} h, bare forward {images * bare / 3600:.1f} h: "
        f"{bare / stage:.2f}x"
    )
    f32 = sum(per_image[b][0] for b in STUDY_BACKBONES) * 2  # random + imagenet
    f16 = sum(per_image[b][1] for b in STUDY_BACKBONES) * 2
    print(
        f"study grid (15 categories, {images} images incl. augmentation per params.yaml, "
        f"4 backbones x 2 inits x 4 layers, flatten): {images * f32 / 1e9:.0f} GB float32, "
        f"{images * f16 / 1e9:.0f} GB float16 (imagenet sizes assumed equal to random init)"
    )
    print(f"(uncompressed float32 would be {images * _raw_floats() * 4 * 2 / 1e9:.0f} GB)")


# --- --precision: float32 vs bfloat16 ------------------------------------------------------


def machine() -> str:
    """This machine in words: CPU model, cores, bf16 instructions, memory, GPU."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
        memory = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        memory = float("nan")
    isa = [name for flag, name in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"),
                                   ("amx_bf16", "AMX-BF16")) if flag in flags]  # fmt: skip
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{model}, {os.cpu_count()} cores ({', '.join(isa) or 'no AVX-512'}), "
            f"{memory:.0f} GiB, {gpu}")  # fmt: skip


def forward_rate(
    unit: WorkUnit, tensors: torch.Tensor, device: torch.device, precision: str, cl: bool,
    batch_size: int, streams: int,
) -> float:  # fmt: skip
    """Images/s of the stage's forward pass (``forward_batch``, every layer flattened, back
    on the CPU) over ``tensors`` in pinned batches, ``streams`` batches at once; warmed up."""
    model = load_model(unit, device, cl)
    wanted = [(layer, "flatten") for layer in unit.layers]
    pin = device.type == "cuda"
    batches = [tensors[i : i + batch_size] for i in range(0, len(tensors), batch_size)]
    batches = [b.pin_memory() if pin else b for b in batches]

    def forward(batch: torch.Tensor) -> None:
        forward_batch(model, batch, wanted, device, precision, cl)

    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(forward, batches[:1] * streams))  # warm-up: oneDNN/cuDNN set-up
        started = time.perf_counter()
        list(pool.map(forward, batches))
    return len(tensors) / (time.perf_counter() - started)


def precision_main(args: argparse.Namespace) -> None:
    """Images/s float32 vs bfloat16 per backbone and device; AUROC difference; --json."""
    devices = [torch.device(d) for d in args.devices
               if d == "cpu" or torch.cuda.is_available()]  # fmt: skip
    print(f"machine: {machine()}")
    print(f"bottle: first {args.images} images, batch {args.batch_size}, flatten of all 4 "
          f"layers; CPU: {args.streams} forward streams x {args.threads} torch threads; "
          f"medians of {args.repeat} runs (alternating); cl = channels_last")  # fmt: skip
    rates: dict[str, dict[str, float]] = {}
    foreign: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        index = bottle_index(root, args.images)
        paths = pq.read_table(index, columns=["path"]).column("path").to_pylist()
        print(f"{'backbone':<20}{'device':<8}{'fwd f32':>9}{'f32 cl':>8}{'bf16':>8}{'bf16 cl':>9}"
              f"{'stage f32':>11}{'stage bf16':>12}{'fwd bf16/f32':>14}{'stage bf16/f32':>16}")  # fmt: skip
        for backbone in args.backbones:
            init = "imagenet" if backbone == "efficientnet_lite0" else BACKBONES[backbone].inits[0]
            tensors = decoded(backbone, paths)
            for device in devices:
                torch.set_num_threads(args.threads)
                precisions = ["float32"] + (["bfloat16"] if bf16_supported(device) else [])
                variants = [(p, cl) for p in precisions
                            for cl in ((False, True) if backbone in CONVOLUTIONAL else (False,))]  # fmt: skip
                base = WorkUnit(
                    category="bottle", backbone=backbone, init=init,
                    layers=tuple(BACKBONES[backbone].layers), representations=("flatten",),
                    index=str(index), augment_index=str(root / "none.parquet"),
                    out=str(root / "features"), batch_size=args.batch_size,
                    num_workers=args.num_workers, shard_rows=64, torch_threads=args.threads,
                    forward_streams=args.streams if device.type == "cpu" else 1,
                    device=str(device),
                )  # fmt: skip
                fwd: dict[tuple[str, bool], list[float]] = {v: [] for v in variants}
                stage: dict[str, list[float]] = {p: [] for p in precisions}
                extract_unit(base)  # fills the decoded cache: every stage run below is warm
                for _ in range(args.repeat):  # alternate, so a load that comes and goes hits all
                    for precision, cl in variants:
                        streams = base.forward_streams
                        rate, _, other = timed(forward_rate, base, tensors, device, precision,
                                               cl, args.batch_size, streams)  # fmt: skip
                        fwd[precision, cl].append(rate)
                        foreign += [other] if other is not None else []
                    for precision in precisions:
                        unit = replace(base, precision=precision)
                        shutil.rmtree(Path(unit.out, "bottle"), ignore_errors=True)
                        _, wall, other = timed(extract_unit, unit)
                        stage[precision].append(len(paths) / wall)
                        foreign += [other] if other is not None else []
                med = {v: statistics.median(r) for v, r in fwd.items()}
                st = {p: statistics.median(r) for p, r in stage.items()}
                rates.setdefault(backbone, {}).update(
                    {f"{device.type}/{p}": round(r, 2) for p, r in st.items()})  # fmt: skip

                def cell(med: dict, v: tuple[str, bool], width: int) -> str:
                    return f"{med[v]:>{width}.1f}" if v in med else f"{'-':>{width}}"

                chosen = {p: (p, uses_channels_last(backbone, device.type, p)) for p in precisions}
                ratio = (f"{med[chosen['bfloat16']] / med[chosen['float32']]:>14.2f}"
                         f"{st['bfloat16'] / st['float32']:>16.2f}"
                         if "bfloat16" in st else f"{'no bf16':>14}{'':>16}")  # fmt: skip
                print(f"{backbone:<20}{device.type:<8}{cell(med, ('float32', False), 9)}"
                      f"{cell(med, ('float32', True), 8)}{cell(med, ('bfloat16', False), 8)}"
                      f"{cell(med, ('bfloat16', True), 9)}{st['float32']:>11.1f}"
                      f"{st.get('bfloat16', float('nan')):>12.1f}{ratio}", flush=True)  # fmt: skip
            del tensors
    print("fwd: the stage's forward pass alone on decoded tensors; stage: extract_unit with the "
          "decoded cache warm (decode cache read, forward, shards written); the ratios compare "
          "each precision as the stage runs it (backbones.CHANNELS_LAST)")  # fmt: skip
    if foreign:
        print(f"other processes used {sum(foreign):.1f} CPU s during these measurements "
              f"(at most {max(foreign):.1f} s in one run; 0 on an idle machine)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rates": rates}, indent=1) + "\n")
        print(f"rates written to {args.json}")
    if args.auroc_backbone != "none" and bf16_supported(torch.device("cpu")):
        auroc_difference(args.auroc_backbone, args.num_workers, args.streams, args.threads)


VARIANTS = ("bfloat16", "float16 storage", "seed 1")  # compared with float32, seed 0


def auroc_difference(backbone: str, num_workers: int, streams: int, threads: int) -> None:
    """|AUROC(bf16 features) - AUROC(fp32 features)| over the study's 71 configs on all
    292 bottle images (CPU), each layer of ``backbone`` flattened, not augmented; next to
    it the same for the fp32 features stored as float16 (``extract.dtype: float16``, a
    rounding of known size, 2^-11 relative), which shows how far each family's AUROC moves
    for any perturbation of that order (IsolationForest's random split thresholds), and
    the fp32 features scored with seed 1 instead of 0: how far a seeded family's AUROC moves
    without any change to the features (its own noise floor)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from ood_speedup import auroc, grid_of, run_shared  # the evaluate stage's shared path

    configs = grid_of("params/study.yaml")
    layers = tuple(BACKBONES[backbone].layers)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        index = bottle_index(root, 292)
        features: dict[str, dict[str, Any]] = {}
        for precision in ("float32", "bfloat16"):
            unit = WorkUnit(
                category="bottle", backbone=backbone, init=BACKBONES[backbone].inits[0],
                layers=layers, representations=("flatten",), index=str(index),
                augment_index=str(root / "none.parquet"), out=str(root / "features"),
                num_workers=num_workers, forward_streams=streams, torch_threads=threads,
                precision=precision,
            )  # fmt: skip
            started = time.perf_counter()
            summary = extract_unit(unit)
            print(f"{backbone} {precision}: 292 bottle images extracted in "
                  f"{time.perf_counter() - started:.1f} s")  # fmt: skip
            features[precision] = {e["layer"]: e["folder"] for e in summary["feature_sets"]}
        # (variant, family) -> |AUROC difference| per (layer, config); NaN AUROCs (failed
        # configs) are left out and counted
        diffs: dict[tuple[str, str], list[float]] = {}
        within: list[bool] = []  # bf16 within max(0.01, the config's seed 0 vs 1 change)
        failed = 0
        for layer in layers:
            fs = load_feature_set(features["float32"][layer])
            bf16 = load_feature_set(features["bfloat16"][layer])
            assert list(bf16.image_id) == list(fs.image_id)
            test = np.flatnonzero(fs.split == "test")
            train = np.flatnonzero(fs.split == "train")
            y = fs.is_anomaly[test]
            variants = {"float32": (fs.X, 0), "bfloat16": (bf16.X, 0),
                        "float16 storage": (fs.X.astype(np.float16).astype(np.float32), 0),
                        "seed 1": (fs.X, 1)}  # fmt: skip
            scores = {
                name: run_shared(np.ascontiguousarray(X), test, {False: train, True: train},
                                 configs, seed).scores
                for name, (X, seed) in variants.items()
            }  # fmt: skip
            for config in configs:
                a = auroc(y, scores["float32"][False, config])
                pair = {name: auroc(y, scores[name][False, config]) for name in VARIANTS}
                if np.isnan(a) or np.isnan(list(pair.values())).any():
                    failed += 1
                    continue
                for name, b in pair.items():
                    diffs.setdefault((name, config.family), []).append(abs(a - b))
                floor = max(0.01, abs(a - pair["seed 1"]))
                within.append(abs(a - pair["bfloat16"]) <= floor)
            print(f"  {layer}: scored ({len(configs)} configs x 4 variants)", flush=True)
        families = list(dict.fromkeys(c.family for c in configs))
        print(f"AUROC |difference| to fp32 features, {backbone} random, layers "
              f"{', '.join(layers)} flatten, study's {len(configs)} configs (median / max):")  # fmt: skip
        print(f"{'family':<22}{'pairs':>6}{'bf16 median':>13}{'bf16 max':>10}"
              f"{'f16 median':>12}{'f16 max':>9}{'seed median':>13}{'seed max':>10}")  # fmt: skip
        for family in [*families, "all"]:
            row = []
            for name in VARIANTS:
                values = [d for (n, f), ds in diffs.items() for d in ds
                          if n == name and family in (f, "all")]  # fmt: skip
                row.append(values)
            print(f"{family:<22}{len(row[0]):>6}{np.median(row[0]):>13.4f}{max(row[0]):>10.4f}"
                  f"{np.median(row[1]):>12.4f}{max(row[1]):>9.4f}"
                  f"{np.median(row[2]):>13.4f}{max(row[2]):>10.4f}")  # fmt: skip
        if failed:
            print(f"({failed} (config, layer) pairs left out: a config failed)")
        print(f"target: bf16 max <= 0.01; bf16 within max(0.01, the config's own seed 0 vs 1 "
              f"difference): {sum(within)} of {len(within)} pairs")  # fmt: skip


def _raw_floats() -> int:
    """Floats per image over the study's 4 backbones x 4 layers (flatten)."""
    dims = {"resnet18": 376_320, "resnet50": 1_505_280, "vit_b_16": 605_184, "vit_b_32": 153_600}
    return int(np.sum(list(dims.values())))


if __name__ == "__main__":
    main()
