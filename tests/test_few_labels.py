"""The few-labels protocol's split (``stages.few_labels``): stratified, seeded, nested
labelled subsets, and a held-out part that no label fraction ever touches."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from stages.few_labels import FewLabelsHyper, split

TYPES = ["good"] * 21 + ["crack"] * 9 + ["hole"] * 7 + ["scratch"] * 2 + ["rare"]
IDS = [f"test/{t}/{i:03d}" for i, t in enumerate(TYPES)]
FRACTIONS = (0.05, 0.1, 0.25, 0.5, 1.0)


@pytest.mark.parametrize("split_seed", [0, 1, 7])
def test_held_out_part_is_fixed_and_never_labelled(split_seed: int) -> None:
    parts = [split(IDS, TYPES, f, 0.5, split_seed) for f in FRACTIONS]
    held = parts[0].held
    for part in parts:
        assert np.array_equal(part.held, held)  # the same for every label fraction
        assert not set(part.labelled) & set(held)  # never labelled
        assert set(part.labelled) <= set(part.pool)
        assert sorted([*part.pool, *part.held]) == list(range(len(TYPES)))  # a partition
    for small, large in itertools.pairwise(parts):
        assert set(small.labelled) <= set(large.labelled)  # nested
    assert np.array_equal(parts[-1].labelled, parts[-1].pool)  # 1.0: the whole pool


def test_split_is_stratified_by_defect_type_and_seeded() -> None:
    part = split(IDS, TYPES, 0.1, 0.5, 0)
    held = Counter(TYPES[i] for i in part.held)
    assert held == {"good": 10, "crack": 4, "hole": 4, "scratch": 1}  # round(0.5 n); 1 stays
    labelled = Counter(TYPES[i] for i in part.labelled)
    assert labelled == {"good": 2, "crack": 1, "hole": 1, "scratch": 1, "rare": 1}  # >= 1 each
    again = split(IDS, TYPES, 0.1, 0.5, 0)
    assert np.array_equal(again.held, part.held) and np.array_equal(again.labelled, part.labelled)
    other = split(IDS, TYPES, 0.1, 0.5, 1)
    assert not np.array_equal(other.held, part.held)


def test_protocol_hyperparameters_are_validated() -> None:
    assert FewLabelsHyper().label_fraction == 0.1
    with pytest.raises(ValueError):
        FewLabelsHyper(eval_fraction=1.0)
    with pytest.raises(ValueError):
        FewLabelsHyper(label_fraction=0.0)


def test_split_depends_on_the_images_not_their_order() -> None:
    """The report recomputes the held-out part from the database's images, in any order."""
    part = split(IDS, TYPES, 0.25, 0.5, 3)
    order = np.random.default_rng(0).permutation(len(IDS))
    shuffled = split([IDS[i] for i in order], [TYPES[i] for i in order], 0.25, 0.5, 3)
    for name in ("held", "pool", "labelled"):
        got = {IDS[order[i]] for i in getattr(shuffled, name)}
        assert got == {IDS[i] for i in getattr(part, name)}, name
