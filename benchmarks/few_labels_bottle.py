"""The few-labels families on the real MVTec AD bottle, next to the one-class pick.

``python benchmarks/few_labels_bottle.py [--root ../shared/data/mvtec_ad] [--category bottle]
[--epochs 30] [--simclr-epochs 25] [--image-size 64] [--workdir /tmp/few_labels_bottle]``
builds a DVC project (this repo's stages, ``benchmarks.chaos.build_project``) from
params.yaml narrowed to one MVTec AD category, runs ``dvc repro`` and prints from the
results database:

- the report's section "With a few labels" (``stages.report_few_labels.few_labels_lines``
  on the database, the lines the report stage writes): ``SupervisedCNN`` and
  ``SimCLRProbe`` (efficientnet_lite0 ImageNet, offline, at ``--image-size`` px on the
  pixels backbone's ``rgbS`` ``image`` feature set; ``--epochs`` / ``--simclr-epochs``;
  ``label_fraction`` 0.1 and 1.0, ``eval_fraction`` 0.5, ``split_seed`` 0) on the
  protocol's held-out test images, each next to the *one-class pick* of its label
  fraction: the one-class experiment with the best AUROC on the same labelled pool images,
  scored on the same held-out images at its honest threshold. Per line: method, kind,
  label fraction, n labelled, n held-out, ROC-AUC, PR-AUC, F1, accuracy, precision, recall,
  specificity, TP/FP/TN/FN, and the experiment's wall seconds (``fit_s + score_s``; for a
  one-class pick its amortised share of the shared path);
- the one-class candidates: params.yaml's classic configs (the families whose ``images``,
  ``patch`` and ``labelled`` are all False) on raw pixels (``pixels gray64 flatten``) and
  on efficientnet_lite0 ImageNet ``stage6`` and ``stage8`` pooled (``avg``);
- the machine (``lscpu`` model name, cores), the date, the code commit, the wall time of
  ``dvc repro`` and of each stage, and the CPU seconds other processes used meanwhile.

The whole image is resized to 224x224 for the feature sets (``extract.crop: false``); no
augmented training sets (``augment.transforms`` of the category ``[]``,
``evaluate.augmentation: off``); no timeout; 2 Dask workers x 1 thread (each training is a
work unit of its own, so two train at once, one per core). Seconds are wall clock: run it
with nothing else running, or read them as upper bounds (it prints the other processes'
CPU seconds). The ``dvc repro`` output goes to ``<workdir>/repro.log`` as it comes; the
report is ``<workdir>/project/results/report.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.chaos import Run, build_project  # noqa: E402
from benchmarks.extract_throughput import busy_cpu_seconds, own_cpu_seconds  # noqa: E402
from benchmarks.reconstruction_bottle import code_version, machine  # noqa: E402
from stages.backbones import PIXEL_SIZES  # noqa: E402
from stages.methods import FAMILIES  # noqa: E402

ROOT = REPO.parent / "shared/data/mvtec_ad"
DB = "results/results.sqlite"
LABEL_FRACTIONS = [0.1, 1.0]
BACKBONE = {"backbone": "efficientnet_lite0", "init": "imagenet"}


def one_class_detectors(detectors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """params.yaml's detector entries whose family is one-class on pooled/flattened
    features (no image, patch or labelled family)."""
    out = []
    for d in detectors:
        family = FAMILIES[d["family"]]
        if not (family.images or family.patch or family.labelled):
            out.append(d)
    return out


def params(root: Path, category: str, epochs: int, simclr_epochs: int, image_size: int) -> dict:
    """The repo's params.yaml narrowed to one real category, the four feature sets, the
    classic one-class grid and the two labelled families."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["data"].update(root=str(root.resolve()), categories=[category])
    p["augment"]["transforms"][category] = []  # no augmented copies to extract
    p["extract"].update(crop=False)
    rgb = min(s for s in PIXEL_SIZES if s >= image_size)
    p["extract"]["extractors"] = [
        {"backbone": "pixels", "init": "none", "layers": [f"rgb{rgb}"],
         "representations": ["image"]},
        {"backbone": "pixels", "init": "none", "layers": ["gray64"],
         "representations": ["flatten"]},
        {"backbone": "efficientnet_lite0", "init": "imagenet", "layers": ["stage6", "stage8"],
         "representations": ["avg"]},
    ]  # fmt: skip
    p["evaluate"].update(augmentation="off", timeout_s=None)
    p["evaluate"]["engine"].update(n_workers=2, threads_per_worker=1)
    labelled = [
        {"family": family, "grid": {"label_fraction": LABEL_FRACTIONS},
         "fixed": {**BACKBONE, "image_size": image_size, "epochs": n,
                   "eval_fraction": 0.5, "split_seed": 0}}
        for family, n in (("SupervisedCNN", epochs), ("SimCLRProbe", simclr_epochs))
    ]  # fmt: skip
    p["evaluate"]["detectors"] = one_class_detectors(p["evaluate"]["detectors"]) + labelled
    return p


def fmt(value: Any, width: int, digits: int = 4) -> str:
    return f"{value:>{width}.{digits}f}" if isinstance(value, (float, int)) else f"{'-':>{width}}"


