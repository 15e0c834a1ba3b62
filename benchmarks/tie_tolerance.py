"""Measure how far the shared path's scores are from the plain reference's, per family.

The tie rule of ``stages.metrics`` (``tie_safe_scores``: scores within ``TIE_RTOL`` of
each other, relative, or both within ``TIE_FLOOR`` x the score set's scale of 0, are one
tie) rests on this measurement. On the cached bottle features (ResNet18 random init,
flatten; ``benchmarks/ood_speedup.py`` writes the cache), not augmented (209 training
rows), the 83 test rows plus ``--dups`` test rows that duplicate training rows (exact ties
in exact arithmetic: a distance of 0). Test and in-sample training scores together.

- ``vs plain``: each family's shared path (``Family.shared_outcomes``, float64) against its
  plain per-config reference (``Family.reference_one``, what ``evaluate.shared: false``
  stores) on a few configs; ``f64``: the same reference fitted on a float64 copy of the
  features (scikit-learn keeps float32 input in float32 in some estimators).
  KernelDensity's reference is the exact float64 log-density from directly computed
  distances instead (scikit-learn's tree is approximate here: not an arithmetic
  difference). ``rel``: ``max |a - b| / max(|a|, |b|)`` over pairs outside the band
  around 0; ``abs``: ``max |a - b| / scale``, ``scale`` the config's largest ``|score|``.
- ``gaps`` (every config of params.yaml's grid, shared path): the smallest gap between
  consecutive sorted scores relative to the larger, among gaps above 1e-11 (how close
  genuinely different scores come), and how many gaps lie in (0, 1e-11] (exact ties
  split by rounding).

    .venv/bin/python benchmarks/tie_tolerance.py [--layers layer4 layer3] [--dups 5]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.methods import FAMILIES, DetectorConfig, Needs, UnitData, expand_detectors
from stages.methods.kde import kde_bandwidth, kde_log_density
from stages.metrics import TIE_FLOOR, TIE_RTOL

REPO = Path(__file__).resolve().parents[1]
CACHE = Path("/tmp/ood_bench_cache")
GRID = [
    {"family": "OneClassSVM", "grid": {"kernel": ["linear", "rbf"]}, "fixed": {"max_iter": 1000}},
    {
        "family": "OneClassSVM",
        "grid": {"kernel": ["poly"], "degree": [3, 13]},
        "fixed": {"max_iter": 1000},
    },
    {"family": "OneClassSVM", "grid": {"kernel": ["linear", "rbf"]}},  # converged (max_iter -1)
    {"family": "IsolationForest", "grid": {"n_estimators": [10, 100]}},
    {"family": "KernelDensity", "grid": {"bandwidth": [1.0, 100.0], "kernel": ["gaussian"]}},
    {"family": "KernelDensity", "grid": {"bandwidth": [100.0], "kernel": ["exponential"]}},
    {
        "family": "LocalOutlierFactor",
        "grid": {"n_neighbors": [2, 16, 64, 300]},
        "fixed": {"novelty": True},
    },
    {"family": "EllipticEnvelope", "grid": {"pca_components": [32, 128]}},
    {"family": "KMeansDistance", "grid": {"n_clusters": [1, 8]}},
    {"family": "KNNDistance", "grid": {"n_neighbors": [1, 16, 300], "aggregate": ["kth", "mean"]}},
    {"family": "Mahalanobis", "grid": {"pca_components": [32, 256]}},
    {"family": "PCAReconstruction", "grid": {"pca_components": [8, 256]}},
]


def load(layer: str, dups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows: train originals, test, then ``dups`` copies of training rows as test rows."""
    role = np.load(CACHE / "role.npy")
    X = np.load(CACHE / f"{layer}.npy", mmap_mode="r")
    train, test = np.flatnonzero(role == "train"), np.flatnonzero(role == "test")
    copies = train[np.linspace(0, len(train) - 1, dups).astype(int)] if dups else train[:0]
    X = np.asarray(X[np.r_[train, test, copies]], dtype=np.float32)
    n = len(train)
    return X, np.arange(n), np.arange(n, len(X))


def kde_reference(X_tr: np.ndarray, X_q: np.ndarray, config: DetectorConfig) -> np.ndarray:
    """Exact float64 -log density from directly computed distances (no Gram)."""
    a, b = X_q.astype(np.float64), X_tr.astype(np.float64)
    sq = np.stack([((b - x) ** 2).sum(axis=1) for x in a])
    p = FAMILIES["KernelDensity"].hyperparams(config)
    h = kde_bandwidth(p.bandwidth, len(b), b.shape[1])
    return -kde_log_density(sq, h, p.kernel, b.shape[1])


