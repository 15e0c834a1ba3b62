"""Augmentation stage: pixel-exact transforms, gating per category, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.mvtec_fixtures import make_mvtec, run_stage, stage_env, write_params

ALL = ["rot90", "rot180", "rot270", "hflip", "vflip"]
NUMPY = {
    "rot90": lambda a: np.rot90(a, 1),
    "rot180": lambda a: np.rot90(a, 2),
    "rot270": lambda a: np.rot90(a, 3),
    "hflip": np.fliplr,
    "vflip": np.flipud,
}


def _setup(tmp_path: Path, transforms: dict, **mvtec) -> Path:
    root = make_mvtec(tmp_path / "mvtec", **mvtec)
    params = write_params(
        tmp_path / "params.yaml", root, list(transforms), augment={"transforms": transforms}
    )
    assert run_stage("dataset", tmp_path).returncode == 0
    return params


def _outputs(tmp_path: Path) -> dict[str, tuple[int, int]]:
    """Every augmented PNG with its (inode, mtime_ns): rewritten files show up as changed."""
    out = tmp_path / "cache" / "augment"
    return {
        str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(out.rglob("*.png"))
    }


def test_pixel_exact_against_numpy_and_gated(tmp_path: Path) -> None:
    _setup(tmp_path, {"alpha": ALL, "beta": ["hflip"]}, size=24)
    result = run_stage("augment", tmp_path)
    assert result.returncode == 0, result.stderr
    index = pq.read_table(tmp_path / "cache/augment/index.parquet").to_pylist()
    assert len(index) == 4 * 5 + 4 * 1
    for row in index:
        source = tmp_path / "mvtec" / row["category"] / f"{row['source_image_id']}.png"
        original = np.asarray(Image.open(source))
        augmented = Image.open(tmp_path / row["path"])
        assert augmented.mode == ("RGB" if row["category"] == "alpha" else "L")
        np.testing.assert_array_equal(np.asarray(augmented), NUMPY[row["transform"]](original))
        assert row["image_id"] == f"{row['source_image_id']}@{row['transform']}"


def test_rerun_skips_and_changing_one_category_redoes_only_it(tmp_path: Path) -> None:
    params = _setup(tmp_path, {"alpha": ALL, "beta": ALL})
    assert run_stage("augment", tmp_path).returncode == 0
    before = _outputs(tmp_path)
    again = run_stage("augment", tmp_path)
    assert again.returncode == 0 and "up to date, skipped" in again.stderr
    assert _outputs(tmp_path) == before

    write_params(
        params,
        tmp_path / "mvtec",
        ["alpha", "beta"],
        augment={"transforms": {"alpha": ALL, "beta": ["rot90", "vflip"]}},
    )
    assert run_stage("augment", tmp_path).returncode == 0
    after = _outputs(tmp_path)
    assert {k: v for k, v in after.items() if k.startswith("alpha/")} == {
        k: v for k, v in before.items() if k.startswith("alpha/")
    }
    beta = {k for k in after if k.startswith("beta/")}
    assert beta == {f"beta/{t}/{i:03d}.png" for t in ("rot90", "vflip") for i in range(4)}
    assert all(after[k] == before[k] for k in beta)  # kept transforms were not redone

    write_params(
        params,
        tmp_path / "mvtec",
        ["alpha", "beta"],
        augment={"transforms": {"alpha": ALL, "beta": []}},
    )
    assert run_stage("augment", tmp_path).returncode == 0
    assert not (tmp_path / "cache/augment/beta").exists()
    rows = pq.read_table(tmp_path / "cache/augment/index.parquet").column("category").to_pylist()
    assert set(rows) == {"alpha"}


def test_changed_source_image_is_redone(tmp_path: Path) -> None:
    _setup(tmp_path, {"alpha": ["rot90"]}, categories={"alpha": "RGB"})
    assert run_stage("augment", tmp_path).returncode == 0
    source = tmp_path / "mvtec/alpha/train/good/002.png"
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(source)
    assert run_stage("dataset", tmp_path).returncode == 0
    before = _outputs(tmp_path)
    assert run_stage("augment", tmp_path).returncode == 0
    after = _outputs(tmp_path)
    assert [k for k in after if after[k] != before[k]] == ["alpha/rot90/002.png"]
    assert np.asarray(Image.open(tmp_path / "cache/augment/alpha/rot90/002.png")).max() == 7


def test_sigkill_then_resume_finishes_without_redoing(tmp_path: Path) -> None:
    _setup(tmp_path, {"alpha": ALL}, categories={"alpha": "RGB"}, n_train=40, size=384)
    journal = tmp_path / "cache/augment/alpha/journal.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.augment"],
        cwd=tmp_path,
        env=stage_env(),
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if journal.exists() and journal.read_text().count("\n") >= 20:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = _outputs(tmp_path)
    journaled = {
        str(Path(json.loads(line)["path"]).relative_to("cache/augment"))
        for line in journal.read_text().splitlines()
        if line.endswith("}")
    }
    if len(done_before) == 200:
        pytest.skip("the run finished before it could be killed")
    assert len(done_before) >= 20

    result = run_stage("augment", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "already done, skipped" in result.stderr
    after = _outputs(tmp_path)
    assert len(after) == 200
    # Journaled files are never redone; files renamed into place but not yet journaled
    # when the kill came (at most one source per worker thread x 5 transforms in flight,
    # plus the sources finished but waiting behind an earlier one in the map order) may be.
    assert all(after[k] == done_before[k] for k in journaled)
    redone = [k for k, v in done_before.items() if after[k] != v]
    assert len(redone) <= 2 * len(os.sched_getaffinity(0)) * 5, redone
    assert not list((tmp_path / "cache").rglob(".*.tmp-*"))
    for name in after:  # every file complete and right
        transform, stem = name.split("/")[1], name.split("/")[2]
        src = np.asarray(Image.open(tmp_path / f"mvtec/alpha/train/good/{stem}"))
        got = np.asarray(Image.open(tmp_path / "cache/augment" / name))
        np.testing.assert_array_equal(got, NUMPY[transform](src))


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P", "I;16", "1"])
def test_encoding_is_lossless_for_every_mode_and_transform(mode: str) -> None:
    """The stage's encoder (zlib level 1, run-length strategy) round-trips every pixel of
    noise (the worst case for run lengths) and of flat runs, in any mode Pillow writes."""
    import io

    from stages.augment import TRANSFORM_FUNCS, apply_transform, encode_png
    from stages.images import decode_fast

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(37, 53, 4), dtype=np.uint8)
    noise[:, 20:40] = 9  # a flat band: long runs
    image = Image.fromarray(noise, "RGBA").convert(mode) if mode != "I;16" else None
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, size=(37, 53), dtype=np.uint16))
    row = Image.fromarray(noise[:1, :, :3])  # one row: nothing above it
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(encode_png(row)))), noise[:1, :, :3]
    )
    for transform, reference in TRANSFORM_FUNCS.items():
        data = encode_png(apply_transform(image, transform))
        back = Image.open(io.BytesIO(data))
        assert back.format == "PNG" and back.mode == image.mode
        np.testing.assert_array_equal(np.asarray(back), reference(np.asarray(image)))
        fast = decode_fast(data)  # libspng, as extract reads them (8-bit L and RGB)
        if mode in ("L", "RGB"):
            np.testing.assert_array_equal(np.asarray(fast), reference(np.asarray(image)))
        if mode == "P":
            assert back.getpalette() == image.getpalette()
        assert encode_png(apply_transform(image, transform)) == data  # same bytes again


def test_worker_threads_write_what_one_thread_writes(tmp_path: Path) -> None:
    """The stage's worker pool and a single thread give the same files, bit for bit."""
    import logging
    from concurrent.futures import ThreadPoolExecutor

    from stages.augment import Workers, augment_category

    rng = np.random.default_rng(1)
    sources = []
    for i in range(3):
        path = tmp_path / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8)).save(path)
        sources.append({"image_id": f"c/{i}", "path": str(path), "sha256": str(i)})
    log = logging.getLogger("test")
    with Workers(2) as pool:
        pooled = augment_category("c", sources, ALL, tmp_path / "a", log, pool)
    with ThreadPoolExecutor(1) as one:
        inline = augment_category("c", sources, ALL, tmp_path / "b", log, lambda: one)
    assert len(pooled) == len(inline) == 15
    for a, b in zip(pooled, inline, strict=True):
        assert a["sha256"] == b["sha256"]
        assert Path(a["path"]).read_bytes() == Path(b["path"]).read_bytes()
