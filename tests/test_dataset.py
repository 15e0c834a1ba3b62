"""Dataset stage: MVTec layout, validation errors (one line, exit 2, nothing written), stats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from stages.dataset import dataset_stats, scan_dataset, stats_markdown
from stages.errors import UserError
from tests.mvtec_fixtures import SHARED_MVTEC, make_mvtec, run_stage, save_png, write_params


def test_scan_reads_layout_and_ignores_root_files(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    records = scan_dataset(root, ["alpha", "beta"], show_progress=False)
    assert len(records) == 2 * (4 + 2 + 2 * 2)
    ids = {(r.category, r.image_id) for r in records}
    assert ("alpha", "train/good/000") in ids and ("beta", "test/hole/001") in ids
    beta = [r for r in records if r.category == "beta"]
    assert {r.mode for r in beta} == {"L"}
    defect = next(r for r in records if r.image_id == "test/scratch/000")
    assert defect.is_anomaly and defect.mask_path.endswith("ground_truth/scratch/000_mask.png")
    assert defect.mask_coverage == pytest.approx(1 / 8)
    good = next(r for r in records if r.image_id == "test/good/000")
    assert not good.is_anomaly and good.mask_path is None


def test_stats_counts_and_missing_mask_is_reported_not_fatal(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    (root / "alpha" / "ground_truth" / "hole" / "001_mask.png").unlink()
    stats = dataset_stats(scan_dataset(root, ["alpha"], show_progress=False))
    alpha = stats["alpha"]
    assert alpha["defect_types"] == ["hole", "scratch"]
    assert (alpha["train_good"], alpha["test_good"], alpha["test_defect"]) == (4, 2, 4)
    assert alpha["masks"] == 3 and alpha["missing_masks"] == 1
    assert alpha["per_defect_type"]["hole"]["missing_masks"] == ["test/hole/001"]
    assert alpha["sizes"] == {"32x32": 10} and alpha["modes"] == {"RGB": 10}
    assert "| alpha | 4 | 2 | 4 | 2 | 3 | 1 |" in stats_markdown(stats)


def break_dataset(root: Path, case: str) -> Path:
    """Damage a good dataset in one way; returns the path the error must name."""
    cat = root / "alpha"
    png = cat / "train" / "good" / "001.png"
    if case == "missing_root":
        shutil.rmtree(root)
        return root
    if case == "missing_category":
        shutil.rmtree(cat)
        return cat
    if case == "no_train_good":
        shutil.rmtree(cat / "train" / "good")
        return cat / "train" / "good"
    if case == "empty_train_good":
        for p in (cat / "train" / "good").iterdir():
            p.unlink()
        return cat / "train" / "good"
    if case == "corrupt_png":
        png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
        return png
    if case == "truncated_png":
        data = png.read_bytes()
        png.write_bytes(data[: len(data) // 2])
        return png
    if case == "16bit_png":
        save_png(png, (np.arange(32 * 32, dtype=np.uint16) * 60).reshape(32, 32))
        return png
    if case == "rgba_png":
        save_png(png, np.zeros((32, 32, 4), np.uint8), "RGBA")
        return png
    if case == "mask_wrong_size":
        mask = cat / "ground_truth" / "hole" / "000_mask.png"
        save_png(mask, np.zeros((16, 32), np.uint8), "L")
        return mask
    raise AssertionError(case)


BAD_LAYOUTS = {
    "missing_root": "dataset root does not exist",
    "missing_category": "category folder missing",
    "no_train_good": "folder missing",
    "empty_train_good": "no PNG images",
    "corrupt_png": "unreadable image",
    "truncated_png": "unreadable image",
    "16bit_png": "16-bit grayscale",
    "rgba_png": "RGB with alpha",
    "mask_wrong_size": "mask is 32x16, expected 32x32",
}


@pytest.mark.parametrize("case", sorted(BAD_LAYOUTS))
def test_bad_layout_is_one_line_and_names_the_path(tmp_path: Path, case: str) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    named = break_dataset(root, case)
    with pytest.raises(UserError) as err:
        scan_dataset(root, ["alpha"], show_progress=False)
    assert str(named) in str(err.value) and BAD_LAYOUTS[case] in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_error_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    break_dataset(root, "truncated_png")
    write_params(tmp_path / "params.yaml", root, ["alpha", "beta"])
    result = run_stage("dataset", tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "001.png: unreadable image" in lines[-1]
    assert not (tmp_path / "cache").exists() and not (tmp_path / "results").exists()


def test_cli_writes_index_and_stats(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    write_params(tmp_path / "params.yaml", root, ["alpha", "beta"])
    result = run_stage("dataset", tmp_path)
    assert result.returncode == 0, result.stderr
    index = pq.read_table(tmp_path / "cache/dataset/index.parquet")
    assert index.num_rows == 20
    stats = json.loads((tmp_path / "results/dataset/stats.json").read_text())
    assert set(stats) == {"alpha", "beta"}
    assert "| beta |" in (tmp_path / "results/dataset/stats.md").read_text()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"data": {"categries": ["alpha"]}}, "unknown key 'data.categries'"),
        ({"data": {"categories": "alpha"}}, "data.categories"),
        ({"augment": {"transforms": {"alpha": ["rot45"]}}}, "augment.transforms.alpha.0"),
        ({"augment": {"transforms": {}}}, "no entry for category 'alpha'"),
        ({"extrakt": {}}, "unknown key 'extrakt'"),
    ],
)
def test_params_errors_are_one_line(tmp_path: Path, edit: dict, message: str) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    write_params(tmp_path / "params.yaml", root, ["alpha"], **edit)
    result = run_stage("dataset", tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


@pytest.mark.real_data
@pytest.mark.skipif(not (SHARED_MVTEC / "bottle").is_dir(), reason="../shared MVTec bottle absent")
def test_real_bottle_stats() -> None:
    stats = dataset_stats(scan_dataset(SHARED_MVTEC, ["bottle"], show_progress=False))["bottle"]
    assert (stats["train_good"], stats["test_good"], stats["test_defect"]) == (209, 20, 63)
    assert stats["defect_types"] == ["broken_large", "broken_small", "contamination"]
    assert stats["masks"] == 63 and stats["missing_masks"] == 0
    assert stats["sizes"] == {"900x900": 292} and stats["modes"] == {"RGB": 292}


def test_cli_removes_temp_files_a_killed_run_left(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    write_params(tmp_path / "params.yaml", root, ["alpha", "beta"])
    stale = [
        tmp_path / "cache/dataset/.index.parquet.tmp-4242",
        tmp_path / "results/dataset/.stats.json.tmp-4242",
    ]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half written")
    result = run_stage("dataset", tmp_path)
    assert result.returncode == 0, result.stderr
    assert not any(path.exists() for path in stale)
    assert (tmp_path / "cache/dataset/index.parquet").is_file()
