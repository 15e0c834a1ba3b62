"""The synthetic dataset: MVTec layout, determinism, modes, orientation, and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from stages.errors import UserError
from stages.params import SynthParams
from stages.synth import CATEGORIES, generate

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"image_size": 48, "n_train": 4, "n_test_good": 2, "n_test_per_defect": 2}


def _params(out: Path, **overrides: object) -> SynthParams:
    return SynthParams(out=str(out), **{**SMALL, **overrides})


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float32) / 255


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthParams, dict]:
    out = tmp_path_factory.mktemp("synth") / "data"
    params = _params(out)
    return out, params, generate(params, progress=False)


def test_layout_is_mvtec(dataset: tuple[Path, SynthParams, dict]) -> None:
    out, params, counts = dataset
    assert (out / "readme.txt").read_text().startswith("Synthetic")
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(params.categories)
    for category in params.categories:
        defects = CATEGORIES[category].defects
        assert len(defects) >= 3
        root = out / category
        assert sorted(p.name for p in root.iterdir()) == ["ground_truth", "test", "train"]
        assert [p.name for p in (root / "train").iterdir()] == ["good"]
        assert sorted(p.name for p in (root / "test").iterdir()) == sorted(["good", *defects])
        assert sorted(p.name for p in (root / "ground_truth").iterdir()) == sorted(defects)
        train = sorted(p.name for p in (root / "train" / "good").iterdir())
        assert train == [f"{i:03d}.png" for i in range(params.n_train)]
        assert len(list((root / "test" / "good").iterdir())) == params.n_test_good
        assert counts[category]["train"] == {"good": params.n_train}
        assert counts[category]["test"]["good"] == params.n_test_good
        for defect in defects:
            images = sorted((root / "test" / defect).iterdir())
            masks = sorted((root / "ground_truth" / defect).iterdir())
            assert len(images) == params.n_test_per_defect == counts[category]["test"][defect]
            assert [m.name for m in masks] == [f"{p.stem}_mask.png" for p in images]
            for image, mask_path in zip(images, masks, strict=True):
                mask = Image.open(mask_path)
                assert mask.mode == "L"
                assert mask.size == Image.open(image).size == (params.image_size,) * 2
                values = np.unique(np.asarray(mask))
                assert set(values.tolist()) <= {0, 255} and 255 in values


def test_modes(dataset: tuple[Path, SynthParams, dict]) -> None:
    out, params, _ = dataset
    for category in params.categories:
        expected = "L" if category == "weave" else "RGB"
        assert CATEGORIES[category].mode == expected
        for path in (out / category).glob("t*/*/*.png"):
            assert Image.open(path).mode == expected, path


def test_deterministic_and_seeded(tmp_path: Path) -> None:
    one = {"categories": ["weave", "chip"], "n_train": 2, "n_test_good": 1, "n_test_per_defect": 1}
    generate(_params(tmp_path / "a", **one), progress=False)
    generate(_params(tmp_path / "b", **one), progress=False)
    generate(_params(tmp_path / "c", seed=1, **one), progress=False)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    pngs = [name for name in a if name.endswith(".png") and "ground_truth" not in name]
    assert all(a[name] != c[name] for name in pngs)


def test_counts_change_without_reshuffling_and_stale_files_go(tmp_path: Path) -> None:
    out = tmp_path / "data"
    generate(_params(out, categories=["fibre", "disc"], n_train=5), progress=False)
    before = _files(out)
    (out / "fibre" / "test" / "good" / "stray.png").write_bytes(b"x")
    generate(_params(out, categories=["fibre"], n_train=3), progress=False)
    after = _files(out)
    assert not (out / "disc").exists()
    assert not (out / "fibre" / "test" / "good" / "stray.png").exists()
    assert sorted(p.name for p in (out / "fibre" / "train" / "good").iterdir()) == [
        "000.png",
        "001.png",
        "002.png",
    ]
    shared = [name for name in after if name.endswith(".png")]
    assert shared and all(after[name] == before[name] for name in shared)


def test_unknown_category_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"synth\.categories.*weave, fibre, disc, chip"):
        generate(_params(tmp_path, categories=["weave", "screw"]), progress=False)


def _nearest(query: np.ndarray, pool: np.ndarray) -> float:
    return float(np.sqrt(((pool - query) ** 2).reshape(len(pool), -1).mean(axis=1)).min())


def _orientation_ratio(tmp_path: Path, category: str, k: int) -> float:
    """Median distance of rotated goods to their nearest other good, over the same unrotated."""
    out = tmp_path / category
    generate(_params(out, categories=[category], image_size=64, n_train=16), progress=False)
    goods = np.stack([_pixels(p) for p in sorted((out / category / "train" / "good").iterdir())])
    plain, rotated = [], []
    for i in range(len(goods)):
        others = np.delete(goods, i, axis=0)
        plain.append(_nearest(goods[i], others))
        rotated.append(_nearest(np.rot90(goods[i], k, axes=(0, 1)), others))
    return float(np.median(rotated) / np.median(plain))


def test_chip_is_oriented_and_disc_is_not(tmp_path: Path) -> None:
    assert _orientation_ratio(tmp_path, "chip", 2) > 2.0
    assert _orientation_ratio(tmp_path, "disc", 1) < 1.3
    assert "misplaced" in CATEGORIES["chip"].defects


def _write_params(path: Path, out: Path, categories: list[str]) -> Path:
    doc = {
        "data": {"root": str(out), "categories": ["weave"]},
        "synth": {"out": str(out), "categories": categories, **SMALL},
        "augment": {"transforms": {"weave": []}},
    }
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def _cli(params: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stages.synth", "--params", str(params)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_runs(tmp_path: Path) -> None:
    out = tmp_path / "data"
    result = _cli(_write_params(tmp_path / "params.yaml", out, ["weave"]))
    assert result.returncode == 0, result.stderr
    assert len(list((out / "weave" / "train" / "good").iterdir())) == SMALL["n_train"]


def test_cli_unknown_category_exits_2(tmp_path: Path) -> None:
    result = _cli(_write_params(tmp_path / "params.yaml", tmp_path / "data", ["weave", "screw"]))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "synth.categories" in lines[0] and "screw" in lines[0] and "chip" in lines[0]
    assert not (tmp_path / "data").exists()
