"""The few-labels protocol: which test images a method that learns from labelled defects may
train on, and which ones it is evaluated on.

MVTec AD has labelled defects only among its test images, so a supervised method must take
some of them for training. Per category the test images are split, stratified by defect
type (``good`` included) and seeded by ``split_seed``, into a *pool* and a *held-out*
evaluation part of about ``eval_fraction`` of each type (at least one image of a type with
two or more stays on each side). ``label_fraction`` of each type's pool images are then
labelled (at least one per type), as the first images of one seeded order of the pool:

- the held-out part depends on ``eval_fraction`` and ``split_seed`` only, so it is the same
  for every label fraction and every method, and the one-class rows can be scored on
  exactly those images (their stored test scores restricted to them);
- a larger fraction's labelled images contain a smaller one's (nested subsets);
- no held-out image is ever labelled or trained on (the evaluate stage gives a labelled
  family the labelled pool images and the good training images, and scores the held-out
  part only).

The three values are hyperparameters of every labelled family's config
(:class:`FewLabelsHyper`), so they are stored with the experiment and enter its key.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from pydantic import Field

from stages.hyper import Fraction, Hyper


class FewLabelsHyper(Hyper):
    """The protocol's hyperparameters, shared by every labelled family."""

    label_fraction: Fraction = 0.1
    eval_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.5
    split_seed: Annotated[int, Field(ge=0)] = 0


@dataclass(frozen=True)
class Split:
    """Positions among a category's test images (in their stored order)."""

    held: np.ndarray  # the evaluation part
    pool: np.ndarray  # the rest
    labelled: np.ndarray  # the pool images whose labels training may use


def _order(indices: np.ndarray, split_seed: int, defect_type: str, salt: int) -> np.ndarray:
    """A seeded order of one defect type's images (independent of the other types)."""
    rng = np.random.default_rng([split_seed, zlib.crc32(defect_type.encode()), salt])
    return indices[rng.permutation(len(indices))]


def split(image_ids: Sequence[str], defect_types: Sequence[str], label_fraction: float,
          eval_fraction: float = 0.5, split_seed: int = 0) -> Split:  # fmt: skip
    """The held-out part, the pool and its labelled images of one category's test images
    (positions in the given order; the split itself depends on the image ids, not on their
    order, so a report can recompute it from the database's images)."""
    types = np.asarray(defect_types, dtype=object)
    ids = np.asarray(image_ids, dtype=object)
    held, pool, labelled = [], [], []
    for defect_type in sorted(set(types.tolist())):
        members = np.flatnonzero(types == defect_type)
        members = members[np.argsort(ids[members], kind="stable")]
        order = _order(members, split_seed, defect_type, 0)
        n = len(order)
        n_held = min(max(round(eval_fraction * n), 1), n - 1) if n >= 2 else 0
        held.append(order[:n_held])
        rest = order[n_held:]
        rest = _order(rest[np.argsort(ids[rest], kind="stable")], split_seed, defect_type, 1)
        pool.append(rest)
        labelled.append(rest[: max(math.ceil(label_fraction * len(rest) - 1e-9), 1)])
    return Split(*(np.sort(np.concatenate(parts)).astype(np.int64)
                   for parts in (held, pool, labelled)))  # fmt: skip
