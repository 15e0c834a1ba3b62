"""Offline distillation of EfficientAd's teacher PDN from efficientnet_lite0 features.

Small real runs (12 images of 64 px, 6 steps): determinism, a real SIGKILL mid-run and
its resume, stale checkpoints, and the weights loading into anomalib's EfficientAdModel.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.methods.anomalib_models.teacher import (
    TEACHER_LAYERS,
    DistillConfig,
    distill_teacher,
    teacher_channels,
)
from tests.mvtec_fixtures import REPO, stage_env

CONFIG = DistillConfig(image_size=64, steps=6, batch_size=4, checkpoint_every=2)
LOGGER = "test_anomalib_teacher"

# Runs distill_teacher in a child process that SIGKILLs itself right after the partial
# checkpoint of step 4 (of 6) is in place: a real kill at a known point, no test hook.
KILLED_CHILD = r"""
import json, os, signal, sys
from pathlib import Path
import numpy as np, torch
from stages.methods.anomalib_models.teacher import DistillConfig, distill_teacher

images, out, threads, config = sys.argv[1:]
torch.set_num_threads(int(threads))
replace = os.replace

def replace_then_die(src, dst):
    replace(src, dst)
    if str(dst).endswith(".partial") and torch.load(dst, weights_only=True)["step"] == 4:
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace_then_die
distill_teacher(np.load(images), Path(out), DistillConfig(**json.loads(config)), progress=False)
"""


def make_images(n: int = 12, size: int = 64, seed: int = 0) -> np.ndarray:
    """(n, 3, size, size) float32 in [0, 1]: smooth colour fields plus oriented stripes
    and a little noise, so the lite0 features have structure to regress."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((n, 3, 6, 6), dtype=np.float32))
    fields = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle, freq = rng.uniform(0, np.pi, n), rng.uniform(3, 10, n)
    stripes = np.sin(
        2 * np.pi * freq[:, None, None] * (np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy)
    )  # fmt: skip
    images = 0.6 * fields.numpy() + 0.3 * (stripes[:, None] + 1) / 2
    images += 0.05 * rng.standard_normal(images.shape)
    return np.clip(images, 0, 1).astype(np.float32)


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return make_images()


