"""A tiny project whose ``dvc repro`` trains the three reconstruction families (one
synthetic category, the ``image`` feature set of the pixels backbone): built once per test
session (``tests/conftest.py``'s ``trained_project``) for the families' stage tests and the
report's "Trained models" section."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks.chaos import build_project, chaos_params, env

CATEGORY = "weave"
TINY = {"image_size": 32, "depth": 3, "latent_channels": 4, "epochs": 2, "batch_size": 4}
# ConvAutoencoder trains long enough to be killed mid-training (tests/test_reconstruction.py).
EPOCHS = {"ConvAutoencoder": 30, "VAE": 2, "EncoderAutoencoder": 2}


def trained_params(extractors: list[dict] | None = None) -> dict:
    params = chaos_params((CATEGORY,))
    params["augment"]["transforms"][CATEGORY] = []
    params["synth"].update(n_train=12)
    params["extract"]["extractors"] = extractors or [
        {"backbone": "pixels", "init": "none", "layers": ["rgb64"], "representations": ["image"]}
    ]
    params["evaluate"]["detectors"] = [
        {"family": "ConvAutoencoder", "fixed": {**TINY, "epochs": EPOCHS["ConvAutoencoder"],
                                                "image_size": 64}},
        {"family": "VAE", "fixed": {**TINY, "epochs": EPOCHS["VAE"]}},
        {"family": "EncoderAutoencoder", "fixed": {"backbone": "resnet18", "init": "random",
                                                   "layer": "layer2", "image_size": 32,
                                                   "epochs": EPOCHS["EncoderAutoencoder"],
                                                   "batch_size": 4}},
    ]  # fmt: skip
    params["evaluate"]["engine"]["n_workers"] = 1
    return params


def trained_project(folder: Path, extractors: list[dict] | None = None) -> Path:
    """The project (built, not run) in ``folder/project``."""
    return build_project(folder / "project", trained_params(extractors))


def repro(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvc", "repro", *args], cwd=project, env=env(),
                          capture_output=True, text=True, timeout=900)  # fmt: skip
