"""The reconstruction families on the real MVTec AD bottle, next to the classic detectors.

``python benchmarks/reconstruction_bottle.py [--root ../shared/data/mvtec_ad]
[--category bottle] [--epochs 50] [--image-size 64] [--lrs 0.001 0.003]
[--workdir /tmp/reconstruction_bottle] [--recheck]`` builds a DVC project (this repo's
stages, ``benchmarks.chaos.build_project``) from params.yaml narrowed to one MVTec AD
category, runs ``dvc repro`` and prints from the results database:

- every reconstruction config (``ConvAutoencoder``, ``VAE``, ``EncoderAutoencoder``, each
  ``--lrs`` (2) x 2 latent sizes x ``train_augment`` false/true: 8 configs, 24 trainings)
  on the ``image`` feature set (the pixels backbone's ``rgbS``, S the smallest pixel size
  >= ``--image-size``): image AUROC, pixel AUROC, AUPRO, honest F1 and accuracy, fit and
  score seconds, their sum (the experiment's wall time), the last epoch's training and
  held-out loss; ``--epochs`` each at ``--image-size`` px. ConvAutoencoder and VAE: depth
  4, latent channels 8 and 32 (a 4x4x8 or 4x4x32 code at 64 px), VAE ``kl_weight`` 1;
  EncoderAutoencoder: efficientnet_lite0 ImageNet (offline, from its wheel) up to
  ``stage6``, frozen, latent channels 16 and 64;
- per family the best and the median image AUROC;
- the classic detectors, params.yaml's grid less the families that need patch or image
  feature sets (``Family.patch`` / ``Family.images``: the study's 71 configs and the course
  baselines), on raw pixels (``pixels gray64 flatten``) and on efficientnet_lite0 ImageNet
  ``stage6`` and ``stage8`` pooled (``avg``): the best config of each by image AUROC. Every
  "best" here is an oracle pick (chosen on the test set), labelled so;
- the wall time of ``dvc repro`` and of each stage (from its ``Running stage`` line to
  the next), and the machine (``lscpu`` model name, cores).

The whole image is resized to 224x224 (``extract.crop: false``: every mask pixel is
evaluated); no augmented training sets (``augment.transforms`` of the category ``[]``,
``evaluate.augmentation: off``); no timeout; 2 Dask workers x 1 thread (each training is a
work unit of its own, so two train at once, one per core; each classic feature set is one
unit). Seconds are wall clock; run it with nothing else running (it prints the CPU seconds
other processes used meanwhile). The ``dvc repro`` output goes to ``<workdir>/repro.log``
as it comes.

``--recheck`` (after a full run, same ``--workdir``): determinism. Deletes one
reconstruction experiment of each family (the first with ``train_augment``) from the
database, runs the evaluate stage again (it trains those three from scratch, the rest are
done) and compares the new test scores, learning curves and metrics with the stored ones,
bit for bit. Exit status 1 if any differs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.chaos import BIN, Run, build_project, env  # noqa: E402
from benchmarks.extract_throughput import busy_cpu_seconds, own_cpu_seconds  # noqa: E402
from stages.backbones import PIXEL_SIZES  # noqa: E402
from stages.methods import FAMILIES  # noqa: E402

ROOT = REPO.parent / "shared/data/mvtec_ad"
DB = "results/results.sqlite"
# Per family: fixed hyperparameters and the two latent sizes of the grid.
RECONSTRUCTION: dict[str, tuple[dict[str, Any], list[int]]] = {
    "ConvAutoencoder": ({"depth": 4}, [8, 32]),
    "VAE": ({"depth": 4, "kl_weight": 1.0}, [8, 32]),
    "EncoderAutoencoder": ({"backbone": "efficientnet_lite0", "init": "imagenet",
                            "layer": "stage6", "freeze": True}, [16, 64]),
}  # fmt: skip
CLASSIC_SETS = (  # label, SQL condition on experiments
    ("raw pixels (pixels gray64 flatten)", "backbone = 'pixels' AND representation = 'flatten'"),
    ("efficientnet_lite0 ImageNet avg (stage6, stage8)",
     "backbone = 'efficientnet_lite0' AND representation = 'avg'"),
)  # fmt: skip


def classic_detectors(detectors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """params.yaml's detector entries whose family runs on pooled/flattened features."""
    return [d for d in detectors
            if not FAMILIES[d["family"]].images and not FAMILIES[d["family"]].patch]  # fmt: skip


def params(root: Path, category: str, epochs: int, image_size: int, lrs: list[float]) -> dict:
    """The repo's params.yaml narrowed to one real category, the three extractors and the
    classic + reconstruction grids."""
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
    recon = [
        {"family": family,
         "grid": {"lr": lrs, "latent_channels": latents, "train_augment": [False, True]},
         "fixed": {"image_size": image_size, "epochs": epochs, **fixed}}
        for family, (fixed, latents) in RECONSTRUCTION.items()
    ]  # fmt: skip
    p["evaluate"]["detectors"] = classic_detectors(p["evaluate"]["detectors"]) + recon
    return p


