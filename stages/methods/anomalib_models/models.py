"""Building anomalib's models offline, and one experiment's train-then-score.

Backbone models (PatchCore, PaDiM, DFM, DFKDE) get the project's network as an
``nn.Module`` (random init seeded) and a pre-processor that resizes to ``image_size`` and
normalises with the backbone's statistics. EfficientAd is anomalib's own class with the two
steps that would download replaced (:func:`efficient_ad`): the teacher comes from
:mod:`.sources`, the penalty batches from the penalty images, one per step as a function
of ``(seed, step)`` (anomalib's transform: resize to twice the size, grayscale with
probability 0.3, centre crop), so a resumed training sees the same ones. Its map
normalisation quantiles come from the good training images (anomalib takes them from a
validation split of good images).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stages.methods.anomalib_models.training import quiet, score, step_rng, train

if TYPE_CHECKING:
    from stages.methods.anomalib_models import AnomalibHyper
    from stages.methods.base import Setting

DEFAULT_BATCH = 8


@dataclass
class Scores:
    """Test scores and maps of one experiment, and its seconds."""

    scores: np.ndarray
    maps: np.ndarray
    fit_s: float
    score_s: float


def batch_size(hp: AnomalibHyper) -> int:
    from stages.methods.anomalib_models import MODELS

    return hp.batch_size or MODELS[str(hp.model)].batch_size or DEFAULT_BATCH


def _pre_processor(size: int, mean: Any = None, std: Any = None) -> Any:
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    steps: list[Any] = [Resize((size, size), antialias=True)]
    if mean is not None:
        steps.append(Normalize(mean=list(mean), std=list(std)))
    return PreProcessor(transform=Compose(steps))


def build(hp: AnomalibHyper, seed: int, setting: Setting) -> Any:
    """The anomalib model of a config, offline (no post-processor, evaluator or
    visualizer: the project computes every metric)."""
    import anomalib.models

    from stages.backbones import get_backbone, layer_parts
    from stages.methods.anomalib_models import MODELS

    spec = MODELS[str(hp.model)]
    common = {"post_processor": False, "evaluator": False, "visualizer": False}
    torch.manual_seed(seed)  # the initial weights (EfficientAd's student and autoencoder)
    kwargs = {k: v for k, v in (hp.model_extra or {}).items() if k in spec.kwargs}
    if spec.layers is None:
        return efficient_ad(hp, seed, setting, **common, **kwargs)
    backbone = get_backbone(str(hp.backbone))
    network = backbone.build(hp.init or backbone.inits[0]).eval()
    nodes = [backbone.layers[p] for p in layer_parts(str(hp.layers))]
    kwargs[spec.layers] = nodes if spec.layers == "layers" else nodes[0]
    with quiet():
        return getattr(anomalib.models, str(hp.model))(
            backbone=network, pre_trained=False,
            pre_processor=_pre_processor(hp.image_size, backbone.mean, backbone.std),
            **common, **kwargs,
        )  # fmt: skip


def efficient_ad(hp: AnomalibHyper, seed: int, setting: Setting, **kwargs: Any) -> Any:
    """anomalib's EfficientAd with our teacher file and penalty images (no download)."""
    from anomalib.models import EfficientAd

    from stages.errors import UserError
    from stages.methods.anomalib_models.sources import penalty_images, teacher_file

    path = teacher_file(hp.teacher, hp, setting)
    size = hp.image_size
    if hp.teacher.startswith("distilled-efficientnet_lite0:"):
        from stages.methods.anomalib_models.teacher import teacher_channels

        kwargs.setdefault("teacher_out_channels", teacher_channels())

    class OfflineEfficientAd(EfficientAd):
        def prepare_pretrained_model(self) -> None:
            if not path.is_file():
                raise UserError(f"EfficientAd teacher {path} not found (rerun the evaluate "
                                "stage, which distils it, or place the file there)")  # fmt: skip
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.model.teacher.load_state_dict(state)

        def prepare_imagenette_data(self, image_size: Any) -> None:
            images = penalty_images(hp.penalty, setting, seed)
            self.imagenet_iterator = PenaltyStream(self, images, size, seed)

        def on_train_start(self) -> None:
            self.prepare_pretrained_model()
            self.prepare_imagenette_data((size, size))
            if not self.model.is_set(self.model.mean_std):
                batches = [_batch(self.pre_processor.transform(x)) for x in self._train_batches]
                self.model.mean_std.update(self.teacher_channel_mean_std(batches))

    with quiet():
        return OfflineEfficientAd(pre_processor=_pre_processor(size), **kwargs)