def report(project: Path) -> None:
    """The few-labels lines (stdout) from the project's results database."""
    cwd = os.getcwd()
    os.chdir(project)  # the stages' relative paths (database URL)
    try:
        from stages.report import latest_done, read_experiments
        from stages.report_few_labels import few_labels_lines, is_labelled
        from stages.results_db import open_db

        engine = open_db(f"sqlite:///{(project / DB).resolve()}", read_only=True)
        try:
            rows = read_experiments(engine)
            both = latest_done(rows)
            few = [r for r in both if is_labelled(r)]
            one_class = [r for r in both if not is_labelled(r)]
            by_category = few_labels_lines(engine, few, one_class) if few else {}
        finally:
            engine.dispose()
    finally:
        os.chdir(cwd)
    by_key = {r["key"]: r for r in rows}
    counts: dict[tuple[bool, str], int] = {}
    for r in rows:
        slot = (is_labelled(r), r["status"])
        counts[slot] = counts.get(slot, 0) + 1
    for r in rows:
        if is_labelled(r) and r["status"] != "done":
            print(f"{r['detector_name']}: {r['status']}: {(r['error'] or '')[:300]}")
    print("\nWith a few labels (held-out test images only; a labelled row's threshold is its "
          "probability 0.5, the one-class pick's its honest threshold; wall = fit + score s):")  # fmt: skip
    head = (f"{'method':<62} {'kind':<14} {'frac':>4} {'n lab':>5} {'n held':>6} "
            f"{'ROC-AUC':>7} {'PR-AUC':>7} {'F1':>6} {'acc':>6} {'prec':>6} {'recall':>6} "
            f"{'spec':>6} {'TP/FP/TN/FN':>12} {'wall s':>7}")  # fmt: skip
    for category, lines in by_category.items():
        print(f"{category}:\n{head}")
        for ln in lines:
            m, row = ln.metrics, by_key[ln.key]
            counts_s = "/".join(str(m[k]) for k in ("tp", "fp", "tn", "fn")) if "tp" in m else "-"
            fit, score = row.get("fit_s"), row.get("score_s")
            wall = fit + score if fit is not None and score is not None else None
            print(f"{ln.name[:62]:<62} {ln.kind:<14} {ln.label_fraction:>4g} "
                  f"{ln.n_labelled:>5} {len(ln.y):>6} {fmt(m.get('auroc'), 7)} "
                  f"{fmt(m.get('average_precision'), 7)} {fmt(m.get('f1'), 6, 3)} "
                  f"{fmt(m.get('accuracy'), 6, 3)} {fmt(m.get('precision'), 6, 3)} "
                  f"{fmt(m.get('recall'), 6, 3)} {fmt(m.get('specificity'), 6, 3)} "
                  f"{counts_s:>12} {fmt(wall, 7, 1)}")  # fmt: skip
    statuses = ", ".join(f"{'labelled' if lab else 'one-class'} {status} {n}"
                         for (lab, status), n in sorted(counts.items()))  # fmt: skip
    print(f"\nExperiments: {statuses}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="MVTec AD root folder")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--epochs", type=int, default=30, help="SupervisedCNN's epochs")
    parser.add_argument("--simclr-epochs", type=int, default=25, help="SimCLRProbe's epochs")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/few_labels_bottle"))
    args = parser.parse_args(argv)
    if not (args.root / args.category / "train/good").is_dir():
        print(f"{args.root / args.category}: no MVTec AD category there", file=sys.stderr)
        return 2
    shutil.rmtree(args.workdir, ignore_errors=True)
    p = params(args.root, args.category, args.epochs, args.simclr_epochs, args.image_size)
    project = build_project(args.workdir / "project", p)
    started = datetime.now().astimezone()
    print(f"{args.category}: {started:%Y-%m-%d %H:%M %Z}; machine: {machine()}; "
          f"{len(p['evaluate']['detectors'])} detector entries; SupervisedCNN {args.epochs} "
          f"epochs, SimCLRProbe {args.simclr_epochs} epochs at {args.image_size} px; "
          f"code {code_version()}", flush=True)  # fmt: skip
    busy, own = busy_cpu_seconds(), own_cpu_seconds()
    run = Run.start(project)
    with (args.workdir / "repro.log").open("w") as log:
        written = 0
        while run.proc.poll() is None or written < len(run.lines):
            lines = run.lines[written:]
            log.writelines(f"{t:8.1f} {line}\n" for t, line in lines)
            log.flush()
            written += len(lines)
            if run.proc.poll() is not None:
                run.finish()
            time.sleep(2)
    code = run.finish()
    if code:
        print(run.text()[-4000:], file=sys.stderr)
        return code
    total = run.ended or 0.0
    after = busy_cpu_seconds()
    stages = ", ".join(f"{name} {s:.0f} s" for name, s in run.durations().items())
    print(f"dvc repro {total:.0f} s ({total / 60:.1f} min): {stages}")
    if busy is not None and after is not None:
        other = max(0.0, (after - busy) - (own_cpu_seconds() - own))
        cores = os.cpu_count() or 1
        print(f"other processes used {other:.0f} CPU s meanwhile (of {total * cores:.0f} on "
              f"{cores} cores; anything but ~0 slows the seconds above)")  # fmt: skip
    summary = json.loads((project / "results/evaluate_summary.json").read_text())
    print(f"evaluate: {summary}")
    report(project)
    return 0


if __name__ == "__main__":
    sys.exit(main())
