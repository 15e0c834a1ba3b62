"""Anomaly maps (stages.patch.maps) against torch's bilinear and scipy's Gaussian filter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from stages.patch.maps import anomaly_maps, gaussian_kernel, gaussian_kernel_size


def test_kernel_size_as_anomalib() -> None:
    assert gaussian_kernel_size(4.0) == 33
    assert gaussian_kernel_size(1.0) == 9


@pytest.mark.parametrize("size", [(224, 224), (96, 160)])
def test_map_is_bilinear_then_gaussian_in_the_interior(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    grids = rng.gamma(2.0, size=(3, 14, 10)).astype(np.float32)
    got = anomaly_maps(grids, size)
    assert got.shape == (3, *size) and got.dtype == np.float32
    up = F.interpolate(
        torch.from_numpy(grids)[:, None], size=size, mode="bilinear", align_corners=False
    )[:, 0].numpy()
    want = np.stack([gaussian_filter(u.astype(np.float64), sigma=4.0) for u in up])
    r = 16  # half the kernel: beyond it the border padding plays no part
    np.testing.assert_allclose(got[:, r:-r, r:-r], want[:, r:-r, r:-r], rtol=1e-5, atol=1e-6)
    # at the border, reflection: scipy's "mirror" mode repeats no edge pixel, as torch's
    mirror = np.stack([gaussian_filter(u.astype(np.float64), 4.0, mode="mirror") for u in up])
    np.testing.assert_allclose(got, mirror, rtol=1e-5, atol=1e-6)


def test_constant_grid_stays_constant_and_no_blur() -> None:
    grids = np.full((2, 4, 4), 3.5, dtype=np.float32)
    np.testing.assert_allclose(anomaly_maps(grids, (10, 12)), 3.5, rtol=1e-6)  # replicate pad
    up = anomaly_maps(np.arange(4, dtype=np.float32).reshape(1, 2, 2), (4, 4), sigma=0)
    np.testing.assert_allclose(up[0, 0], [0.0, 0.25, 0.75, 1.0])


def test_bad_grid() -> None:
    with pytest.raises(ValueError, match="grids"):
        anomaly_maps(np.zeros((4, 4)), (8, 8))


def test_map_equals_anomalib_blur() -> None:
    """anomalib's GaussianBlur2d (PatchCore's anomaly map) on the same upsampled grids."""
    components = pytest.importorskip("anomalib.models.components")
    rng = np.random.default_rng(1)
    grids = rng.gamma(2.0, size=(4, 28, 28)).astype(np.float32)
    up = F.interpolate(
        torch.from_numpy(grids)[:, None], size=(224, 224), mode="bilinear", align_corners=False
    )
    blur = components.GaussianBlur2d(sigma=4.0, channels=1, kernel_size=gaussian_kernel_size(4.0))
    with torch.no_grad():
        want = blur(up)[:, 0].numpy()
    np.testing.assert_allclose(anomaly_maps(grids, (224, 224)), want, rtol=1e-5, atol=1e-5)


def _torch_maps(grids: np.ndarray, size: tuple[int, int], sigma: float) -> np.ndarray:
    """The maps as torch computes them (the stage's first implementation): float32 bilinear
    resize, padding, then the separable float32 convolution."""
    x = F.interpolate(torch.from_numpy(grids)[:, None], size=size, mode="bilinear")
    if sigma > 0:
        k = torch.tensor(gaussian_kernel(sigma), dtype=torch.float32)
        r = len(k) // 2
        x = F.pad(x, (r, r, r, r), mode="reflect" if min(size) > r else "replicate")
        x = F.conv2d(F.conv2d(x, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    return x[:, 0].numpy()


@pytest.mark.parametrize(
    ("grid", "size", "sigma"),
    [((28, 28), (224, 224), 4.0), ((14, 10), (96, 160), 4.0), ((4, 4), (10, 12), 4.0),
     ((7, 9), (40, 20), 2.0), ((5, 3), (224, 224), 0.0), ((1, 1), (17, 33), 4.0)],
)  # fmt: skip
def test_maps_equal_torchs_resize_then_blur(grid, size, sigma) -> None:
    """The matrix form against torch's float32 ops: each output sums at most 2 resize and
    2 x 33 kernel products per axis, so float32 rounding stays below ~70 * 2**-24 (4e-6)
    of the largest value; 1e-5 of it bounds both."""
    grids = np.random.default_rng(2).gamma(2.0, size=(3, *grid)).astype(np.float32)
    want = _torch_maps(grids, size, sigma)
    got = anomaly_maps(grids, size, sigma)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))
