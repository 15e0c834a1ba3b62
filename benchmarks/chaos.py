"""Chaos harness: SIGKILL `dvc repro` at N random moments, restart each time, compare.

On the embedded synthetic dataset (a small params set by default), in two DVC projects
built like ``tests/test_pipeline.py`` does:

1. a reference project: one uninterrupted ``dvc repro``, timed per stage from its
   ``Running stage 'x'`` lines;
2. a chaos project: ``dvc repro`` in its own process group, SIGKILLed (the whole group,
   Dask workers included) at N moments spread over all stages (every stage gets a kill
   when N >= 6, the rest go to the longest stages), each at a random 5-90% of the
   stage's reference duration after its ``Running stage`` line (a stage already done
   when its kill comes passes the kill on to the next stage that runs), restarted after
   every kill, then run to completion.

Per kill it prints the stage hit and the work the restart redid: finished work units
(written before the kill) that the restart wrote again, found from the outputs (file
mtimes; the results database's ``updated_at``), and the seconds the restart spent in
that stage. Work units: synth, dataset and report are one unit each (regenerated whole,
seconds); augment one source image (all its transforms); extract one Parquet shard;
evaluate one feature set (all its experiments). Target: at most one unit per stage.

Finally it checks against the reference: the same experiment keys, statuses and AUROCs
(exact), no duplicate rows, no ``*.tmp-*`` file under cache/ data/ results/, no orphan
process, ``dvc status`` up to date. Exit status 1 if any check fails.

    .venv/bin/python benchmarks/chaos.py --kills 20 --seed 0 [--workdir DIR] [--params FILE]
        [--anomalib] [--trained]

``--anomalib`` adds an anomalib EfficientAd unit to the small params set: a kill in its
training resumes from the last checkpoint (its restart says from which step). ``--trained``
adds a ConvAutoencoder and a SupervisedCNN unit (few labels), checkpointed every epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.dvc_locks import repair_rwlock  # noqa: E402

BIN = Path(sys.executable).parent
STAGES = ("synth", "dataset", "augment", "extract", "evaluate", "report")
RUNNING = re.compile(r"Running stage '(\w+)'")
DB = "results/results.sqlite"
SKIPPED = re.compile(
    r"already done|up to date, skipped|: skip |removed \d+ (unfinished )?temp"
    r"|resuming training from (step|epoch)|already distilled|already trained"
)


def chaos_params(
    categories: tuple[str, ...] = ("weave", "chip"),
    anomalib: bool = False,
    trained: bool = False,
) -> dict[str, Any]:
    """params.yaml shrunk so a full run takes about a minute, with several shards per unit.

    ``anomalib``: also an anomalib unit, EfficientAd on the images (a teacher distilled in
    a few steps, a few training steps with a checkpoint every step): several minutes more,
    and a kill in the evaluate stage can land in the middle of its training."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    cats = list(categories)
    params["synth"].update(image_size=48, n_train=6, n_test_good=3, n_test_per_defect=2)
    params["synth"]["categories"] = cats
    params["data"]["categories"] = cats
    params["extract"].update(shard_rows=8, batch_size=8)
    params["extract"]["extractors"] = [
        {
            "backbone": "resnet18",
            "init": "random",
            "layers": ["layer3", "layer4"],
            "representations": ["avg"],
        },
        {
            "backbone": "resnet18",
            "init": "random",
            "layers": ["layer2+layer3"],
            "representations": ["patch"],
        },
    ]
    params["evaluate"]["detectors"] = [
        {
            "family": "LocalOutlierFactor",
            "grid": {"n_neighbors": [2, 4]},
            "fixed": {"novelty": True},
        },
        {"family": "KernelDensity", "grid": {"bandwidth": [1.0], "kernel": ["gaussian"]}},
        {"family": "IsolationForest", "grid": {"n_estimators": [10, 20]}},
        {"family": "PatchCore", "grid": {"coreset_ratio": [0.1, 1.0]}},
    ]
    params["evaluate"]["engine"]["n_workers"] = 1
    if anomalib or trained:
        params["extract"]["extractors"].append(
            {
                "backbone": "pixels",
                "init": "none",
                "layers": ["rgb64"],
                "representations": ["image"],
            }
        )
    if trained:  # a reconstruction family and a few-labels one, checkpointed every epoch
        params["evaluate"]["detectors"] += [
            {"family": "ConvAutoencoder", "fixed": {"image_size": 32, "depth": 3,
                                                    "latent_channels": 4, "epochs": 20,
                                                    "batch_size": 4}},
            {"family": "SupervisedCNN", "fixed": {"backbone": "resnet18", "init": "random",
                                                  "image_size": 32, "epochs": 15,
                                                  "batch_size": 4, "patience": 0,
                                                  "label_fraction": 0.5}},
        ]  # fmt: skip
    if anomalib:
        params["evaluate"]["detectors"].append({"family": "Anomalib", "fixed": {
            "model": "EfficientAd", "image_size": 256, "max_steps": 6, "checkpoint_every": 1,
            "calibration_images": 2, "teacher_steps": 4, "teacher_image_size": 64}})  # fmt: skip
    return params