def machine() -> str:
    model = "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                     if line.startswith("Model name"))  # fmt: skip
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def code_version() -> str:
    """The commit whose stages the project copies, and whether they differ from it."""
    git = ["git", "-C", str(REPO)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "stages", "dvc.yaml",
                                "params.yaml"], capture_output=True, text=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    changed = [line[3:] for line in dirty.splitlines()]
    return f"{head}" + (f" + uncommitted {', '.join(changed)}" if changed else "")


def config_label(hyperparams: str) -> str:
    hp = json.loads(hyperparams)
    return (f"lr={hp['lr']:g} latent={hp['latent_channels']} "
            f"aug={'yes' if hp['train_augment'] else 'no'}")  # fmt: skip


def order(hyperparams: str) -> tuple[float, int, bool]:
    hp = json.loads(hyperparams)
    return hp["lr"], hp["latent_channels"], hp["train_augment"]


def fmt(value: Any, width: int, digits: int) -> str:
    return f"{value:>{width}.{digits}f}" if isinstance(value, float) else f"{'-':>{width}}"


def report(project: Path) -> None:
    """The tables (stdout) from the project's results database."""
    with sqlite3.connect(project / DB) as db:
        recon = db.execute(
            "SELECT id, detector, hyperparams, status, auroc, pixel_auroc, aupro, f1_honest, "
            "accuracy_honest, fit_s, score_s, error FROM experiments "
            "WHERE representation = 'image'"
        ).fetchall()
        recon.sort(key=lambda r: (r[1], *order(r[2])))
        last = dict(
            (exp, (train, val))
            for exp, train, val in db.execute(
                "SELECT experiment, train_loss, val_loss FROM epochs e WHERE epoch = "
                "(SELECT MAX(epoch) FROM epochs WHERE experiment = e.experiment)"
            )
        )
        classic = {label: db.execute(
            f"SELECT detector_name, layer, auroc, f1_honest, accuracy_honest, fit_s, score_s "
            f"FROM experiments WHERE status = 'done' AND auroc IS NOT NULL AND {where} "
            "ORDER BY auroc DESC, detector_name LIMIT 1").fetchone()
            for label, where in CLASSIC_SETS}  # fmt: skip
        counts = db.execute(
            "SELECT representation = 'image', status, COUNT(*) FROM experiments GROUP BY 1, 2"
        ).fetchall()
    print("\nReconstruction configs (image AUROC; pixel AUROC and AUPRO on the 224x224 masks; "
          "F1/accuracy at the honest threshold; wall = fit + score):")  # fmt: skip
    print(f"{'family':<19} {'config':<30} {'AUROC':>7} {'pixel':>7} {'AUPRO':>7} "
          f"{'F1 hon':>7} {'acc hon':>7} {'fit s':>7} {'score s':>7} {'wall s':>7} "
          f"{'train':>7} {'val':>7}")  # fmt: skip
    by_family: dict[str, list[tuple[float, str, float]]] = {}
    for exp, family, hp, status, auroc, pixel, aupro, f1, acc, fit, score, error in recon:
        label = config_label(hp)
        wall = fit + score if fit is not None and score is not None else None
        train, val = last.get(exp, (None, None))
        if status != "done":
            print(f"{family:<19} {label:<30} {status}: {(error or '')[:80]}")
            continue
        print(f"{family:<19} {label:<30} {fmt(auroc, 7, 4)} {fmt(pixel, 7, 4)} "
              f"{fmt(aupro, 7, 4)} {fmt(f1, 7, 4)} {fmt(acc, 7, 4)} {fmt(fit, 7, 1)} "
              f"{fmt(score, 7, 1)} {fmt(wall, 7, 1)} {fmt(train, 7, 5)} "
              f"{fmt(val, 7, 5)}")  # fmt: skip
        if auroc is not None:
            by_family.setdefault(family, []).append((auroc, label, wall or 0.0))
    print("\nPer family, image AUROC (best = oracle pick: the config best on the test set):")
    for family, rows in by_family.items():
        best = max(rows)
        print(f"  {family:<19} best {best[0]:.4f} ({best[1]}), "
              f"median {statistics.median(r[0] for r in rows):.4f} over {len(rows)} configs, "
              f"median wall {statistics.median(r[2] for r in rows):.1f} s per experiment")  # fmt: skip
    print("\nBest classic detector per feature set (oracle pick: best image AUROC on the test "
          "set; no anomaly maps, so no pixel metrics):")  # fmt: skip
    for label, row in classic.items():
        if row is None:
            print(f"  {label}: no done experiment")
            continue
        name, layer, auroc, f1, acc, fit, score = row
        print(f"  {label}: {auroc:.4f}  {name} on {layer}; F1 honest {fmt(f1, 0, 4)}, "
              f"accuracy honest {fmt(acc, 0, 4)}, {(fit or 0) + (score or 0):.2f} s "
              "(amortised share of the shared path)")  # fmt: skip
    statuses = ", ".join(f"{'reconstruction' if image else 'classic'} {status} {n}"
                         for image, status, n in counts)  # fmt: skip
    print(f"\nExperiments: {statuses}")


