"""User-facing errors: one line naming the file, folder or params key, then a non-zero exit."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake the user can fix (bad params, bad dataset layout); shown as one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


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
    """Run a stage entry point; turn ``UserError`` into one line on stderr and exit 2."""
    try:
        main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue where it stopped", file=sys.stderr)
        sys.exit(130)
