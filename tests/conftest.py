"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.recon_fixtures import repro, trained_project


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project whose ``dvc repro`` (every stage, the report included) trained the three
    reconstruction families (``tests.recon_fixtures``), run once per session."""
    project = trained_project(tmp_path_factory.mktemp("trained"))
    run = repro(project)
    assert run.returncode == 0, run.stderr[-3000:]
    return project
