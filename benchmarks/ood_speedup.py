"""Benchmark: plain per-config scikit-learn against the shared evaluator (stages/methods/).

"Ours" is the evaluate stage's own shared path (``_shared_rows`` in stages/evaluate.py):
every (augmented, family) group of the unit reserves what it needs (``Family.reserve``),
one ``UnitData`` holds both augmentation choices, and each group is one
``Family.shared_outcomes`` call, which also scores the training rows in-sample, plus one
call per fold for their out-of-fold scores (the honest threshold; ``--threshold-folds``,
5 as the stage's default), and so does more work than the plain side. A family's "ours" seconds are its
group calls (less the shared quantities computed inside them) plus its share of every
shared quantity it used (Gram, distances, kNN table, PCA basis), each split evenly over
the experiments that used it, as the stage splits them. "Plain" is the stage's plain
path (``evaluate.shared: false``) producing the same outputs: per config the family's own
estimator fitted on the raw features, scoring the test rows and the training rows
in-sample (``Family.reference_one``), plus one fit per fold for the out-of-fold scores.

The configs are data: each family's come from params.yaml's ``evaluate.detectors`` (the
study's 71 of params/study.yaml and the course baselines). On the shared MVTec AD bottle
category, ResNet18 with random init (``torch.manual_seed(0)``), layers 1-4 flattened,
augmented and not. Prints, per family and in total, wall and CPU seconds, peak RSS, the
speed ratio and the AUROC agreement, then projects the full grid. Features are cached as
.npy under /tmp/ood_bench_cache (never inside the repo).

    .venv/bin/python benchmarks/ood_speedup.py --layers layer4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.evaluate import reference_oof, shared_oof
from stages.methods import FAMILIES, DetectorConfig, Needs, UnitData, expand_detectors
from stages.methods.unit import fold_assignment

REPO = Path(__file__).resolve().parents[1]

DATA = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle"
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


def plain_reference(
    config: DetectorConfig, X_tr: np.ndarray, X_te: np.ndarray, seed: int,
    folds: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """The stage's plain path (``evaluate.shared: false``) for one config: the family's own
    estimator fitted on the raw features, scoring the test rows and, in-sample, the
    training rows, plus one fit per fold for the out-of-fold training scores when ``folds``
    is given; the same outputs as the shared path. Test scores (NaN if it fails)."""
    family = FAMILIES[config.family]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = family.reference_one(X_tr, X_te, config, seed)
        if outcome.error is not None:
            return np.full(len(X_te), np.nan)
        if folds is not None:
            reference_oof(family, outcome, X_tr, folds, config, seed)
    return outcome.scores


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if not np.isfinite(scores).all():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def config_weight(config: DetectorConfig) -> float:
    """Relative cost of a config inside its family, for extrapolating unmeasured configs."""
    p = FAMILIES[config.family].hyperparams(config)
    if config.family == "IsolationForest":
        return float(p.n_estimators)
    if config.family == "EllipticEnvelope":
        return float(p.pca_components) ** 2
    if config.family == "KMeansDistance":
        return float(p.n_clusters)
    return 1.0


# --- the grid: data only (params.yaml, params/study.yaml) ---------------------------------
SELECTABLE = [name for name, family in FAMILIES.items() if not family.test_only]


def grid_of(params_file: str) -> list[DetectorConfig]:
    """The expanded ``evaluate.detectors`` of one of the repository's params files."""
    raw = yaml.safe_load((REPO / params_file).read_text(encoding="utf-8"))
    return expand_detectors(raw["evaluate"]["detectors"], section=f"{params_file}: evaluate.detectors")  # fmt: skip


def load_grid() -> tuple[list[DetectorConfig], list[str]]:
    """params.yaml's configs (the study's 71 and the course baselines) and the study's
    families (params/study.yaml), checking that params.yaml holds every study config."""
    configs, study = grid_of("params.yaml"), grid_of("params/study.yaml")
    missing = [c.name for c in study if c not in set(configs)]
    if missing:
        raise SystemExit(f"params.yaml lacks {len(missing)} of the {len(study)} configs of "
                         f"params/study.yaml, e.g. {missing[0]}")  # fmt: skip
    families = list(dict.fromkeys(c.family for c in study))
    print(f"grid: {len(configs)} configs in params.yaml, including all {len(study)} of "
          f"params/study.yaml ({', '.join(families)})")  # fmt: skip
    return configs, families


