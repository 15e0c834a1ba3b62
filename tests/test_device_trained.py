"""``evaluate.device`` for the families that train a network: one-line params errors, the
CPU bits unchanged (explicit ``cpu`` = ``auto`` on a machine without CUDA, through the
stage), checkpoints that resume through ``map_location``, the device stored per
experiment, and GPU units placed on the Dask workers that offer the ``GPU`` resource. The
CUDA tests skip without CUDA."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from distributed import get_worker

from stages.device import GPU_RESOURCE
from stages.engine import EngineParams, dask_client, run_units
from stages.errors import UserError
from stages.evaluate import (
    EvaluateParams,
    FeatureSetEntry,
    Planned,
    Unit,
    check_gpu_workers,
    evaluate,
    gpu_workers,
    stage_device,
    unit_device,
    unit_resources,
)
from stages.methods import FAMILIES, DetectorConfig
from stages.methods.base import Setting, run_setting
from stages.params import load_section
from tests.eval_fixtures import REPO

CUDA = torch.cuda.is_available()
no_cuda = pytest.mark.skipif(CUDA, reason="PyTorch sees a CUDA device here")
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")
TINY_AE = {"image_size": 16, "depth": 2, "latent_channels": 4, "epochs": 2, "batch_size": 4}
TINY_CNN = {"backbone": "resnet18", "init": "random", "image_size": 32, "epochs": 2,
            "batch_size": 4, "patience": 0}  # fmt: skip


def config(family: str, **kwargs: object) -> DetectorConfig:
    return DetectorConfig(family, tuple(sorted(kwargs.items())))


def _params_with(tmp_path: Path, **evaluate_keys: object) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    raw["evaluate"].update(evaluate_keys)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


# --- params ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["gpu", "cuda:", "CPU", "cuda:x"])
def test_a_device_that_is_not_one_is_a_one_line_error(tmp_path: Path, device: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(REPO)
    path = _params_with(tmp_path, device=device)
    with pytest.raises(UserError, match=rf"{path}: evaluate.device: String should match") as info:
        load_section(path, "evaluate", EvaluateParams)
    assert "\n" not in str(info.value)


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_stops_the_stage_before_it_writes(tmp_path: Path, device: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Checked right after the params load: nothing else exists here (no features, no
    database), and the error is about the device, in one line."""
    monkeypatch.chdir(tmp_path)
    path = _params_with(tmp_path, device=device)
    with pytest.raises(UserError, match=rf"{path}: evaluate.device: {device} asked, but "
                       "PyTorch sees no CUDA device here") as info:  # fmt: skip
        evaluate(path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "results").exists()


def test_how_the_stage_resolves_the_device() -> None:
    """auto: this machine's view; with a remote scheduler an explicit cuda is the
    workers' (not checked here); only units that train get it."""
    auto = stage_device(EvaluateParams(detectors=[{"family": "KNNDistance"}]))
    assert auto == ("cuda" if CUDA else "cpu")
    remote = EvaluateParams(detectors=[{"family": "KNNDistance"}], device="cuda:1",
                            engine={"address": "tcp://gpu-host:8786"})  # fmt: skip
    assert stage_device(remote) == "cuda:1"
    cpu = EvaluateParams(detectors=[{"family": "KNNDistance"}], device="cpu")
    assert stage_device(cpu) == "cpu"
    knn = Planned("k", False, config("KNNDistance", n_neighbors=1), 0)
    ae = Planned("a", False, config("ConvAutoencoder", **TINY_AE), 0)
    assert unit_device((knn,), "cuda") == "cpu" and unit_device((ae,), "cuda") == "cuda"


# --- the CPU bits and the stored device --------------------------------------------------------


TYPES = ["good"] * 4 + ["crack"] * 4 + ["hole"] * 4


