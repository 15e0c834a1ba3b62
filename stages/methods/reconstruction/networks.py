"""The networks of the reconstruction families (the math, no training glue).

Each network maps images ``(B, 3, S, S)`` in [0, 1] to a :class:`Reconstruction`: the
reconstructed images (a sigmoid output, in [0, 1]) and, for the VAE, each image's KL
divergence from the prior. In training mode the VAE samples its latent; in eval mode it
decodes the mean, so scoring is deterministic.

- :class:`ConvAutoencoder`: ``depth`` strided 4x4 convolutions (channels ``base``,
  ``2 base``, ... capped at 256, LeakyReLU 0.2) to a 1x1 bottleneck of
  ``latent_channels`` at ``S / 2**depth``; the decoder mirrors it with transposed
  convolutions, then a 3x3 convolution to RGB.
- :class:`VAE`: the same, with the bottleneck split into a mean and a log-variance
  (clamped to [-10, 10]) per latent element.
- :class:`EncoderDecoder`: a backbone of ``stages.backbones`` up to one layer (frozen or
  fine-tuned; its BatchNorm statistics stay frozen either way) and a learned decoder of
  transposed convolutions back to the input's size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

MAX_CHANNELS = 256


class Reconstruction(NamedTuple):
    images: torch.Tensor  # (B, 3, S, S) in [0, 1]
    kl: torch.Tensor | None = None  # (B,) KL divergence of each image's latent (VAE)


def channels(base: int, depth: int) -> list[int]:
    """The encoder's channels per stride-2 block: ``base * 2**i``, capped at 256."""
    return [min(base * 2**i, MAX_CHANNELS) for i in range(depth)]


def _down(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]


def _up(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]


def conv_encoder(base: int, depth: int, out_channels: int) -> nn.Sequential:
    """``depth`` stride-2 blocks, then a 1x1 convolution to ``out_channels``."""
    cs = channels(base, depth)
    layers = [m for c_in, c_out in zip([3, *cs[:-1]], cs, strict=True) for m in _down(c_in, c_out)]
    return nn.Sequential(*layers, nn.Conv2d(cs[-1], out_channels, 1))


def decoder(in_channels: int, ups: list[int]) -> nn.Sequential:
    """1x1 convolution to ``ups[0]`` channels, one transposed stride-2 block per entry of
    ``ups`` (each to the next entry's width, the last keeping its own), then 3x3 to RGB and
    a sigmoid: the output is ``2**len(ups)`` times the input's size."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, ups[0], 1), nn.LeakyReLU(0.2)]
    for c_in, c_out in zip(ups, [*ups[1:], ups[-1]], strict=True):
        layers += _up(c_in, c_out)
    return nn.Sequential(*layers, nn.Conv2d(ups[-1], 3, 3, padding=1), nn.Sigmoid())


class ConvAutoencoder(nn.Module):
    def __init__(self, base: int, depth: int, latent_channels: int) -> None:
        super().__init__()
        self.encoder = conv_encoder(base, depth, latent_channels)
        self.decoder = decoder(latent_channels, channels(base, depth)[::-1])

    def forward(self, x: torch.Tensor) -> Reconstruction:
        return Reconstruction(self.decoder(self.encoder(x)))


class VAE(nn.Module):
    def __init__(self, base: int, depth: int, latent_channels: int) -> None:
        super().__init__()
        self.encoder = conv_encoder(base, depth, 2 * latent_channels)
        self.decoder = decoder(latent_channels, channels(base, depth)[::-1])

    def forward(self, x: torch.Tensor) -> Reconstruction:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        logvar = logvar.clamp(-10.0, 10.0)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
        return Reconstruction(self.decoder(z), kl)


class EncoderDecoder(nn.Module):
    """``encoder``: a module whose forward returns ``{layer: (B, C, h, w)}`` (a
    ``stages.backbones.build_extractor``), fed images normalised with ``mean``/``std``."""

    def __init__(self, encoder: nn.Module, layer: str, mean: tuple[float, ...],
                 std: tuple[float, ...], size: int, latent_channels: int, base: int,
                 freeze: bool) -> None:  # fmt: skip
        super().__init__()
        self.encoder, self.layer, self.freeze = encoder, layer, freeze
        self.encoder.requires_grad_(not freeze)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        with torch.no_grad():
            c, h = self.features(torch.zeros(1, 3, size, size)).shape[1:3]
        steps = (size // h).bit_length() - 1
        if h * 2**steps != size:
            raise ValueError(f"layer {layer} maps {size} px to {h}: not a power-of-two stride")
        ups = [max(MAX_CHANNELS >> i, base) for i in range(max(steps, 1))]
        self.bottleneck = nn.Sequential(nn.Conv2d(c, latent_channels, 1), nn.LeakyReLU(0.2))
        self.decoder = decoder(latent_channels, ups) if steps else _flat_decoder(latent_channels)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder((x - self.mean) / self.std)[self.layer]

    def train(self, mode: bool = True) -> EncoderDecoder:
        super().train(mode)
        self.encoder.eval()  # frozen BatchNorm statistics, fine-tuned or not
        return self

    def forward(self, x: torch.Tensor) -> Reconstruction:
        if self.freeze:
            with torch.no_grad():
                f = self.features(x)
        else:
            f = self.features(x)
        return Reconstruction(self.decoder(self.bottleneck(f)))


def _flat_decoder(c: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, 3, 3, padding=1), nn.Sigmoid())


def reconstruction_loss(x: torch.Tensor, recon: torch.Tensor, kind: str) -> torch.Tensor:
    """The batch's reconstruction loss: ``mse`` (mean squared error), or ``ssim+l1``
    (1 - SSIM, Gaussian window 11 / sigma 1.5, plus the mean absolute error)."""
    if kind == "mse":
        return F.mse_loss(recon, x)
    from torchmetrics.functional.image import structural_similarity_index_measure

    ssim = structural_similarity_index_measure(recon, x, data_range=1.0)
    return 1.0 - ssim + F.l1_loss(recon, x)
