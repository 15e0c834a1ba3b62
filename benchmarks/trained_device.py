"""One training epoch of each family that trains a network, per device (issue 20).

The families' own code as the evaluate stage runs it (``reference_one`` / ``fit_labelled``
under ``run_setting(Setting(device=...))``, so ``evaluate.device``'s path: model and
batches on the device, results back on the CPU), without checkpoints: ConvAutoencoder,
EncoderAutoencoder (efficientnet_lite0 ImageNet ``stage6``, frozen), SupervisedCNN and
SimCLRProbe (efficientnet_lite0 ImageNet, offline), each at ``--image-size`` px with its
default recipe otherwise. Each trains ``--epochs`` epochs; the first is a warm-up (kernel
selection, allocator, lazy imports) and the reported time is the median of the others
(the learning curve's per-epoch seconds, validation loss included), with training images
per second, and the whole call's wall and CPU seconds (this process's: with other
processes on the cores, CPU s / wall s below the thread count shows the contention).
EfficientAd is not timed here: it trains in steps through Lightning with a
distilled teacher (``benchmarks/patchcore_vs_anomalib.py`` and the anomalib tests).

Images: the real category when ``--root`` exists (its ``train/good`` images: the
reconstruction families' training set and the labelled families' good images; its test
images with their labels: the labelled pool, of which ``--eval-images`` are scored), else
seeded random images of the same counts as MVTec AD's bottle (209 train, 83 test).

Run: ``python -m benchmarks.trained_device`` (CPU, and CUDA when PyTorch sees it); on a GPU
machine ``python -m benchmarks.trained_device --devices cuda cpu`` finishes well under 10
minutes. ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stages.methods import FAMILIES, DetectorConfig
from stages.methods.base import Outcome, Setting, run_setting

ROOT = Path("/work/shared/data/mvtec_ad/bottle")
BACKBONE = {"backbone": "efficientnet_lite0", "init": "imagenet"}
FAMILY_NAMES = ("ConvAutoencoder", "EncoderAutoencoder", "SupervisedCNN", "SimCLRProbe")


def load(folder: Path, size: int) -> np.ndarray:
    """The folder's PNGs (sorted) as float32 (n, 3, size, size) in [0, 1] (bilinear)."""
    images = []
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        images.append(np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0)
    return np.stack(images)


def images(root: Path, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Good training images, test images and their labels (True: anomalous), and where
    they come from."""
    if (root / "train" / "good").is_dir():
        train = load(root / "train" / "good", size)
        tests = [(load(d, size), d.name != "good") for d in sorted((root / "test").iterdir())
                 if d.is_dir()]  # fmt: skip
        test = np.concatenate([x for x, _ in tests])
        y = np.concatenate([np.full(len(x), bad) for x, bad in tests])
        return train, test, y, f"{root} ({len(train)} train, {len(test)} test images)"
    rng = np.random.default_rng(0)
    y = np.arange(83) % 4 != 0
    return (rng.random((209, 3, size, size), dtype=np.float32),
            rng.random((83, 3, size, size), dtype=np.float32), y,
            "random images (209 train, 83 test: the bottle's counts)")  # fmt: skip


def run(family: str, device: str, size: int, epochs: int, train: np.ndarray,
        test: np.ndarray, y: np.ndarray, n_eval: int) -> Outcome:  # fmt: skip
    """One experiment of ``family`` on ``device`` (no checkpoints)."""
    labelled = family in ("SupervisedCNN", "SimCLRProbe")
    fixed: dict[str, object] = {"image_size": size, "epochs": epochs}
    if family != "ConvAutoencoder":
        fixed.update(BACKBONE)
    if family == "SupervisedCNN":
        fixed["patience"] = 0  # every epoch runs
    cfg = DetectorConfig(family, tuple(sorted(fixed.items())))
    FAMILIES[family].validate(cfg)
    with run_setting(Setting(device=device)):
        if labelled:
            pick = np.random.default_rng(0).permutation(len(test))
            evaluate, pool = pick[:n_eval], pick[n_eval:]
            return FAMILIES[family].fit_labelled(train, test[pool], y[pool], test[evaluate],
                                                 cfg, 0)  # fmt: skip
        return FAMILIES[family].reference_one(train, test[:n_eval], cfg, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT)
    default = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    parser.add_argument("--devices", nargs="+", default=default)
    parser.add_argument("--families", nargs="+", default=list(FAMILY_NAMES),
                        choices=FAMILY_NAMES)  # fmt: skip
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="the first is a warm-up")
    parser.add_argument("--eval-images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs: at least 2 (the first is a warm-up)")
    if args.threads:
        torch.set_num_threads(args.threads)
    train, test, y, origin = images(args.root, args.image_size)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"torch threads, GPU: {gpu}; torch {torch.__version__}")  # fmt: skip
    print(f"images: {origin}, {args.image_size} px; {args.epochs} epochs, the first a warm-up")
    print(f"load average before: {os.getloadavg()[0]:.1f} (other processes share the cores)")
    print(f"{'family':20s} {'device':7s} {'epoch s (median)':>17s} {'train img/s':>12s} "
          f"{'warm-up s':>10s} {'call s':>8s} {'call CPU s':>11s}")  # fmt: skip
    rows = []
    for device in args.devices:
        for family in args.families:
            t0, c0 = time.perf_counter(), time.process_time()
            out = run(family, device, args.image_size, args.epochs, train, test, y,
                      args.eval_images)  # fmt: skip
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if out.error is not None:
                raise SystemExit(f"{family} on {device}: {out.error}")
            seconds = [e["seconds"] for e in out.curve]
            epoch = statistics.median(seconds[1:])
            n = len(train) + (len(test) - args.eval_images if family == "SupervisedCNN" else 0)
            rows.append({"family": family, "device": device, "epoch_s": epoch,
                         "images_per_s": n / epoch, "warmup_s": seconds[0], "call_s": wall, "call_cpu_s": cpu,
                         "epochs": len(seconds), "train_images": n,
                         "image_size": args.image_size})  # fmt: skip
            print(f"{family:20s} {device:7s} {epoch:17.2f} {n / epoch:12.1f} {seconds[0]:10.2f} "
                  f"{wall:8.1f} {cpu:11.1f}", flush=True)  # fmt: skip
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
