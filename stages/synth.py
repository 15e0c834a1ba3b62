"""Embedded default dataset: a synthetic dataset in the exact MVTec AD layout.

Real MVTec AD cannot ship with the project, so this stage draws one, deterministic from
``synth.seed``: every image has its own random generator seeded from (seed, category,
split, label, index), so changing a count adds or drops images without reshuffling the
others, and the same params give byte-identical PNGs. Four categories mirror the kinds
of MVTec AD: ``weave`` (periodic grayscale texture), ``fibre`` (irregular colour texture),
``disc`` (rotation-invariant object) and ``chip`` (oriented object whose rotation or flip
is itself a defect). Defects vary in size and contrast, some subtle, each with a mask.

Layout written under ``synth.out``::

    <category>/train/good/000.png
    <category>/test/good/000.png
    <category>/test/<defect>/000.png
    <category>/ground_truth/<defect>/000_mask.png   (mode L, 0 or 255)

Every file is written atomically; files of a category that the current params do not
produce (e.g. after ``n_train`` shrinks) are removed, so the folder equals the params.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from stages.errors import UserError, run_cli, setup_logging
from stages.io import remove_stale_temps, write_bytes_atomic, write_text_atomic
from stages.params import SynthParams, load_params, stage_args

Array = np.ndarray
# (image as floats in [0, 1], HxW or HxWx3; defect mask HxW bool, or None for good)
Rendered = tuple[Array, Array | None]
Renderer = Callable[[np.random.Generator, int, str | None], Rendered]

LUMA = np.array([0.299, 0.587, 0.114])
WRITERS = 16  # threads writing files


# --------------------------------------------------------------------------- helpers


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[Array, Array]:
    """Pixel-centre coordinates (y, x) of a size x size image, read-only."""
    c = np.arange(size, dtype=np.float64) + 0.5
    y, x = np.meshgrid(c, c, indexing="ij")
    y.flags.writeable = False
    x.flags.writeable = False
    return y, x


def _soft(dist: Array) -> Array:
    """Anti-aliased coverage from a signed distance in pixels (positive inside)."""
    return np.clip(dist + 0.5, 0.0, 1.0)


def _disc(y: Array, x: Array, cy: float, cx: float, r: float) -> Array:
    return _soft(r - np.hypot(y - cy, x - cx))


def _rect(u: Array, v: Array, cu: float, cv: float, hw: float, hh: float) -> Array:
    return _soft(np.minimum(hw - np.abs(u - cu), hh - np.abs(v - cv)))


def _segment(y: Array, x: Array, p0: Sequence[float], p1: Sequence[float], width: float) -> Array:
    """Coverage of a round-capped line from p0 to p1 (points as (y, x))."""
    (y0, x0), (y1, x1) = p0, p1
    dy, dx = y1 - y0, x1 - x0
    length2 = max(dy * dy + dx * dx, 1e-9)
    t = np.clip(((y - y0) * dy + (x - x0) * dx) / length2, 0.0, 1.0)
    return _soft(width / 2 - np.hypot(y - (y0 + t * dy), x - (x0 + t * dx)))


def _polyline(y: Array, x: Array, points: Sequence[Sequence[float]], width: float) -> Array:
    alpha = np.zeros_like(y)
    for p0, p1 in pairwise(points):
        alpha = np.maximum(alpha, _segment(y, x, p0, p1, width))
    return alpha


def _blob(
    rng: np.random.Generator, y: Array, x: Array, cy: float, cx: float, r: float, feather: float
) -> Array:
    """Irregular blob (wobbly radius), edge softened by a Gaussian of ``feather`` pixels."""
    phi = np.arctan2(y - cy, x - cx)
    radius = np.full_like(y, r)
    for k in (2, 3, 5):
        radius += r * rng.uniform(0.0, 0.5 / k) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    alpha = _soft(radius - np.hypot(y - cy, x - cx))
    return ndimage.gaussian_filter(alpha, feather) if feather > 0 else alpha


def _scratch_path(
    rng: np.random.Generator, start: tuple[float, float], angle: float, length: float
) -> list[tuple[float, float]]:
    """A slightly bent three-point path from ``start`` in direction ``angle``."""
    bend = rng.uniform(-0.35, 0.35)
    mid = (start[0] + 0.5 * length * np.sin(angle), start[1] + 0.5 * length * np.cos(angle))
    end = (
        mid[0] + 0.5 * length * np.sin(angle + bend),
        mid[1] + 0.5 * length * np.cos(angle + bend),
    )
    return [start, mid, end]


def _noise_field(rng: np.random.Generator, size: int, sigma: float | tuple[float, float]) -> Array:
    """Smooth Gaussian noise with unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return field / (field.std() + 1e-12)