def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max relative diff outside the band around 0, max abs diff / scale)."""
    if not np.array_equal(np.isfinite(a), np.isfinite(b)):
        return np.inf, np.inf
    finite = np.isfinite(a)
    a, b = a[finite], b[finite]
    scale = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0))
    if scale == 0:
        return 0.0, 0.0
    diff = np.abs(a - b)
    big = np.maximum(np.abs(a), np.abs(b))
    outside = big > TIE_FLOOR * scale
    return float((diff[outside] / big[outside]).max(initial=0.0)), float(diff.max() / scale)


def gaps(scores: np.ndarray) -> tuple[float, int]:
    """(smallest relative gap above 1e-11, number of gaps in (0, 1e-11]) outside the band."""
    s = np.sort(scores[np.isfinite(scores)])
    if s.size < 2:
        return np.inf, 0
    larger = np.maximum(np.abs(s[1:]), np.abs(s[:-1]))
    keep = larger > TIE_FLOOR * larger.max()
    rel = np.diff(s)[keep] / larger[keep]
    return float(rel[rel > 1e-11].min(initial=np.inf)), int(((rel > 0) & (rel <= 1e-11)).sum())


Row = dict[str, float]


def measure(layer: str, dups: int, seed: int) -> dict[str, list[Row]]:
    X, train, queries = load(layer, dups)
    configs = expand_detectors(GRID)
    every = expand_detectors(
        yaml.safe_load((REPO / "params.yaml").read_text())["evaluate"]["detectors"]
    )
    needs = Needs()
    for family in dict.fromkeys(c.family for c in configs + every):
        FAMILIES[family].reserve(needs, [c for c in configs + every if c.family == family])
    data = UnitData(queries, {False: train}, needs, raw=X)
    X_tr, X_te = X[train], X[queries]
    out: dict[str, list[Row]] = {}
    for family in dict.fromkeys(c.family for c in configs):
        group = [c for c in configs if c.family == family]
        t0 = time.perf_counter()
        for config, mine in zip(group, FAMILIES[family].shared_outcomes(data, False, group, seed),
                                strict=True):  # fmt: skip
            assert mine.error is None, (config.name, mine.error)
            ours = np.concatenate([mine.scores, mine.train_scores])
            row: Row = {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if family == "KernelDensity":
                    theirs = kde_reference(X_tr, np.concatenate([X_te, X_tr]), config)
                    row["rel"], row["abs"] = compare(ours, theirs)
                else:
                    for tag, dtype in (("", np.float32), ("f64 ", np.float64)):
                        if tag and family == "OneClassSVM":
                            continue  # libsvm computes in float64 whatever the input
                        ref = FAMILIES[family].reference_one(
                            X_tr.astype(dtype), X_te.astype(dtype), config, seed
                        )
                        assert ref.error is None, (config.name, ref.error)
                        theirs = np.concatenate([ref.scores, ref.train_scores])
                        row[f"{tag}rel"], row[f"{tag}abs"] = compare(ours, theirs)
            out.setdefault(family, []).append(row)
        print(f"  {layer} {family}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    for family in dict.fromkeys(c.family for c in every):
        group = [c for c in every if c.family == family]
        for mine in FAMILIES[family].shared_outcomes(data, False, group, seed):
            if mine.error is None:
                gap, ties = gaps(np.concatenate([mine.scores, mine.train_scores]))
                out.setdefault(family, []).append({"gap": gap, "ties": ties})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", nargs="+", default=["layer4", "layer3"])
    parser.add_argument("--dups", type=int, default=5, help="test rows duplicating train rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (CACHE / "layer4.npy").exists():
        raise SystemExit(f"no cached features in {CACHE}: run benchmarks/ood_speedup.py first")
    rows: dict[str, list[Row]] = {}
    for layer in args.layers:
        for family, results in measure(layer, args.dups, args.seed).items():
            rows.setdefault(family, []).extend(results)

    def worst(family: str, field: str, best: bool = False) -> str:
        values = [r[field] for r in rows[family] if field in r]
        if not values:
            return "-"
        return f"{(min if best else max)(values):.1e}" if field != "ties" else str(sum(values))

    print(f"tie rule: rtol {TIE_RTOL:g}, band {TIE_FLOOR:g} x scale; {', '.join(args.layers)}; "
          f"209 train, 83 + {args.dups} duplicated test rows")  # fmt: skip
    print(
        "\n| family | vs plain: rel | abs | f64: rel | abs | gaps: smallest > 1e-11 | in (0, 1e-11] |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for family in rows:
        cells = [worst(family, f) for f in ("rel", "abs", "f64 rel", "f64 abs")]
        cells += [worst(family, "gap", best=True), worst(family, "ties")]
        print(f"| {family} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
