"""``VAE``: a convolutional variational autoencoder (the ``ConvAutoencoder``'s network
with a Gaussian latent), trained on the good images.

Objective per batch: the reconstruction loss plus ``kl_weight`` times the KL divergence of
each image's latent from N(0, I), summed over the latent and divided by the image's
3 x S x S values (so ``kl_weight: 1`` is the evidence lower bound of a Gaussian decoder
with variance 1/2, per pixel value, under ``loss: mse``). Scoring decodes the latent's
mean: image score = the reconstruction error (``score``), plus that KL term when
``score_kl`` (an image whose code is unlike the good ones' scores higher); the anomaly
map is the residual, as for every reconstruction family.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
from pydantic import Field
from torch import nn

from stages.methods.reconstruction.conv_autoencoder import (
    ConvAutoencoderFamily,
    ConvAutoencoderHyper,
)
from stages.methods.reconstruction.networks import VAE, Reconstruction


class VAEHyper(ConvAutoencoderHyper):
    kl_weight: Annotated[float, Field(ge=0)] = 1.0
    score_kl: bool = False


class VAEFamily(ConvAutoencoderFamily):
    """The ConvAutoencoder's hyperparameters and checks, a Gaussian latent."""

    name = "VAE"
    hyper = VAEHyper

    def network(self, hp: VAEHyper, seed: int) -> nn.Module:
        return VAE(hp.base_channels, hp.depth, hp.latent_channels)

    @staticmethod
    def kl_term(hp: VAEHyper, x: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
        """Each image's weighted KL divergence per pixel value."""
        return hp.kl_weight * kl / x[0].numel()

    def objective(self, hp: VAEHyper, x: torch.Tensor, out: Reconstruction) -> torch.Tensor:
        assert out.kl is not None
        return super().objective(hp, x, out) + self.kl_term(hp, x, out.kl).mean()

    def image_scores(self, hp: VAEHyper, residual: np.ndarray, out: Reconstruction) -> np.ndarray:
        scores = super().image_scores(hp, residual, out)
        if hp.score_kl and out.kl is not None:
            scores = scores + self.kl_term(hp, out.images, out.kl).double().numpy()
        return scores
