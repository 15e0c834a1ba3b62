"""Benchmark: plain per-config scikit-learn against the shared evaluator (stages/shared.py).

"Ours" is the evaluate stage's own shared path: the unit's Gram (``gram_blockwise``) and,
per (augmented, family) group, ``stages.evaluate.shared_outcomes``, which also scores the
training rows in-sample (the honest threshold) and so does more work than the plain side.
"Plain" fits the stage's per-config estimators (``evaluate.shared: false``) on the test rows.

On the shared MVTec AD bottle category, ResNet18 with random init (``torch.manual_seed(0)``),
layers 1-4 flattened, augmented and not. Prints, per family and in total, wall and CPU
seconds, peak RSS, the speed ratio and the AUROC agreement, then projects the full study grid.
Features are cached as .npy under /tmp/ood_bench_cache (never inside the repo).

    .venv/bin/python benchmarks/ood_speedup.py --layers layer4
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.detectors import FAMILIES as DETECTOR_FAMILIES
from stages.detectors import STUDY_DETECTORS, DetectorConfig, expand_detectors
from stages.evaluate import shared_outcomes
from stages.shared import FAMILIES, gram_blockwise

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec_ad" / "bottle"
CACHE = Path("/tmp/ood_bench_cache")
LAYERS = ("layer1", "layer2", "layer3", "layer4")
AUGMENTATIONS = ("rot90", "rot180", "rot270", "fliplr", "flipud")


def _augment(image: np.ndarray) -> list[np.ndarray]:
    """The five lossless copies of one HxWxC train image, in ``AUGMENTATIONS`` order."""
    return [
        np.rot90(image, 1),
        np.rot90(image, 2),
        np.rot90(image, 3),
        np.fliplr(image),
        np.flipud(image),
    ]


def extract_features(data: Path = DATA, cache: Path = CACHE) -> dict[str, np.ndarray]:
    """Extract (or load cached) flattened ResNet18-random features of bottle, all 4 layers.

    Returns ``{"meta": ...}`` arrays plus one memory-mapped float32 matrix per layer; row
    order: 209 train originals, 5 x 209 augmented copies (grouped by transform), 83 test.
    """
    cache.mkdir(parents=True, exist_ok=True)
    done = cache / "done"
    if done.exists():
        out = {layer: np.load(cache / f"{layer}.npy", mmap_mode="r") for layer in LAYERS}
        out["role"] = np.load(cache / "role.npy")
        out["label"] = np.load(cache / "label.npy")
        return out

    import torch
    from PIL import Image
    from torchvision import models
    from torchvision.models.feature_extraction import create_feature_extractor
    from torchvision.transforms import v2
    from tqdm import tqdm

    train = sorted((data / "train" / "good").glob("*.png"))
    test = sorted((data / "test").glob("*/*.png"))
    originals = [("train", p, -1) for p in train]
    augmented = [("aug", p, k) for k in range(len(AUGMENTATIONS)) for p in train]
    tests = [("test", p, -1) for p in test]
    items = originals + augmented + tests
    role = np.array(["train"] * len(originals) + ["aug"] * len(augmented) + ["test"] * len(tests))
    label = np.array(
        [0] * (len(originals) + len(augmented)) + [int(p.parent.name != "good") for p in test]
    )

    torch.manual_seed(0)
    model = models.resnet18(weights=None).eval()
    extractor = create_feature_extractor(model, return_nodes={name: name for name in LAYERS})
    preprocess = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(256, antialias=True),
            v2.CenterCrop(224),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    dims = {
        "layer1": 64 * 56 * 56,
        "layer2": 128 * 28 * 28,
        "layer3": 256 * 14 * 14,
        "layer4": 512 * 7 * 7,
    }
    outs = {
        layer: np.lib.format.open_memmap(
            cache / f"{layer}.npy", mode="w+", dtype=np.float32, shape=(len(items), dims[layer])
        )
        for layer in LAYERS
    }
    cached_image: dict[Path, np.ndarray] = {}
    batch = 16
    with torch.inference_mode():
        for start in tqdm(
            range(0, len(items), batch), desc="extract resnet18-random", unit="batch"
        ):
            tensors = []
            for _, path, k in items[start : start + batch]:
                if path not in cached_image:
                    cached_image[path] = np.asarray(Image.open(path).convert("RGB"))
                image = cached_image[path]
                if k >= 0:
                    image = _augment(image)[k]
                image = np.array(image)  # writable copy for torch
                tensors.append(preprocess(image))
            feats = extractor(torch.stack(tensors))
            for layer in LAYERS:
                outs[layer][start : start + len(tensors)] = feats[layer].flatten(1).numpy()
    for layer in LAYERS:
        outs[layer].flush()
    np.save(cache / "role.npy", role)
    np.save(cache / "label.npy", label)
    done.touch()
    return extract_features(data, cache)


class Meter:
    """Wall, CPU (self + joblib workers) and peak RSS (self + children) of one phase."""

    def __enter__(self) -> Meter:
        import threading

        import psutil

        self._proc = psutil.Process()
        self._stop = threading.Event()
        self.peak = 0
        self._cpu0 = self._cpu()

        def sample() -> None:
            while not self._stop.wait(0.05):
                self.peak = max(self.peak, self._rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self.peak = self._rss()
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def _procs(self) -> list:
        return [self._proc, *self._proc.children(recursive=True)]

    def _rss(self) -> int:
        total = 0
        for proc in self._procs():
            with contextlib.suppress(Exception):
                total += proc.memory_info().rss
        return total

    def _cpu(self) -> float:
        total = 0.0
        for proc in self._procs():
            with contextlib.suppress(Exception):
                t = proc.cpu_times()
                total += t.user + t.system
        return total

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t0
        self.cpu = self._cpu() - self._cpu0
        self._stop.set()
        self._thread.join()
        self.peak_mb = self.peak / 2**20


@dataclass
class Cost:
    wall: float = 0.0
    cpu: float = 0.0
    peak_mb: float = 0.0
    measured: int = 0
    total: int = 0
    extrapolated: bool = False

    def add(self, meter: Meter) -> None:
        self.wall += meter.wall
        self.cpu += meter.cpu
        self.peak_mb = max(self.peak_mb, meter.peak_mb)

    def merge(self, other: Cost) -> None:
        self.wall += other.wall
        self.cpu += other.cpu
        self.peak_mb = max(self.peak_mb, other.peak_mb)
        self.measured += other.measured
        self.total += other.total
        self.extrapolated |= other.extrapolated


def plain_sklearn(
    config: DetectorConfig, X_tr: np.ndarray, X_te: np.ndarray, seed: int
) -> np.ndarray:
    """The study's way: the stage's per-config scikit-learn estimator on the raw features."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = DETECTOR_FAMILIES[config.family].estimator(config.kwargs, seed).fit(X_tr)
        return -model.score_samples(X_te)


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if not np.isfinite(scores).all():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def config_weight(config: DetectorConfig) -> float:
    """Relative cost of a config inside its family, for extrapolating unmeasured configs."""
    if config.family == "IsolationForest":
        return float(config.kwargs["n_estimators"])
    if config.family == "EllipticEnvelope":
        return float(config.kwargs["pca_components"]) ** 2
    return 1.0


