"""Image decoding and the input geometry, without torch.

Shared by the stages that read images but run no network (dataset checks, the evaluation's
masks, query's map figures), so that they do not import torch and torchvision (about 4 s
of a core per process). ``stages.backbones`` builds the networks' preprocessing on the same
numbers and a test checks that the two agree with torchvision's own transforms.
"""

from __future__ import annotations

from pathlib import Path

import pyspng
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
INPUT_SIZE = 224  # the networks' input: every feature, map and mask is in this geometry

# Shorter side before the 224 centre crop (``extract.crop: true``), per backbone: the
# ImageNet weights' own ``transforms()`` (torchvision's presets; 232 for resnet50's V2
# weights), 256 for efficientnet_lite0 and pixels. ``stages.backbones`` checks its registry
# against this table.
RESIZE: dict[str, int] = {
    "resnet18": 256,
    "resnet50": 232,
    "vit_b_16": 256,
    "vit_b_32": 256,
    "efficientnet_lite0": 256,
    "pixels": 256,
}


def is_fast_png(data: bytes) -> bool:
    """A non-interlaced 8-bit grayscale or RGB PNG (from its IHDR chunk): what libspng
    decodes here."""
    # IHDR, the first chunk: bit depth at byte 24, colour type at 25, interlace at 28.
    return (
        data[:8] == PNG_SIGNATURE
        and data[12:16] == b"IHDR"
        and len(data) > 28
        and data[24] == 8
        and data[25] in (0, 2)  # grayscale, RGB
        and data[28] == 0
    )


def decode_fast(data: bytes) -> Image.Image | None:
    """The PIL image of PNG bytes decoded by libspng, or None where Pillow must decode them:
    anything but a non-interlaced 8-bit grayscale or RGB PNG, or a file libspng rejects."""
    if not is_fast_png(data):
        return None
    try:
        pixels = pyspng.load(data)
    except Exception:  # Pillow decodes it, or says what is wrong
        return None
    return Image.fromarray(pixels)


def read_image(path: str | Path) -> Image.Image:
    """Decode an image file into a loaded PIL image, as ``Image.open`` would.

    Non-interlaced 8-bit grayscale or RGB PNGs (all of MVTec AD's) are decoded by libspng
    (pyspng): about 1.6x faster than Pillow on MVTec's 900x900 PNGs, whose rows are mostly
    Paeth-filtered. PNG is lossless, so the pixels are identical. Any other file (palette,
    alpha, 16-bit, interlaced, JPEG, ...) and any PNG libspng rejects goes to Pillow.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    fast = decode_fast(data)
    if fast is not None:
        return fast
    image = Image.open(path)
    image.load()
    return image


def resize_crop(
    image: Image.Image, backbone: str, crop: bool, resample: Image.Resampling
) -> Image.Image:
    """The resize/crop of the networks' input on a PIL image, as torchvision's ``Resize``
    and ``CenterCrop`` compute it on PIL images: ``crop`` resizes the shorter side to
    :data:`RESIZE` (the longer one truncated to keep the aspect ratio) then cuts the central
    224x224 (offsets rounded half to even); otherwise the whole image goes to 224x224."""
    if not crop:
        return image.resize((INPUT_SIZE, INPUT_SIZE), resample)
    size = RESIZE[backbone]
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short != size:
        new_long = int(size * long / short)
        new = (size, new_long) if width <= height else (new_long, size)
        image = image.resize(new, resample)
        width, height = new
    if width < INPUT_SIZE or height < INPUT_SIZE:  # never with 232 or 256: no padding needed
        raise ValueError(f"{width}x{height} is smaller than the {INPUT_SIZE} crop")
    top = round((height - INPUT_SIZE) / 2.0)
    left = round((width - INPUT_SIZE) / 2.0)
    return image.crop((left, top, left + INPUT_SIZE, top + INPUT_SIZE))
