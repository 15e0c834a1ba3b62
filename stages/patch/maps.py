"""Patch-score grids to anomaly maps, as PatchCore and anomalib make them.

A grid of patch scores ``(h, w)`` is upsampled bilinearly to the target ``(H, W)`` (the
model's input, ``align_corners=False``), then blurred with a Gaussian of ``sigma`` 4 (the
PatchCore paper's) whose kernel has ``2 * int(4 * sigma + 0.5) + 1`` taps (anomalib's
size; the same as scipy's ``gaussian_filter`` with its default ``truncate=4``). The borders
are reflected (anomalib's padding); a map too small to reflect a half kernel is padded by
repeating its edge instead. Float32, as the maps are stored.
"""

from __future__ import annotations

import numpy as np

SIGMA = 4.0


def gaussian_kernel_size(sigma: float) -> int:
    """Taps of the blur kernel: ``2 * int(4 * sigma + 0.5) + 1`` (anomalib's)."""
    return 2 * int(4.0 * sigma + 0.5) + 1


def gaussian_kernel(sigma: float) -> np.ndarray:
    """The normalised 1-D Gaussian of :func:`gaussian_kernel_size` taps (float64)."""
    radius = gaussian_kernel_size(sigma) // 2
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def anomaly_maps(grids: np.ndarray, size: tuple[int, int], sigma: float = SIGMA) -> np.ndarray:
    """``(n, h, w)`` patch-score grids to ``(n, H, W)`` float32 anomaly maps (``size`` is
    ``(H, W)``; need not be square); ``sigma <= 0`` skips the blur."""
    g = np.asarray(grids)
    if g.ndim != 3 or min(g.shape) < 1:
        raise ValueError(f"grids must be (n_images, h, w), got shape {g.shape}")
    import torch  # here, not at the top: the evaluate stage imports torch only for maps
    import torch.nn.functional as F

    height, width = (int(v) for v in size)
    if height < 1 or width < 1:
        raise ValueError(f"map size must be positive, got {size}")
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(g, dtype=np.float32))[:, None]
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
        if sigma > 0:
            k = torch.from_numpy(gaussian_kernel(sigma).astype(np.float32))
            r = len(k) // 2
            mode = "reflect" if min(height, width) > r else "replicate"
            x = F.pad(x, (r, r, r, r), mode=mode)
            x = F.conv2d(x, k.view(1, 1, 1, -1))  # separable: rows, then columns
            x = F.conv2d(x, k.view(1, 1, -1, 1))
        return x[:, 0].numpy()
