"""The ``pixels`` backbone: raw pixels, area-resized, through the real extract stage.

The references are computed here without the stage's code: Pillow for the resize and crop
(what torchvision's ``Resize``/``CenterCrop`` do on a PIL image), numpy for the [0, 1]
scaling, the BT.601 luma and the area resize (as explicit averaging windows).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stages import extract
from stages.backbones import geometry_key
from stages.errors import UserError, run_cli
from stages.features import MANIFEST, FeatureSet, load_feature_set, read_manifest
from tests.extract_fixtures import make_dataset, write_params

U = 2.0**-24  # unit roundoff of float32
LAYERS = ["rgb32", "gray64", "gray224"]
SECTION = {
    "num_workers": 0,
    "batch_size": 4,
    "shard_rows": 8,
    "extractors": [{"backbone": "pixels", "layers": LAYERS, "representations": ["flatten", "avg"]}],
}


def _stage(root: Path, section: dict, monkeypatch: pytest.MonkeyPatch) -> Path:
    sections = make_dataset(root)  # alpha: RGB 48 px, augmented; beta: L 40 px
    monkeypatch.chdir(root)
    return write_params(root, sections, section)


def _crop(path: str, crop: bool) -> np.ndarray:
    """uint8 (3, 224, 224): the input every extractor sees, computed with Pillow alone."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    assert rgb.width == rgb.height  # the fixtures are square: the shorter side is both
    if crop:  # resize the shorter side to 256, centre-crop 224
        rgb = rgb.resize((256, 256), Image.Resampling.BILINEAR).crop((16, 16, 240, 240))
    else:
        rgb = rgb.resize((224, 224), Image.Resampling.BILINEAR)
    return np.asarray(rgb).transpose(2, 0, 1)


def _windows(size: int) -> np.ndarray:
    """(size, 224) averaging matrix of an area resize: row i averages input pixels
    floor(i*224/size) .. ceil((i+1)*224/size)-1 with equal weights."""
    matrix = np.zeros((size, 224))
    for i in range(size):
        start, stop = i * 224 // size, -(-(i + 1) * 224 // size)
        matrix[i, start:stop] = 1 / (stop - start)
    return matrix


def _reference(pixels: np.ndarray, layer: str) -> np.ndarray:
    """float64 (C, S, S) for a pixels layer from a uint8 (3, 224, 224) crop."""
    x = pixels / 255.0
    if layer.startswith("gray"):
        x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
    pool = _windows(int(layer.removeprefix("gray").removeprefix("rgb")))
    return pool @ x @ pool.T


def _tolerance(layer: str) -> float:
    """Bound on |float32 stage - float64 reference| for one pooled value in [0, 1].

    Relative float32 rounding errors, each at most U: the /255 (1), luma weights rounded to
    float32 (1), products (1) and two sums (2), then the sum of the n values of one window
    (n - 1, any order) and the division by n (1): (n + 5) U, rounded up to (n + 8) U.
    """
    size = int(layer.removeprefix("gray").removeprefix("rgb"))
    n = int((_windows(size) > 0).sum(axis=1).max()) ** 2
    return (n + 8) * U


def _check_features(rows: dict, folder_of: Callable[[str, str], str | Path], crop: bool) -> None:
    """The stage's feature sets (``folder_of(layer, representation)``) against the references."""

    def features_of(layer: str, representation: str) -> FeatureSet:
        return load_feature_set(folder_of(layer, representation))

    crops = [_crop(path, crop) for path in rows["path"]]
    for layer in LAYERS:
        flatten = features_of(layer, "flatten")
        assert list(flatten.image_id) == rows["image_id"]
        expected = np.stack([_reference(c, layer) for c in crops])
        got = flatten.X.reshape(len(crops), *flatten.manifest["feature_shape"])
        assert got.dtype == np.float32
        assert np.abs(got - expected).max() <= _tolerance(layer), layer
        # mean of S*S pooled values: their own bound plus (S*S - 1) U for the sum
        avg = features_of(layer, "avg").X
        bound = _tolerance(layer) + got[0, 0].size * U
        assert np.abs(avg - expected.mean(axis=(2, 3))).max() <= bound, layer
    # gray224 is no resize (one-pixel windows): bitwise the float32 luma of the crop.
    gray = np.stack(
        [
            np.float32(0.299) * x[0] + np.float32(0.587) * x[1] + np.float32(0.114) * x[2]
            for x in (c.astype(np.float32) / np.float32(255) for c in crops)
        ]
    )
    assert np.array_equal(features_of("gray224", "flatten").X.reshape(gray.shape), gray)


def _shard_stats(out: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(out.rglob("part-*.parquet"))
    }


