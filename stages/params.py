"""params.yaml, validated: unknown keys and wrong types become one-line errors.

Each stage reads its own section (``data``, ``synth``, ``augment``, ...). Models are
strict (``extra='forbid'``) so a typo in a key is reported, not silently ignored.
"""

from __future__ import annotations

import argparse
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)
from pydantic.fields import FieldInfo

from stages.errors import UserError, register_user_paths

DEFAULT_PARAMS = "params.yaml"

Transform = Literal["rot90", "rot180", "rot270", "hflip", "vflip"]
TRANSFORMS: tuple[str, ...] = ("rot90", "rot180", "rot270", "hflip", "vflip")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- paths: checked against the filesystem with the rest of params ---------------------------


def _kind(path: Path) -> tuple[str, OSError | None]:
    """``folder``, ``file``, ``missing``, ``broken-link`` or ``error`` (with the OSError)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return ("broken-link" if os.path.islink(path) else "missing"), None
    except OSError as exc:
        return "error", exc
    return ("folder" if stat.S_ISDIR(mode) else "file"), None


def _creatable_under(path: Path) -> str | None:
    """Why ``path`` (missing) cannot be created, judged by its nearest existing folder."""
    for parent in path.parents:
        kind, exc = _kind(parent)
        if kind == "missing":
            continue
        if kind == "error":
            return f"cannot be created: {parent}: {exc.strerror if exc else 'unusable'}"
        if kind == "broken-link":
            return f"cannot be created: {parent} is a broken symbolic link"
        if kind == "file":
            return f"cannot be created: {parent} is a file, not a folder"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"cannot be created: no write permission in {parent}"
        return None
    return None


PathKind = Literal["folder", "output-folder", "output-file"]


def path_problem(value: str, expected: PathKind) -> str | None:
    """What is wrong with ``value`` as a path of this kind, or None.

    ``folder``: read by the stage; if it exists it must be a folder (whether it must exist
    is the stage's call). ``output-folder``: a folder the stage writes into: not a file, and
    it or its nearest existing parent folder writable. ``output-file``: a file the stage
    writes (atomically, by renaming in its folder): not a folder, its folder creatable.
    """
    if not value.strip():
        return "empty path (expected a path relative to the project folder, or absolute)"
    if "\0" in value:
        return "not a valid path (contains a NUL character)"
    path = Path(value)
    kind, exc = _kind(path)
    if kind == "error":
        return f"cannot be used: {exc.strerror if exc else exc}"
    if kind == "broken-link":
        return f"is a broken symbolic link (to {os.readlink(path)})"
    if expected in ("folder", "output-folder") and kind == "file":
        return "is a file, expected a folder"
    if expected == "output-file" and kind == "folder":
        return "is a folder, expected a file"
    if expected == "folder":
        return None
    if kind == "folder":
        if not os.access(path, os.W_OK | os.X_OK):
            return "is a folder without write permission"
        return None
    if kind == "file":  # an output file that exists: replaced by a rename in its folder
        if not os.access(path.parent, os.W_OK | os.X_OK):
            return f"cannot be replaced: no write permission in {path.parent}"
        return None
    return _creatable_under(path)


class _PathCheck:
    """A field validator checking a path param against the filesystem (``path_problem``)."""

    def __init__(self, expected: PathKind) -> None:
        self.expected = expected

    def __call__(self, value: str) -> str:
        problem = path_problem(value, self.expected)
        if problem:
            raise ValueError(problem)
        return value


# An existing folder the stage reads (if it is there: the stage says when it must be).
FolderPath = Annotated[str, AfterValidator(_PathCheck("folder"))]
# A folder the stage writes into (created with its parents when missing).
OutputFolder = Annotated[str, AfterValidator(_PathCheck("output-folder"))]
# A file the stage writes (its folder created when missing); later stages may read it.
OutputFile = Annotated[str, AfterValidator(_PathCheck("output-file"))]


def _is_path_field(info: FieldInfo) -> bool:
    def checks(metadata: Any) -> bool:
        return any(isinstance(m, AfterValidator) and isinstance(m.func, _PathCheck)
                   for m in metadata)  # fmt: skip

    def nested(annotation: Any) -> bool:
        args = get_args(annotation)
        return checks(getattr(annotation, "__metadata__", ())) or any(nested(a) for a in args)

    return checks(info.metadata) or nested(info.annotation)


def path_params(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, str]]:
    """``(dotted key, path)`` of every path-typed param in a validated model (nested too)."""
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        key = f"{prefix}.{name}" if prefix else name
        if isinstance(value, BaseModel):
            yield from path_params(value, key)
        elif isinstance(value, str) and _is_path_field(info):
            yield key, value


# --- engine settings -----------------------------------------------------------------------

MIN_MEMORY_LIMIT = 256 * 2**20  # a worker process alone needs about 150 MB
MEMORY_HINT = ("expected auto, a size such as 4GiB or 500MB, a fraction of this machine's "
               "memory such as 0.5, or null for no limit")  # fmt: skip


def _memory_bytes(value: float) -> float:
    """Bytes of a numeric memory limit as Dask reads it: <= 1 is a fraction of the memory."""
    if value <= 1:
        from distributed.system import MEMORY_LIMIT  # imported by the stages that use it

        return value * MEMORY_LIMIT
    return value


def _memory_limit(value: Any) -> Any:
    """A Dask worker memory limit, checked as ``distributed`` will read it."""
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"not a memory size ({MEMORY_HINT})")
    if isinstance(value, str) and not value.strip():
        raise ValueError(f"not a memory size ({MEMORY_HINT})")
    try:
        number = float(value)  # Dask tries this first, strings included
    except ValueError:
        from dask.utils import parse_bytes

        try:
            number = float(parse_bytes(value))
        except (ValueError, TypeError):
            raise ValueError(f"not a memory size ({MEMORY_HINT})") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"not a memory size ({MEMORY_HINT})")
    if number == 0:
        return value  # Dask: no limit
    size = _memory_bytes(number)
    if size < MIN_MEMORY_LIMIT:
        plain = number > 1 and not (isinstance(value, str) and value.strip()[-1:].isalpha())
        hint = "; a plain number above 1 is bytes: write a unit, e.g. 4GiB" if plain else ""
        raise ValueError(f"{int(size)} bytes per worker is too little for a worker process "
                         f"(at least 256MiB{hint})")  # fmt: skip
    return value


# A Dask worker's memory limit: ``auto``, a size (``4GiB``), a fraction, null or 0 (none).
MemoryLimit = Annotated[str | int | float | None, BeforeValidator(_memory_limit)]

SCHEDULER_SCHEMES = ("tcp", "tls", "ws", "wss", "ucx")


def _scheduler_address(value: Any) -> Any:
    """``scheme://host:port`` of a Dask scheduler another process can reach (format only)."""
    if not isinstance(value, str):
        return value  # the type check says what is wrong
    hint = "expected a Dask scheduler address such as tcp://host:8786, or null for a local cluster"
    text = value.strip()
    if not text:
        raise ValueError(f"empty address ({hint})")
    scheme, sep, location = text.partition("://")
    if not sep:
        scheme, location = "tcp", text
    if scheme not in SCHEDULER_SCHEMES:
        raise ValueError(f"unknown protocol '{scheme}' ({hint}; protocols: "
                         f"{', '.join(SCHEDULER_SCHEMES)})")  # fmt: skip
    if scheme == "ucx":
        return text
    host, _, port = location.rpartition(":")
    host = host.strip("[]")
    if not host or not port:
        raise ValueError(f"no host and port ({hint})")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"port '{port}' is not a port number 1-65535 ({hint})")
    return text


