"""Patch feature sets: PatchCore's layer join, the (h, w, c) layout, the params checks, masks
in the model's geometry and the per-experiment store of patch-score grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stages.anomaly_maps import load_masks, read_grids, write_grids
from stages.backbones import (
    activation_shapes,
    build_extractor,
    geometry,
    represent_layer,
    represented_shape,
)
from stages.errors import UserError
from stages.extract import load_extract_params
from tests.mvtec_fixtures import write_params


def test_a_joined_layer_is_anomalibs_patchcore_embedding() -> None:
    """``layer2+layer3`` ``patch`` = anomalib's PatchcoreModel.generate_embedding: each layer
    AvgPool2d(3, 1, 1), layer3 resized bilinearly to layer2's grid, concatenated; stored
    positions x channels. The same torch operations in the same order: bitwise equal."""
    model = build_extractor("resnet18", "random", ["layer2+layer3"], seed=0)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        acts = model(x)
        ours = represent_layer(acts, "layer2+layer3", "patch")
        pool = torch.nn.AvgPool2d(3, 1, 1)
        l2, l3 = pool(acts["layer2"]), pool(acts["layer3"])
        l3 = F.interpolate(l3, size=l2.shape[-2:], mode="bilinear")
        embedding = torch.cat([l2, l3], dim=1).permute(0, 2, 3, 1).reshape(2, -1)
    assert torch.equal(ours, embedding)
    shape = activation_shapes("resnet18", ["layer2+layer3"])["layer2+layer3"]
    assert list(shape) == [384, 28, 28]
    assert represented_shape(shape, "patch") == [28, 28, 384]
    # one row reshapes to the grid: position (i, j) holds that patch's channels
    grid = ours[1].reshape(28, 28, 384)
    assert torch.equal(grid[3, 5, :128], l2[1, :, 3, 5])


def test_patch_layouts_of_every_kind_of_backbone() -> None:
    assert represented_shape([197, 768], "patch") == [14, 14, 768]  # ViT: class token dropped
    assert represented_shape([1, 32, 32], "patch:1") == [32, 32, 1]  # pixels
    lite = activation_shapes("efficientnet_lite0", ["stage4+stage6"])["stage4+stage6"]
    assert represented_shape(lite, "patch") == [28, 28, 152]
    with pytest.raises(ValueError, match="no spatial grid"):
        represented_shape([51, 768], "patch")  # a class token and 50 tokens: no square
    with pytest.raises(ValueError, match="no spatial grid"):
        represented_shape([768], "patch")


def test_patch_one_is_the_raw_activation_positions_by_channels() -> None:
    acts = {"layer": torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)}
    rows = represent_layer(acts, "layer", "patch:1")
    assert torch.equal(rows, acts["layer"].permute(0, 2, 3, 1).reshape(2, -1))


@pytest.mark.parametrize(
    ("extractor", "message"),
    [
        ({"layers": ["layer2+layer9"]}, "layers: unknown layer 'layer9' for resnet18"),
        ({"layers": ["layer2+layer2"]}, "layers: 'layer2+layer2' joins a layer with itself"),
        ({"layers": ["layer2"], "representations": ["patch:2"]},
         "representations: unknown representation 'patch:2'"),
    ],
)  # fmt: skip
def test_bad_patch_params_are_one_line_naming_the_key(
    tmp_path, extractor: dict, message: str
) -> None:
    params = write_params(
        tmp_path / "params.yaml", tmp_path, ["alpha"],
        extract={"extractors": [{"backbone": "resnet18", "init": "random", **extractor}]},
    )  # fmt: skip
    with pytest.raises(UserError) as info:
        load_extract_params(params)
    assert f"extract.extractors[0].{message}" in str(info.value)
    assert "\n" not in str(info.value)


def test_one_backbone_in_two_entries_is_one_forward_pass_without_crossing(tmp_path) -> None:
    from stages.extract import work_units

    (tmp_path / "data").mkdir()
    params = write_params(
        tmp_path / "params.yaml", tmp_path / "data", ["alpha"],
        extract={"extractors": [
            {"backbone": "resnet18", "init": "random", "layers": ["layer3", "layer4"],
             "representations": ["avg"]},
            {"backbone": "resnet18", "init": "random", "layers": ["layer2+layer3"],
             "representations": ["patch"]},
        ]},
    )  # fmt: skip
    (unit,) = work_units(params)
    assert unit.feature_sets() == [("layer3", "avg"), ("layer4", "avg"), ("layer2+layer3", "patch")]
    assert unit.layers == ("layer3", "layer4", "layer2+layer3")


def test_masks_follow_the_images_resize_and_crop(tmp_path) -> None:
    """A mask through the nearest-neighbour twin of the image geometry: a bright square of
    the image lands exactly where the mask's square does (crop and no crop, non-square)."""
    height, width = 300, 400
    image = np.zeros((height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=np.uint8)
    image[100:180, 150:260] = 255
    mask[100:180, 150:260] = 255
    Image.fromarray(image).save(tmp_path / "img.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    for crop in (True, False):
        (m,) = load_masks([str(tmp_path / "mask.png")], [str(tmp_path / "img.png")],
                          "resnet18", crop)  # fmt: skip
        with Image.open(tmp_path / "img.png") as pil:
            pixels = geometry("resnet18", crop)(pil).numpy()[0]
        assert m.shape == (224, 224) and m.any()
        # bilinear edges blur by a pixel; the cores agree
        assert (pixels[m] > 127).mean() > 0.95 and (pixels[~m] < 128).mean() > 0.99
    good = load_masks([None], [str(tmp_path / "img.png")], "resnet18", True)
    assert good.shape == (1, 224, 224) and not good.any()


def test_a_mask_whose_size_differs_from_its_image_is_one_line(tmp_path) -> None:
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(tmp_path / "mask.png")
    with pytest.raises(UserError, match=r"mask\.png: mask is 30x30, expected 40x30 like its"):
        load_masks([str(tmp_path / "mask.png")], [str(tmp_path / "img.png")], "resnet18", True)


def test_grids_round_trip_through_parquet_as_float16(tmp_path) -> None:
    grids = np.random.default_rng(0).normal(size=(3, 5, 7)).astype(np.float32)
    path = write_grids(tmp_path, "ab" + "0" * 62, ["a", "b", "c"], grids)
    assert path.parent.name == "ab"
    ids, back = read_grids(tmp_path, "ab" + "0" * 62)
    assert ids == ["a", "b", "c"]
    assert np.array_equal(back, grids.astype(np.float16).astype(np.float32))
    with pytest.raises(UserError, match="no stored anomaly maps"):
        read_grids(tmp_path, "cd" + "0" * 62)
