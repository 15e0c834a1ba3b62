"""anomalib's models as the ``Anomalib`` family: offline checks at plan time, seeded
training, and a training killed mid-way that resumes to the same scores (the stage)."""

from __future__ import annotations

import inspect
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.chaos import build_project, chaos_params, env
from stages.errors import UserError
from stages.methods import FAMILIES, DetectorConfig, expand_detectors
from stages.methods.anomalib_models import MODELS
from stages.methods.base import Setting, run_setting

FAMILY = FAMILIES["Anomalib"]


def config(**kwargs: object) -> DetectorConfig:
    return DetectorConfig("Anomalib", tuple(sorted(kwargs.items())))


def test_models_keywords_are_anomalibs() -> None:
    """MODELS names only keywords anomalib 2.7's classes take (what a config may set)."""
    import anomalib.models

    for name, spec in MODELS.items():
        params = inspect.signature(getattr(anomalib.models, name).__init__).parameters
        assert set(spec.kwargs) <= set(params), name
        if spec.layers is not None:
            assert {"backbone", spec.layers} <= set(params), name


@pytest.mark.parametrize(
    ("fixed", "expected"),
    [
        ({"model": "WinClip"}, r"model: 'WinClip' is not an anomalib model that runs offline"),
        ({"model": "Patchcore", "backbone": "wide_resnet50_2", "layers": "layer2"},
         r"fixed.backbone: anomalib's Patchcore needs a backbone"),
        ({"model": "Patchcore", "backbone": "resnet18", "layers": "layer9"},
         r"fixed.layers: 'layer9' is not a layer of resnet18"),
        ({"model": "Patchcore", "backbone": "resnet18", "layers": "layer2", "n_features": 5},
         r"fixed.n_features: anomalib's Patchcore takes no keyword 'n_features'"),
        ({"model": "Padim", "backbone": "resnet18", "layers": "layer2"},
         r"detectors\[0\]: anomalib's Padim needs n_features with the project's backbones"),
        ({"model": "EfficientAd", "image_size": 256},
         r"detectors\[0\]: anomalib's EfficientAd trains: set max_steps"),
        ({"model": "EfficientAd", "image_size": 128, "max_steps": 5},
         r"fixed.image_size: anomalib's EfficientAd needs images of at least 256"),
        ({"model": "EfficientAd", "max_steps": 5, "batch_size": 4},
         r"fixed.batch_size: anomalib's EfficientAd trains with batch size 1"),
    ],
)  # fmt: skip
def test_configs_anomalib_cannot_run_are_one_line_errors(fixed: dict, expected: str) -> None:
    with pytest.raises(UserError, match=expected) as info:
        expand_detectors([{"family": "Anomalib", "fixed": fixed}])
    assert "\n" not in str(info.value)


def test_a_teacher_we_cannot_download_is_an_error_naming_the_file(tmp_path: Path,
                                                                   monkeypatch) -> None:  # fmt: skip
    """Before any work: the file to place, and where (anomalib's own teacher or a path)."""
    monkeypatch.setenv("HOME", str(tmp_path))  # anomalib's pre-trained folder: ~/.cache
    setting = Setting(scratch=str(tmp_path))
    missing = tmp_path / "teacher.pth"
    efficient = {"model": "EfficientAd", "max_steps": 5}
    with pytest.raises(UserError, match=rf"EfficientAd teacher: {missing} not found"):
        FAMILY.resolve(config(**efficient, teacher=str(missing)), setting)
    with pytest.raises(UserError, match=r"anomalib's pretrained teacher .*pretrained_teacher_"
                       r"small.pth is not there and cannot be downloaded here"):  # fmt: skip
        FAMILY.resolve(config(**efficient, teacher="anomalib"), setting)


def test_patchcore_is_seeded_and_scores_raw_maps(tmp_path: Path) -> None:
    """Same seed, bitwise the same scores and maps (anomalib's coreset draws from torch);
    maps come at the model's input size, scores are the raw (unnormalised) ones."""
    rng = np.random.default_rng(0)
    X_train = rng.random((10, 3, 64, 64), dtype=np.float32)
    X_test = rng.random((4, 3, 64, 64), dtype=np.float32)
    patchcore = config(model="Patchcore", backbone="resnet18", init="random", layers="layer2",
                       image_size=64, coreset_sampling_ratio=0.5)  # fmt: skip
    runs = []
    for part in ("a", "b"):
        with run_setting(Setting(scratch=str(tmp_path), key=f"k{part}")):
            runs.append(FAMILY.reference_one(X_train, X_test, patchcore, seed=3))
    a, b = runs
    assert a.error is None and b.error is None
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.maps, b.maps)
    assert a.maps.shape == (4, 64, 64)
    assert a.scores.max() > 1.0  # raw distances, not anomalib's [0, 1] normalised scores