@no_cuda
def test_explicit_cpu_is_bitwise_auto_here_and_the_row_says_where(tmp_path: Path) -> None:
    """On a machine without CUDA, the stage's own call for a labelled experiment
    (``labelled_row``, on a unit whose device ``stage_device`` resolved) with ``device:
    auto`` and ``device: cpu``: bitwise the same scores, maps and learning curve; its row
    stores ``device = cpu`` in ``experiments`` (a family that trains nothing: NULL)."""
    from stages.evaluate import labelled_row
    from stages.results_db import ExperimentRow, open_db, upsert

    rng = np.random.default_rng(0)
    X_train = rng.random((6, 3, 32, 32), dtype=np.float32)
    X_test = rng.random((len(TYPES), 3, 32, 32), dtype=np.float32)
    y = np.array([t != "good" for t in TYPES])
    ids = [f"test/{t}/{i:03d}" for i, t in enumerate(TYPES)]
    per_image = {"image_ids": ids, "defect_types": TYPES, "is_anomaly": y.tolist()}
    cfg = config("SupervisedCNN", **TINY_CNN, label_fraction=1.0)
    rows = {}
    for device in ("auto", "cpu"):
        params = EvaluateParams(detectors=[{"family": "KNNDistance"}], device=device)
        exp = Planned(f"key-{device}", False, cfg, 0)
        unit = _unit("", "KNNDistance", "cpu")
        unit = Unit(unit.features, (exp,), None, str(tmp_path), scratch=str(tmp_path),
                    device=unit_device((exp,), stage_device(params)))  # fmt: skip
        meta = {"n_train": len(X_train), "n_test": len(TYPES), "dim": 3 * 32 * 32}
        rows[device] = labelled_row(unit, exp, X_train, X_test, y, meta, per_image, None, True)
    auto, cpu = rows["auto"], rows["cpu"]
    assert auto.status == cpu.status == "done", (auto.error, cpu.error)
    assert auto.scores == cpu.scores and np.array_equal(auto.grids, cpu.grids)
    assert auto.curve == [{**e, "seconds": a["seconds"]} for e, a in zip(cpu.curve, auto.curve,
                                                                         strict=True)]  # fmt: skip
    assert auto.config["device"] == cpu.config["device"] == "cpu"
    knn = ExperimentRow("knn", {k: v for k, v in cpu.config.items() if k != "device"}, "failed")
    db = open_db(f"sqlite:///{tmp_path / 'results.sqlite'}")
    try:
        upsert(db, [cpu, knn], "test")
    finally:
        db.dispose()
    with sqlite3.connect(tmp_path / "results.sqlite") as con:
        stored = dict(con.execute("SELECT key, device FROM experiments").fetchall())
    assert stored == {"key-cpu": "cpu", "knn": None}


def test_a_checkpoint_resumes_through_map_location(tmp_path: Path) -> None:
    """A training stopped after its first epoch (a config of 1 epoch, its checkpoint
    kept) and resumed to two ends bitwise where an uninterrupted one does; the checkpoint
    holds CPU tensors only (loadable on any device)."""
    rng = np.random.default_rng(0)
    X_train = rng.random((10, 3, 16, 16), dtype=np.float32)
    X_test = rng.random((4, 3, 16, 16), dtype=np.float32)
    family = FAMILIES["ConvAutoencoder"]
    with run_setting(Setting(scratch=str(tmp_path), key="whole", device="cpu")):
        whole = family.reference_one(X_train, X_test, config("ConvAutoencoder", **TINY_AE), 0)
    with run_setting(Setting(scratch=str(tmp_path), key="split", device="cpu")):
        family.reference_one(X_train, X_test, config("ConvAutoencoder", **{**TINY_AE,
                                                                           "epochs": 1}), 0)  # fmt: skip
        checkpoint = tmp_path / "training" / "split" / "model" / "epoch.pt"
        state = torch.load(checkpoint, weights_only=False)  # no map_location: as saved
        resumed = family.reference_one(X_train, X_test, config("ConvAutoencoder", **TINY_AE), 0)
    assert state["epoch"] == 1
    tensors = [*state["model"].values(),
               *(t for s in state["optimizer"]["state"].values() for t in s.values())]  # fmt: skip
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    assert whole.error is None and resumed.error is None
    assert np.array_equal(whole.scores, resumed.scores)
    assert np.array_equal(whole.maps, resumed.maps)
    assert [e["train_loss"] for e in whole.curve] == [e["train_loss"] for e in resumed.curve]


# --- Dask: GPU units on the workers that offer the resource --------------------------------------


def _where(unit: Unit) -> tuple[str, object, float]:
    """Stand-in for ``evaluate_unit`` (a CPU machine cannot run a CUDA unit): where the
    unit ran and that worker's GPU resource."""
    time.sleep(0.3)  # long enough that both workers are busy
    worker = get_worker()
    return unit.device, worker.name, worker.state.total_resources.get(GPU_RESOURCE, 0)


def _unit(key: str, family: str, device: str) -> Unit:
    features = FeatureSetEntry(category="c", backbone="pixels", init="none", layer="rgb8",
                               representation="image", folder="f", content_hash="h")  # fmt: skip
    exps = (Planned(key, False, config(family, **TINY_AE) if family != "KNNDistance"
                    else config(family, n_neighbors=1), 0),)  # fmt: skip
    return Unit(features, exps, None, "", device=unit_device(exps, device))


