"""What reaches the console besides kfm's own lines: library warnings, logs and progress bars.

Libraries report things a user of `kfm` cannot act on: deprecations inside transformers, notes
on torch's and torchao's own internals, progress bars of sub-second loads. By default and with
``-q`` the console shows warnings of kfm's own code and errors of any library, and no library
progress bar; ``-v`` shows every warning, bar and INFO log of kfm and its libraries.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import TextIO

from kfm.console import VERBOSE

_OUR_MODULES = r"(kfm|kfm_cli|eval|data_pipeline)(\..*)?$"
_OUR_LOGGERS = ("kfm", "kfm_cli", "eval", "data_pipeline")
_QUIET_ENV = {
    # Read when each library is imported, which every command does after this runs; a value the
    # user set wins.
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' and the Hub's load/save bars
    "TORCH_LOGS": "-torch",  # torch's own logger (its handler is separate): errors only
    # Libraries' bars (datatrove's dedup steps...); kfm's training bar asks for itself.
    "TQDM_DISABLE": "1",
}


def _own_warning_or_any_error(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or (
        record.levelno >= logging.WARNING and record.name.split(".")[0] in _OUR_LOGGERS
    )


class _Stderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record comes (as logging's last-resort
    handler does), not the stream of the moment it was made."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.name.split(".")[0] not in _OUR_LOGGERS:
            text = f"{record.name}: {text}"
        return text


def _one_line(
    message: Warning | str, category: type[Warning], *args: object, **kwargs: object
) -> str:
    """A warning as the user reads it: no file, line number or source line (-v shows those)."""
    return f"warning: {message}\n"


def quiet_libraries(level: int) -> None:
    """Set up warnings and logging for a command run at console ``level`` (kfm.console)."""
    if level >= VERBOSE:
        warnings.simplefilter("default")  # each distinct warning once, from every library
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
        return
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    _quiet_imported_libraries()
    warnings.simplefilter("ignore")
    warnings.filterwarnings("default", module=_OUR_MODULES)  # checked first: inserted last
    warnings.formatwarning = _one_line
    root = logging.getLogger()
    if not any(getattr(h, "kfm_console", False) for h in root.handlers):
        handler = _Stderr()
        handler.addFilter(_own_warning_or_any_error)
        handler.setFormatter(_ConsoleFormatter())
        handler.kfm_console = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in _OWN_HANDLER_LOGGERS:
        # These print through a handler of their own (propagate=False) that they attach at
        # import, after this runs; a filter on the logger object outlives that.
        logger = logging.getLogger(name)
        if _library_error_only not in logger.filters:
            logger.addFilter(_library_error_only)


_OWN_HANDLER_LOGGERS = ("DeepSpeed",)
"""Library loggers that bypass the root handler: DeepSpeed's, imported by transformers and
accelerate whenever DeepSpeed is installed, warns "Setting accelerator to CPU" on every command."""


def _library_error_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def _quiet_imported_libraries() -> None:
    """The same settings for libraries imported before this ran (``main()`` called in-process,
    e.g. from a notebook or a test), which read their environment variables at import only."""
    if "transformers" in sys.modules and "TRANSFORMERS_VERBOSITY" not in _user_set:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules and "HF_HUB_DISABLE_PROGRESS_BARS" not in _user_set:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


_user_set = frozenset(k for k in _QUIET_ENV if k in os.environ)
"""The variables the user set before kfm started (their values win over kfm's quiet defaults)."""
