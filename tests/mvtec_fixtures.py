"""Tiny datasets in the MVTec AD layout, written as real PNG files for tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_MVTEC = REPO.parent / "shared" / "data" / "mvtec_ad"


def save_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path, format="PNG")
    return path


def make_mvtec(
    root: Path,
    categories: dict[str, str] | None = None,
    n_train: int = 4,
    n_good: int = 2,
    defects: tuple[str, ...] = ("scratch", "hole"),
    n_defect: int = 2,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """Write ``root/<category>/{train,test,ground_truth}`` with random images and masks."""
    categories = categories or {"alpha": "RGB", "beta": "L"}
    rng = np.random.default_rng(seed)
    (root / "readme.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "readme.txt").write_text("tiny test dataset\n")
    (root / "license.txt").write_text("CC0\n")
    for category, mode in categories.items():
        shape = (size, size, 3) if mode == "RGB" else (size, size)

        def image() -> np.ndarray:
            return rng.integers(0, 256, size=shape, dtype=np.uint8)  # noqa: B023

        for i in range(n_train):
            save_png(root / category / "train" / "good" / f"{i:03d}.png", image(), mode)
        for i in range(n_good):
            save_png(root / category / "test" / "good" / f"{i:03d}.png", image(), mode)
        for defect in defects:
            for i in range(n_defect):
                save_png(root / category / "test" / defect / f"{i:03d}.png", image(), mode)
                mask = np.zeros((size, size), dtype=np.uint8)
                mask[: size // 4, : size // 2] = 255
                save_png(root / category / "ground_truth" / defect / f"{i:03d}_mask.png", mask, "L")
    return root


def write_params(path: Path, root: Path | str, categories: list[str], **sections: Any) -> Path:
    """A params.yaml with the required sections; ``sections`` override or add stage sections."""
    params: dict[str, Any] = {
        "data": {
            "root": str(root),
            "categories": categories,
            "stats_dir": "results/dataset",
            "index": "cache/dataset/index.parquet",
        },
        "augment": {"out": "cache/augment", "transforms": {c: [] for c in categories}},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(params.get(key), dict):
            params[key] = {**params[key], **value}
        else:
            params[key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_stage(stage: str, cwd: Path, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run ``python -m stages.<stage>`` as DVC would, from ``cwd``."""
    env = {**_env(), **kwargs.pop("env", {})}
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        **kwargs,
    )


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def stage_env() -> dict[str, str]:
    """Environment for subprocesses: the repo importable, analytics off."""
    return _env()


def error_line(result: subprocess.CompletedProcess) -> str:
    """The stage's one error line; asserts exit 2, no traceback, exactly one ``error:`` line."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the venv's ``dvc`` in a project with the stages importable; asserts success."""
    env = stage_env()
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    env["PYTHONPATH"] = str(project)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result
