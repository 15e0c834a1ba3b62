"""The reconstruction baselines: networks trained on the good images, scored by how badly
they rebuild an image (the course reports' convolutional autoencoder, VAE and
pretrained-encoder autoencoder). One module per family; what they share (training
hyperparameters, the resumable epoch loop, residual scores and anomaly maps) is in
:mod:`.base`, :mod:`.training` and :mod:`.networks`.
"""

from stages.methods.reconstruction.base import ReconstructionFamily, ReconstructionHyper
from stages.methods.reconstruction.conv_autoencoder import ConvAutoencoderFamily
from stages.methods.reconstruction.encoder_autoencoder import EncoderAutoencoderFamily
from stages.methods.reconstruction.vae import VAEFamily

__all__ = ["ConvAutoencoderFamily", "EncoderAutoencoderFamily", "ReconstructionFamily",
           "ReconstructionHyper", "VAEFamily"]  # fmt: skip
