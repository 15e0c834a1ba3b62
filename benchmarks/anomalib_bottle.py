"""anomalib's models as rows of the grid, on the real MVTec AD bottle, next to our PatchCore.

``python benchmarks/anomalib_bottle.py [--root ../shared/data/mvtec_ad] [--category bottle]
[--teacher-steps 300] [--max-steps 200] [--workdir DIR]`` builds a DVC project (this repo's
stages) on one MVTec AD category and runs ``dvc repro`` with three detector configs, then
prints their rows from the results database: image AUROC, pixel AUROC, AUPRO, honest F1
and the experiment's seconds (training, scoring), plus the teacher's distillation time.

- ``PatchCore`` (ours) on efficientnet_lite0 ImageNet ``stage4+stage6`` patch features;
- ``Anomalib(model=Patchcore)``: anomalib's PatchCore through its ``Engine`` with the same
  network and layers (passed as ``nn.Module``), on the 224x224 images;
- ``Anomalib(model=EfficientAd)``: small, 256x256, with a teacher distilled from
  efficientnet_lite0 on the category's good training images, ``--max-steps`` training steps
  (the paper trains 70,000 on a GPU: a CPU budget, said so in README).

The whole image is resized to 224x224 (``extract.crop: false``: every mask pixel is
evaluated); no augmentation; one Dask worker with both cores. EfficientAd's penalty images
are the embedded synthetic dataset's good training images (the other MVTec categories are
not on this machine; anomalib would download ImageNette). Seconds are wall clock on this
machine; run it with nothing else running.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.chaos import BIN, build_project, env  # noqa: E402

ROOT = REPO.parent / "shared/data/mvtec_ad"


def params(root: Path, category: str, teacher_steps: int, max_steps: int,
           penalty: Path) -> dict:  # fmt: skip
    """The repo's params.yaml narrowed to one real category and the three configs."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["data"].update(root=str(root.resolve()), categories=[category])
    p["extract"].update(crop=False)
    p["extract"]["extractors"] = [
        {"backbone": "efficientnet_lite0", "init": "imagenet", "layers": ["stage4+stage6"],
         "representations": ["patch"]},
        {"backbone": "pixels", "init": "none", "layers": ["rgb224"], "representations": ["image"]},
    ]  # fmt: skip
    p["evaluate"].update(augmentation="off", timeout_s=None)  # EfficientAd trains for minutes
    p["evaluate"]["engine"].update(n_workers=1, threads_per_worker=2)
    p["evaluate"]["detectors"] = [
        {"family": "PatchCore", "fixed": {"coreset_ratio": 0.01, "n_neighbors": 9}},
        {"family": "Anomalib", "fixed": {
            "model": "Patchcore", "backbone": "efficientnet_lite0", "init": "imagenet",
            "layers": "stage4+stage6", "image_size": 224, "coreset_sampling_ratio": 0.01,
            "num_neighbors": 9}},
        {"family": "Anomalib", "fixed": {
            "model": "EfficientAd", "image_size": 256, "max_steps": max_steps,
            "checkpoint_every": 50, "teacher_steps": teacher_steps, "teacher_image_size": 256,
            "penalty": str(penalty)}},
    ]  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="MVTec AD root folder")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/anomalib_bottle"))
    args = parser.parse_args(argv)
    if not (args.root / args.category / "train/good").is_dir():
        print(f"{args.root / args.category}: no MVTec AD category there", file=sys.stderr)
        return 2
    penalty = args.workdir / "penalty"
    project = args.workdir / "project"
    shutil.rmtree(args.workdir, ignore_errors=True)
    project = build_project(project, params(args.root, args.category, args.teacher_steps,
                                            args.max_steps, penalty))  # fmt: skip
    subprocess.run([str(BIN / "python"), "-m", "stages.synth"], cwd=project, env=env(), check=True)
    for good in sorted((project / "data/synthetic").glob("*/train/good")):
        shutil.copytree(good, penalty / good.parts[-3])
    started = time.perf_counter()
    out = subprocess.run([str(BIN / "dvc"), "repro"], cwd=project, env=env(),
                         capture_output=True, text=True)  # fmt: skip
    total = time.perf_counter() - started
    (args.workdir / "repro.log").write_text(out.stdout + out.stderr)
    if out.returncode:
        print((out.stdout + out.stderr)[-4000:], file=sys.stderr)
        return out.returncode
    distilled = re.search(r"EfficientAd teacher ready in \d+ s", out.stderr)
    with sqlite3.connect(project / "results/results.sqlite") as db:
        rows = db.execute(
            "SELECT detector_name, status, auroc, pixel_auroc, aupro, f1_honest, fit_s, score_s "
            "FROM experiments ORDER BY detector_name"
        ).fetchall()
    print(f"{args.category}: dvc repro {total:.0f} s; machine: see README")
    if distilled:
        print(f"teacher: {distilled.group(0)}")
    print(f"{'detector':<60} {'status':<7} {'AUROC':>7} {'pixel':>7} {'AUPRO':>7} "
          f"{'F1 hon':>7} {'fit s':>8} {'score s':>8}")  # fmt: skip
    for name, status, *values in rows:
        cells = " ".join(f"{v:>7.4f}" if isinstance(v, float) and i < 4 else
                         f"{v:>8.1f}" if isinstance(v, float) else f"{'-':>7}"
                         for i, v in enumerate(values))  # fmt: skip
        print(f"{name[:60]:<60} {status:<7} {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