def _batch(images: torch.Tensor) -> Any:
    from anomalib.data import ImageBatch

    return ImageBatch(image=images, gt_label=torch.zeros(len(images), dtype=torch.long))


class PenaltyStream:
    """EfficientAd's penalty batch of the current step: image ``perm(seed, pass)[t % m]``
    of the penalty images, resized to twice the size and centre-cropped (the middle half),
    in grayscale with probability 0.3; all a function of ``(seed, step)``."""

    def __init__(self, module: Any, images: np.ndarray, size: int, seed: int) -> None:
        import torch.nn.functional as F

        x = torch.from_numpy(images).float() / 255.0
        x = F.interpolate(x, size=(2 * size, 2 * size), mode="bilinear", antialias=True,
                          align_corners=False)  # fmt: skip
        start = size // 2
        self.images = x[:, :, start : start + size, start : start + size].contiguous()
        self.module, self.seed = module, seed

    def __iter__(self) -> PenaltyStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, int]:
        step = int(self.module.global_step)
        m = len(self.images)
        p, j = divmod(step, m)
        index = np.random.default_rng([self.seed, p, 1]).permutation(m)[j]
        image = self.images[index]
        if step_rng(self.seed, step).random() < 0.3:
            r, g, b = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
            gray = r * image[0] + g * image[1] + b * image[2]
            image = gray.expand(3, -1, -1)
        return image[None], 0


def calibration(images: torch.Tensor, hp: AnomalibHyper, seed: int) -> list[torch.Tensor]:
    """EfficientAd's calibration batches (teacher statistics, map quantiles): every
    training image, or a seeded sample of ``calibration_images``."""
    n = len(images)
    keep = np.arange(n)
    if hp.calibration_images is not None and hp.calibration_images < n:
        keep = np.sort(np.random.default_rng([seed, 2]).permutation(n)[: hp.calibration_images])
    chosen = images[torch.from_numpy(keep)].float()
    return [chosen[i : i + DEFAULT_BATCH] for i in range(0, len(chosen), DEFAULT_BATCH)]


def train_and_score(model: Any, hp: AnomalibHyper, X_train: np.ndarray, X_test: np.ndarray,
                    seed: int, workdir: Path, label: str,
                    device: torch.device | None = None) -> Scores:  # fmt: skip
    """Train (or resume, or load a finished training), then score the test images, on
    ``device`` (``None``: the CPU)."""
    device = device or torch.device("cpu")
    from stages.methods.anomalib_models import MODELS

    spec = MODELS[str(hp.model)]
    train_images = torch.from_numpy(np.ascontiguousarray(X_train))
    test_images = torch.from_numpy(np.ascontiguousarray(X_test))
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    try:
        if spec.layers is None:  # EfficientAd: the images of its teacher statistics
            model._train_batches = calibration(train_images, hp, seed)
        train(model, train_images, batch_size=batch_size(hp), seed=seed, workdir=workdir,
              max_steps=hp.max_steps if spec.trains else None, every=hp.checkpoint_every,
              label=label, device=device)  # fmt: skip
        model.to(device)  # Lightning hands the model back on the CPU
        if spec.layers is None:  # and its map quantiles (anomalib's: on good validation images)
            with torch.no_grad(), quiet():
                batches = [_batch(model.pre_processor.transform(x)) for x in model._train_batches]
                model.model.quantiles.update(model.map_norm_quantiles(batches))
        t1 = time.perf_counter()
        with quiet():
            scores, maps = score(model, test_images, DEFAULT_BATCH, device)
        t2 = time.perf_counter()
    finally:
        torch.set_num_threads(threads)  # Lightning may change it
    return Scores(scores, maps, t1 - t0, t2 - t1)