def _mask(alpha: Array, threshold: float = 0.5) -> Array:
    """Binary mask of a defect's coverage; never empty (keeps the strongest pixels)."""
    mask = alpha > threshold
    if not mask.any():
        mask = alpha >= 0.5 * alpha.max()
    return mask


def _diff_mask(clean: Array, changed: Array, threshold: float = 0.1) -> Array:
    """Mask of where a defect changed a noise-free render: grown one pixel, holes filled."""
    diff = np.abs(changed - clean)
    if diff.ndim == 3:
        diff = diff.max(axis=-1)
    mask = ndimage.binary_closing(ndimage.binary_dilation(_mask(diff, threshold)))
    return ndimage.binary_fill_holes(mask)


def _finish(rng: np.random.Generator, img: Array, noise: float, gradient: float) -> Array:
    """Lighting ramp in a random direction, global gain and sensor noise, then to uint8."""
    size = img.shape[0]
    y, x = _grid(size)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (
        1
        + rng.uniform(0, gradient)
        * ((x - size / 2) * np.cos(angle) + (y - size / 2) * np.sin(angle))
        / size
    )
    gain = rng.uniform(0.95, 1.05)
    if img.ndim == 3:
        ramp = ramp[..., None]
    img = img * ramp * gain + rng.normal(0.0, noise, img.shape)
    return np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


def _blend(img: Array, alpha: Array, target: Array | float) -> Array:
    if img.ndim == 3 and alpha.ndim == 2:
        alpha = alpha[..., None]
    return img * (1 - alpha) + alpha * target


# --------------------------------------------------------------------------- weave


def _weave_pattern(y: Array, x: Array, period: float, angle: float, oy: float, ox: float) -> Array:
    """Plain weave: checkerboard of half-period cells, the top thread alternating."""
    ca, sa = np.cos(angle), np.sin(angle)
    u = (x - ox) * ca + (y - oy) * sa
    v = -(x - ox) * sa + (y - oy) * ca
    half = period / 2
    iu, iv = np.floor(u / half), np.floor(v / half)
    fu, fv = u / half - iu, v / half - iv
    over_h = (iu + iv) % 2 == 0
    ridges = 2 * np.pi / (period / 3)
    horizontal = np.sin(np.pi * fv) ** 0.6 * (0.9 + 0.1 * np.cos(ridges * u))
    vertical = np.sin(np.pi * fu) ** 0.6 * (0.9 + 0.1 * np.cos(ridges * v))
    return np.where(over_h, 0.25 + 0.55 * horizontal, 0.2 + 0.5 * vertical)


