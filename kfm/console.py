"""How much kfm says on the console: the CLI's ``-q`` / ``-v`` flags, seen by every process.

`kfm -q` / `kfm -v` set ``KFM_VERBOSITY`` in the environment, so that the processes a command
starts (torchrun ranks, datatrove's pool workers, Slurm jobs) inherit the same level without
threading a flag through every call. Code that prints progress asks `verbosity()`.
"""

from __future__ import annotations

import os

VERBOSITY_ENV = "KFM_VERBOSITY"
QUIET = -1
"""Warnings, errors and each command's final result line only."""
NORMAL = 0
"""Progress too: step lines, one line per curation stage, saved checkpoints."""
VERBOSE = 1
"""Library info messages and datatrove's per-task banners on the console as well."""


def verbosity() -> int:
    """The console level of this process: QUIET, NORMAL (also when unset or malformed) or VERBOSE."""
    try:
        level = int(os.environ.get(VERBOSITY_ENV, NORMAL))
    except ValueError:
        return NORMAL
    return max(QUIET, min(VERBOSE, level))


def set_verbosity(level: int) -> None:
    """Set the level for this process and every process it starts from now on."""
    os.environ[VERBOSITY_ENV] = str(level)
