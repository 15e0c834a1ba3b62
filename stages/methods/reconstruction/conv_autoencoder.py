"""``ConvAutoencoder``: a convolutional autoencoder trained on the good images, scored by
its reconstruction error (the course reports' first attempt; with ``train_augment``, their
second: flips and slight rotations during training).

Hyperparameters: :class:`stages.methods.reconstruction.base.ReconstructionHyper` (image
size, epochs, learning rate, batch size, loss, augmentation, score) plus the network's
``depth`` (stride-2 blocks), ``base_channels`` (the first block's width, doubled per
block up to 256) and ``latent_channels`` (the bottleneck's channels at
``image_size / 2**depth``: 64 px, depth 4, 16 channels is a 4 x 4 x 16 code).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field
from torch import nn

from stages.methods.base import PositiveInt
from stages.methods.reconstruction.base import (
    ReconstructionFamily,
    ReconstructionHyper,
    power_of_two_error,
)
from stages.methods.reconstruction.networks import ConvAutoencoder


class ConvAutoencoderHyper(ReconstructionHyper):
    depth: Annotated[int, Field(ge=1, le=7)] = 4
    base_channels: PositiveInt = 32
    latent_channels: PositiveInt = 16


class ConvAutoencoderFamily(ReconstructionFamily):
    name = "ConvAutoencoder"
    hyper = ConvAutoencoderHyper

    def check(self, hp: ConvAutoencoderHyper) -> None:
        error = power_of_two_error(hp, hp.depth)
        if error:
            raise error

    def network(self, hp: ConvAutoencoderHyper, seed: int) -> nn.Module:
        return ConvAutoencoder(hp.base_channels, hp.depth, hp.latent_channels)