def _render_weave(rng: np.random.Generator, size: int, defect: str | None) -> Rendered:
    y, x = _grid(size)
    k = size / 96
    period = size / 8 * rng.uniform(0.97, 1.03)
    angle = np.deg2rad(rng.uniform(-2, 2))
    oy, ox = rng.uniform(0, period, 2)
    img = _weave_pattern(y, x, period, angle, oy, ox)
    img = img * (1 + 0.05 * _noise_field(rng, size, 8 * k))
    mask = None
    if defect == "scratch":
        length = size * rng.uniform(0.12, 0.6)
        start = tuple(rng.uniform(0.15, 0.85, 2) * size)
        path = _scratch_path(rng, start, rng.uniform(0, 2 * np.pi), length)
        alpha = _polyline(y, x, path, k * rng.uniform(1.0, 2.5))
        contrast = rng.uniform(0.12, 0.5) * rng.choice([-1, 1])
        img = _blend(img, alpha, np.clip(img + contrast, 0, 1))
        mask = _mask(alpha)
    elif defect == "hole":
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        alpha = _blob(rng, y, x, cy, cx, size * rng.uniform(0.03, 0.1), 0.6 * k)
        dark = rng.uniform(0.03, 0.2) + 0.03 * _noise_field(rng, size, 1.5 * k)
        img = _blend(img, alpha, dark)
        mask = _mask(alpha)
    elif defect == "misweave":
        cy, cx = rng.uniform(0.25, 0.75, 2) * size
        alpha = _blob(rng, y, x, cy, cx, size * rng.uniform(0.07, 0.2), 1.0 * k)
        shifted = _weave_pattern(
            y,
            x,
            period * rng.uniform(0.9, 1.1),
            angle + np.deg2rad(rng.uniform(-12, 12)),
            oy + period * rng.uniform(0.2, 0.5),
            ox + period * rng.uniform(0.2, 0.5),
        )
        img = _blend(img, alpha, shifted)
        mask = _mask(alpha)
    elif defect == "stain":
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        alpha = _blob(rng, y, x, cy, cx, size * rng.uniform(0.06, 0.18), 2.0 * k)
        img = img * (1 - alpha * rng.uniform(0.15, 0.45))
        mask = _mask(alpha)
    return img, mask


# --------------------------------------------------------------------------- fibre


def _render_fibre(rng: np.random.Generator, size: int, defect: str | None) -> Rendered:
    y, x = _grid(size)
    k = size / 96
    fine = _noise_field(rng, size, (2.5 * k, 0.6 * k))
    coarse = _noise_field(rng, size, 5 * k)
    tone = 0.5 + 0.11 * fine + 0.06 * coarse
    colour = np.array([0.62, 0.45, 0.30]) + rng.normal(0, 0.012, 3)
    img = tone[..., None] / 0.5 * colour
    mask = None
    if defect == "cut":
        length = size * rng.uniform(0.12, 0.55)
        start = tuple(rng.uniform(0.15, 0.85, 2) * size)
        path = _scratch_path(rng, start, rng.uniform(0, 2 * np.pi), length)
        alpha = _polyline(y, x, path, k * rng.uniform(1.0, 2.2))
        img = img * (1 - alpha * rng.uniform(0.25, 0.75))[..., None]
        mask = _mask(alpha)
    elif defect == "hole":
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        r = size * rng.uniform(0.025, 0.09)
        alpha = _blob(rng, y, x, cy, cx, r, 0.5 * k)
        rim = np.clip(_blob(rng, y, x, cy, cx, r + 1.5 * k, 0.8 * k) - alpha, 0, 1)
        img = _blend(img, rim * 0.6, img * 1.25)
        img = _blend(img, alpha, colour * rng.uniform(0.1, 0.3))
        mask = _mask(np.maximum(alpha, rim))
    elif defect == "color":
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        alpha = _blob(rng, y, x, cy, cx, size * rng.uniform(0.06, 0.18), 1.5 * k)
        # A hue shift orthogonal to luminance: nearly invisible in grayscale.
        direction = rng.standard_normal(3)
        direction -= direction @ LUMA / (LUMA @ LUMA) * LUMA
        direction /= np.linalg.norm(direction)
        img = img + alpha[..., None] * rng.uniform(0.06, 0.2) * direction
        mask = _mask(alpha)
    elif defect == "glue":
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        alpha = _blob(rng, y, x, cy, cx, size * rng.uniform(0.06, 0.16), 1.0 * k)
        smooth = ndimage.gaussian_filter(img, (3 * k, 3 * k, 0))
        img = _blend(img, alpha, smooth * rng.uniform(1.0, 1.2))
        mask = _mask(alpha)
    return img, mask


