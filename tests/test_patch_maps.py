"""Anomaly maps (stages.patch.maps) against torch's bilinear and scipy's Gaussian filter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from stages.patch.maps import anomaly_maps, gaussian_kernel_size


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
