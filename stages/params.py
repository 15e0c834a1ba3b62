"""params.yaml, validated: unknown keys and wrong types become one-line errors.

Each stage reads its own section (``data``, ``synth``, ``augment``, ...). Models are
strict (``extra='forbid'``) so a typo in a key is reported, not silently ignored.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stages.errors import UserError

DEFAULT_PARAMS = "params.yaml"

Transform = Literal["rot90", "rot180", "rot270", "hflip", "vflip"]
TRANSFORMS: tuple[str, ...] = ("rot90", "rot180", "rot270", "hflip", "vflip")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Section):
    """Which dataset (MVTec AD layout) and which of its categories the pipeline runs on."""

    root: str
    categories: Annotated[list[str], Field(min_length=1)]
    stats_dir: str = "results/dataset"
    index: str = "cache/dataset/index.parquet"

    @field_validator("categories")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        dupes = sorted({c for c in value if value.count(c) > 1})
        if dupes:
            raise ValueError(f"categories listed twice: {', '.join(dupes)}")
        return value


class SynthParams(Section):
    """The embedded synthetic dataset (MVTec layout), generated deterministically from seed."""

    out: str = "data/synthetic"
    seed: int = 0
    image_size: Annotated[int, Field(ge=32, le=1024)] = 96
    n_train: Annotated[int, Field(ge=2)] = 40
    n_test_good: Annotated[int, Field(ge=1)] = 12
    n_test_per_defect: Annotated[int, Field(ge=1)] = 6
    categories: Annotated[list[str], Field(min_length=1)] = ["weave", "fibre", "disc", "chip"]


class AugmentParams(Section):
    """Per-category list of lossless transforms applied to train/good images ([] = none)."""

    out: str = "cache/augment"
    transforms: dict[str, list[Transform]]

    @field_validator("transforms")
    @classmethod
    def _no_repeats(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for category, names in value.items():
            if len(set(names)) != len(names):
                raise ValueError(f"{category}: a transform is listed twice in {names}")
        return value


class Params(Section):
    data: DataParams
    synth: SynthParams = SynthParams()
    augment: AugmentParams
    # Sections of later stages are validated by their own models when they exist.
    extract: dict[str, Any] | None = None
    evaluate: dict[str, Any] | None = None
    report: dict[str, Any] | None = None


def _describe(error: dict[str, Any]) -> str:
    loc = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"unknown key '{loc}' (check its spelling against README.md's params table)"
    if kind == "missing":
        return f"missing key '{loc}'"
    got = error.get("input")
    shown = repr(got) if not isinstance(got, dict | list) or len(repr(got)) < 60 else type(got)
    message = error["msg"].removeprefix("Value error, ")
    return f"{loc}: {message} (got {shown})"


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and validate params.yaml; raise ``UserError`` with one line on any problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: params file not found (expected a YAML file)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} is not valid YAML") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of stage sections at the top level")
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{path}: {_describe(exc.errors()[0])}") from None
    missing = [c for c in params.data.categories if c not in params.augment.transforms]
    if missing:
        raise UserError(
            f"{path}: augment.transforms has no entry for category '{missing[0]}' "
            "(expected a list of transforms, [] for none)"
        )
    return params


def stage_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The common command line of a stage: ``--params PATH``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="params file (params.yaml)")
    return parser.parse_args(argv)


def load_section(path: str | Path, key: str, model: type[Section]) -> Section:
    """Validate one later-stage section (``extract``, ``evaluate``, ...) with its own model.

    The stage module owns the model; errors name the file and the dotted key.
    """
    params = load_params(path)
    raw = getattr(params, key)
    if raw is None:
        raise UserError(f"{path}: missing section '{key}'")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        first = {**first, "loc": (key, *first["loc"])}
        raise UserError(f"{path}: {_describe(first)}") from None