def run_unit(
    X: np.ndarray,
    role: np.ndarray,
    label: np.ndarray,
    families: list[str],
    seed: int,
    max_seconds: float,
    n_jobs: int,
    progress,
) -> tuple[dict, dict, dict, dict]:
    """One layer, both augmentation choices: plain loop and shared evaluator."""
    test = np.flatnonzero(role == "test")
    trains = {False: np.flatnonzero(role == "train"), True: np.flatnonzero(role != "test")}
    y = label[test]
    configs = [c for c in expand_detectors(STUDY_DETECTORS) if c.family in families]
    plain: dict[str, Cost] = {f: Cost() for f in families}
    ours: dict[str, Cost] = {f: Cost() for f in (*families, "Gram")}
    aucs: dict[tuple, tuple[float, float]] = {}
    X_all = np.ascontiguousarray(X)
    with Meter() as meter:
        gram = gram_blockwise(X_all)
        finite = np.isfinite(np.diagonal(gram.K))
    ours["Gram"].add(meter)
    for augmented, train in trains.items():
        X_tr, X_te = X_all[train], X_all[test]
        for family in families:
            fam = [c for c in configs if c.family == family]
            with Meter() as meter:
                outcomes = shared_outcomes(
                    gram, train, test, fam, seed, raw=X_all, finite=finite, n_jobs=n_jobs
                )
                mine = {c: o.scores if o.error is None else np.full(len(test), np.nan)
                        for c, o in zip(fam, outcomes, strict=True)}  # fmt: skip
            ours[family].add(meter)
            ours[family].measured += len(fam)
            ours[family].total += len(fam)
            cost, done_weight = Cost(), 0.0
            for config in fam:
                if cost.wall > max_seconds:
                    break
                with Meter() as meter:
                    theirs = plain_sklearn(config, X_tr, X_te, seed)
                cost.add(meter)
                cost.measured += 1
                done_weight += config_weight(config)
                aucs[(augmented, config)] = (auroc(y, mine[config]), auroc(y, theirs))
                progress.update(1)
            cost.total = len(fam)
            if cost.measured < cost.total:
                scale = sum(config_weight(c) for c in fam) / done_weight
                cost.wall *= scale
                cost.cpu *= scale
                cost.extrapolated = True
                progress.update(cost.total - cost.measured)
            plain[family].merge(cost)
    return plain, ours, aucs, {"n": {k: len(v) for k, v in trains.items()}, "dim": X.shape[1]}