# --- ours: the evaluate stage's shared path ------------------------------------------------
class MeteredUnitData(UnitData):
    """The stage's ``UnitData``, which also records each shared quantity's own CPU seconds
    (nested quantities excluded, as ``seconds``). Bookkeeping only: same computation."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cpu_seconds: dict[str, float] = {}
        self._cpu_stack: list[float] = []

    def _cached(self, name: str, compute: Callable[[], Any]) -> Any:
        def metered() -> Any:
            t0 = time.process_time()
            self._cpu_stack.append(0.0)
            try:
                return compute()
            finally:
                inner, elapsed = self._cpu_stack.pop(), time.process_time() - t0
                self.cpu_seconds[name] = elapsed - inner
                if self._cpu_stack:
                    self._cpu_stack[-1] += elapsed

        return super()._cached(name, metered)


@dataclass
class Shared:
    """Ours for one unit: per family its group calls and its share of the shared quantities."""

    calls: dict[str, Cost] = field(default_factory=dict)
    share: dict[str, Cost] = field(default_factory=dict)
    quantities: dict[str, Cost] = field(default_factory=dict)  # each one's own seconds
    gram_cpu: dict[str, float] = field(default_factory=dict)  # CPU s of the Gram, in ``share``
    scores: dict[tuple[bool, DetectorConfig], np.ndarray] = field(default_factory=dict)
    errors: dict[tuple[bool, DetectorConfig], str] = field(default_factory=dict)

    def ours(self, family: str) -> Cost:
        out = Cost()
        out.merge(self.calls[family])
        out.merge(self.share[family])
        return out

    def merge(self, other: Shared) -> None:
        for mine, theirs in ((self.calls, other.calls), (self.share, other.share),
                             (self.quantities, other.quantities)):  # fmt: skip
            for name, cost in theirs.items():
                mine.setdefault(name, Cost()).merge(cost)


def run_shared(
    X: np.ndarray,
    test: np.ndarray,
    trains: dict[bool, np.ndarray],
    configs: list[DetectorConfig],
    seed: int,
    row_groups: np.ndarray | None = None,
    folds: int = 0,
) -> Shared:
    """``_shared_rows`` of stages/evaluate.py on one unit (both augmentation choices)."""
    fallback = [c.name for c in configs if not FAMILIES[c.family].shares(c)]
    if fallback:
        raise SystemExit(f"no shared path for {len(fallback)} configs, e.g. {fallback[0]}")
    planned = [(augmented, c) for augmented in (False, True) for c in configs]
    groups = [((augmented, family), [c for _, c in group])
              for (augmented, family), group in groupby(planned, key=lambda p: (p[0], p[1].family))]  # fmt: skip
    needs = Needs()
    for (_, family), group in groups:
        FAMILIES[family].reserve(needs, group)
    if needs.raw:
        data = MeteredUnitData(test, trains, needs, raw=X)
    else:  # the stage streams the Gram from the shards: here from the cached rows
        step = max(1, (64 << 20) // (X.shape[1] * X.itemsize))
        data = MeteredUnitData(test, trains, needs,
                               blocks=lambda: (X[i : i + step] for i in range(0, len(X), step)))  # fmt: skip
    out = Shared()
    done = []
    for (augmented, family), group in groups:
        before = set(data.seconds)
        with Meter() as meter:
            outcomes = FAMILIES[family].shared_outcomes(data, augmented, group, seed)
            if folds:  # the honest threshold's out-of-fold scores, as the stage computes them
                keys = data.add_folds(augmented, row_groups[trains[augmented]], folds, seed)
                shared_oof(FAMILIES[family], data, augmented, keys, group, seed, outcomes)
        used = data.take_used()
        inside = set(data.seconds) - before  # computed by this call: counted in their share
        call = out.calls.setdefault(family, Cost())
        call.wall += meter.wall - sum(data.seconds[n] for n in inside)
        call.cpu += meter.cpu - sum(data.cpu_seconds[n] for n in inside)
        call.peak_mb = max(call.peak_mb, meter.peak_mb)
        call.measured += len(group)
        call.total += len(group)
        for config, outcome in zip(group, outcomes, strict=True):
            if outcome.error is None:
                out.scores[(augmented, config)] = outcome.scores
            else:
                out.scores[(augmented, config)] = np.full(len(test), np.nan)
                out.errors[(augmented, config)] = outcome.error
        done.append((family, len(group), used))
    users: Counter[str] = Counter()
    for _, n, used in done:
        users.update(dict.fromkeys(used, n))
    for family, n, used in done:
        share = out.share.setdefault(family, Cost())
        share.wall += n * sum(data.seconds.get(name, 0.0) / users[name] for name in used)
        share.cpu += n * sum(data.cpu_seconds.get(name, 0.0) / users[name] for name in used)
        if "gram" in used:
            out.gram_cpu[family] = (out.gram_cpu.get(family, 0.0)
                                    + n * data.cpu_seconds.get("gram", 0.0) / users["gram"])  # fmt: skip
    for name, seconds in data.seconds.items():
        out.quantities[name] = Cost(wall=seconds, cpu=data.cpu_seconds.get(name, 0.0))
    return out


def run_unit(
    X: np.ndarray,
    role: np.ndarray,
    label: np.ndarray,
    configs: list[DetectorConfig],
    seed: int,
    max_seconds: float,
    progress,
    folds: int = 5,
) -> tuple[dict[str, Cost], Shared, dict, dict]:
    """One layer, both augmentation choices: the shared path, then the plain loops."""
    test = np.flatnonzero(role == "test")
    trains = {False: np.flatnonzero(role == "train"), True: np.flatnonzero(role != "test")}
    y = label[test]
    families = list(dict.fromkeys(c.family for c in configs))
    X_all = np.ascontiguousarray(X)
    # an augmented copy belongs to its original (rows: originals, then 5 x the originals)
    n_orig = len(trains[False])
    groups = np.where(
        role == "test", np.arange(len(role)) + len(role), np.arange(len(role)) % n_orig
    )
    shared = run_shared(X_all, test, trains, configs, seed, groups, folds)
    plain: dict[str, Cost] = {f: Cost() for f in families}
    aucs: dict[tuple, tuple[float, float]] = {}
    for augmented, train in trains.items():
        X_tr, X_te = X_all[train], X_all[test]
        fold_of = fold_assignment(groups[train], folds, seed) if folds else None
        for family in families:
            fam = [c for c in configs if c.family == family]
            if max_seconds <= 0:  # ours only (--max-seconds 0: for the projection)
                progress.update(len(fam))
                continue
            cost, done_weight = Cost(), 0.0
            for config in fam:
                if cost.wall > max_seconds:
                    break
                with Meter() as meter:
                    theirs = plain_reference(config, X_tr, X_te, seed, fold_of)
                cost.add(meter)
                cost.measured += 1
                done_weight += config_weight(config)
                aucs[(augmented, config)] = (auroc(y, shared.scores[(augmented, config)]),
                                             auroc(y, theirs))  # fmt: skip
                progress.update(1)
            cost.total = len(fam)
            if cost.measured < cost.total:
                scale = sum(config_weight(c) for c in fam) / done_weight
                cost.wall *= scale
                cost.cpu *= scale
                cost.extrapolated = True
                progress.update(cost.total - cost.measured)
            plain[family].merge(cost)
    return plain, shared, aucs, {"n": {k: len(v) for k, v in trains.items()}, "dim": X.shape[1]}


def print_table(plain: dict[str, Cost], shared: Shared, aucs: dict, study: list[str]) -> None:
    """Per family, then per group of families: plain vs ours (its share of the shared
    quantities in the ``shared s`` column, included in ``ours s``)."""
    rows = [(f, [f]) for f in plain]
    groups = {
        "OCSVM+LOF+KDE": ["OneClassSVM", "LocalOutlierFactor", "KernelDensity"],
        "total: study families": [f for f in plain if f in study],
        "new families": [f for f in plain if f not in study],
        "all families": list(plain),
    }
    seen = {(f,) for f in plain}
    print(
        f"\n{'family':<24}{'configs':>9}{'plain s':>10}{'cpu s':>9}{'MiB':>7}"
        f"{'ours s':>9}{'cpu s':>8}{'MiB':>7}{'speedup':>9}{'shared s':>9}  AUROC |diff| (n, <=1e-6, max)"
    )
    for name, fams in [*rows, *groups.items()]:
        fams = [f for f in fams if f in plain]
        if not fams or (name in groups and tuple(fams) in seen):
            continue
        seen.add(tuple(fams))
        p, o, s = Cost(), Cost(), Cost()
        for f in fams:
            p.merge(plain[f])
            o.merge(shared.ours(f))
            s.merge(shared.share[f])
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
            f"{o.wall:>9.2f}{o.cpu:>8.1f}{o.peak_mb:>7.0f}"
            f"{f'{p.wall / max(o.wall, 1e-9):.1f}x' if p.measured else '-':>9}"
            f"{s.wall:>9.2f}  {agree}"
        )
    q = Cost()
    for cost in shared.quantities.values():
        q.merge(cost)
    calls = sum(c.wall for c in shared.calls.values())
    print(f"{'shared quantities':<24}{'':>9}{'':>10}{'':>9}{'':>7}{q.wall:>9.2f}{q.cpu:>8.1f}")
    print("  shared quantities, own wall / cpu s: "
          + ", ".join(f"{n} {c.wall:.2f}/{c.cpu:.1f}" for n, c in shared.quantities.items()))  # fmt: skip
    print(f"  ours = group calls {calls:.2f} s + shared quantities {q.wall:.2f} s = "
          f"{calls + q.wall:.2f} s (the 'all families' row)")  # fmt: skip
    print(
        "* = extrapolated from the measured configs (cost weights: trees for IsolationForest,"
        " components^2 for EllipticEnvelope, clusters for KMeansDistance)"
    )
    for (aug, c), error in shared.errors.items():
        print(f"  ours failed: aug={aug} {c.name}: {error[:200]}")
    kde = [(aug, c, a, b) for (aug, c), (a, b) in aucs.items() if c.family == "KernelDensity"]
    if kde:
        print("\nKernelDensity AUROC, ours (exact float64) vs scikit-learn's tree estimate:")
        for aug, c, a, b in kde:
            print(f"  aug={aug!s:<5} {c.name:<58} ours {a:.4f}  sklearn {b:.4f}")


# The study's grid (params/study.yaml): 15 MVTec categories x {resnet18, resnet50, vit_b_16,
# vit_b_32} x {random, imagenet} x 4 layers x flatten = 480 units x 71 configs x 2
# augmentation choices. Image counts per category: (train good, test).
MVTEC_COUNTS = {  # category: (train good, test)
    "bottle": (209, 83), "cable": (224, 150), "capsule": (219, 132), "carpet": (280, 117),
    "grid": (264, 78), "hazelnut": (391, 110), "leather": (245, 124), "metal_nut": (220, 115),
    "pill": (267, 167), "screw": (320, 160), "tile": (230, 117), "toothbrush": (60, 42),
    "transistor": (213, 100), "wood": (247, 79), "zipper": (240, 151),
}  # fmt: skip
N_AUG = len(AUGMENTATIONS)
PRECISIONS = ("float32", "bfloat16")


@dataclass
class StudyGrid:
    """What params/study.yaml asks for: per category its transforms, per backbone its inits
    and layers (each (category, backbone, init) is one extraction of all its layers)."""

    transforms: dict[str, list[str]]
    extractors: dict[str, dict[str, list[str]]]  # backbone: {init: layers}
    workers: int  # evaluate.engine.n_workers x threads_per_worker (1)


def study_grid(params_file: str = "params/study.yaml") -> StudyGrid:
    raw = yaml.safe_load((REPO / params_file).read_text(encoding="utf-8"))
    extractors: dict[str, dict[str, list[str]]] = {}
    for e in raw["extract"]["extractors"]:
        extractors.setdefault(e["backbone"], {})[e["init"]] = list(e["layers"])
    transforms = {
        c: list(raw["augment"]["transforms"].get(c, [])) for c in raw["data"]["categories"]
    }
    engine = raw["evaluate"]["engine"]
    return StudyGrid(transforms, extractors, engine["n_workers"] * engine["threads_per_worker"])


def forward_rates(grid: StudyGrid, batch: int = 8, batches: int = 3) -> dict[str, dict[str, float]]:
    """Images/s of each study backbone's forward pass on this CPU (random init, the study's
    layers; float32, and bfloat16 where the CPU has bf16 instructions), from the median of
    ``batches`` timed batches after one warm-up batch: ``{backbone: {"cpu/<precision>":
    images/s}}``. The forward only: the extract
    stage adds decoding and writing (README: 0.8-0.9x of the forward on this machine)."""
    import torch

    from stages.backbones import build_extractor, uses_channels_last
    from stages.device import autocast, cpu_has_bf16

    cpu = torch.device("cpu")
    precisions = PRECISIONS if cpu_has_bf16() else PRECISIONS[:1]
    rates: dict[str, dict[str, float]] = {}
    for backbone, inits in grid.extractors.items():
        layers = next(iter(inits.values()))
        model = build_extractor(backbone, "random", layers)
        for precision in precisions:
            x = torch.randn(batch, 3, 224, 224)
            if uses_channels_last(backbone, "cpu", precision):
                model, x = (
                    model.to(memory_format=torch.channels_last),
                    x.contiguous(memory_format=torch.channels_last),
                )
            seconds = []
            with torch.inference_mode(), autocast(cpu, precision):
                model(x)
                for _ in range(batches):
                    t0 = time.perf_counter()
                    model(x)
                    seconds.append(time.perf_counter() - t0)
            rates.setdefault(backbone, {})[f"cpu/{precision}"] = batch / float(np.median(seconds))
            model = model.to(memory_format=torch.contiguous_format)
    return rates


def read_extract_rates(path: Path) -> tuple[str, dict[str, dict[str, float]]]:
    """benchmarks/extract_throughput.py's ``--json`` file: (machine, rates)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        machine, rates = str(raw["machine"]), raw["rates"]
        rates = {b: {k: float(v) for k, v in r.items()} for b, r in rates.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SystemExit(f"{path}: not an extract-rates file of benchmarks/extract_throughput.py "
                         f"--json ({type(exc).__name__}: {exc}); expected "
                         '{"machine": str, "rates": {backbone: {"cpu/float32": images/s}}}') from None  # fmt: skip
    return machine, rates


def project(
    measured: dict[str, dict],
    n_configs: int,
    grid: StudyGrid,
    extract_rates: dict[str, dict[str, float]],
    rates_source: str,
    augment_rate: float,
) -> None:
    """Project the study's grid on this machine from every stage's measured rate: augment
    (images/s of the stage's code), extraction (images/s per backbone, device and
    precision) and evaluation (per-unit costs measured above, both augmentation choices)."""
    # Gram CPU seconds per (row^2 * dim), from the measured layers (both augmentation
    # choices share one Gram over all rows); the rest of a unit (every config x 2) per row.
    # CPU seconds, spread over the stage's single-threaded workers (evaluate.engine), are
    # its wall time on an otherwise idle machine, and do not grow with other processes' load.
    c_gram = np.mean([m["gram"] / (m["rows"] ** 2 * m["dim"]) for m in measured.values()])
    c_rest = np.mean([m["rest"] / m["rows"] for m in measured.values()])
    dims = {  # flattened dims of each study layer, for one 224x224 image
        backbone: [int(np.prod(shape)) for shape in activation_dims(backbone, layers)]
        for backbone, inits in grid.extractors.items()
        for layers in [next(iter(inits.values()))]
    }
    augmented_images = extract_images = 0
    evaluate = disk = 0.0
    units = experiments = 0
    per_backbone: dict[str, int] = dict.fromkeys(grid.extractors, 0)
    for category, (n_train, n_test) in MVTEC_COUNTS.items():
        if category not in grid.transforms:
            continue
        n_aug = len(grid.transforms[category]) * n_train
        augmented_images += n_aug
        rows = n_train + n_aug + n_test
        choices = 2 if n_aug else 1  # augmented experiments only where it has transforms
        for backbone, inits in grid.extractors.items():
            per_backbone[backbone] += len(inits) * rows
            extract_images += len(inits) * rows
            for dim in dims[backbone]:
                units += len(inits)
                experiments += len(inits) * n_configs * choices
                evaluate += len(inits) * (c_gram * rows**2 * dim + c_rest * rows * choices / 2)
                disk += len(inits) * rows * dim * 4
    evaluate /= grid.workers
    augment = augmented_images / augment_rate
    print(
        f"\nProjection of the study's grid ({experiments:,} experiments: {units} units x "
        f"{n_configs} configs x augmentation choices) on this {os.cpu_count()}-core machine:"
    )
    print(f"  augment: {augmented_images:,} images at {augment_rate:.1f} images/s (the stage's "
          f"code, measured here) = {augment / 3600:.2f} h")  # fmt: skip
    print(f"  evaluation: Gram {c_gram:.3g} CPU s/(row^2 dim), other work {c_rest:.3g} CPU "
          f"s/row per unit (measured above), on {grid.workers} single-threaded workers = "
          f"{evaluate / 3600:.2f} h")  # fmt: skip
    print(f"  extraction: {extract_images:,} images (each category's train, augmented and test "
          f"images once per backbone and init), rates {rates_source}:")  # fmt: skip
    keys = sorted({k for r in extract_rates.values() for k in r})
    print(
        f"    {'backbone':<10}{'images':>8}" + "".join(f"{k + ' img/s':>22}{'h':>7}" for k in keys)
    )
    totals: dict[str, float] = {}
    for backbone, n_images in per_backbone.items():
        line = f"    {backbone:<10}{n_images:>8,}"
        for k in keys:
            rate = extract_rates.get(backbone, {}).get(k)
            if rate is None:
                line += f"{'-':>22}{'-':>7}"
                totals[k] = float("nan")
                continue
            totals[k] = totals.get(k, 0.0) + n_images / rate
            line += f"{rate:>22.1f}{n_images / rate / 3600:>7.2f}"
        print(line)
    print(f"  totals (augment + extraction + evaluation; features on disk {disk / 1e9:.0f} GB "
          f"float32, {disk / 2e9:.0f} GB with extract.dtype float16):")  # fmt: skip
    names = {"cpu/float32": "CPU float32", "cpu/bfloat16": "CPU bf16",
             "cuda/float32": "GPU float32", "cuda/bfloat16": "GPU bf16"}  # fmt: skip
    for k in keys:
        total = augment + totals[k] + evaluate
        print(f"    {names.get(k, k):<12} extraction {totals[k] / 3600:6.2f} h   total "
              f"{total / 3600:6.2f} h")  # fmt: skip
    print("  target: <= 12 h on this machine's CPU; the study: 12 days on 6 cores, 380 GB")


def activation_dims(backbone: str, layers: list[str]) -> list[tuple[int, ...]]:
    """Each layer's activation shape for one image (``stages.backbones``, nothing computed)."""
    from stages.backbones import activation_shapes

    shapes = activation_shapes(backbone, layers)
    return [shapes[layer] for layer in layers]


def main(argv: list[str] | None = None) -> None:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS)
    parser.add_argument("--families", nargs="+", default=None, choices=SELECTABLE,
                        help="detector families (default: all with a shared path for all "
                        "their configs); their configs come from params.yaml's "
                        "evaluate.detectors")  # fmt: skip
    parser.add_argument("--max-seconds", type=float, default=300.0,
                        help="plain-loop budget per family, layer and augmentation choice; "
                        "the remaining configs are extrapolated (0: ours only, e.g. for "
                        "the projection)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold-folds", type=int, default=5,
                        help="out-of-fold scores for the honest threshold, as the stage's "
                        "evaluate.threshold_folds (0: in-sample only, as before)")  # fmt: skip
    parser.add_argument("--extract-only", action="store_true")
    parser.add_argument("--extract-rates", type=Path, default=None,
                        help="benchmarks/extract_throughput.py --json output: extraction "
                        "images/s per backbone, device and precision for the projection "
                        "(default: the forward pass measured here)")  # fmt: skip
    parser.add_argument("--augment-images", type=int, default=6,
                        help="bottle images (x5 transforms) the augment stage's rate is "
                        "measured on for the projection")  # fmt: skip
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"skipped: MVTec bottle not found at {DATA}")
        return
    grid, study = load_grid()
    if args.families is None:
        unshared = {c.family for c in grid if not FAMILIES[c.family].shares(c)}
        patch = {f for f in SELECTABLE if FAMILIES[f].patch}  # need patch feature sets
        if unshared | patch:
            print(f"left out (no shared path): {', '.join(sorted(unshared))}; "
                  f"(patch feature sets only): {', '.join(sorted(patch))}")  # fmt: skip
        args.families = [f for f in SELECTABLE if f not in unshared | patch]
    configs = [c for c in grid if c.family in args.families]
    missing = [f for f in args.families if not any(c.family == f for c in configs)]
    if missing:
        parser.error(f"no configs for {', '.join(missing)} in params.yaml's evaluate.detectors")
    t0 = time.perf_counter()
    feats = extract_features()
    print(f"features ready in {time.perf_counter() - t0:.1f} s (cache {CACHE})")
    if args.extract_only:
        return
    role, label = feats["role"], feats["label"]
    progress = tqdm(total=len(configs) * 2 * len(args.layers), desc="plain sklearn configs")
    totals_plain: dict[str, Cost] = {}
    totals_shared = Shared()
    all_aucs: dict = {}
    measured: dict[str, dict] = {}
    for layer in args.layers:
        X = np.asarray(feats[layer])
        plain, shared, aucs, shape = run_unit(
            X, role, label, configs, args.seed, args.max_seconds, progress, args.threshold_folds
        )
        progress.clear()
        print(
            f"\n=== {layer}: dim {shape['dim']}, train {shape['n'][False]} originals / "
            f"{shape['n'][True]} with augmentation, test {int((role == 'test').sum())} "
            f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores) ==="
        )
        print_table(plain, shared, aucs, study)
        for f, cost in plain.items():
            totals_plain.setdefault(f, Cost()).merge(cost)
        totals_shared.merge(shared)
        all_aucs.update({(layer, *k): v for k, v in aucs.items()})
        if set(study) <= set(args.families):  # the study's families only, the Gram whole
            rest = sum(shared.ours(f).cpu - shared.gram_cpu.get(f, 0.0) for f in study)
            measured[layer] = {"gram": shared.quantities["gram"].cpu, "rest": rest,
                               "rows": len(X), "dim": X.shape[1]}  # fmt: skip
    progress.close()
    if len(args.layers) > 1:
        print(f"\n=== all measured layers: {', '.join(args.layers)} ===")
        print_table(
            totals_plain, totals_shared, {((k[0], k[1]), k[2]): v for k, v in all_aucs.items()},
            study,
        )  # fmt: skip
    if measured:
        study_grid_ = study_grid()
        if args.extract_rates:
            machine, rates = read_extract_rates(args.extract_rates)
            source = f"from {args.extract_rates} ({machine})"
        else:
            print("\nmeasuring the study backbones' forward rates (random init, batches of 8)")
            rates = forward_rates(study_grid_)
            source = "of the bare forward pass, measured here (no --extract-rates)"
        from benchmarks.augment_throughput import stage_images_per_second

        augment_rate = stage_images_per_second(args.augment_images)
        project(measured, len(grid_of("params/study.yaml")), study_grid_, rates, source,
                augment_rate)  # fmt: skip


if __name__ == "__main__":
    main()