@pytest.mark.parametrize(
    ("model", "layers", "extra"),
    [("Padim", "layer1+layer2", {"n_features": 50}), ("Dfm", "layer2", {})],
)
def test_every_backbone_model_trains_and_maps_offline(tmp_path: Path, model: str,
                                                      layers: str, extra: dict) -> None:  # fmt: skip
    """PaDiM and DFM on the project's resnet18 (random init, no download): one finite
    score and one map per test image, at the model's input size."""
    rng = np.random.default_rng(0)
    X_train = rng.random((8, 3, 64, 64), dtype=np.float32)
    X_test = rng.random((3, 3, 64, 64), dtype=np.float32)
    cfg = config(model=model, backbone="resnet18", init="random", layers=layers, image_size=64,
                 **extra)  # fmt: skip
    with run_setting(Setting(scratch=str(tmp_path), key=model)):
        out = FAMILY.reference_one(X_train, X_test, cfg, seed=0)
    assert out.error is None, out.error
    assert out.scores.shape == (3,) and np.isfinite(out.scores).all()
    assert out.maps.shape == (3, 64, 64)


def _random_teacher(path: Path) -> Path:
    from anomalib.models.image.efficient_ad.torch_model import EfficientAdModel

    torch.manual_seed(0)
    torch.save(EfficientAdModel(teacher_out_channels=384, model_size="small").teacher
               .state_dict(), path)  # fmt: skip
    return path


def _project(folder: Path, teacher: Path, penalty: Path) -> Path:
    """One synthetic category, EfficientAd only (a teacher file and a folder of penalty
    images: no distillation), two checkpoints in the middle of its training."""
    params = chaos_params(("weave",))
    params["augment"]["transforms"]["weave"] = []
    params["extract"]["extractors"] = [{"backbone": "pixels", "init": "none",
                                        "layers": ["rgb64"], "representations": ["image"]}]  # fmt: skip
    params["evaluate"]["detectors"] = [{"family": "Anomalib", "fixed": {
        "model": "EfficientAd", "image_size": 256, "max_steps": 6, "checkpoint_every": 2,
        "calibration_images": 2, "teacher": str(teacher), "penalty": str(penalty)}}]  # fmt: skip
    params["evaluate"]["engine"]["n_workers"] = 1
    return build_project(folder / "project", params)


def _penalty(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def _scores(project: Path) -> dict[str, list[float]]:
    """Per done Anomalib experiment: its test images' scores, in image order."""
    with sqlite3.connect(project / "results/results.sqlite") as db:
        rows = db.execute("SELECT id, key, status, f1_honest, pixel_auroc FROM experiments "
                          "WHERE detector = 'Anomalib'").fetchall()  # fmt: skip
        assert rows and all(r[2] == "done" for r in rows), rows
        assert all(r[3] is not None and r[4] is not None for r in rows)  # honest F1, pixel AUROC
        return {key: [s for (s,) in db.execute("SELECT score FROM scores WHERE experiment = ? "
                                               "ORDER BY image", (id_,))]
                for id_, key, *_ in rows}  # fmt: skip


def _repro(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvc", "repro", *args], cwd=project, env=env(),
                          capture_output=True, text=True, timeout=900)  # fmt: skip


def test_a_killed_efficientad_training_resumes_to_the_same_scores(tmp_path: Path) -> None:
    """SIGKILL of the stage (its Dask worker with it) once a checkpoint is on disk: the
    rerun says from which step it resumes, and its scores equal an uninterrupted run's;
    the finished experiment's checkpoints are removed."""
    teacher = _random_teacher(tmp_path / "teacher.pth")
    penalty = _penalty(tmp_path / "penalty")
    reference = _project(tmp_path / "ref", teacher, penalty)
    assert _repro(reference).returncode == 0
    expected = _scores(reference)

    project = _project(tmp_path / "chaos", teacher, penalty)
    assert _repro(project, "extract").returncode == 0
    log = tmp_path / "evaluate.log"
    with open(log, "w") as out:
        run = subprocess.Popen([sys.executable, "-m", "stages.evaluate"], cwd=project, env=env(),
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        training = project / "cache/evaluate/training"
        deadline = time.monotonic() + 600
        while not list(training.glob("*/model/last.ckpt")) and time.monotonic() < deadline:
            assert run.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        step = torch.load(next(training.glob("*/model/last.ckpt")), weights_only=False)
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    assert step["global_step"] < 6
    rerun = _repro(project)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = [line for line in (rerun.stdout + rerun.stderr).splitlines()
               if "resuming training from step" in line]  # fmt: skip
    assert resumed and "of 6" in resumed[0], rerun.stderr[-3000:]
    assert _scores(project) == expected
    assert not list(training.iterdir())
