"""The chaos harness (benchmarks/chaos.py): 3 SIGKILLs of `dvc repro` on a tiny params set."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from benchmarks.chaos import chaos_params, main

pytestmark = pytest.mark.slow


def test_three_kills_resume_to_the_reference_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(chaos_params(("weave",)), sort_keys=False))
    code = main(["--kills", "3", "--seed", "1", "--workdir", str(tmp_path / "work"),
                 "--params", str(params)])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    kills = [line for line in out.splitlines() if line.startswith("kill ") and "stage" in line]
    assert len(kills) == 3, out
    assert "| kill | at s | stage hit |" in out
    assert "identical AUROCs: True, duplicates: 0, temp files: 0, dvc status clean: True" in out
