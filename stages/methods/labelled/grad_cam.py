"""Grad-CAM of a labelled family's classifier (pytorch-grad-cam's ``GradCAM``): where in an
image the evidence for "anomalous" lies, as the family's anomaly map.

pytorch-grad-cam scales each image's map to [0, 1] on its own, which would give a good
image as bright a map as a defective one; the map is therefore multiplied by the image's
probability of being anomalous, so maps compare across images (the pixel metrics pool
every pixel of every held-out image).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def grad_cam(model: nn.Module, layer: nn.Module, images: torch.Tensor, output: int,
             probabilities: np.ndarray, batch_size: int) -> np.ndarray:  # fmt: skip
    """``(n, S, S)`` float32 maps of ``model``'s output ``output`` (the anomalous class's
    logit) at ``layer``, each in [0, the image's probability]; ``images`` on the CPU, the
    model on its device."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model.eval()
    device = next(model.parameters()).device
    maps = []
    with GradCAM(model=model, target_layers=[layer]) as cam:
        for start in range(0, len(images), batch_size):
            # the input carries the gradient when every layer before ``layer`` is frozen
            x = images[start : start + batch_size].to(device, copy=True).requires_grad_(True)
            maps.append(cam(input_tensor=x, targets=[ClassifierOutputTarget(output)] * len(x)))
    out = np.concatenate(maps).astype(np.float32)
    return out * np.asarray(probabilities, dtype=np.float32)[:, None, None]
