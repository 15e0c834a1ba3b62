"""The dataset scanner on bad input, end to end through ``python -m stages.dataset``: what is an
image (hidden files, `good` up to case, one image id per file, non-PNG files, broken links,
the pixel budget), masks validated as masks, and DVC seeing every change of the data even
when category folders are links into another disk (issue 14, items 1, 2 and 7)."""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from tests.mvtec_fixtures import (
    dvc,
    error_line,
    make_mvtec,
    run_stage,
    save_png,
    write_params,
)

INDEX = "cache/dataset/index.parquet"
STATS = "results/dataset/stats.json"


def run_dataset(tmp_path: Path, root: Path, **data: object) -> subprocess.CompletedProcess:
    write_params(tmp_path / "params.yaml", root, ["alpha", "beta"], data=data)
    return run_stage("dataset", tmp_path)


def nothing_written(tmp_path: Path) -> bool:
    return not (tmp_path / "cache").exists() and not (tmp_path / "results").exists()


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def image_ids(tmp_path: Path, category: str = "alpha") -> set[str]:
    rows = pq.read_table(tmp_path / INDEX).to_pylist()
    return {r["image_id"] for r in rows if r["category"] == category}


def stats(tmp_path: Path, category: str = "alpha") -> dict:
    return json.loads((tmp_path / STATS).read_text())[category]


def png(path: Path, value: int = 0, size: int = 32, mode: str = "RGB") -> Path:
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    return save_png(path, np.full(shape, value, np.uint8), mode)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says ``width`` x ``height`` (no pixel data): a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    iend = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk + iend)
    return path


# --- 1. what is an image ----------------------------------------------------------------