# --------------------------------------------------------------------------- disc


def _render_disc(rng: np.random.Generator, size: int, defect: str | None) -> Rendered:
    """A hazelnut/bottle-bottom seen from the top, at a random rotation."""
    y, x = _grid(size)
    k = size / 96
    cy, cx = size / 2 + rng.uniform(-0.02, 0.02, 2) * size
    radius = size * 0.33 * rng.uniform(0.96, 1.04)
    theta = rng.uniform(0, 2 * np.pi)
    dy, dx = y - cy, x - cx
    r = np.hypot(dy, dx)
    phi = np.arctan2(dy, dx)
    rel = np.clip(r / radius, 0.0, 1.0)
    shade = 0.55 + 0.45 * np.sqrt(1 - rel**2)
    ridges = 1 + 0.16 * np.cos(7 * (phi - theta)) * rel**1.5
    rings = 1 + 0.05 * np.sin(2 * np.pi * r / (radius / 2.5))
    texture = 1 + 0.06 * _noise_field(rng, size, 1.0 * k)
    psi = rng.uniform(0, 2 * np.pi)
    hy, hx = cy + 0.3 * radius * np.sin(psi), cx + 0.3 * radius * np.cos(psi)
    highlight = 0.22 * np.exp(-((y - hy) ** 2 + (x - hx) ** 2) / (2 * (0.18 * radius) ** 2))
    colour = np.array([0.58, 0.37, 0.19]) + rng.normal(0, 0.015, 3)
    # The stem scar marks the rotation theta: good discs point every way.
    sy, sx = y - cy - 0.5 * radius * np.sin(theta), x - cx - 0.5 * radius * np.cos(theta)
    along, across = sy * np.sin(theta) + sx * np.cos(theta), sy * np.cos(theta) - sx * np.sin(theta)
    scar = np.exp(-((along / (0.12 * radius)) ** 2 + (across / (0.06 * radius)) ** 2) / 2)
    obj = colour * (shade * ridges * rings * texture * (1 - 0.5 * scar))[..., None]
    obj = obj + highlight[..., None]
    background = np.array([0.76, 0.77, 0.79]) + rng.normal(0, 0.01, 3)
    halo = 1 - 0.18 * np.exp(-((r - radius).clip(0) ** 2) / (2 * (0.08 * radius) ** 2))
    bg = background * ((1 + 0.02 * _noise_field(rng, size, 8 * k)) * halo)[..., None]
    body = _soft(radius - r)
    mask = None
    if defect == "broken":
        beta = rng.uniform(0, 2 * np.pi)
        dist = radius * rng.uniform(0.95, 1.1)
        bite = _disc(
            y,
            x,
            cy + dist * np.sin(beta),
            cx + dist * np.cos(beta),
            radius * rng.uniform(0.15, 0.4),
        )
        mask = _mask(body * bite)
        body = body * (1 - bite)
    img = _blend(bg, body, obj)
    if defect == "crack":
        beta = rng.uniform(0, 2 * np.pi)
        start = (cy + 0.95 * radius * np.sin(beta), cx + 0.95 * radius * np.cos(beta))
        inward = beta + np.pi + rng.uniform(-0.5, 0.5)
        path = _scratch_path(rng, start, inward, radius * rng.uniform(0.25, 0.9))
        alpha = _polyline(y, x, path, k * rng.uniform(1.0, 2.2)) * body
        img = img * (1 - alpha * rng.uniform(0.35, 0.85))[..., None]
        mask = _mask(alpha)
    elif defect == "hole":
        rho, beta = radius * np.sqrt(rng.uniform(0, 0.5)), rng.uniform(0, 2 * np.pi)
        hy, hx = cy + rho * np.sin(beta), cx + rho * np.cos(beta)
        hr = max(radius * rng.uniform(0.06, 0.18), 1.5 * k)
        alpha = _disc(y, x, hy, hx, hr)
        depth = np.clip(1 - np.hypot(y - hy, x - hx) / hr, 0, 1)
        img = _blend(img, alpha, np.array([0.12, 0.08, 0.05]) * (1 - 0.6 * depth)[..., None])
        mask = _mask(alpha)
    elif defect == "contamination":
        rho, beta = radius * np.sqrt(rng.uniform(0, 0.8)), rng.uniform(0, 2 * np.pi)
        by, bx = cy + rho * np.sin(beta), cx + rho * np.cos(beta)
        alpha = _blob(rng, y, x, by, bx, radius * rng.uniform(0.08, 0.25), 0.7 * k)
        stuff = [
            np.array([0.9, 0.9, 0.85]),
            np.array([0.35, 0.55, 0.3]),
            np.array([0.2, 0.2, 0.26]),
        ]
        img = _blend(img, alpha * rng.uniform(0.35, 0.9), stuff[rng.integers(len(stuff))])
        mask = _mask(alpha)
    return img, mask


