"""The reconstruction baselines (ConvAutoencoder, VAE, EncoderAutoencoder): one-line errors
at plan time, seeded training, residual maps, and in the stage a training killed mid-epoch
that resumes from its last checkpoint to the same scores, with its learning curve stored."""

from __future__ import annotations

import contextlib
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
from torchvision.models import ResNet18_Weights

from benchmarks.chaos import env
from stages.anomaly_maps import read_examples
from stages.backbones import expected_weights_file, weights_error
from stages.errors import UserError
from stages.evaluate import Planned, example_images, unit_parts
from stages.methods import FAMILIES, DetectorConfig, expand_detectors
from stages.methods.base import Setting, run_setting
from stages.methods.reconstruction.training import augment
from tests.recon_fixtures import EPOCHS as RECON_EPOCHS
from tests.recon_fixtures import TINY, repro, trained_project


def config(family: str, **kwargs: object) -> DetectorConfig:
    return DetectorConfig(family, tuple(sorted(kwargs.items())))


def _imagenet_resnet18_missing() -> bool:
    return weights_error("resnet18", "imagenet") is not None


@pytest.mark.parametrize(
    ("family", "fixed", "expected"),
    [
        ("ConvAutoencoder", {"image_size": 48, "depth": 5},
         r"fixed.image_size: 48 is not a multiple of 2\*\*depth = 32"),
        ("VAE", {"kl_weight": -1.0}, r"fixed.kl_weight: Input should be greater than or equal to 0"),
        ("ConvAutoencoder", {"loss": "l2"}, r"fixed.loss: Input should be 'mse' or 'ssim\+l1'"),
        ("EncoderAutoencoder", {"backbone": "pixels"}, r"fixed.backbone: 'pixels' is not a network"),
        ("EncoderAutoencoder", {"backbone": "vit_b_16", "init": "random", "layer": "encoder_layer_1"},
         r"fixed.layer: vit_b_16 encoder_layer_1 is not a convolutional feature map"),
        ("EncoderAutoencoder", {"backbone": "resnet18", "init": "random", "layer": "layer9"},
         r"fixed.layer: 'layer9' is not a layer of resnet18"),
    ],
)  # fmt: skip
def test_configs_that_cannot_train_are_one_line_errors(family: str, fixed: dict,
                                                       expected: str) -> None:  # fmt: skip
    with pytest.raises(UserError, match=expected) as info:
        expand_detectors([{"family": family, "fixed": fixed}])
    assert "\n" not in str(info.value)


@pytest.mark.skipif(not _imagenet_resnet18_missing(), reason="resnet18 ImageNet weights present")
def test_missing_imagenet_weights_are_an_error_naming_the_file() -> None:
    """ResNet18 ImageNet weights are not on PyPI: their absence names the file to place."""
    path = expected_weights_file(ResNet18_Weights.IMAGENET1K_V1)
    fixed = {"backbone": "resnet18", "init": "imagenet", "layer": "layer3"}
    with pytest.raises(UserError, match=rf"fixed.init: ImageNet weights for resnet18 not found "
                       rf"at {path}"):  # fmt: skip
        expand_detectors([{"family": "EncoderAutoencoder", "fixed": fixed}])


@pytest.mark.parametrize(
    ("family", "extra"),
    [
        ("ConvAutoencoder", {"loss": "ssim+l1", "score": "max"}),
        ("VAE", {"score_kl": True, "train_augment": True}),
        ("EncoderAutoencoder", {"backbone": "resnet18", "init": "random", "layer": "layer2",
                                "freeze": False, "latent_channels": 8}),
    ],
)  # fmt: skip
def test_training_is_seeded_and_maps_are_residuals(tmp_path: Path, family: str,
                                                   extra: dict) -> None:  # fmt: skip
    """Same seed: bitwise the same scores, maps and losses; another seed: other weights.
    One residual map per query at ``image_size``; one curve entry per epoch, with the
    held-out rows' loss; the mse score is the map's mean."""
    rng = np.random.default_rng(0)
    X_train = rng.random((12, 3, 40, 40), dtype=np.float32)
    X_test = rng.random((5, 3, 40, 40), dtype=np.float32)
    kwargs = {**TINY, **extra}
    if family == "EncoderAutoencoder":
        kwargs = {k: v for k, v in kwargs.items() if k not in ("depth", "latent_channels")}
        kwargs = {**kwargs, **extra}
    cfg = config(family, **kwargs)
    FAMILIES[family].validate(cfg)
    runs = []
    for seed, part in ((0, "a"), (0, "b"), (1, "c")):
        with run_setting(Setting(scratch=str(tmp_path), key=part, held=2)):
            runs.append(FAMILIES[family].reference_one(X_train, X_test, cfg, seed))
    a, b, c = runs
    assert a.error is None, a.error
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.maps, b.maps)
    assert [e["train_loss"] for e in a.curve] == [e["train_loss"] for e in b.curve]
    assert not np.array_equal(a.scores, c.scores)
    assert a.maps.shape == (5, 32, 32) and np.isfinite(a.scores).all()
    assert [e["epoch"] for e in a.curve] == [1, 2]
    assert all(e["val_loss"] is not None for e in a.curve)
    assert a.inputs.shape == a.reconstructions.shape == (5, 3, 32, 32)
    assert a.reconstructions.dtype == np.uint8
    mse = config(
        family, **{**kwargs, "score": "mse", **({"score_kl": False} if family == "VAE" else {})}
    )
    plain = FAMILIES[family].reference_one(X_train, X_test, mse, 0)
    # the same float32 residuals summed in float64 (numpy's pairwise order either way)
    np.testing.assert_allclose(plain.scores, plain.maps.mean(axis=(1, 2), dtype=np.float64),
                               rtol=1e-12)  # fmt: skip