def print_table(plain: dict[str, Cost], ours: dict[str, Cost], aucs: dict) -> None:
    gram = ours["Gram"]
    rows = [(f, [f]) for f in plain]
    groups = {
        "OCSVM+LOF+KDE (+Gram)": ["OneClassSVM", "LocalOutlierFactor", "KernelDensity"],
        "total (+Gram)": list(plain),
    }
    print(
        f"\n{'family':<24}{'configs':>9}{'plain s':>10}{'cpu s':>9}{'MiB':>7}"
        f"{'ours s':>9}{'cpu s':>8}{'MiB':>7}{'speedup':>9}{'floor s':>9}  AUROC |diff| (n, <=1e-6, max)"
    )
    floor = {"IsolationForest": "=ours", "EllipticEnvelope": "=ours"}  # one forest; the MCD fits
    for name, fams in [*rows, *groups.items()]:
        fams = [f for f in fams if f in plain]
        if not fams:
            continue
        p, o = Cost(), Cost()
        for f in fams:
            p.merge(plain[f])
            o.merge(ours[f])
        if name in groups:
            o.merge(gram)
        diffs = [
            abs(a - b)
            for (aug, c), (a, b) in aucs.items()
            if c.family in fams and c.family != "KernelDensity"
        ]
        diffs = [d for d in diffs if np.isfinite(d)]
        agree = f"{len(diffs)}, {sum(d <= 1e-6 for d in diffs)}, {max(diffs):.2g}" if diffs else "-"
        mark = "*" if p.extrapolated else " "
        print(
            f"{name:<24}{f'{p.measured}/{p.total}':>9}{p.wall:>9.1f}{mark}{p.cpu:>9.1f}{p.peak_mb:>7.0f}"
            f"{o.wall:>9.2f}{o.cpu:>8.1f}{o.peak_mb:>7.0f}{p.wall / max(o.wall, 1e-9):>8.1f}x"
            f"{f'{gram.wall:.2f}' if name in groups else floor.get(name, ''):>9}  {agree}"
        )
    print(
        f"{'Gram (shared floor)':<24}{'':>9}{'':>10}{'':>9}{'':>7}{gram.wall:>9.2f}{gram.cpu:>8.1f}{gram.peak_mb:>7.0f}"
    )
    print(
        "* = extrapolated from the measured configs (cost weights: trees for IsolationForest,"
        " components^2 for EllipticEnvelope)"
    )
    kde = [(aug, c, a, b) for (aug, c), (a, b) in aucs.items() if c.family == "KernelDensity"]
    if kde:
        print("\nKernelDensity AUROC, ours (exact float64) vs scikit-learn's tree estimate:")
        for aug, c, a, b in kde:
            print(f"  aug={aug!s:<5} {c.name:<58} ours {a:.4f}  sklearn {b:.4f}")


# The study's grid: 15 MVTec categories x {resnet18, resnet50, vit_b_16, vit_b_32} x
# {random, imagenet} x 4 layers x flatten = 480 units x 71 configs x 2 augmentation choices.
MVTEC_COUNTS = {  # category: (train good, test)
    "bottle": (209, 83), "cable": (224, 150), "capsule": (219, 132), "carpet": (280, 117),
    "grid": (264, 78), "hazelnut": (391, 110), "leather": (245, 124), "metal_nut": (220, 115),
    "pill": (267, 167), "screw": (320, 160), "tile": (230, 117), "toothbrush": (60, 42),
    "transistor": (213, 100), "wood": (247, 79), "zipper": (240, 151),
}  # fmt: skip
BACKBONES = {  # name: (GFLOPs per 224x224 image, flattened dims of its 4 layers)
    "resnet18": (1.81, (200_704, 100_352, 50_176, 25_088)),
    "resnet50": (4.09, (802_816, 401_408, 200_704, 100_352)),
    "vit_b_16": (17.56, (151_296,) * 4),
    "vit_b_32": (4.41, (38_400,) * 4),
}
N_AUG = len(AUGMENTATIONS)