def recheck(project: Path) -> int:
    """Retrain the first experiment of each reconstruction family; compare bit for bit."""
    db_path = project / DB
    cols = "auroc, pixel_auroc, aupro, f1_honest, accuracy_honest, threshold_honest"
    stored: dict[str, dict[str, Any]] = {}
    with sqlite3.connect(db_path) as db:
        db.execute("PRAGMA foreign_keys=ON")
        for family in RECONSTRUCTION:
            rows = db.execute(
                f"SELECT id, key, detector_name, hyperparams, {cols} FROM experiments "
                "WHERE detector = ? AND status = 'done'",
                (family,),
            ).fetchall()
            if not rows:
                print(f"{family}: no done experiment to recheck", file=sys.stderr)
                return 2
            # the first augmented config (augmentation draws are part of what must repeat)
            exp, key, name, _, *metrics = min(rows, key=lambda r: (not order(r[3])[2],
                                                                   order(r[3])))  # fmt: skip
            stored[key] = {
                "name": name, "metrics": metrics,
                "scores": db.execute("SELECT image, score FROM scores WHERE experiment = ? "
                                     "ORDER BY image", (exp,)).fetchall(),
                "curve": db.execute("SELECT epoch, train_loss, val_loss FROM epochs WHERE "
                                    "experiment = ? ORDER BY epoch", (exp,)).fetchall(),
            }  # fmt: skip
            for table, column in (("scores", "experiment"), ("epochs", "experiment"),
                                  ("experiments", "id")):  # fmt: skip
                db.execute(f"DELETE FROM {table} WHERE {column} = ?", (exp,))
    print(f"recheck: retraining {len(stored)} experiments from scratch", flush=True)
    out = subprocess.run([str(BIN / "python"), "-m", "stages.evaluate"], cwd=project,
                         env=env(), capture_output=True, text=True)  # fmt: skip
    (project.parent / "recheck.log").write_text(out.stdout + out.stderr)
    if out.returncode:
        print((out.stdout + out.stderr)[-4000:], file=sys.stderr)
        return out.returncode
    same = True
    with sqlite3.connect(db_path) as db:
        for key, old in stored.items():
            row = db.execute(f"SELECT id, fit_s, {cols} FROM experiments WHERE key = ?",
                             (key,)).fetchone()  # fmt: skip
            exp, fit, *metrics = row
            scores = db.execute("SELECT image, score FROM scores WHERE experiment = ? "
                                "ORDER BY image", (exp,)).fetchall()  # fmt: skip
            curve = db.execute("SELECT epoch, train_loss, val_loss FROM epochs WHERE "
                               "experiment = ? ORDER BY epoch", (exp,)).fetchall()  # fmt: skip
            checks = {"scores": scores == old["scores"], "curve": curve == old["curve"],
                      "metrics": metrics == old["metrics"]}  # fmt: skip
            same &= all(checks.values())
            print(f"  {old['name']}: {len(scores)} scores, {len(curve)} epochs, "
                  f"AUROC {metrics[0]:.6f} (stored {old['metrics'][0]:.6f}); "
                  + ", ".join(f"{k} {'identical' if v else 'DIFFER'}" for k, v in checks.items())
                  + f"; retrained in {fit:.1f} s")  # fmt: skip
    print("recheck: " + ("bitwise identical" if same else "DIFFERENCES"))
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="MVTec AD root folder")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--lrs", type=float, nargs=2, default=[0.001, 0.003])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/reconstruction_bottle"))
    parser.add_argument("--recheck", action="store_true",
                        help="determinism: retrain one config per family of a finished run")  # fmt: skip
    args = parser.parse_args(argv)
    project = args.workdir / "project"
    if args.recheck:
        if not (project / DB).is_file():
            print(f"{project / DB}: no finished run to recheck", file=sys.stderr)
            return 2
        return recheck(project)
    if not (args.root / args.category / "train/good").is_dir():
        print(f"{args.root / args.category}: no MVTec AD category there", file=sys.stderr)
        return 2
    shutil.rmtree(args.workdir, ignore_errors=True)
    p = params(args.root, args.category, args.epochs, args.image_size, args.lrs)
    project = build_project(project, p)
    started = datetime.now().astimezone()
    print(f"{args.category}: {started:%Y-%m-%d %H:%M %Z}; machine: {machine()}; "
          f"{len(p['evaluate']['detectors'])} detector entries, {args.epochs} epochs at "
          f"{args.image_size} px; code {code_version()}", flush=True)  # fmt: skip
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
        print(f"other processes used {other:.0f} CPU s meanwhile (of {total * (os.cpu_count() or 1):.0f} "
              f"on {os.cpu_count()} cores; anything but ~0 slows the seconds above)")  # fmt: skip
    summary = json.loads((project / "results/evaluate_summary.json").read_text())
    print(f"evaluate: {summary}")
    report(project)
    return 0


if __name__ == "__main__":
    sys.exit(main())
