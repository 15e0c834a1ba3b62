"""User-facing errors: one line naming the file, folder or params key, then a non-zero exit."""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

EXIT_USER_ERROR = 2

# OS errors that say something about the place a path points to, not about the code: on a
# path the user named in params they are the user's to fix (a missing file is not among
# them: that is for the stage to say, or a bug).
ENVIRONMENT_ERRNOS = frozenset({
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EISDIR,
    errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.EMLINK, errno.EFBIG,
})  # fmt: skip
_user_paths: dict[str, tuple[str, str]] = {}  # absolute path -> (params key, value as written)


class UserError(Exception):
    """A mistake the user can fix (bad params, bad dataset layout); shown as one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def register_user_paths(items: Iterable[tuple[str, str]]) -> None:
    """Remember the paths params named (``(dotted key, path)``), so that ``run_cli`` can
    say which param an ``OSError`` on a path under one of them is about."""
    for key, value in items:
        if value.strip() and "\0" not in value:
            _user_paths[os.path.abspath(value)] = (key, value)


def user_path_error(exc: OSError) -> str | None:
    """One line for an environment ``OSError`` on a path under a params path, else None."""
    if exc.errno not in ENVIRONMENT_ERRNOS:
        return None
    for name in (exc.filename2, exc.filename):  # a rename's destination first
        if name is None or isinstance(name, int):
            continue
        where = Path(os.path.abspath(os.fsdecode(name)))
        for known, (key, value) in sorted(_user_paths.items(), key=lambda kv: -len(kv[0])):
            if where == Path(known) or where.is_relative_to(known):
                return (f"{os.fsdecode(name)}: {exc.strerror or exc} (a path under {key}: "
                        f"{value}); fix that path or change {key}, then rerun")  # fmt: skip
    return None


def setup_logging(stage: str) -> logging.Logger:
    """Log to stderr as ``stage: message`` so DVC's output says which stage speaks."""
    logging.basicConfig(
        level=logging.INFO, format=f"{stage}: %(message)s", stream=sys.stderr, force=True
    )
    for chatty in ("distributed", "dask", "tornado", "asyncio"):
        logging.getLogger(chatty).setLevel(logging.WARNING)  # cluster start-up is not news
    return logging.getLogger(f"stages.{stage}")


def run_cli(
    main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None
) -> None:
    """Run a stage entry point; turn ``UserError`` into one line on stderr and exit 2.

    So is an ``OSError`` such as permission denied or a read-only filesystem on a path under
    one of the paths params named (``register_user_paths``); any other exception is a bug
    and keeps its traceback.
    """
    _user_paths.clear()
    try:
        main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except OSError as exc:
        line = user_path_error(exc)
        if line is None:
            raise
        print(f"error: {' '.join(line.split())}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue where it stopped", file=sys.stderr)
        sys.exit(130)