def forward_seconds_per_image() -> float:
    """ResNet18 forward time per image on this machine (batch 16, all 4 layers returned)."""
    import torch
    from torchvision import models
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    model = create_feature_extractor(models.resnet18(weights=None).eval(), list(LAYERS))
    x = torch.randn(16, 3, 224, 224)
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        model(x)
    return (time.perf_counter() - t0) / 16


def project(measured: dict[str, dict], t_image: float) -> None:
    """Project the full 68,160-experiment grid on this machine from per-unit costs."""
    # Gram seconds per (row^2 * dim), from the measured layers (both augmentation choices
    # share one Gram over all rows); the rest of a unit (all 71 configs x 2) per row.
    c_gram = np.mean([m["gram"] / (m["rows"] ** 2 * m["dim"]) for m in measured.values()])
    c_rest = np.mean([m["rest"] / m["rows"] for m in measured.values()])
    extract = evaluate = disk = 0.0
    units = 0
    for n_train, n_test in MVTEC_COUNTS.values():
        rows = (1 + N_AUG) * n_train + n_test
        for gflops, dims in BACKBONES.values():
            extract += 2 * rows * t_image * gflops / BACKBONES["resnet18"][0]
            for dim in dims:
                units += 2
                evaluate += 2 * (c_gram * rows**2 * dim + c_rest * rows)
                disk += 2 * rows * dim * 4
    experiments = units * 71 * 2
    days = (extract + evaluate) / 86400
    print(
        f"\nProjection of the full grid ({experiments:,} experiments, {units} units) on this "
        f"{os.cpu_count()}-core machine:"
    )
    print(
        f"  model: Gram {c_gram:.3g} s/(row^2 dim), other work {c_rest:.3g} s/row per unit "
        f"(measured above), extraction {t_image * 1e3:.0f} ms/image for resnet18 scaled by GFLOPs"
    )
    print(
        f"  extraction {extract / 3600:8.1f} h   evaluation {evaluate / 3600:8.1f} h   "
        f"total {days:.2f} days   features on disk {disk / 1e9:.0f} GB float32, "
        f"{disk / 2e9:.0f} GB with extract.dtype float16"
    )
    print("  the study: 12 days on 6 cores, 380 GB")


def main(argv: list[str] | None = None) -> None:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--max-seconds", type=float, default=300.0,
                        help="plain-loop budget per family, layer and augmentation choice; "
                        "the remaining configs are extrapolated")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--n-jobs",
        type=int,
        default=1,
        help="EllipticEnvelope processes (the stage uses 1 per worker)",
    )
    parser.add_argument("--extract-only", action="store_true")
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"skipped: MVTec bottle not found at {DATA}")
        return
    t0 = time.perf_counter()
    feats = extract_features()
    print(f"features ready in {time.perf_counter() - t0:.1f} s (cache {CACHE})")
    if args.extract_only:
        return
    role, label = feats["role"], feats["label"]
    n_configs = sum(c.family in args.families for c in expand_detectors(STUDY_DETECTORS))
    progress = tqdm(total=n_configs * 2 * len(args.layers), desc="plain sklearn configs")
    totals_plain = {f: Cost() for f in args.families}
    totals_ours = {f: Cost() for f in (*args.families, "Gram")}
    all_aucs: dict = {}
    measured: dict[str, dict] = {}
    for layer in args.layers:
        X = np.asarray(feats[layer])
        plain, ours, aucs, shape = run_unit(
            X, role, label, args.families, args.seed, args.max_seconds, args.n_jobs, progress
        )
        progress.clear()
        print(
            f"\n=== {layer}: dim {shape['dim']}, train {shape['n'][False]} originals / "
            f"{shape['n'][True]} with augmentation, test {int((role == 'test').sum())} ==="
        )
        print_table(plain, ours, aucs)
        for f in plain:
            totals_plain[f].merge(plain[f])
        for f in ours:
            totals_ours[f].merge(ours[f])
        all_aucs.update({(layer, *k): v for k, v in aucs.items()})
        if set(args.families) == set(FAMILIES):
            rest = sum(ours[f].wall for f in FAMILIES)
            measured[layer] = {
                "gram": ours["Gram"].wall,
                "rest": rest,
                "rows": len(X),
                "dim": X.shape[1],
            }
    progress.close()
    if len(args.layers) > 1:
        print(f"\n=== all measured layers: {', '.join(args.layers)} ===")
        print_table(
            totals_plain, totals_ours, {((k[0], k[1]), k[2]): v for k, v in all_aucs.items()}
        )
    if measured:
        project(measured, forward_seconds_per_image())


if __name__ == "__main__":
    main()
