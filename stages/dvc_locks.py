"""Repair what a kill can leave behind in DVC's own lock files (not in this project's outputs).

DVC rewrites ``.dvc/tmp/rwlock`` (which outputs its running commands read and write) by
truncating the file and then writing it; a kill between the two leaves it empty, and every
later ``dvc repro`` stops with "Unable to read RWLock-file ... JSON structure is corrupted"
(treeverse/dvc#7615). The file describes commands in flight only: when no DVC command holds
the repository lock ``.dvc/tmp/lock`` (zc.lockfile, an ``flock``), an unreadable one
describes nothing and is deleted.

    python -m stages.dvc_locks [--root DIR]     (``make demo`` runs it before ``dvc repro``)
"""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def repair_rwlock(root: str | Path = ".") -> str | None:
    """Delete an unreadable ``.dvc/tmp/rwlock`` under ``root`` when no DVC command runs
    there; returns the line saying what was found and done (None: nothing to do)."""
    tmp = Path(root) / ".dvc" / "tmp"
    rwlock = tmp / "rwlock"
    try:
        json.loads(rwlock.read_text(encoding="utf-8"))
        return None
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        pass  # empty or cut short: a kill while DVC wrote it
    with open(tmp / "lock", "a") as fh:  # DVC's repository lock (it creates it the same way)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return (f"{rwlock}: unreadable, but a DVC command holds {tmp / 'lock'}; left "
                    "alone (rerun this once it ends)")  # fmt: skip
        try:
            rwlock.unlink(missing_ok=True)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    return (f"{rwlock}: unreadable (a DVC command was killed while writing it); removed: it "
            "records commands in flight only, and none runs")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="the DVC project (default: here)")
    args = parser.parse_args(argv)
    line = repair_rwlock(args.root)
    if line:
        print(f"dvc_locks: {line}", file=sys.stderr)


if __name__ == "__main__":
    main()