def env() -> dict[str, str]:
    """Stage commands run ``python -m stages.X``: the venv's bin first on PATH."""
    out = dict(os.environ)
    out["PATH"] = str(BIN) + os.pathsep + out.get("PATH", "")
    out["DVC_NO_ANALYTICS"] = "1"
    out["PYTHONUNBUFFERED"] = "1"
    out.pop("PYTHONPATH", None)  # stages are imported from the project itself (cwd)
    return out


def build_project(folder: Path, params: dict[str, Any]) -> Path:
    """A git + DVC project in ``folder`` with this repo's stages, dvc.yaml and ``params``."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shutil.copytree(
        REPO / "stages", folder / "stages", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / "dvc.yaml", folder / "dvc.yaml")
    shutil.copy(REPO / ".gitignore", folder / ".gitignore")
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    for args in (["init", "-q"], ["config", "core.analytics", "false"]):
        subprocess.run([str(BIN / "dvc"), *args], cwd=folder, env=env(), check=True)
    return folder


@dataclass
class Run:
    """One ``dvc repro`` in its own process group, its output lines timed as they arrive."""

    proc: subprocess.Popen[str]
    started: float
    lines: list[tuple[float, str]] = field(default_factory=list)
    reader: threading.Thread | None = None
    ended: float | None = None  # seconds since start when it exited or was killed

    @classmethod
    def start(cls, project: Path) -> Run:
        # what README's "Resuming" tells a user (and `make demo` does) after a kill: DVC's
        # own rwlock file, cut short by a kill while DVC wrote it, is removed first
        repaired = repair_rwlock(project)
        if repaired:
            print(f"  restart: {repaired}", flush=True)
        proc = subprocess.Popen(
            [str(BIN / "dvc"), "repro"],
            cwd=project,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: killpg reaches every child
        )
        run = cls(proc, time.monotonic())
        run.reader = threading.Thread(target=run._read, daemon=True)
        run.reader.start()
        return run

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.started, line.rstrip("\n")))

    def stage_starts(self) -> list[tuple[str, float]]:
        return [(m[1], t) for t, line in list(self.lines) if (m := RUNNING.search(line))]

    def current_stage(self) -> str | None:
        starts = self.stage_starts()
        return starts[-1][0] if starts else None

    def wait_for_stage(self, target: str) -> tuple[str, float] | None:
        """The first stage at or after ``target`` to start, and when; None if none did."""
        while True:
            for name, t in self.stage_starts():
                if STAGES.index(name) >= STAGES.index(target):
                    return name, t
            if self.proc.poll() is not None:
                self.finish()
                return None
            time.sleep(0.02)

    def kill(self) -> float:
        """SIGKILL the whole process group; returns seconds since start."""
        at = self.ended = time.monotonic() - self.started
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.finish()
        return at

    def finish(self, timeout: float | None = None) -> int:
        code = self.proc.wait(timeout=timeout)
        if self.ended is None:
            self.ended = time.monotonic() - self.started
        if self.reader is not None:
            self.reader.join(timeout=10)
        return code

    def durations(self) -> dict[str, float]:
        """Seconds per stage that ran: from its start line to the next one (or the end)."""
        starts = self.stage_starts()
        end = self.ended if self.ended is not None else time.monotonic() - self.started
        return {
            name: (starts[i + 1][1] if i + 1 < len(starts) else end) - t
            for i, (name, t) in enumerate(starts)
        }

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def orphans(project: Path) -> list[psutil.Process]:
    """Live processes working in ``project`` (cwd or command line), except this one."""
    found = []
    root = str(project.resolve())
    for proc in psutil.process_iter(["pid", "cwd", "cmdline"]):
        if proc.pid == os.getpid():
            continue
        try:
            cwd = proc.info["cwd"] or ""
            cmd = " ".join(proc.info["cmdline"] or [])
            if (cwd == root or cwd.startswith(root + os.sep) or root in cmd) and (
                proc.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def reap_orphans(project: Path) -> list[str]:
    """Kill the orphan processes of ``project`` (there should be none); describe them."""
    time.sleep(0.2)  # let the kernel deliver the group's SIGKILL
    described = []
    for proc in orphans(project):
        try:
            described.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    return described


def unit_of(rel: str) -> tuple[str, str] | None:
    """(stage, work unit) that wrote the output file ``rel``; None for bookkeeping files."""
    parts = rel.split("/")
    if parts[:2] == ["data", "synthetic"]:
        return "synth", "dataset"
    if parts[:2] in (["cache", "dataset"], ["results", "dataset"]):
        return "dataset", "index"
    if parts[:2] == ["cache", "augment"] and rel.endswith(".png") and len(parts) == 5:
        return "augment", f"{parts[2]}/{Path(parts[4]).stem}"  # category/source image
    if parts[:2] == ["cache", "features"] and parts[-1].startswith("part-"):
        return "extract", rel
    report = ("report.md", "experiments.csv", "metrics.json")
    if parts[0] == "results" and (parts[1] in report or parts[1] in ("figures", "plots")):
        return "report", "report"
    return None


def snapshot(project: Path) -> dict[str, Any]:
    """Finished outputs: file mtimes (temp files excluded) and the done experiments."""
    files = {}
    for top in ("data", "cache", "results"):
        for path in (project / top).rglob("*"):
            if path.is_file() and ".tmp-" not in path.name:
                files[path.relative_to(project).as_posix()] = path.stat().st_mtime_ns
    rows = {}
    if (project / DB).exists():
        with sqlite3.connect(project / DB) as db:
            for key, unit, updated, attempts in db.execute(
                "SELECT key, category || ' ' || backbone || '-' || init || ' ' || layer || ' ' ||"
                " representation, updated_at, attempts FROM experiments WHERE status = 'done'"
            ):
                rows[key] = (unit, updated, attempts)
    return {"files": files, "rows": rows}


def redone(before: dict[str, Any], after: dict[str, Any]) -> dict[str, set[str]]:
    """Work units finished before a restart that the restart wrote again, per stage."""
    out: dict[str, set[str]] = {s: set() for s in STAGES}
    for rel, mtime in before["files"].items():
        if rel in after["files"] and after["files"][rel] != mtime and (unit := unit_of(rel)):
            out[unit[0]].add(unit[1])
    for key, (unit, updated, attempts) in before["rows"].items():
        if key in after["rows"] and after["rows"][key][1:] != (updated, attempts):
            out["evaluate"].add(unit)
    return out


def experiments(project: Path) -> tuple[dict[str, tuple[str, float | None]], int, int]:
    """{key: (status, auroc)}, duplicate keys, duplicate (experiment, image) scores."""
    with sqlite3.connect(project / DB) as db:
        rows = {k: (s, a) for k, s, a in db.execute("SELECT key, status, auroc FROM experiments")}
        dup_keys = db.execute(
            "SELECT COUNT(*) FROM (SELECT key FROM experiments GROUP BY key HAVING COUNT(*) > 1)"
        ).fetchone()[0]
        dup_scores = db.execute(
            "SELECT COUNT(*) FROM (SELECT 1 FROM scores GROUP BY experiment, image "
            "HAVING COUNT(*) > 1)"
        ).fetchone()[0]
    return rows, dup_keys, dup_scores


def plan_kills(durations: dict[str, float], n: int, rng: random.Random) -> list[tuple[str, float]]:
    """(stage, fraction of its reference duration) for ``n`` kills, in pipeline order.

    Every stage gets one kill when n >= 6 and the rest go by stage length; with fewer, the
    stages are evenly spaced. A stage already done when its kill comes (a restart resumes
    faster than a fresh run) passes its kill on to the next stage that runs.
    """
    stages = [s for s in STAGES if s in durations]
    by_length = sorted(stages, key=lambda s: -durations[s])
    if n < len(stages):  # evenly spaced: the first stage, the last, and between
        picks = [by_length[0]] if n == 1 else [
            stages[int(i * (len(stages) - 1) / (n - 1) + 0.5)] for i in range(n)
        ]  # fmt: skip
        counts = {s: picks.count(s) for s in picks}
    else:
        counts = dict.fromkeys(stages, 1)
        total = sum(durations.values())
        extra = n - len(stages)
        shares = {s: extra * durations[s] / total for s in stages}
        for s in stages:
            counts[s] += int(shares[s])
        for s in sorted(stages, key=lambda s: -(shares[s] % 1))[: n - sum(counts.values())]:
            counts[s] += 1
    return [
        (s, fraction)
        for s in stages
        for fraction in sorted(rng.uniform(0.05, 0.9) for _ in range(counts.get(s, 0)))
    ]


def temp_files(project: Path) -> list[str]:
    return [
        p.relative_to(project).as_posix()
        for top in ("cache", "data", "results")
        for p in (project / top).rglob("*.tmp-*")
    ]


def dvc_status(project: Path) -> str:
    result = subprocess.run(
        [str(BIN / "dvc"), "status"], cwd=project, env=env(), capture_output=True, text=True
    )
    return result.stdout + result.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--workdir", type=Path, help="where the two projects go (default: tmp)")
    parser.add_argument("--params", type=Path, help="params.yaml to run (default: a small set)")
    parser.add_argument("--anomalib", action="store_true",
                        help="add an anomalib unit (EfficientAd) to the small set")  # fmt: skip
    parser.add_argument("--trained", action="store_true",
                        help="add ConvAutoencoder and SupervisedCNN units (epoch checkpoints)")  # fmt: skip
    args = parser.parse_args(argv)
    params = (yaml.safe_load(args.params.read_text()) if args.params
              else chaos_params(anomalib=args.anomalib, trained=args.trained))  # fmt: skip
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)

    print(f"reference run in {workdir / 'reference'}", flush=True)
    reference = build_project(workdir / "reference", params)
    run = Run.start(reference)
    if run.finish() != 0:
        print(run.text())
        print("FAIL: the reference run failed")
        return 1
    durations = run.durations()
    print("reference stage seconds: " + ", ".join(f"{s} {t:.1f}" for s, t in durations.items()))
    plan = plan_kills(durations, args.kills, rng)

    project = build_project(workdir / "chaos", params)
    print(f"chaos run in {project}: {len(plan)} kills", flush=True)
    kills: list[dict[str, Any]] = []
    failures: list[str] = []
    previous: dict[str, Any] | None = None  # the last kill, waiting for its restart's numbers
    chaos_started = time.monotonic()

    def settle(restart: Run, after: dict[str, Any]) -> None:
        """Fill in the previous kill's redone work from its restart ``restart``."""
        if previous is None:
            return
        units = redone(previous["snapshot"], after)
        stage = previous["stage"]
        previous["units"] = {s: len(u) for s, u in units.items() if u}
        previous["redone"] = len(units.get(stage, ())) if stage else 0
        seconds = restart.durations().get(stage) if stage else None
        previous["seconds"] = seconds
        # The restart was killed too, before the stage finished.
        previous["partial"] = restart.proc.returncode != 0 and restart.current_stage() == stage
        evidence = [line for _, line in restart.lines if stage and SKIPPED.search(line)]
        previous["evidence"] = evidence[0][:90] if evidence else ""
        for s, u in units.items():
            if len(u) > 1:
                failures.append(f"kill {previous['n']}: {len(u)} {s} units redone: {sorted(u)[:3]}")

    for n, (target, fraction) in enumerate(plan, 1):
        run = Run.start(project)
        begun = run.wait_for_stage(target)  # a later stage if the target is already done
        if begun is not None:
            moment = begun[1] + fraction * durations[begun[0]]
            while time.monotonic() - run.started < moment and run.proc.poll() is None:
                time.sleep(0.01)
        finished = run.proc.poll() is not None
        at = 0.0 if finished and run.finish() is not None else run.kill()
        stage = run.current_stage()
        settle(run, after := snapshot(project))
        stray = reap_orphans(project)
        if stray:
            failures.append(f"kill {n}: orphan processes after killpg: {stray}")
        if finished:  # nothing left to kill: the pipeline completed before the moment
            print(f"kill {n}: the pipeline finished before the moment; no kill left", flush=True)
            previous = None
            break
        previous = {
            "n": n,
            "target": target,
            "stage": stage,
            "at": time.monotonic() - chaos_started,
            "in_run": at,
            "snapshot": after,
            "orphans": len(stray),
        }
        kills.append(previous)
        print(f"kill {n}: {at:6.1f} s into the run, stage {stage} (aimed at {target})", flush=True)

    final = Run.start(project)
    code = final.finish()
    settle(final, snapshot(project))
    if code != 0:
        failures.append(f"final dvc repro exited {code}:\n{final.text()[-3000:]}")

    print()
    print("| kill | at s | stage hit | units redone (stage hit) | redone elsewhere | "
          "restart s in stage (ref s) | orphans |")  # fmt: skip
    print("|---:|---:|---|---:|---|---|---:|")
    evidence = []
    for k in kills:
        elsewhere = ", ".join(f"{s} {c}" for s, c in k["units"].items() if s != k["stage"]) or "-"
        sec = k.get("seconds")
        ref = durations.get(k["stage"] or "", 0.0)
        sec_text = "-" if sec is None else f"{sec:.1f}{'+' if k['partial'] else ''} ({ref:.1f})"
        print(f"| {k['n']} | {k['at']:.1f} | {k['stage']} | {k['redone']} | {elsewhere} | "
              f"{sec_text} | {k['orphans']} |")  # fmt: skip
        if k.get("evidence"):
            evidence.append(f"  kill {k['n']} restart: {k['evidence']}")
    print("(+: the restart was itself killed before the stage finished)")
    if evidence:
        print("what the restarts said they skipped (first line each):")
        print("\n".join(evidence))
    print()

    if code == 0:
        ref_rows, _, _ = experiments(reference)
        rows, dup_keys, dup_scores = experiments(project)
        if set(rows) != set(ref_rows):
            failures.append(
                f"experiment keys differ: {len(set(rows) - set(ref_rows))} extra, "
                f"{len(set(ref_rows) - set(rows))} missing"
            )
        differ = [k for k in ref_rows if k in rows and rows[k] != ref_rows[k]]
        if differ:
            failures.append(f"{len(differ)} experiments differ in status/AUROC, e.g. {differ[0]}")
        if dup_keys or dup_scores:
            failures.append(f"duplicates: {dup_keys} keys, {dup_scores} (experiment, image) scores")
        temps = temp_files(project)
        if temps:
            failures.append(f"{len(temps)} orphaned temp files, e.g. {temps[:3]}")
        status = dvc_status(project)
        if "Data and pipelines are up to date" not in status:
            failures.append(f"dvc status not clean: {status.strip()[:500]}")
        stray = reap_orphans(project)
        if stray:
            failures.append(f"orphan processes at the end: {stray}")
        print(f"experiments: {len(rows)} (reference {len(ref_rows)}), identical AUROCs: "
              f"{not differ}, duplicates: {dup_keys + dup_scores}, temp files: {len(temps)}, "
              f"dvc status clean: {'up to date' in status}")  # fmt: skip
    print(f"{len(kills)} kills, chaos wall time {time.monotonic() - chaos_started:.0f} s")
    for failure in failures:
        print(f"FAIL: {failure}")
    print("OK" if not failures else f"{len(failures)} checks failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