# --------------------------------------------------------------------------- chip


@dataclass(frozen=True)
class _ChipPose:
    """Where the chip lies: origin (pixels), rotation (radians), flips, bent/missing lead."""

    oy: float
    ox: float
    angle: float = 0.0
    hflip: bool = False
    vflip: bool = False
    lead: int = -1  # the lead a defect changes, -1 for none
    lead_keep: float = 1.0  # fraction of that lead's length left
    lead_bend: float = 0.0  # bend (radians) of that lead below its knee
    knee: float = 0.4  # where along the lead the bend starts


def _chip_clean(size: int, pose: _ChipPose) -> Array:
    """Noise-free chip (transistor-like: body, tab with hole, three leads, marker dot)."""
    y, x = _grid(size)
    dy, dx = y - pose.oy, x - pose.ox
    ca, sa = np.cos(pose.angle), np.sin(pose.angle)
    u = dx * ca + dy * sa
    v = -dx * sa + dy * ca
    if pose.hflip:
        u = -u
    if pose.vflip:
        v = -v
    s = size
    bg = np.broadcast_to(np.array([0.84, 0.86, 0.84]), (s, s, 3)).copy()
    leads = np.zeros((s, s))
    for i, lu in enumerate((-0.13 * s, 0.0, 0.13 * s)):
        top, length, width = 0.15 * s, 0.26 * s, 0.06 * s
        if i != pose.lead:
            leads = np.maximum(leads, _segment(v, u, (top, lu), (top + length, lu), width))
            continue
        knee = top + pose.knee * length
        rest = (1 - pose.knee) * length
        end = (knee + rest * np.cos(pose.lead_bend), lu + rest * np.sin(pose.lead_bend))
        if pose.lead_keep >= 1.0:
            path = [(top, lu), (knee, lu), end]
        else:
            path = [(top, lu), (top + max(pose.lead_keep, 0.02) * length, lu)]
        leads = np.maximum(leads, _polyline(v, u, path, width))
    tab = _rect(u, v, 0.0, -0.21 * s, 0.15 * s, 0.07 * s) * (
        1 - _disc(v, u, -0.22 * s, 0, 0.035 * s)
    )
    body = _rect(u, v, 0.0, 0.0, 0.22 * s, 0.16 * s)
    silhouette = np.maximum.reduce([leads, tab, body])
    img = bg * (1 - 0.3 * ndimage.gaussian_filter(silhouette, 0.02 * s))[..., None]
    img = _blend(img, leads, np.array([0.50, 0.49, 0.45]))
    img = _blend(img, tab, np.array([0.70, 0.71, 0.74]) * (1 + 0.15 * (v / s + 0.21))[..., None])
    bevel = 1 + 0.25 * np.clip(1 - (v / s + 0.16) / 0.04, 0, 1)
    img = _blend(img, body, np.array([0.22, 0.22, 0.24]) * bevel[..., None])
    label = _rect(u, v, 0.06 * s, 0.05 * s, 0.12 * s, 0.025 * s)
    img = _blend(img, label * body, np.array([0.55, 0.55, 0.52]))
    dot = _disc(v, u, -0.09 * s, -0.15 * s, 0.03 * s)
    return _blend(img, dot, np.array([0.9, 0.9, 0.88]))


