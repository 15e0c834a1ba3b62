"""The few-labels methods (SupervisedCNN, SimCLRProbe): one-line errors at plan time, seeded
training, probabilities with their own 0.5 threshold, no held-out image in any training
batch (through the evaluate stage's own call), and in the stage: rows on the held-out part
only, for every label fraction, and a training killed mid-way that resumes to the same
scores."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.chaos import build_project, chaos_params, env
from stages.backbones import weights_error
from stages.dataset import read_index
from stages.errors import UserError
from stages.evaluate import FeatureSetEntry, Planned, Unit, labelled_row
from stages.few_labels import split
from stages.methods import FAMILIES, DetectorConfig, expand_detectors
from stages.methods.base import Setting, run_setting
from stages.methods.labelled.base import Encoder
from tests.recon_fixtures import repro

FAMILY_NAMES = ("SupervisedCNN", "SimCLRProbe")
TINY = {"backbone": "resnet18", "init": "random", "image_size": 32, "epochs": 2, "batch_size": 4}


def config(family: str, **kwargs: object) -> DetectorConfig:
    return DetectorConfig(family, tuple(sorted(kwargs.items())))


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: with two on a busy 2-core machine a step takes ten times longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("family", "fixed", "expected"),
    [
        ("SupervisedCNN", {"backbone": "pixels"}, r"fixed.backbone: 'pixels' is not a convolutional network"),
        ("SimCLRProbe", {"backbone": "vit_b_16"}, r"fixed.backbone: 'vit_b_16' is not a convolutional network"),
        ("SupervisedCNN", {"backbone": "resnet18", "unfreeze": 5},
         r"fixed.unfreeze: 5 is more than resnet18's 4 blocks \(layer1, layer2, layer3, layer4\)"),
        ("SimCLRProbe", {"backbone": "efficientnet_lite0", "init": "imagenet", "image_size": 16},
         r"fixed.image_size: 16 is smaller than efficientnet_lite0's stride at stage8 \(32 px\)"),
        ("SupervisedCNN", {"init": "none"}, r"fixed.init: unknown init 'none' for resnet50"),
        ("SupervisedCNN", {"batch_size": 1}, r"fixed.batch_size: Input should be greater than or equal to 2"),
        ("SimCLRProbe", {"temperature": 0.0}, r"fixed.temperature: Input should be greater than 0"),
        ("SimCLRProbe", {"label_fraction": 0.0}, r"fixed.label_fraction: Input should be greater than 0"),
        ("SupervisedCNN", {"patience": 2.5}, r"fixed.patience: Input should be a valid integer"),
    ],
)  # fmt: skip
def test_configs_that_cannot_train_are_one_line_errors(family: str, fixed: dict,
                                                       expected: str) -> None:  # fmt: skip
    with pytest.raises(UserError, match=expected) as info:
        expand_detectors([{"family": family, "fixed": fixed}])
    assert "\n" not in str(info.value)


@pytest.mark.skipif(weights_error("resnet50", "imagenet") is None,
                    reason="resnet50 ImageNet weights present")  # fmt: skip
def test_missing_imagenet_weights_are_an_error_naming_the_file() -> None:
    with pytest.raises(UserError, match=r"fixed.init: ImageNet weights for resnet50 not found at "):
        expand_detectors([{"family": "SupervisedCNN", "fixed": {"init": "imagenet"}}])


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 40, 40), dtype=np.float32)


@pytest.mark.parametrize(
    ("family", "extra"),
    [
        ("SupervisedCNN", {"patience": 2, "val_fraction": 0.5}),
        ("SimCLRProbe", {"projection_hidden": 16, "projection_dim": 8, "unfreeze": 1}),
    ],
)  # fmt: skip
def test_training_is_seeded_and_scores_are_probabilities(tmp_path: Path, family: str,
                                                         extra: dict) -> None:  # fmt: skip
    """Same seed: bitwise the same scores and losses (with checkpoints or without); another
    seed: other scores. Probabilities in [0, 1] with the 0.5 threshold, one embedding per
    image; one curve entry per epoch; SupervisedCNN's validation slice (enough images of
    each class) has a loss."""
    X_good, X_lab, X_eval = _images(8, 0), _images(6, 1), _images(5, 2)
    y_lab = np.array([False, True, True, False, True, True])
    cfg = config(family, **{**TINY, **extra})
    FAMILIES[family].validate(cfg)
    runs = []
    for seed, part in ((0, "a"), (0, ""), (1, "c")):
        with run_setting(Setting(scratch=str(tmp_path) if part else "", key=part)):
            runs.append(FAMILIES[family].fit_labelled(X_good, X_lab, y_lab, X_eval, cfg, seed))
    a, b, c = runs
    assert a.error is None, a.error
    assert np.array_equal(a.scores, b.scores) and not np.array_equal(a.scores, c.scores)
    assert [e["train_loss"] for e in a.curve] == [e["train_loss"] for e in b.curve]
    assert a.scores.shape == (5,) and ((a.scores >= 0) & (a.scores <= 1)).all()
    assert a.threshold == 0.5
    assert a.embeddings.shape[0] == 5 and np.array_equal(a.embeddings, b.embeddings)
    assert [e["epoch"] for e in a.curve] == [1, 2]
    has_val = family == "SupervisedCNN"
    assert all((e["val_loss"] is not None) == has_val for e in a.curve)
    # Grad-CAM maps at image_size, bitwise repeatable, each within [0, its probability]
    assert a.maps.shape == (5, TINY["image_size"], TINY["image_size"])
    assert np.array_equal(a.maps, b.maps) and (a.maps >= 0).all()
    assert (a.maps.max(axis=(1, 2)) <= a.scores.astype(np.float32) + 1e-6).all()


def test_the_probe_as_a_linear_layer_gives_the_probes_probabilities() -> None:
    """SimCLRProbe's Grad-CAM differentiates the probe as a torch layer: the same logit
    (float32 against scikit-learn's float64: within 1e-5)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from stages.methods.labelled.simclr_probe import probe_layer

    rng = np.random.default_rng(0)
    Z = rng.normal(size=(40, 6)) * [1, 2, 3, 4, 5, 6] + 3
    y = Z[:, 0] + rng.normal(size=40) > 3
    probe = make_pipeline(StandardScaler(), LogisticRegression()).fit(Z, y)
    with torch.no_grad():
        logit = probe_layer(probe)(torch.from_numpy(Z).float())[:, 0].double().numpy()
    np.testing.assert_allclose(1 / (1 + np.exp(-logit)), probe.predict_proba(Z)[:, 1], atol=1e-5)


def test_without_an_anomalous_label_the_experiment_fails_with_a_reason() -> None:
    cfg = config("SupervisedCNN", **TINY)
    out = FAMILIES["SupervisedCNN"].fit_labelled(_images(4, 0), _images(2, 1),
                                                 np.array([False, False]), _images(2, 2), cfg, 0)  # fmt: skip
    assert out.scores is None and "no anomalous image among the labelled ones" in out.error


# --- the evaluate stage's path: which images train -------------------------------------------
TYPES = ["good"] * 6 + ["crack"] * 5 + ["hole"] * 4
N_GOOD_TRAIN = 6


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_training_batch_never_holds_a_held_out_image(tmp_path: Path, family: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """``stages.evaluate.labelled_row`` (the stage's call) for several label fractions:
    every image the encoder trains on (flips, crops and blur keep an image's one flat
    colour, its identity) is a good training image or a labelled pool image (SimCLR
    pretrains on the good ones only), never a held-out one; the row's test images are the
    held-out part, the same for every fraction."""
    n_test = len(TYPES)
    value = np.arange(1, N_GOOD_TRAIN + n_test + 1, dtype=np.float32) * 5 / 255  # one per image
    flat = np.ones((1, 3, 32, 32), dtype=np.float32)
    X_train = value[:N_GOOD_TRAIN, None, None, None] * flat
    X_test = value[N_GOOD_TRAIN:, None, None, None] * flat
    y = np.array([t != "good" for t in TYPES])
    ids = [f"test/{t}/{i:03d}" for i, t in enumerate(TYPES)]
    per_image = {"image_ids": ids, "defect_types": TYPES, "is_anomaly": y.tolist()}
    seen: list[float] = []
    forward = Encoder.forward

    def recording(self: Encoder, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            seen.extend(float(v) for v in x.mean(dim=(1, 2, 3)))
            assert torch.allclose(x, x.mean(dim=(1, 2, 3), keepdim=True), atol=1e-5)
        return forward(self, x)

    monkeypatch.setattr(Encoder, "forward", recording)
    features = FeatureSetEntry(category="weave", backbone="pixels", init="none", layer="rgb32",
                               representation="image", folder="f", content_hash="h")  # fmt: skip
    unit = Unit(features, (), None, str(tmp_path))
    extra = ({"patience": 0} if family == "SupervisedCNN"
             else {"color_jitter": 0.0, "gray_scale": 0.0, "projection_hidden": 16})  # fmt: skip
    helds = []
    for fraction in (0.2, 0.5, 1.0):
        seen.clear()
        cfg = config(family, **{**TINY, **extra, "label_fraction": fraction})
        meta = {"n_train": N_GOOD_TRAIN, "n_test": n_test, "dim": 3 * 32 * 32}
        row = labelled_row(unit, Planned(f"k{fraction}", False, cfg, 0), X_train, X_test, y,
                           meta, per_image, None, True)  # fmt: skip
        assert row.status == "done", row.error
        part = split(ids, TYPES, fraction)
        helds.append(part.held.tolist())
        assert row.n_test == len(part.held) and list(row.image_ids) == [ids[i] for i in part.held]
        trained = {round(v * 255 / 5) - 1 for v in seen}  # positions in train, then test
        held = {N_GOOD_TRAIN + i for i in part.held}
        labelled = {N_GOOD_TRAIN + i for i in part.labelled}
        good = set(range(N_GOOD_TRAIN))
        assert trained and not trained & held
        assert trained == (good | labelled if family == "SupervisedCNN" else good)
    assert helds[0] == helds[1] == helds[2]


# --- in the stage ------------------------------------------------------------------------------
CATEGORY = "weave"
FRACTIONS = [0.25, 1.0]
# SupervisedCNN trains long enough to be killed mid-training; SimCLRProbe a couple of epochs.
EPOCHS = {"SupervisedCNN": 30, "SimCLRProbe": 2}


def _params() -> dict:
    params = chaos_params((CATEGORY,))
    params["augment"]["transforms"][CATEGORY] = []
    params["synth"].update(n_train=8)
    params["extract"]["extractors"] = [
        {"backbone": "pixels", "init": "none", "layers": ["rgb64"], "representations": ["image"]},
        {"backbone": "pixels", "init": "none", "layers": ["gray16"],
         "representations": ["flatten"]},
    ]  # fmt: skip
    params["evaluate"]["detectors"] = [
        {"family": "KNNDistance", "grid": {"n_neighbors": [1, 2]}},  # the one-class picks
        {"family": "SupervisedCNN", "grid": {"label_fraction": FRACTIONS},
         "fixed": {**TINY, "epochs": EPOCHS["SupervisedCNN"], "patience": 0}},
        {"family": "SimCLRProbe", "grid": {"label_fraction": FRACTIONS},
         "fixed": {**TINY, "epochs": EPOCHS["SimCLRProbe"], "projection_hidden": 32,
                   "projection_dim": 16}},
    ]  # fmt: skip
    params["evaluate"]["engine"]["n_workers"] = 1
    return params


def _results(project: Path) -> dict[str, tuple]:
    """Per experiment: family, hyperparameters, status, n_test, (image id, score) in image
    id order, its epochs' training losses."""
    with sqlite3.connect(project / "results/results.sqlite") as db:
        rows = db.execute("SELECT id, key, detector, hyperparams, status, n_test "
                          "FROM experiments").fetchall()  # fmt: skip
        return {key: (family, hp, status, n_test,
                      db.execute("SELECT i.image_id, s.score FROM scores s JOIN images i ON "
                                 "i.id = s.image WHERE s.experiment = ? ORDER BY i.image_id",
                                 (id_,)).fetchall(),
                      [loss for (loss,) in db.execute("SELECT train_loss FROM epochs WHERE "
                                                      "experiment = ? ORDER BY epoch", (id_,))])
                for id_, key, family, hp, status, n_test in rows}  # fmt: skip


def _test_images(project: Path) -> tuple[list[str], list[str]]:
    """The category's test image ids and defect types, from the dataset stage's index."""
    rows = read_index(project / "cache/dataset/index.parquet").to_pylist()
    test = [r for r in rows if r["category"] == CATEGORY and r["split"] == "test"]
    return [r["image_id"] for r in test], [r["defect_type"] for r in test]


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project whose ``dvc repro`` trained both families for two label fractions
    next to two one-class configs, and wrote the report (run once: the stage and report
    tests' subject and the kill test's reference)."""
    project = build_project(tmp_path_factory.mktemp("labelled") / "project", _params())
    run = repro(project)
    assert run.returncode == 0, run.stderr[-3000:]
    return project


@pytest.mark.slow
def test_the_stage_scores_the_held_out_part_only(staged: Path) -> None:
    """Every row is done, on the held-out images only (the same ones for both fractions),
    with probabilities and its learning curve."""
    results = _results(staged)
    ids, types = _test_images(staged)
    held = sorted(ids[i] for i in split(ids, types, 0.1).held)  # default eval_fraction, seed
    assert 0 < len(held) < len(ids)
    results = {k: v for k, v in results.items() if v[0] in FAMILY_NAMES}
    assert sorted(v[0] for v in results.values()) == sorted(FAMILY_NAMES * len(FRACTIONS))
    for family, hp, status, n_test, scores, losses in results.values():
        assert status == "done", (family, hp)
        assert n_test == len(held) and [i for i, _ in scores] == held, (family, hp)
        assert all(0 <= s <= 1 for _, s in scores)
        assert len(losses) == EPOCHS[family]


@pytest.mark.slow
def test_a_training_killed_mid_way_resumes_to_the_same_scores(tmp_path: Path,
                                                              staged: Path) -> None:  # fmt: skip
    """SIGKILL of the stage (its worker with it) after a few epochs' checkpoints of a
    SupervisedCNN: the rerun says from which epoch it resumes and ends with the scores and
    losses of the uninterrupted run (``staged``), bitwise; the checkpoints are removed."""
    expected = _results(staged)
    project = build_project(tmp_path / "chaos", _params())
    assert repro(project, "extract").returncode == 0
    log = tmp_path / "evaluate.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "stages.evaluate"], cwd=project, env=env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        training = project / "cache/evaluate/training"
        deadline = time.monotonic() + 300
        epoch = 0
        while epoch < 3 and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            for found in training.glob("*/model/epoch.pt"):
                with contextlib.suppress(Exception):  # replaced or removed while read
                    epoch = max(epoch, torch.load(found, weights_only=False)["epoch"])
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 3 <= epoch < EPOCHS["SupervisedCNN"]
    rerun = repro(project, "evaluate")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = [line for line in (rerun.stdout + rerun.stderr).splitlines()
               if "resuming training from epoch" in line]  # fmt: skip
    assert any(f"of {EPOCHS['SupervisedCNN']}" in line for line in resumed), rerun.stderr[-3000:]
    assert _results(project) == expected
    assert not list(training.iterdir())


@pytest.mark.slow
def test_the_report_compares_them_with_the_one_class_pick_on_the_held_out_images(
    staged: Path,
) -> None:
    """The labelled rows are in their own report section (not in the one-class tables),
    next to the one-class pick, with their figures; their Grad-CAM maps give pixel metrics
    and their embeddings are stored."""
    report = (staged / "results/report.md").read_text()
    section = report.split("## With a few labels", 1)[1].split("\n## ", 1)[0]
    assert section.count("| labelled | ") == len(FAMILY_NAMES) * len(FRACTIONS)
    assert section.count("| one-class pick |") == len(FRACTIONS)
    assert "KNNDistance" in section
    table4 = report.split("## Table 4", 1)[1].split("\n## ", 1)[0]
    assert not any(name in table4 for name in FAMILY_NAMES)
    for kind in ("few_labels", "tsne", "gradcam"):
        assert (staged / f"results/figures/{kind}_{CATEGORY}.png").is_file(), kind
    metrics = json.loads((staged / "results/metrics.json").read_text())["few_labels"]
    assert set(metrics[CATEGORY]) == {f"{f:g}" for f in FRACTIONS}
    with sqlite3.connect(staged / "results/results.sqlite") as db:
        rows = db.execute("SELECT key, pixel_auroc FROM experiments WHERE detector IN "
                          "('SupervisedCNN', 'SimCLRProbe')").fetchall()  # fmt: skip
    assert rows and all(pixel is not None for _, pixel in rows)
    for key, _ in rows:
        assert (staged / "results/maps" / key[:2] / f"{key}.embeddings.parquet").is_file()