def test_units_on_cuda_run_only_on_the_gpu_worker(tmp_path: Path) -> None:
    """A local cluster of two workers for units on ``cuda``: the first offers ``GPU=1``
    (one per GPU, at least one), the units that train ask for it and all run there; the
    others run anywhere. Without a GPU worker the stage stops with a one-line error."""
    units = [_unit(f"ae{i}", "ConvAutoencoder", "cuda") for i in range(4)]
    units += [_unit(f"knn{i}", "KNNDistance", "cuda") for i in range(4)]
    assert [unit_resources(u) for u in units] == [{GPU_RESOURCE: 1}] * 4 + [None] * 4
    options = gpu_workers(units, 2)
    gpus = max(1, min(torch.cuda.device_count(), 2))
    assert options == {"resources": {GPU_RESOURCE: 1}, "resource_workers": gpus}
    assert gpu_workers(units[4:], 2) == {}
    ran: list[tuple[str, object, float]] = []
    with dask_client(EngineParams(n_workers=2), **options) as client:
        check_gpu_workers(client, units)
        run_units(client, _where, units, split=lambda u: [u],
                  on_result=lambda u, r: ran.append(r), on_error=lambda u, e: pytest.fail(str(e)),
                  on_crash=lambda u, f: pytest.fail(f), scratch=tmp_path,
                  resources=unit_resources)  # fmt: skip
    assert len(ran) == 8
    on_gpu = {(name, gpu) for device, name, gpu in ran if device == "cuda"}
    assert on_gpu == {(0, 1)} if gpus == 1 else all(g == 1 for _, g in on_gpu)
    with dask_client(EngineParams(n_workers=1)) as client:
        with pytest.raises(UserError, match=r"evaluate.device: cuda asked, but no Dask worker "
                           r"offers the GPU resource: start GPU workers with `dask worker "
                           r"<scheduler> --resources GPU=1`") as info:  # fmt: skip
            check_gpu_workers(client, units)
        check_gpu_workers(client, units[4:])  # CPU units only: nothing asked
    assert "\n" not in str(info.value)


# --- CUDA (skipped without it) ---------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize(("family", "kwargs"), [("ConvAutoencoder", TINY_AE),
                                                ("SupervisedCNN", TINY_CNN)])  # fmt: skip
def test_training_on_cuda_reruns_bitwise(tmp_path: Path, family: str, kwargs: dict) -> None:
    rng = np.random.default_rng(0)
    X_train = rng.random((10, 3, 32, 32), dtype=np.float32)
    X_test = rng.random((6, 3, 32, 32), dtype=np.float32)
    y_lab = np.array([False, True, True, False, True, True])
    runs = []
    for key in ("a", "b"):
        with run_setting(Setting(scratch=str(tmp_path), key=key, device="cuda")):
            if family == "SupervisedCNN":
                runs.append(FAMILIES[family].fit_labelled(X_train, X_test, y_lab, X_test,
                                                          config(family, **kwargs), 0))  # fmt: skip
            else:
                runs.append(FAMILIES[family].reference_one(X_train, X_test,
                                                           config(family, **kwargs), 0))  # fmt: skip
    a, b = runs
    assert a.error is None, a.error
    assert isinstance(a.scores, np.ndarray) and np.array_equal(a.scores, b.scores)
    assert np.array_equal(a.maps, b.maps)


@needs_cuda
def test_a_checkpoint_written_on_cuda_resumes_on_the_cpu(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X_train = rng.random((10, 3, 16, 16), dtype=np.float32)
    X_test = rng.random((4, 3, 16, 16), dtype=np.float32)
    family = FAMILIES["ConvAutoencoder"]
    with run_setting(Setting(scratch=str(tmp_path), key="k", device="cuda")):
        family.reference_one(X_train, X_test, config("ConvAutoencoder", **{**TINY_AE,
                                                                           "epochs": 1}), 0)  # fmt: skip
    state = torch.load(tmp_path / "training/k/model/epoch.pt", weights_only=False)
    assert all(t.device.type == "cpu" for t in state["model"].values())
    with run_setting(Setting(scratch=str(tmp_path), key="k", device="cpu")):
        out = family.reference_one(X_train, X_test, config("ConvAutoencoder", **TINY_AE), 0)
    assert out.error is None, out.error
    assert [e["epoch"] for e in out.curve] == [1, 2] and np.isfinite(out.scores).all()
