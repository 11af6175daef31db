"""What every stage script shares: one-line errors, atomic outputs, logging."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger("ivr")


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 2, no traceback."""


def run_main(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a script's main(); a UserError becomes one clear line on stderr and exit 2."""
    logging.basicConfig(
        level=os.environ.get("IVR_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    try:
        main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final` and move it into place only on success.

    Works for files and folders; on any exception the temporary path is removed, so
    a failed run never leaves a partial target behind.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent)) / final.name
    try:
        yield tmp
        if tmp.is_dir():  # mkdtemp made the parent private; the result gets the usual permissions
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


@contextlib.contextmanager
def atomic_outputs(*finals: str | os.PathLike) -> Iterator[list[Path]]:
    """Like atomic_path for several outputs that must appear together or not at all."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(atomic_path(f)) for f in finals]


def progress(iterable=None, **kwargs):
    """A tqdm progress bar on stderr that stays quiet when IVR_NO_PROGRESS is set."""
    from tqdm import tqdm

    kwargs.setdefault("disable", bool(os.environ.get("IVR_NO_PROGRESS")))
    kwargs.setdefault("mininterval", 1.0)
    kwargs.setdefault("file", sys.stderr)
    return tqdm(iterable, **kwargs)
