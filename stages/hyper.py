"""The hyperparameter model every family's (and the few-labels protocol's) derives from,
and its constrained types: a leaf module (pydantic only), so ``stages.few_labels`` and the
families can import it in any order."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]


class Hyper(BaseModel):
    """Hyperparameters of one family; strict, so ``n_neighbors: 2.5`` or ``"8"`` is an error."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