MISPLACEMENTS = ("rot180", "rot90", "rot270", "hflip", "vflip", "shift", "tilt")


def _render_chip(rng: np.random.Generator, size: int, defect: str | None) -> Rendered:
    """A transistor-like part, always in the same orientation when good."""
    k = size / 96
    pose = _ChipPose(
        oy=size * 0.43 + rng.uniform(-0.015, 0.015) * size,
        ox=size * 0.5 + rng.uniform(-0.015, 0.015) * size,
        angle=np.deg2rad(rng.uniform(-1.5, 1.5)),
    )
    clean = _chip_clean(size, pose)
    changed = clean
    if defect == "misplaced":
        how = MISPLACEMENTS[rng.integers(len(MISPLACEMENTS))]
        if how.startswith("rot"):
            moved = _ChipPose(
                size - pose.oy if how == "rot180" else size / 2,
                size - pose.ox if how == "rot180" else size / 2,
                pose.angle + np.deg2rad(int(how[3:])),
            )
        elif how == "hflip":  # mirror image of the part, as if placed upside down
            moved = _ChipPose(pose.oy, size - pose.ox, -pose.angle, hflip=True)
        elif how == "vflip":
            moved = _ChipPose(size - pose.oy, pose.ox, -pose.angle, vflip=True)
        elif how == "shift":
            step, direction = size * rng.uniform(0.05, 0.18), rng.uniform(0, 2 * np.pi)
            moved = _ChipPose(
                pose.oy + step * np.sin(direction), pose.ox + step * np.cos(direction), pose.angle
            )
        else:  # tilt
            tilt = np.deg2rad(rng.uniform(6, 25) * rng.choice([-1, 1]))
            moved = _ChipPose(pose.oy, pose.ox, pose.angle + tilt)
        changed = _chip_clean(size, moved)
    elif defect == "bent_lead":
        bend = np.deg2rad(rng.uniform(15, 60) * rng.choice([-1, 1]))
        bent = _ChipPose(
            pose.oy,
            pose.ox,
            pose.angle,
            lead=int(rng.integers(3)),
            lead_bend=bend,
            knee=rng.uniform(0.2, 0.6),
        )
        changed = _chip_clean(size, bent)
    elif defect == "missing_lead":
        cut = _ChipPose(
            pose.oy,
            pose.ox,
            pose.angle,
            lead=int(rng.integers(3)),
            lead_keep=rng.uniform(0.0, 0.55),
        )
        changed = _chip_clean(size, cut)
    elif defect == "scratch":
        y, x = _grid(size)
        ca, sa = np.cos(pose.angle), np.sin(pose.angle)
        su, sv = rng.uniform(-0.17, 0.17) * size, rng.uniform(-0.12, 0.12) * size
        start = (pose.oy + su * sa + sv * ca, pose.ox + su * ca - sv * sa)
        path = _scratch_path(rng, start, rng.uniform(0, 2 * np.pi), size * rng.uniform(0.06, 0.22))
        body = _rect(*_to_chip(y, x, pose), 0.0, 0.0, 0.21 * size, 0.15 * size)
        alpha = _polyline(y, x, path, k * rng.uniform(1.0, 2.0)) * body
        changed = _blend(clean, alpha, clean + rng.uniform(0.12, 0.4))
    mask = None if defect is None else _diff_mask(clean, changed)
    texture = 1 + 0.015 * _noise_field(rng, size, 1.0 * k)
    return changed * texture[..., None], mask