# The address of a running Dask scheduler (reachability is checked when the stage connects).
SchedulerAddress = Annotated[str, BeforeValidator(_scheduler_address)]


class DataParams(Section):
    """Which dataset (MVTec AD layout) and which of its categories the pipeline runs on."""

    root: FolderPath
    categories: Annotated[list[str], Field(min_length=1)]
    stats_dir: OutputFolder = "results/dataset"
    index: OutputFile = "cache/dataset/index.parquet"
    # Largest image or mask accepted (width x height), checked from the PNG header.
    max_pixels: Annotated[int, Field(ge=1)] = 50_000_000

    @field_validator("categories")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        dupes = sorted({c for c in value if value.count(c) > 1})
        if dupes:
            raise ValueError(f"categories listed twice: {', '.join(dupes)}")
        return value


class SynthParams(Section):
    """The embedded synthetic dataset (MVTec layout), generated deterministically from seed."""

    out: OutputFolder = "data/synthetic"
    seed: int = 0
    image_size: Annotated[int, Field(ge=32, le=1024)] = 96
    n_train: Annotated[int, Field(ge=2)] = 40
    n_test_good: Annotated[int, Field(ge=1)] = 12
    n_test_per_defect: Annotated[int, Field(ge=1)] = 6
    categories: Annotated[list[str], Field(min_length=1)] = ["weave", "fibre", "disc", "chip"]


