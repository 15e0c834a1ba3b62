"""A kill while DVC writes its rwlock file leaves it empty (treeverse/dvc#7615): the repair
deletes it only when no DVC command holds the repository lock, and DVC runs again."""

from __future__ import annotations

import fcntl
import subprocess
import sys
from pathlib import Path

from benchmarks.chaos import env
from stages.dvc_locks import repair_rwlock


def _project(tmp_path: Path) -> Path:
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, env=env(), check=True)
    (tmp_path / "dvc.yaml").write_text("stages:\n  hello:\n    cmd: echo hi > out.txt\n"
                                       "    outs: [out.txt]\n")  # fmt: skip
    (tmp_path / ".dvc/tmp").mkdir(exist_ok=True)
    return tmp_path


def _repro(project: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_an_empty_rwlock_is_removed_and_dvc_runs_again(tmp_path: Path) -> None:
    project = _project(tmp_path)
    rwlock = project / ".dvc/tmp/rwlock"
    rwlock.write_text("")  # what a kill between DVC's truncate and write leaves
    broken = _repro(project)
    assert broken.returncode != 0 and "Unable to read RWLock-file" in broken.stderr
    line = repair_rwlock(project)
    assert line and "removed" in line and not rwlock.exists()
    assert _repro(project).returncode == 0
    assert repair_rwlock(project) is None  # DVC's own (valid) file after a run: untouched


def test_a_running_dvc_command_keeps_its_rwlock(tmp_path: Path) -> None:
    project = _project(tmp_path)
    rwlock = project / ".dvc/tmp/rwlock"
    rwlock.write_text('{"read": {}, "wri')
    with open(project / ".dvc/tmp/lock", "a") as held:  # as zc.lockfile holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        out = subprocess.run([sys.executable, "-m", "stages.dvc_locks", "--root", str(project)],
                             capture_output=True, text=True, cwd=Path(__file__).parents[1])  # fmt: skip
    assert out.returncode == 0 and "left alone" in out.stderr
    assert rwlock.read_text() == '{"read": {}, "wri'