@pytest.fixture(scope="module")
def reference(images: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted runs: seed 0 twice, seed 1 once."""
    root = tmp_path_factory.mktemp("teacher")
    runs = {}
    for name, seed in (("a", 0), ("again", 0), ("b", 1)):
        config = dataclasses.replace(CONFIG, seed=seed)
        runs[name] = distill_teacher(images, root / name / "teacher.pth", config, progress=False)
    return runs


@pytest.fixture(scope="module")
def killed(images: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output path of a seed-0 run in a child process SIGKILLed right after it
    checkpointed step 4 of 6: its ``.partial`` and ``.targets`` files are left there."""
    root = tmp_path_factory.mktemp("killed")
    out = root / "teacher.pth"
    np.save(root / "images.npy", images)
    args = [str(root / "images.npy"), str(out), str(torch.get_num_threads())]
    result = subprocess.run(
        [sys.executable, "-c", KILLED_CHILD, *args, json.dumps(dataclasses.asdict(CONFIG))],
        cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not out.exists()
    assert load(Path(f"{out}.partial"))["step"] == 4
    return out


def copy_leftovers(killed: Path, out: Path) -> None:
    for suffix in (".partial", ".targets"):
        shutil.copy(f"{killed}{suffix}", f"{out}{suffix}")


def test_same_config_gives_bitwise_same_weights_and_seed_matters(
    reference, images, tmp_path, caplog
):
    a, again, b = (load(reference[name]) for name in ("a", "again", "b"))
    assert_bitwise_equal(a, again)
    assert any(not torch.equal(a[name], b[name]) for name in a)
    assert not list(reference["a"].parent.glob("*.partial")), "partial checkpoint left behind"
    assert sorted(p.name for p in reference["a"].parent.iterdir()) == ["teacher.pth"]

    # the global RNG and thread count are left as they were
    rng, threads = torch.random.get_rng_state(), torch.get_num_threads()
    caplog.set_level(logging.INFO, logger=LOGGER)
    out = distill_teacher(images, tmp_path / "t.pth", CONFIG, log=logging.getLogger(LOGGER))
    assert torch.equal(torch.random.get_rng_state(), rng) and torch.get_num_threads() == threads
    assert_bitwise_equal(load(out), a)

    # an existing output is returned at once
    caplog.clear()
    assert distill_teacher(images, out, CONFIG, log=logging.getLogger(LOGGER)) == out
    assert "already distilled, skipping" in caplog.text


def test_killed_run_resumes_to_bitwise_same_weights(reference, killed, images, tmp_path, caplog):
    out = tmp_path / "teacher.pth"
    copy_leftovers(killed, out)
    caplog.set_level(logging.INFO, logger=LOGGER)
    distill_teacher(images, out, CONFIG, log=logging.getLogger(LOGGER), progress=False)
    assert "resuming teacher distillation from step 4 of 6" in caplog.text
    assert "reusing the lite0 targets" in caplog.text
    assert_bitwise_equal(load(out), load(reference["a"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.pth"]


def test_stale_partial_checkpoint_is_ignored(reference, killed, images, tmp_path, caplog):
    # a real partial checkpoint (and cached targets) of seed 0, left under seed 1's path
    out = tmp_path / "teacher.pth"
    copy_leftovers(killed, out)
    caplog.set_level(logging.INFO, logger=LOGGER)
    seed1 = dataclasses.replace(CONFIG, seed=1)
    distill_teacher(images, out, seed1, log=logging.getLogger(LOGGER), progress=False)
    assert "ignoring partial teacher checkpoint" in caplog.text
    assert "ignoring cached teacher targets" in caplog.text
    assert "resuming" not in caplog.text
    assert_bitwise_equal(load(out), load(reference["b"]))
    assert not Path(f"{out}.partial").exists() and not Path(f"{out}.targets").exists()

    # other images (one fewer) with the same config: stale too; garbage: unreadable
    caplog.clear()
    shutil.copy(f"{killed}.partial", f"{tmp_path / 'fewer.pth'}.partial")
    Path(f"{tmp_path / 'junk.pth'}.partial").write_bytes(b"not a checkpoint")
    distill_teacher(
        images[:-1], tmp_path / "fewer.pth", CONFIG, log=logging.getLogger(LOGGER), progress=False
    )
    distill_teacher(
        images, tmp_path / "junk.pth", CONFIG, log=logging.getLogger(LOGGER), progress=False
    )
    assert "ignoring partial teacher checkpoint" in caplog.text
    assert "ignoring unreadable partial teacher checkpoint" in caplog.text
    assert_bitwise_equal(load(tmp_path / "junk.pth"), load(reference["a"]))


def test_weights_load_strictly_into_anomalib_efficientad(reference, images):
    from anomalib.models.image.efficient_ad.torch_model import EfficientAdModel

    assert teacher_channels() == 152 and TEACHER_LAYERS == ("stage4", "stage6")
    model = EfficientAdModel(
        teacher_out_channels=teacher_channels(), model_size="small", padding=False
    )
    model.teacher.load_state_dict(load(reference["a"]), strict=True)
    with torch.no_grad():
        features = model.teacher(torch.from_numpy(images[:1]))
    assert features.shape == (1, teacher_channels(), 8, 8)
    assert torch.isfinite(features).all()


def test_loss_decreases(images, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    config = dataclasses.replace(CONFIG, steps=30, checkpoint_every=100)
    distill_teacher(
        images, tmp_path / "t.pth", config, log=logging.getLogger(LOGGER), progress=False
    )
    match = re.search(
        r"final loss ([\d.]+) \(mean of the last 10 steps; first step ([\d.]+)\)", caplog.text
    )
    assert match, caplog.text
    final, first = float(match[1]), float(match[2])
    assert final < 0.95 * first, (final, first)  # about 0.91 here


def test_bad_inputs_are_refused(images, tmp_path):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        distill_teacher(images * 2, tmp_path / "t.pth", CONFIG)
    with pytest.raises(ValueError, match="model_size"):
        distill_teacher(images, tmp_path / "t.pth", dataclasses.replace(CONFIG, model_size="large"))
    with pytest.raises(ValueError, match=r"\(n >= 1, 3, H, W\)"):
        distill_teacher(images[:, :1], tmp_path / "t.pth", CONFIG)
    assert not list(tmp_path.iterdir())