def _to_chip(y: Array, x: Array, pose: _ChipPose) -> tuple[Array, Array]:
    """Image coordinates to the chip's own (u, v) coordinates, flips ignored."""
    dy, dx = y - pose.oy, x - pose.ox
    ca, sa = np.cos(pose.angle), np.sin(pose.angle)
    return dx * ca + dy * sa, -dx * sa + dy * ca


# --------------------------------------------------------------------------- categories


@dataclass(frozen=True)
class Category:
    """One synthetic category: PIL mode, defect types, renderer, and finishing noise."""

    mode: str
    defects: tuple[str, ...]
    render: Renderer
    noise: float
    gradient: float
    about: str


CATEGORIES: dict[str, Category] = {
    "weave": Category(
        "L",
        ("scratch", "hole", "misweave", "stain"),
        _render_weave,
        0.03,
        0.12,
        "periodic plain-weave texture (grid/tile-like), grayscale",
    ),
    "fibre": Category(
        "RGB",
        ("cut", "hole", "color", "glue"),
        _render_fibre,
        0.02,
        0.10,
        "irregular fibrous texture (carpet/leather-like)",
    ),
    "disc": Category(
        "RGB",
        ("crack", "hole", "contamination", "broken"),
        _render_disc,
        0.02,
        0.08,
        "rotation-invariant round object seen from the top (hazelnut/bottle-like)",
    ),
    "chip": Category(
        "RGB",
        ("misplaced", "bent_lead", "missing_lead", "scratch"),
        _render_chip,
        0.02,
        0.08,
        "oriented part (transistor-like); its rotation or flip is a defect (misplaced)",
    ),
}


def _rng(seed: int, category: str, split: str, label: str, index: int) -> np.random.Generator:
    """A generator of its own for one image, so counts can change without reshuffling."""
    key = f"{seed}/{category}/{split}/{label}/{index}".encode()
    words = np.frombuffer(hashlib.sha256(key).digest(), dtype="<u4")
    return np.random.default_rng([int(w) for w in words])


def render(
    seed: int, category: str, split: str, label: str, index: int, size: int
) -> tuple[Array, Array | None]:
    """One image (uint8, HxW for mode L else HxWx3) and its mask (uint8 0/255, or None)."""
    spec = CATEGORIES[category]
    rng = _rng(seed, category, split, label, index)
    img, mask = spec.render(rng, size, None if label == "good" else label)
    if spec.mode == "L" and img.ndim == 3:
        img = img @ LUMA
    pixels = _finish(rng, img, spec.noise, spec.gradient)
    return pixels, None if mask is None else mask.astype(np.uint8) * 255