def test_pixels_through_the_stage_equal_a_direct_computation_and_rerun_skips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    params = _stage(tmp_path, SECTION, monkeypatch)
    extract.main(["--params", str(params)])  # init omitted: pixels' only init, none
    out = tmp_path / "cache/features"
    units = {u.category: u for u in extract.work_units(params)}
    for category, unit in units.items():
        rows = extract.unit_rows(unit)
        folder = out / category / "pixels-none"
        _check_features(rows, lambda layer, r, folder=folder: folder / layer / r, crop=True)

    manifest = read_manifest(out / "alpha/pixels-none/gray64/flatten")
    assert manifest is not None and manifest["init"] == "none"
    assert manifest["seed"] is None and manifest["weights"] is None  # nothing to seed or load
    assert manifest["shape"] == [22, 64 * 64] and manifest["dim"] == 64 * 64
    assert manifest["activation_shape"] == manifest["feature_shape"] == [1, 64, 64]
    avg = read_manifest(out / "alpha/pixels-none/rgb32/avg")
    assert avg["activation_shape"] == [3, 32, 32] and avg["feature_shape"] == [3]
    listed = json.loads((out / "feature_sets.json").read_text())
    assert len(listed) == 2 * len(LAYERS) * 2
    entry = next(e for e in listed if e["folder"].endswith("alpha/pixels-none/rgb32/flatten"))
    assert entry["activation_shape"] == entry["feature_shape"] == [3, 32, 32]
    assert entry["dim"] == 3 * 32 * 32

    # A rerun skips every shard and rewrites nothing.
    shards = _shard_stats(out)
    manifests = {p: p.read_bytes() for p in out.rglob(MANIFEST)}
    capsys.readouterr()
    extract.main(["--params", str(params)])
    err = capsys.readouterr().err
    assert "alpha pixels-none: 18 of 18 shards already done, skipped" in err  # 3 shards x 6
    assert "beta pixels-none: 12 of 12 shards already done, skipped" in err  # 2 shards x 6
    assert _shard_stats(out) == shards
    assert {p: p.read_bytes() for p in out.rglob(MANIFEST)} == manifests

    # A cache written before the shapes were recorded: same content hash, shapes added,
    # no shard rewritten.
    for path in manifests:
        old = {k: v for k, v in json.loads(path.read_bytes()).items() if not k.endswith("_shape")}
        path.write_text(json.dumps(old))
    extract.main(["--params", str(params)])
    assert _shard_stats(out) == shards
    assert {p: json.loads(p.read_bytes()) for p in out.rglob(MANIFEST)} == {
        p: json.loads(text) for p, text in manifests.items()
    }


def test_image_representation_keeps_the_rgb_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``image``: the rgbS rows as stored by ``flatten``, declared (3, S, S) images (what
    anomalib's models train on), bitwise equal to the flatten set of the same layer."""
    section = {**SECTION, "extractors": [
        {"backbone": "pixels", "layers": ["rgb32"], "representations": ["flatten", "image"]}]}  # fmt: skip
    params = _stage(tmp_path, section, monkeypatch)
    extract.main(["--params", str(params)])
    out = tmp_path / "cache/features/alpha/pixels-none/rgb32"
    image, flat = read_manifest(out / "image"), read_manifest(out / "flatten")
    assert image["feature_shape"] == [3, 32, 32] and image["representation"] == "image"
    assert image["content_hash"] != flat["content_hash"]  # a feature set of its own
    assert np.array_equal(load_feature_set(out / "image").X, load_feature_set(out / "flatten").X)


def test_pixels_without_crop_and_seed_independence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """crop: false resizes the whole image to 224 as for the networks; the seed is no input."""
    params = _stage(tmp_path, {**SECTION, "crop": False}, monkeypatch)
    unit = next(u for u in extract.work_units(params) if u.category == "beta")  # grayscale
    assert not unit.crop and unit.init == "none"
    summary = extract.extract_unit(unit)
    folders = {(e["layer"], e["representation"]): e["folder"] for e in summary["feature_sets"]}
    rows = extract.unit_rows(unit)
    _check_features(rows, lambda layer, r: folders[layer, r], crop=False)
    # The same decoded images as resnet18's (the decoded cache is shared).
    for crop in (True, False):
        assert geometry_key("pixels", crop) == geometry_key("resnet18", crop)
    assert (Path(unit.out) / extract.DECODED_DIR / "resize224x224").is_dir()
    reseeded = dataclasses.replace(unit, seed=unit.seed + 1)
    assert reseeded.extractor_config("gray64", "flatten") == unit.extractor_config(
        "gray64", "flatten"
    )
    assert extract.extract_unit(reseeded)["images_computed"] == 0
    shard = Path(folders["gray64", "flatten"]) / "part-00000.parquet"
    assert pq.read_schema(shard).field("feature").type.list_size == 64 * 64


@pytest.mark.parametrize(
    ("extractor", "message"),
    [
        (
            {"backbone": "pixels", "init": "random", "layers": ["gray64"]},
            "extract.extractors[0].init: unknown init 'random' for pixels "
            "(valid: none; pixels has no weights)",
        ),
        (
            {"backbone": "pixels", "init": "imagenet", "layers": ["gray64"]},
            "extract.extractors[0].init: unknown init 'imagenet' for pixels",
        ),
        (
            {"backbone": "resnet18", "init": "none", "layers": ["layer4"]},
            "extract.extractors[0].init: unknown init 'none' for resnet18 "
            "(valid: random, imagenet)",
        ),
        (
            {"backbone": "pixels", "layers": ["gray64"], "representations": ["image"]},
            "extract.extractors[0].representations: image needs an RGB image layer (pixels "
            "rgbS), but pixels gray64's activation of shape [1, 64, 64] is no RGB image",
        ),
        (
            {"backbone": "resnet18", "layers": ["layer2"], "representations": ["image"]},
            "extract.extractors[0].representations: image needs an RGB image layer",
        ),
        (
            {"backbone": "pixels", "layers": ["gray65"]},
            "extract.extractors[0].layers: unknown layer 'gray65' for pixels (valid: rgb16, "
            "rgb32, rgb64, rgb128, rgb224, gray16, gray32, gray64, gray128, gray224)",
        ),
    ],
)
def test_bad_init_or_layer_is_one_line_naming_the_key(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    extractor: dict,
    message: str,
) -> None:
    params = _stage(tmp_path, {"num_workers": 0, "extractors": [extractor]}, monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(extract.main, ["--params", str(params)])
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and line.startswith(f"error: {params}: ")
    assert message in line, line
    assert not (tmp_path / "cache/features").exists()
    with pytest.raises(UserError):
        extract.load_extract_params(params)