def test_hidden_files_and_folders_are_skipped_and_counted(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    cat = root / "alpha"
    hidden = [
        cat / "test" / ".ipynb_checkpoints",  # Jupyter: would become a defect type
        cat / "test" / "__MACOSX",
        cat / "__MACOSX",
        cat / "train" / "good" / ".DS_Store",
        cat / "train" / "good" / "._000.png",  # AppleDouble: a PNG name, not a PNG
        cat / "train" / "good" / "Thumbs.db",
        cat / "train" / "good" / "desktop.ini",
        cat / "ground_truth" / "hole" / ".000_mask.png",
        cat / "ground_truth" / ".ipynb_checkpoints",
    ]
    png(cat / "test" / ".ipynb_checkpoints" / "000.png")
    png(cat / "test" / "__MACOSX" / "000.png")
    (cat / "__MACOSX").mkdir()
    (cat / "ground_truth" / ".ipynb_checkpoints").mkdir()
    for path in hidden[3:-1]:
        path.write_bytes(b"\x00junk")

    result = ok(run_dataset(tmp_path, root))
    ids = image_ids(tmp_path)
    assert len(ids) == 10 and not any("ipynb" in i or "MACOSX" in i for i in ids), ids
    s = stats(tmp_path)
    assert s["defect_types"] == ["hole", "scratch"] and s["test_defect"] == 4
    assert s["hidden"] == sorted(p.relative_to(root).as_posix() for p in hidden)
    assert f"skipped {len(hidden)} hidden files/folders" in result.stderr
    assert "alpha/test/.ipynb_checkpoints" in (tmp_path / "results/dataset/stats.md").read_text()


@pytest.mark.parametrize("name", ["Good", "GOOD", "good "])
def test_good_folder_up_to_case_is_an_error_then_fixed(tmp_path: Path, name: str) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    test = root / "alpha" / "test"
    (test / "good").rename(test / name)
    line = error_line(run_dataset(tmp_path, root))
    assert f"{test / name}: defect-type folder named '{name}'" in line, line
    assert "rename it to good" in line and nothing_written(tmp_path)

    (test / name).rename(test / "good")
    ok(run_dataset(tmp_path, root))
    assert stats(tmp_path)["test_good"] == 2


def test_good_beside_good_up_to_case_is_an_error(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    png(root / "alpha" / "test" / "Good" / "007.png")
    line = error_line(run_dataset(tmp_path, root))
    assert str(root / "alpha" / "test" / "Good") in line and nothing_written(tmp_path)


def test_defect_folders_differing_only_in_case_are_an_error(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    png(root / "alpha" / "test" / "Hole" / "007.png")
    line = error_line(run_dataset(tmp_path, root))
    assert str(root / "alpha" / "test" / "Hole") in line and str(root / "alpha/test/hole") in line
    assert "differ only in case" in line and nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("folder", "first", "second"),
    [
        ("train/good", "000.png", "000.PNG"),
        ("train/good", "001.png", "001.jpg"),
        ("train/good", "002.Png", "002.png"),  # both kept by the old scanner: one id
        ("test/scratch", "001.png", "001.jpeg"),
        ("test/good", "Abc.png", "abc.png"),  # ids differ only in case
    ],
)
def test_two_files_for_one_image_id_are_an_error_naming_both(
    tmp_path: Path, folder: str, first: str, second: str
) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    where = root / "alpha" / folder
    a, b = where / first, where / second
    if not a.exists():
        png(a, 10)
    if b.suffix.lower() == ".png":
        png(b, 20)
    else:
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(b, format="JPEG")
    line = error_line(run_dataset(tmp_path, root))
    assert str(a) in line and str(b) in line and "two files for one image id" in line, line
    assert nothing_written(tmp_path)

    b.unlink()  # the user keeps one
    ok(run_dataset(tmp_path, root))


def test_two_masks_for_one_image_are_an_error(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    masks = root / "alpha" / "ground_truth" / "hole"
    shutil.copy(masks / "000_mask.png", masks / "000_MASK.png")
    line = error_line(run_dataset(tmp_path, root))
    assert str(masks / "000_mask.png") in line and str(masks / "000_MASK.png") in line, line
    assert "two masks for one image" in line and nothing_written(tmp_path)


def test_non_png_files_broken_links_and_strays_are_listed_as_ignored(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    cat = root / "alpha"
    (cat / "train" / "good" / "notes.txt").write_text("taken on monday\n")
    Image.new("RGB", (32, 32)).save(cat / "train" / "good" / "007.jpg")
    Image.new("RGB", (32, 32)).save(cat / "train" / "good" / "008.bmp")
    (cat / "train" / "good" / "009.png").symlink_to(tmp_path / "elsewhere" / "009.png")
    (cat / "test" / "hole" / "002.png").symlink_to(tmp_path / "elsewhere" / "002.png")
    png(cat / "train" / "good" / "extra" / "000.png")  # a folder inside an image folder
    (cat / "test" / "index.csv").write_text("a,b\n")
    png(cat / "ground_truth" / "hole" / "007_mask.png", mode="L")  # a mask of no image
    png(cat / "ground_truth" / "hole" / "legend.png", mode="L")
    png(cat / "ground_truth" / "Scratch" / "000_mask.png", mode="L")  # no test/Scratch
    png(cat / "validation" / "000.png")

    result = ok(run_dataset(tmp_path, root))
    assert len(image_ids(tmp_path)) == 10
    ignored = {i["path"]: i["reason"] for i in stats(tmp_path)["ignored"]}
    assert set(ignored) == {
        "alpha/train/good/notes.txt",
        "alpha/train/good/007.jpg",
        "alpha/train/good/008.bmp",
        "alpha/train/good/009.png",
        "alpha/test/hole/002.png",
        "alpha/train/good/extra",
        "alpha/test/index.csv",
        "alpha/ground_truth/hole/007_mask.png",
        "alpha/ground_truth/hole/legend.png",
        "alpha/ground_truth/Scratch",
        "alpha/validation",
    }, ignored
    assert ignored["alpha/train/good/009.png"] == "broken link"
    assert ignored["alpha/train/good/007.jpg"] == "not a PNG: .jpg extension"
    assert "test/hole/007.png" in ignored["alpha/ground_truth/hole/007_mask.png"]
    assert f"ignored 11 entries (listed in {Path(STATS)})" in result.stderr, result.stderr
    assert "ignored: broken link" in (tmp_path / "results/dataset/stats.md").read_text()


def test_image_folder_with_no_png_says_what_it_found(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    crack = root / "alpha" / "test" / "crack"
    crack.mkdir()
    Image.new("RGB", (32, 32)).save(crack / "000.jpg")
    line = error_line(run_dataset(tmp_path, root))
    assert f"{crack}: no PNG images" in line and "000.jpg" in line, line


def test_train_good_spelled_in_another_case_is_named(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    train = root / "alpha" / "train"
    (train / "good").rename(train / "Good")
    line = error_line(run_dataset(tmp_path, root))
    assert f"{train / 'good'}: folder missing" in line and "found 'Good'" in line, line


def test_broken_category_link_is_named(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    shutil.rmtree(root / "alpha")
    (root / "alpha").symlink_to(tmp_path / "unmounted" / "alpha")
    line = error_line(run_dataset(tmp_path, root))
    assert f"{root / 'alpha'}: category folder is a link to" in line and "unmounted" in line


# --- 1. the pixel budget (data.max_pixels) ------------------------------------------------


def test_image_over_max_pixels_is_one_line_with_its_size(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    big = png(root / "alpha" / "train" / "good" / "004.png", size=1200)
    line = error_line(run_dataset(tmp_path, root, max_pixels=1_000_000))
    assert f"{big}: image is 1200x1200 = 1,440,000 pixels, over data.max_pixels = 1,000,000" in line
    assert nothing_written(tmp_path)
    ok(run_dataset(tmp_path, root, max_pixels=2_000_000))  # the user raises the budget
    assert "train/good/004" in image_ids(tmp_path)


def test_decompression_bomb_is_named_before_decoding(tmp_path: Path) -> None:
    """196 megapixels: over the default 50 MP budget, read from the header (never decoded)."""
    root = make_mvtec(tmp_path / "mvtec")
    bomb = png_header_only(root / "alpha" / "train" / "good" / "004.png", 14_000, 14_000)
    line = error_line(run_dataset(tmp_path, root))
    assert f"{bomb}: image is 14000x14000 = 196,000,000 pixels, over data.max_pixels" in line
    assert "DecompressionBomb" not in line and nothing_written(tmp_path)


def test_budget_above_pillows_limit_still_one_line(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    bomb = png_header_only(root / "alpha" / "test" / "hole" / "001.png", 14_000, 14_000)
    line = error_line(run_dataset(tmp_path, root, max_pixels=10**9))
    assert line.startswith(f"error: {bomb}: image too large for Pillow to decode"), line


def test_mask_over_max_pixels_is_named(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    mask = png_header_only(root / "alpha" / "ground_truth" / "hole" / "000_mask.png", 9000, 9000)
    line = error_line(run_dataset(tmp_path, root, max_pixels=1_000_000))
    assert f"{mask}: mask is 9000x9000 = 81,000,000 pixels" in line, line


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "data.max_pixels: Input should be greater than or equal to 1 (got 0)"),
        ("many", "data.max_pixels: Input should be a valid integer"),
    ],
)
def test_max_pixels_param_is_validated(tmp_path: Path, value: object, message: str) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    line = error_line(run_dataset(tmp_path, root, max_pixels=value))
    assert message in line and nothing_written(tmp_path), line


# --- 2. masks are validated as masks ---------------------------------------------------------


def _binary(value: int = 255) -> np.ndarray:
    mask = np.zeros((32, 32), np.uint8)
    mask[:8, :16] = value  # 1/8 of the image, like the fixture's masks
    return mask


def _noisy_background() -> np.ndarray:
    mask = _binary()
    background = mask == 0
    mask[background] = np.arange(background.sum()) % 20  # 0..19: a re-encoded background
    return mask


def _resized() -> np.ndarray:
    big = np.zeros((128, 128), np.uint8)
    big[:37, :61] = 255
    return np.asarray(Image.fromarray(big).resize((32, 32), Image.Resampling.BILINEAR))


def _jpeg_roundtrip() -> np.ndarray:
    yy, xx = np.mgrid[:32, :32]
    disc = (((yy - 13) ** 2 + (xx - 17) ** 2) < 40).astype(np.uint8) * 255
    buffer = io.BytesIO()
    Image.fromarray(disc).save(buffer, format="JPEG", quality=90)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"))


def _two_levels() -> np.ndarray:
    mask = _binary()
    mask[30, 30] = 3  # one near-zero speck
    return mask


BAD_MASKS = {
    "noisy_background": (_noisy_background, "values 0..19 and 255"),
    "speck": (_two_levels, "values 0, 3 and 255"),
    "resized": (_resized, "mask is not binary"),
    "jpeg_roundtrip": (_jpeg_roundtrip, "mask is not binary"),
}


@pytest.mark.parametrize("case", sorted(BAD_MASKS))
def test_mask_not_binary_is_an_error_naming_its_values(tmp_path: Path, case: str) -> None:
    make, message = BAD_MASKS[case]
    root = make_mvtec(tmp_path / "mvtec")
    mask = save_png(root / "alpha" / "ground_truth" / "scratch" / "001_mask.png", make(), "L")
    line = error_line(run_dataset(tmp_path, root))
    assert line.startswith(f"error: {mask}: mask is not binary: values "), line
    assert message in line and nothing_written(tmp_path)

    save_png(mask, (make() > 127).astype(np.uint8) * 255, "L")  # thresholded by the user
    ok(run_dataset(tmp_path, root))


@pytest.mark.parametrize(("value", "mode"), [(1, "L"), (128, "L"), (77, "L"), (1, "1")])
def test_binary_mask_with_any_defect_value_is_a_defect(
    tmp_path: Path, value: int, mode: str
) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    path = root / "alpha" / "ground_truth" / "hole" / "000_mask.png"
    array = _binary(value)
    if mode == "1":
        Image.fromarray(array > 0).convert("1").save(path)
    else:
        save_png(path, array, "L")
    ok(run_dataset(tmp_path, root))
    rows = pq.read_table(tmp_path / INDEX).to_pylist()
    row = next(r for r in rows if r["category"] == "alpha" and r["image_id"] == "test/hole/000")
    assert row["mask_coverage"] == pytest.approx(1 / 8)
    assert stats(tmp_path)["empty_masks"] == []


def test_all_zero_mask_on_a_defect_image_is_a_warning(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    save_png(root / "alpha" / "ground_truth" / "hole" / "001_mask.png", _binary(0), "L")
    result = ok(run_dataset(tmp_path, root))
    s = stats(tmp_path)
    assert s["empty_masks"] == ["test/hole/001"] and s["masks"] == 4
    assert "warning: 1 defect image(s) with an all-zero mask" in result.stderr
    assert "alpha/test/hole/001" in result.stderr
    assert "all-zero mask (warning)" in (tmp_path / "results/dataset/stats.md").read_text()


# --- 7. DVC sees every change of the data -------------------------------------------------


def test_linked_folder_below_a_category_is_a_warning(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    good = root / "alpha" / "train" / "good"
    shutil.move(good, tmp_path / "disk_good")
    good.symlink_to(tmp_path / "disk_good")
    result = ok(run_dataset(tmp_path, root))
    assert len(image_ids(tmp_path)) == 10
    assert stats(tmp_path)["linked_folders"] == ["alpha/train/good"]
    assert "links, which DVC does not look into" in result.stderr
    assert "alpha/train/good" in result.stderr


def _dvc(project: Path, *args: str) -> str:
    return dvc(project, *args).stdout


def _lock_dep(project: Path, stage: str, path: str) -> dict:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return next(d for d in lock["stages"][stage]["deps"] if d["path"] == path)


@pytest.mark.slow
def test_dvc_sees_changes_under_linked_category_folders(tmp_path: Path) -> None:
    from benchmarks.chaos import build_project, chaos_params

    disk = make_mvtec(tmp_path / "disk")  # "another disk"
    params = chaos_params(("weave",))
    params["data"].update(root="mvtec", categories=["alpha", "beta"])
    params["augment"]["transforms"].update(alpha=[], beta=[])
    project = build_project(tmp_path / "project", params)
    (project / "mvtec").mkdir()
    for category in ("alpha", "beta"):
        (project / "mvtec" / category).symlink_to(disk / category)

    first = _dvc(project, "repro", "augment")
    for stage in ("dataset_files@alpha", "dataset_files@beta", "dataset", "augment"):
        assert f"Running stage '{stage}'" in first, first
    files = [p for p in (disk / "alpha").rglob("*") if p.is_file()]
    assert _lock_dep(project, "dataset_files@alpha", "mvtec/alpha")["nfiles"] == len(files) == 14
    assert "up to date" in _dvc(project, "status", "--with-deps", "augment")

    # A changed image under a linked category: DVC sees it; the index changes; augment reruns.
    png(disk / "alpha" / "train" / "good" / "000.png", 7)
    status = _dvc(project, "status", "--with-deps", "augment")
    assert "dataset_files@alpha" in status and "mvtec/alpha" in status, status
    assert "dataset_files@beta" not in status
    rerun = _dvc(project, "repro", "dataset")
    assert "Running stage 'dataset_files@alpha'" in rerun and "Running stage 'dataset'" in rerun
    assert "Running stage 'dataset_files@beta'" not in rerun
    assert "cache/dataset/index.parquet" in _dvc(project, "status", "augment")
    _dvc(project, "repro", "augment")

    # An added image: the same.
    png(disk / "beta" / "test" / "good" / "002.png", 9, mode="L")
    assert "dataset_files@beta" in _dvc(project, "status", "--with-deps", "augment")
    assert "Running stage 'augment'" in _dvc(project, "repro", "augment")
    rows = pq.read_table(project / INDEX).to_pylist()
    assert len(rows) == 21 and any(r["image_id"] == "test/good/002" for r in rows)

    # A hidden file: the dataset stage reruns, its index is the same, augment does not rerun.
    (disk / "alpha" / "train" / "good" / ".DS_Store").write_bytes(b"\x00")
    quiet = _dvc(project, "repro", "augment")
    assert "Running stage 'dataset'" in quiet and "Running stage 'augment'" not in quiet, quiet
    assert "Stage 'augment' didn't change" in quiet

    final = _dvc(project, "repro", "augment")
    assert "Running stage" not in final
    assert "up to date" in _dvc(project, "status", "--with-deps", "augment")
