"""Extraction's ``device`` and ``precision``: params errors, bf16 and CUDA features that are
bitwise stable on rerun and resume, identities (content hash, folder) apart from float32's."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stages import extract
from stages.device import cpu_has_bf16
from stages.engine import EngineParams, dask_client, run_units
from stages.errors import UserError
from stages.features import content_hash_of, hashed_config, load_feature_set, read_manifest
from tests.extract_fixtures import CATEGORIES, make_dataset, write_params

ONE_CATEGORY = {"alpha": CATEGORIES["alpha"]}
# resnet18: its two ends (1 + 4 convolutions to layer1, 17 + 3 downsampling ones to layer4).
SECTION = {
    "num_workers": 0,
    "batch_size": 4,
    "shard_rows": 8,
    "engine": {"n_workers": 1, "threads_per_worker": 1, "memory_limit": "2GiB"},
    "extractors": [
        {
            "backbone": "resnet18",
            "init": "random",
            "layers": ["layer1", "layer4"],
            "representations": ["flatten", "avg"],
        }
    ],
}
NO_BF16 = pytest.mark.skipif(
    not cpu_has_bf16(), reason="this CPU has no bf16 instructions (AVX512-BF16 or AMX)"
)
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch sees no CUDA device")


def _params(root: Path, monkeypatch: pytest.MonkeyPatch, **extra: object) -> Path:
    sections = make_dataset(root, ONE_CATEGORY)
    monkeypatch.chdir(root)
    return write_params(root, sections, {**SECTION, **extra})


def _features(summary: dict) -> dict[tuple[str, str], np.ndarray]:
    return {(e["layer"], e["representation"]): load_feature_set(e["folder"]).X
            for e in summary["feature_sets"]}  # fmt: skip


def _error(params: Path) -> str:
    with pytest.raises(UserError) as info:
        extract.main(["--params", str(params)])
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_device_that_is_none_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "extract.device" in _error(_params(tmp_path, monkeypatch, device="gpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="PyTorch sees a CUDA device here")
def test_cuda_without_a_cuda_device_is_a_one_line_error_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = _error(_params(tmp_path, monkeypatch, device="cuda"))
    assert "extract.device: cuda asked, but PyTorch sees no CUDA device" in message
    assert not (tmp_path / "cache/features").exists()  # refused before anything is written


@pytest.mark.skipif(cpu_has_bf16(), reason="this CPU has bf16 instructions")
def test_bf16_on_a_cpu_without_bf16_is_a_one_line_error_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = _error(_params(tmp_path, monkeypatch, device="cpu", precision="bfloat16"))
    assert "extract.precision: bfloat16 asked, but this CPU has no bf16 instructions" in message


def test_a_precision_that_is_none_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "extract.precision" in _error(_params(tmp_path, monkeypatch, precision="fp8"))


@NO_BF16
def test_bf16_features_are_bitwise_stable_and_never_mix_with_float32(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    params = _params(tmp_path, monkeypatch, device="cpu", precision="bfloat16")
    extract.main(["--params", str(params)])  # the stage's own entry point, on Dask
    assert "extract: networks run on cpu in bfloat16" in capsys.readouterr().err
    listed = json.loads((tmp_path / "cache/features/feature_sets.json").read_text())
    assert len(listed) == 4
    assert all("/resnet18-random-bf16/" in e["folder"] for e in listed)
    [bf16] = extract.work_units(params)
    assert (bf16.device, bf16.precision) == ("cpu", "bfloat16")
    fp32 = dataclasses.replace(bf16, precision="float32")
    first = extract.extract_unit(bf16)  # every shard already there: nothing recomputed
    assert first["images_computed"] == 0 and first["shards_skipped"] == first["shards_total"]
    stored = _features(first)

    # Rerun from scratch and resume after a lost shard: the same bits.
    shutil.rmtree(tmp_path / "cache/features/alpha")
    rerun = _features(extract.extract_unit(bf16))
    assert all(np.array_equal(a, stored[k]) for k, a in rerun.items())
    folder = Path(first["feature_sets"][0]["folder"])
    (folder / "part-00001.parquet").unlink()
    resumed = extract.extract_unit(bf16)
    assert resumed["images_computed"] == 8  # one shard of 8 rows
    assert all(np.array_equal(a, stored[k]) for k, a in _features(resumed).items())

    # float32 of the same extractor: its own folder and content hash, nothing overwritten.
    plain = extract.extract_unit(fp32)
    assert plain["images_computed"] == 22
    for a, b in zip(first["feature_sets"], plain["feature_sets"], strict=True):
        assert a["folder"] != b["folder"] and a["content_hash"] != b["content_hash"]
        manifest = read_manifest(a["folder"])
        assert manifest["precision"] == "bfloat16" and "device" not in manifest
        assert manifest["memory_format"] == "channels_last"  # oneDNN's bf16 layout
        assert "precision" not in read_manifest(b["folder"])  # float32 CPU: hash as before
        # what the evaluate stage recomputes to tell stale features
        rows = extract.unit_rows(bf16)
        expected = content_hash_of(hashed_config(manifest), rows["image_id"], rows["sha256"])
        assert expected == manifest["content_hash"]
    assert extract.extract_unit(bf16)["images_computed"] == 0  # bf16 still current

    # Close to float32. Autocast rounds each convolution's input and weights to bf16 (8-bit
    # significand: relative rounding error <= u = 2^-8), accumulating in float32. To first
    # order each convolution adds at most 2u of relative error, so the normwise relative
    # error after n convolutions is <= 2nu: n = 5 to layer1, 20 to layer4 (downsampling
    # included). Random rounding errors mostly cancel (measured ~0.005-0.008 here).
    convs = {"layer1": 5, "layer4": 20}
    reference = _features(plain)
    for (layer, representation), x in stored.items():
        y = reference[layer, representation]
        relative = np.linalg.norm(x - y, axis=1) / np.linalg.norm(y, axis=1)
        assert relative.max() <= 2 * convs[layer] * 2.0**-8, (layer, representation)
        assert relative.min() > 0  # bf16 did run


def test_units_that_ask_for_a_worker_resource_run_where_the_workers_offer_it(
    tmp_path: Path,
) -> None:
    """The engine's resources: what the extract stage uses to send CUDA units to GPU workers."""
    done: list[int] = []
    with dask_client(EngineParams(n_workers=1), resources={"GPU": 1}) as client:
        run_units(client, abs, [-1, -2, -3], split=lambda u: [u],
                  on_result=lambda u, r: done.append(r), on_error=lambda u, e: pytest.fail(repr(e)),
                  on_crash=lambda u, s: pytest.fail(s), scratch=tmp_path,
                  resources=lambda u: {"GPU": 1})  # fmt: skip
    assert sorted(done) == [1, 2, 3]


@NO_CUDA
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_cuda_features_are_bitwise_stable_on_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    if precision == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this CUDA device does not support bfloat16")
    [unit] = extract.work_units(_params(tmp_path, monkeypatch, device="cuda", precision=precision))
    assert unit.device == "cuda:0"
    first = extract.extract_unit(unit)
    assert all("-cuda" in Path(e["folder"]).parent.parent.name for e in first["feature_sets"])
    assert read_manifest(first["feature_sets"][0]["folder"])["device"] == "cuda"
    stored = _features(first)
    shutil.rmtree(tmp_path / "cache/features/alpha")
    again = _features(extract.extract_unit(unit))
    assert all(np.array_equal(a, stored[k]) for k, a in again.items())
    cpu = _features(extract.extract_unit(dataclasses.replace(unit, device="cpu",
                                                             precision="float32")))  # fmt: skip
    for key, x in stored.items():  # the same network: close to the CPU's float32 (bound above)
        relative = np.linalg.norm(x - cpu[key], axis=1) / np.linalg.norm(cpu[key], axis=1)
        assert relative.max() <= 2 * {"layer1": 5, "layer4": 20}[key[0]] * 2.0**-8, key
