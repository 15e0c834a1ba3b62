"""``python -m stages.query map``: one test image's anomaly map as a PNG, and its errors.

The workspace (also used by ``tests/test_report_pixel.py``) is built by hand: PNG images and
masks, an image index, a results database of ``upsert``-ed experiments with pixel metrics
and their stored patch-score grids (``write_grids``), for two categories.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from stages.anomaly_maps import grid_path, write_grids
from stages.dataset import ImageRecord, write_index
from stages.errors import UserError
from stages.query import MAP_DPI, MAP_FIGSIZE, experiment_maps, map_index
from stages.query import main as query_main
from stages.results_db import ExperimentRow, open_db, upsert
from tests.mvtec_fixtures import error_line, save_png, stage_env

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ("alpha", "beta")
IMAGES = [f"test/good/{i:03d}" for i in range(3)] + [f"test/crack/{i:03d}" for i in range(3)]
SIZE = 64  # image side; the defect is a dark square in the middle (inside the 224 crop)
DEFECT = (slice(20, 36), slice(24, 40))
# Patch configs: family, hyperparams, name; and the image-level one (no maps).
CONFIGS = {
    "X": ("PatchCore", '{"coreset": 0.01}', "PatchCore(coreset=0.01)"),
    "Y": ("PatchCore", '{"coreset": 0.1}', "PatchCore(coreset=0.1)"),
    "Z": ("PaDiM", '{"d": 100}', "PaDiM(d=100)"),
    "I": ("KernelDensity", '{"bandwidth": 1.0}', "KernelDensity(bandwidth=1.0)"),
}
# (image AUROC, pixel AUROC, AUPRO) per category and config; I is image-level (no pixels)
# and the best by image AUROC everywhere, so it must not enter the pixel-level picks.
METRICS = {
    "alpha": {"X": (0.95, 0.90, 0.60), "Y": (0.80, 0.97, 0.85), "Z": (0.70, 0.93, 0.75),
              "I": (0.99, None, None)},
    "beta": {"X": (0.60, 0.85, 0.50), "Y": (0.90, 0.88, 0.70), "Z": (0.85, 0.96, 0.90),
             "I": (0.99, None, None)},
}  # fmt: skip
# Image scores of the best-by-AUPRO experiments (alpha Y, beta Z), in IMAGES order; NaN is
# stored as NULL and ranks least anomalous.
SCORES = {
    ("alpha", "Y"): [0.3, 0.9, 0.1, 2.0, 1.5, 0.5],
    ("beta", "Z"): [float("nan"), 0.2, 0.4, 0.6, 3.0, 1.0],
}


def key_of(category: str, config: str) -> str:
    return hashlib.sha256(f"{category}/{config}".encode()).hexdigest()


def _images(root: Path, category: str, seed: int) -> list[ImageRecord]:
    rng = np.random.default_rng(seed)
    records = []
    for image_id in IMAGES:
        defect = image_id.split("/")[1]
        pixels = rng.integers(100, 160, size=(SIZE, SIZE, 3), dtype=np.uint8)
        mask_path = None
        if defect != "good":
            pixels[DEFECT] = 30
            mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
            mask[DEFECT] = 255
            mask_path = f"data/{category}/ground_truth/{defect}/{image_id[-3:]}_mask.png"
            save_png(root / mask_path, mask, "L")
        path = f"data/{category}/{image_id}.png"
        save_png(root / path, pixels, "RGB")
        records.append(ImageRecord(category=category, image_id=image_id, split="test",
                                   defect_type=defect, is_anomaly=defect != "good", path=path,
                                   mask_path=mask_path, width=SIZE, height=SIZE, mode="RGB",
                                   sha256="-", mask_coverage=None))  # fmt: skip
    return records


def _grids(rng: np.random.Generator, strength: float) -> np.ndarray:
    """(6, 14, 14) patch scores: noise, plus a hot spot over the defect of crack images."""
    grids = rng.uniform(0.0, 0.3, size=(len(IMAGES), 14, 14)).astype(np.float32)
    for i, image_id in enumerate(IMAGES):
        if "crack" in image_id:
            grids[i, 4:8, 5:9] += strength
    return grids


def _row(category: str, config: str, rng: np.random.Generator) -> ExperimentRow:
    family, hyper, name = CONFIGS[config]
    auroc, pixel_auroc, aupro = METRICS[category][config]
    patch = config != "I"
    scores = SCORES.get((category, config), list(rng.uniform(0, 1, len(IMAGES))))
    return ExperimentRow(
        key=key_of(category, config),
        config={"category": category, "augmented": False, "backbone": "resnet18",
                "init": "imagenet", "layer": "layer2+layer3" if patch else "layer4",
                "representation": "patch" if patch else "avg", "detector": family,
                "hyperparams": hyper, "detector_name": name, "seed": 0,
                "feature_hash": f"hash-{category}-{patch}"},
        status="done", n_train=10, n_test=len(IMAGES), dim=64, auroc=auroc,
        average_precision=auroc, fit_s=0.5, score_s=0.1, group_s=0.6, group_size=1,
        thresholds={"threshold_quantile": 0.99, "threshold_folds": 5, "f1_honest": 0.5},
        image_ids=IMAGES, defect_types=[i.split("/")[1] for i in IMAGES],
        is_anomaly=["crack" in i for i in IMAGES], scores=scores,
        pixel={"pixel_auroc": pixel_auroc, "aupro": aupro, "pixel_f1_honest": 0.4}
        if patch else {},
    )  # fmt: skip


def pixel_workspace(
    root: Path, categories: tuple[str, ...] = CATEGORIES, configs: str = "XYZI"
) -> Path:
    """Images, index, database and maps under ``root``; returns the params file. Paths in
    the index are relative to ``root`` (the project folder: run from there)."""
    rng = np.random.default_rng(0)
    records = [r for c, cat in enumerate(categories) for r in _images(root, cat, c)]
    write_index(records, root / "cache" / "index.parquet")
    db_url = f"sqlite:///{root / 'results' / 'results.sqlite'}"
    rows = [_row(c, k, rng) for c in categories for k in configs]
    failed = ExperimentRow(key=key_of(categories[0], "F"), status="failed", error="boom",
                           config={**rows[0].config, "hyperparams": '{"coreset": 0.5}'})  # fmt: skip
    engine = open_db(db_url)
    try:
        upsert(engine, [*rows, failed], "test")
    finally:
        engine.dispose()
    for row in rows:
        if row.pixel:
            write_grids(root / "maps", row.key, IMAGES, _grids(rng, 1.0 + rng.uniform()),
                        {"category": row.config["category"], "backbone": "resnet18",
                         "crop": True})  # fmt: skip
    params = {
        "data": {"root": str(root / "data"), "categories": list(categories),
                 "stats_dir": str(root / "results" / "dataset"),
                 "index": str(root / "cache" / "index.parquet")},
        "augment": {"transforms": {c: [] for c in categories}},
        "evaluate": {"db_url": db_url, "maps": str(root / "maps")},
        "report": {"out": str(root / "results"), "scope": "all"},
    }  # fmt: skip
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("maps")
    pixel_workspace(root)
    return root


def _map(root: Path, *args: str) -> None:
    query_main(["--params", str(root / "params.yaml"), "map", *args])


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_map_writes_a_png_of_the_expected_size(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    out = workspace / "out" / "crack.png"
    _map(workspace, key_of("alpha", "Y")[:8], "test/crack/001", "--out", str(out))
    assert capsys.readouterr().out.strip() == str(out)
    picture = _png(out)
    assert picture.shape == (round(MAP_FIGSIZE[1] * MAP_DPI), round(MAP_FIGSIZE[0] * MAP_DPI), 3)
    assert not list(out.parent.glob(".*"))  # no temporary file left
    # The jet colours of the map are there (a red hot spot over the defect), and a good
    # image's picture differs from a defective one's.
    red = (picture[..., 0] > 180) & (picture[..., 1] < 90) & (picture[..., 2] < 90)
    assert red.sum() > 200
    good = workspace / "out" / "good.png"
    _map(workspace, key_of("alpha", "Y"), "test/good/000.png", "--out", str(good))  # .png ok
    assert _png(good).shape == picture.shape and not np.array_equal(_png(good), picture)


def test_map_colour_scale_spans_all_test_maps_of_the_experiment(workspace):
    maps = experiment_maps({"key": key_of("beta", "Z"), "status": "done",
                            "representation": "patch", "detector_name": "PaDiM",
                            "category": "beta", "backbone": "resnet18"},
                           workspace / "maps")  # fmt: skip
    assert maps.maps.shape == (len(IMAGES), 224, 224)
    assert (maps.vmin, maps.vmax) == (float(maps.maps.min()), float(maps.maps.max()))
    assert maps.vmax > 1.0 > 0.3 > maps.vmin  # hot spots of crack images, noise elsewhere
    assert (maps.category, maps.backbone, maps.crop) == ("beta", "resnet18", True)
    assert map_index(maps, "test/crack/002") == IMAGES.index("test/crack/002")


@pytest.mark.parametrize(
    ("key", "image", "maps", "expected"),
    [
        ("ffff", "test/good/000", None, "no experiment with key 'ffff'"),
        ("2b", "test/good/000", None, "key prefix '2b' is ambiguous"),  # alpha Y, beta X
        (("alpha", "Y"), "test/crack/009", None,
         "image 'test/crack/009' is not a test image of experiment"),
        (("alpha", "I"), "test/good/000", None,
         "(KernelDensity(bandwidth=1.0), representation avg) is an image-level detector"),
        (("alpha", "F"), "test/good/000", None, "is failed, not done"),
        (("beta", "X"), "test/good/000", "empty", "anomaly maps of experiment"),
    ],
)  # fmt: skip
def test_map_errors_are_one_line_naming_the_problem(workspace, tmp_path, key, image, maps,
                                                     expected):  # fmt: skip
    key = key if isinstance(key, str) else key_of(*key)
    args = [key, image, "--out", str(tmp_path / "m.png")]
    if maps:
        args += ["--maps", str(tmp_path / maps)]
    with pytest.raises(UserError) as info:
        _map(workspace, *args)
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert not (tmp_path / "m.png").exists()
    if "not a test image" in message:  # a few valid ids are listed
        assert "test/good/000" in message and "test/crack/000" in message
    if maps:  # the missing file is named
        assert str(grid_path(tmp_path / maps, key)) in message


def test_map_command_line_error_and_options_after_the_command(workspace, tmp_path):
    env = stage_env()
    args = [sys.executable, "-m", "stages.query", "map", "00000", "test/good/000", "--out",
            str(tmp_path / "m.png"), "--params", str(workspace / "params.yaml")]  # fmt: skip
    result = subprocess.run(args, cwd=workspace, env=env, capture_output=True, text=True)
    assert error_line(result) == "error: no experiment with key '00000'"
    # --db after the command overrides the params file's database
    other = tmp_path / "other.sqlite"
    open_db(f"sqlite:///{other}").dispose()
    with pytest.raises(UserError, match="no experiment with key"):
        query_main(["map", key_of("alpha", "Y"), "test/good/000", "--out",
                    str(tmp_path / "m.png"), "--params", str(workspace / "params.yaml"),
                    "--db", f"sqlite:///{other}"])  # fmt: skip


def test_map_missing_image_file_is_one_line(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # index paths are relative to the project folder
    with pytest.raises(UserError, match=r"data/alpha/test/crack/000.png: cannot read") as info:
        _map(workspace, key_of("alpha", "Y"), "test/crack/000", "--out", str(tmp_path / "m.png"))
    assert "project folder" in str(info.value)