def _write_png(path: Path, pixels: Array) -> None:
    """Write a PNG atomically, without metadata (no timestamps), hence reproducible."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


def check_categories(categories: Sequence[str]) -> None:
    """Raise ``UserError`` naming ``synth.categories`` on an unknown or repeated name."""
    known = ", ".join(CATEGORIES)
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise UserError(f"synth.categories: unknown category '{unknown[0]}' (known: {known})")
    dupes = sorted({c for c in categories if list(categories).count(c) > 1})
    if dupes:
        raise UserError(f"synth.categories: listed twice: {', '.join(dupes)}")


def _plan(params: SynthParams) -> list[tuple[str, str, str, int]]:
    """Every image to draw, as (category, split, label, index)."""
    jobs = []
    for category in params.categories:
        jobs += [(category, "train", "good", i) for i in range(params.n_train)]
        jobs += [(category, "test", "good", i) for i in range(params.n_test_good)]
        for defect in CATEGORIES[category].defects:
            jobs += [(category, "test", defect, i) for i in range(params.n_test_per_defect)]
    return jobs


def _readme(params: SynthParams) -> str:
    lines = [
        "Synthetic anomaly-detection dataset in the MVTec AD layout.",
        "",
        "This is NOT MVTec AD: it is generated by the pipeline's `synth` stage",
        "(stages/synth.py, `python -m stages.synth`) so the project runs without the real",
        "dataset. Every image is drawn with numpy from its own random generator, seeded",
        "from (seed, category, split, label, index); the same params give byte-identical",
        "PNGs. Masks in ground_truth/ are 0/255 grayscale PNGs, one per defective image.",
        "",
        f"seed: {params.seed}",
        f"image_size: {params.image_size}",
        f"n_train: {params.n_train} (train/good)",
        f"n_test_good: {params.n_test_good} (test/good)",
        f"n_test_per_defect: {params.n_test_per_defect} (test/<defect>)",
        "",
        "categories:",
    ]
    for name in params.categories:
        spec = CATEGORIES[name]
        lines.append(f"  {name} ({spec.mode}): {spec.about}; defects: {', '.join(spec.defects)}")
    return "\n".join(lines) + "\n"


def _prune(folder: Path, keep: set[Path]) -> int:
    """Delete files under ``folder`` not in ``keep``, then empty folders; returns files removed."""
    removed = 0
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file() or path.is_symlink():
            if path not in keep:
                path.unlink()
                removed += 1
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return removed


def generate(params: SynthParams, progress: bool = True) -> dict[str, dict[str, dict[str, int]]]:
    """Write the dataset under ``params.out``; return counts ``{category: {split: {label: n}}}``.

    Everything is regenerated (it takes seconds) and written atomically; files of the
    generated categories that these params do not produce are removed, as are folders of
    known synthetic categories no longer listed, so the output matches the params exactly.
    """
    check_categories(params.categories)
    out = Path(params.out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    counts: dict[str, dict[str, dict[str, int]]] = {}
    written: set[Path] = set()
    pending: set[Future[None]] = set()
    # fsync (in write_bytes_atomic) dominates the time: writers overlap it with drawing.
    with ThreadPoolExecutor(max_workers=WRITERS) as pool:
        for category, split, label, index in tqdm(
            _plan(params), desc="synth", unit="img", disable=not progress, dynamic_ncols=True
        ):
            pixels, mask = render(params.seed, category, split, label, index, params.image_size)
            stem = f"{index:03d}"
            files = [(out / category / split / label / f"{stem}.png", pixels)]
            if mask is not None:
                files.append((out / category / "ground_truth" / label / f"{stem}_mask.png", mask))
            for path, data in files:
                pending.add(pool.submit(_write_png, path, data))
                written.add(path)
            if len(pending) >= 4 * WRITERS:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()
            by_split = counts.setdefault(category, {}).setdefault(split, {})
            by_split[label] = by_split.get(label, 0) + 1
        for future in pending:
            future.result()
    for category in params.categories:
        _prune(out / category, written)
    for category in CATEGORIES:
        if category not in params.categories and (out / category).is_dir():
            shutil.rmtree(out / category)
    write_text_atomic(out / "readme.txt", _readme(params))
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m stages.synth [--params params.yaml]``."""
    args = stage_args(
        "Generate the embedded synthetic dataset (MVTec AD layout).",
        None if argv is None else list(argv),
    )
    log = setup_logging("synth")
    params = load_params(args.params).synth
    try:
        check_categories(params.categories)
    except UserError as exc:
        raise UserError(f"{args.params}: {exc}") from None
    counts = generate(params)
    for category, splits in counts.items():
        test = splits.get("test", {})
        defects = sum(n for label, n in test.items() if label != "good")
        log.info(
            "%s: %d train, %d test good, %d test defective (%s)",
            category,
            splits.get("train", {}).get("good", 0),
            test.get("good", 0),
            defects,
            ", ".join(label for label in test if label != "good"),
        )
    log.info("wrote %s", params.out)


if __name__ == "__main__":
    run_cli(main)
