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


def _bilinear(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` matrix of torch's 1-D bilinear resize, ``align_corners=False``:
    output ``i`` samples ``(i + 0.5) * n_in / n_out - 0.5`` (clamped at 0) between its two
    neighbours, the last one repeated past the end."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = src - low
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), low), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), high), frac)
    return m


def _blur(n: int, kernel: np.ndarray, reflect: bool) -> np.ndarray:
    """``(n, n)`` matrix of the 1-D convolution with ``kernel`` over a signal of length ``n``
    padded by half the kernel: reflected (no edge repeated, torch's "reflect") or repeated
    edge ("replicate")."""
    r = len(kernel) // 2
    index = np.arange(n)[:, None] + np.arange(-r, r + 1)[None, :]
    if reflect:
        index = np.abs(index)
        index = np.where(index > n - 1, 2 * (n - 1) - index, index)
    else:
        index = np.clip(index, 0, n - 1)
    m = np.zeros((n, n))
    np.add.at(m, (np.repeat(np.arange(n), len(kernel)), index.ravel()), np.tile(kernel, n))
    return m


def anomaly_maps(grids: np.ndarray, size: tuple[int, int], sigma: float = SIGMA) -> np.ndarray:
    """``(n, h, w)`` patch-score grids to ``(n, H, W)`` float32 anomaly maps (``size`` is
    ``(H, W)``; need not be square); ``sigma <= 0`` skips the blur.

    Both steps are linear and separable, so each axis is one matrix (the blur's times the
    resize's, in float64) and a map is ``rows @ grid @ cols.T``: numpy only, no torch to
    import, and closer to the exact value than torch's float32 resize then convolution
    (the two agree to about 1e-7 relative)."""
    g = np.asarray(grids)
    if g.ndim != 3 or min(g.shape) < 1:
        raise ValueError(f"grids must be (n_images, h, w), got shape {g.shape}")
    height, width = (int(v) for v in size)
    if height < 1 or width < 1:
        raise ValueError(f"map size must be positive, got {size}")
    rows, cols = _bilinear(g.shape[1], height), _bilinear(g.shape[2], width)
    if sigma > 0:
        kernel = gaussian_kernel(sigma)
        reflect = min(height, width) > len(kernel) // 2
        rows, cols = _blur(height, kernel, reflect) @ rows, _blur(width, kernel, reflect) @ cols
    out = np.empty((len(g), height, width), dtype=np.float32)
    for start in range(0, len(g), 64):  # bounded float64 temporaries
        chunk = g[start : start + 64].astype(np.float64)
        out[start : start + 64] = rows @ chunk @ cols.T
    return out