def test_augmentation_flips_exactly_and_keeps_the_batch_shape() -> None:
    """Rotation 0: each image is itself or an exact flip (what ``train_augment`` draws)."""
    x = torch.from_numpy(np.random.default_rng(0).random((16, 3, 8, 8), dtype=np.float32))
    out = augment(x, np.random.default_rng(1), 0.0)
    assert out.shape == x.shape
    for img, got in zip(x, out, strict=True):
        candidates = [img, img.flip(-1), img.flip(-2), img.flip(-1).flip(-2)]
        assert min(float((got - c).abs().max()) for c in candidates) < 1e-5


def test_example_images_are_a_good_one_then_one_per_defect_type() -> None:
    assert example_images(["good", "good", "crack", "crack", "hole", "good"]) == [0, 1, 2, 4]
    assert example_images(["crack", "crack"]) == [0, 1]


# --- in the stage ---------------------------------------------------------------------------
EPOCHS = RECON_EPOCHS["ConvAutoencoder"]


def _results(project: Path) -> dict[str, tuple]:
    """Per experiment: family, status, scores in image order, its epochs' losses."""
    with sqlite3.connect(project / "results/results.sqlite") as db:
        rows = db.execute("SELECT id, key, detector, status, pixel_auroc, f1_honest "
                          "FROM experiments").fetchall()  # fmt: skip
        return {key: (family, status, pixel is not None, f1 is not None,
                      [s for (s,) in db.execute("SELECT score FROM scores WHERE experiment = ? "
                                                "ORDER BY image", (id_,))],
                      db.execute("SELECT epoch, train_loss, val_loss FROM epochs WHERE "
                                 "experiment = ? ORDER BY epoch", (id_,)).fetchall())
                for id_, key, family, status, pixel, f1 in rows}  # fmt: skip


def test_a_training_killed_mid_epoch_resumes_to_the_same_scores(tmp_path: Path,
                                                                trained: Path) -> None:  # fmt: skip
    """SIGKILL of the stage (its worker with it) after a few epochs' checkpoints: the rerun
    says from which epoch it resumes; every experiment is done with pixel metrics, an
    honest F1, its curve and examples; scores and losses equal an uninterrupted run's
    (``trained``); the checkpoints are removed."""
    expected = _results(trained)
    assert sorted(v[0] for v in expected.values()) == sorted(RECON_EPOCHS)
    for family, status, pixel, f1, scores, epochs in expected.values():
        assert status == "done" and pixel and f1 and len(scores) > 0, family
        assert len(epochs) == RECON_EPOCHS[family]
        assert all(val is not None for _, _, val in epochs)
    key = next(k for k, v in expected.items() if v[0] == "ConvAutoencoder")
    ids, inputs, recons = read_examples(trained / "results/maps", key)
    assert len(ids) == 4 and inputs.shape == recons.shape == (4, 3, 64, 64)

    project = trained_project(tmp_path / "chaos")
    assert repro(project, "extract").returncode == 0
    log = tmp_path / "evaluate.log"
    with open(log, "w") as out:
        run = subprocess.Popen([sys.executable, "-m", "stages.evaluate"], cwd=project, env=env(),
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        training = project / "cache/evaluate/training"
        deadline = time.monotonic() + 600
        epoch = 0
        while epoch < 3 and time.monotonic() < deadline:
            assert run.poll() is None, log.read_text()[-3000:]
            found = list(training.glob("*/model/epoch.pt"))
            if found:
                with contextlib.suppress(Exception):  # replaced while read
                    epoch = torch.load(found[0], weights_only=False)["epoch"]
            time.sleep(0.05)
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    assert 3 <= epoch < EPOCHS
    rerun = repro(project)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = [line for line in (rerun.stdout + rerun.stderr).splitlines()
               if "resuming training from epoch" in line]  # fmt: skip
    assert resumed and f"of {EPOCHS}" in resumed[0], rerun.stderr[-3000:]
    assert _results(project) == expected
    assert not list(training.iterdir())


def test_a_reconstruction_family_without_image_features_is_a_params_error(tmp_path: Path) -> None:
    """No image feature set: the evaluate stage names the detectors entry, in one line."""
    project = trained_project(tmp_path, [{"backbone": "pixels", "init": "none",
                                          "layers": ["gray16"], "representations": ["flatten"]}])  # fmt: skip
    run = repro(project)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if "evaluate.detectors[0]" in line]
    assert lines and "ConvAutoencoder" in lines[0] and "representation image" in lines[0], (
        run.stderr[-2000:]
    )
    assert "Traceback" not in run.stderr


def test_each_training_is_a_work_unit_of_its_own() -> None:
    """Trainings spread over the workers (and are recorded one by one); the other
    families of a feature set stay in one unit, which shares its computation."""
    knn = config("KNNDistance", n_neighbors=1)
    exps = [Planned(str(i), False, det, 0) for i, det in
            enumerate([knn, config("VAE", **TINY), config("ConvAutoencoder", **TINY),
                       config("KNNDistance", n_neighbors=2)])]  # fmt: skip
    parts = unit_parts(exps)
    assert [[e.key for e in p] for p in parts] == [["1"], ["2"], ["0", "3"]]
    assert unit_parts(exps[:1]) == [tuple(exps[:1])]
