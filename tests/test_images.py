"""The torch-free image geometry agrees with torchvision's transforms, pixel for pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision import models
from torchvision import transforms as T

from stages.backbones import BACKBONES, geometry
from stages.images import INPUT_SIZE, RESIZE, decode_fast, resize_crop

SIZES = [(900, 900), (400, 300), (300, 400), (256, 300), (231, 500), (1001, 777), (224, 224)]


def _picture(width: int, height: int, mode: str) -> Image.Image:
    rng = np.random.default_rng(width * 7 + height)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def test_the_resize_table_is_the_registrys() -> None:
    assert {name: spec.resize for name, spec in BACKBONES.items()} == RESIZE
    for name, spec in BACKBONES.items():  # torchvision's weights: their own transforms()
        if spec.weights.count(".") == 1 and "_Weights." in spec.weights:
            enum, member = spec.weights.split(".")
            preset = getattr(getattr(models, enum), member).transforms()
            assert RESIZE[name] == preset.resize_size[0], name


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
@pytest.mark.parametrize("crop", [True, False])
@pytest.mark.parametrize("size", SIZES)
def test_resize_crop_is_torchvisions_geometry(backbone: str, crop: bool, size) -> None:
    """Bilinear: the images' geometry; nearest: the masks' (torchvision's Resize and
    CenterCrop with nearest resampling, as the masks were resized before)."""
    image = _picture(*size, "RGB")
    expected = geometry(backbone, crop)(image).permute(1, 2, 0).numpy()
    ours = np.asarray(resize_crop(image, backbone, crop, Image.Resampling.BILINEAR))
    assert ours.shape == (INPUT_SIZE, INPUT_SIZE, 3)
    assert np.array_equal(ours, expected)

    mask = _picture(*size, "L")
    nearest = T.InterpolationMode.NEAREST
    steps = (
        [T.Resize(RESIZE[backbone], nearest), T.CenterCrop(INPUT_SIZE)]
        if crop
        else [T.Resize((INPUT_SIZE, INPUT_SIZE), nearest)]
    )
    expected_mask = np.asarray(T.Compose(steps)(mask))
    assert np.array_equal(
        np.asarray(resize_crop(mask, backbone, crop, Image.NEAREST)), expected_mask
    )


def test_an_rgb_png_with_a_transparent_colour_decodes_as_pillows_rgb(tmp_path: Path) -> None:
    """A tRNS chunk: libspng returns the three colour channels, as Pillow's mode RGB."""
    path = tmp_path / "trns.png"
    _picture(40, 30, "RGB").save(path, transparency=(0, 0, 0))
    fast = decode_fast(path.read_bytes())
    with Image.open(path) as expected:
        assert fast is not None and fast.mode == expected.mode == "RGB"
        assert np.array_equal(np.asarray(fast), np.asarray(expected))
