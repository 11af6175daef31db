"""What every stage script shares: one-line errors, atomic outputs, logging."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
import socket
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


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _host() -> str:
    return socket.gethostname().replace(".", "_") or "localhost"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Remove the temporary folders that killed runs (SIGKILL, out of memory) left beside `final`.

    A temporary folder is named .<name>.<pid>-<host>.<random>; it is stale when its process ran on
    this host and is gone. Folders of live processes and of other hosts are left alone.
    """
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(\d+)-([^.]*)\.[^.]+")
    removed = []
    for old in final.parent.glob(f".{glob.escape(final.name)}.*"):
        match = pattern.fullmatch(old.name)
        if match and match.group(2) == _host() and old.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
    return removed


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final` and move it into place only on success.

    Works for files and folders; on any exception the temporary path is removed, so
    a failed run never leaves a partial target behind, and what a killed run left is
    removed by the next one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for old in remove_stale_temporaries(final):
        log.info("removed %s, left by a run that was killed", old)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}-{_host()}.", dir=final.parent)) / final.name
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