class AugmentParams(Section):
    """Per-category list of lossless transforms applied to train/good images ([] = none)."""

    out: OutputFolder = "cache/augment"
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


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (YAML
    would silently keep the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, mark: yaml.Mark) -> None:
        super().__init__(key)
        self.key, self.mark = key, mark


def _params_text(path: Path) -> str:
    """The params file's text; ``UserError`` naming the file when it cannot be read as such."""
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a params file (YAML; --params)")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: params file not found (expected a YAML file)") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the params file ({exc.strerror or exc})") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"{path}: params file is UTF-16 text, expected UTF-8 (save it as UTF-8)")
    try:
        return data.decode("utf-8-sig")  # a byte order mark is tolerated
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
            "save the params file as UTF-8"
        ) from None


def read_params_file(path: str | Path) -> dict[str, Any]:
    """The params file as a mapping of sections; ``UserError`` (one line) on any problem."""
    path = Path(path)
    text = _params_text(path)
    if not text.strip():
        raise UserError(f"{path}: params file is empty (expected a YAML mapping of stage "
                        "sections: data, augment, ...)")  # fmt: skip
    try:
        raw = yaml.load(text, Loader=_StrictLoader)
    except _DuplicateKey as exc:
        raise UserError(f"{path}: line {exc.mark.line + 1}: key '{exc.key}' is given twice in "
                        "one mapping (expected each key once)") from None  # fmt: skip
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow
        line = text[: exc.position].count("\n") + 1
        char = chr(exc.character) if isinstance(exc.character, int) else exc.character
        raise UserError(f"{path}: line {line} is not valid YAML (it contains the control "
                        f"character {char!r})") from None  # fmt: skip
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None)
        why = f" ({problem})" if problem else ""
        raise UserError(f"{path}:{where} is not valid YAML{why}") from None
    except RecursionError:
        raise UserError(f"{path}: is not valid YAML (nested too deeply)") from None
    if not isinstance(raw, dict):
        got = "nothing" if raw is None else f"a {_yaml_kind(raw)}"
        raise UserError(f"{path}: expected a mapping of stage sections at the top level "
                        f"(data, augment, ...; got {got})")  # fmt: skip
    return raw


def _yaml_kind(value: Any) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and validate params.yaml; raise ``UserError`` with one line on any problem."""
    path = Path(path)
    raw = read_params_file(path)
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
    register_user_paths(path_params(params))
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
        section = model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        first = {**first, "loc": (key, *first["loc"])}
        raise UserError(f"{path}: {_describe(first)}") from None
    register_user_paths(path_params(section, key))
    return section
