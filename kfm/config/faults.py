"""The syntax of ``debug.faults`` entries: ``KIND@STEPS[:rRANK][=VALUE]``.

Parsed here (so a typo is a config error before any process starts) and acted on by
`kfm.train.debug.FaultInjector`. Examples::

    nan@7            the loss of step 7 is NaN on every rank
    spike@9=1000     the logits of step 9 are multiplied by 1000 on every rank
    sleep@3-:r1=0.5  rank 1 sleeps 0.5 s at the start of every step from step 3 on
    hang@5:r1        rank 1 blocks forever at the start of step 5
    sigkill@13       every rank SIGKILLs itself after step 13 (its checkpoint, if any, included)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kfm.config.errors import ConfigError

KINDS = ("nan", "spike", "sleep", "hang", "sigkill")
_SPEC = re.compile(
    r"^(?P<kind>[a-z]+)@(?P<first>\d+)(?P<range>-(?P<last>\d+)?)?"
    r"(?::r(?P<rank>\d+))?(?:=(?P<value>[-+0-9.eE]+))?$"
)
_NEEDS_VALUE = {"spike": 1000.0, "sleep": 1.0}


@dataclass(frozen=True, slots=True)
class FaultSpec:
    kind: str
    first_step: int
    last_step: int | None
    """None: every step from first_step on."""
    rank: int | None
    """None: every rank."""
    value: float

    def applies(self, step: int, rank: int) -> bool:
        if self.rank is not None and rank != self.rank:
            return False
        return step >= self.first_step and (self.last_step is None or step <= self.last_step)


def parse_fault(spec: str) -> FaultSpec:
    """Parse one ``debug.faults`` entry.

    Raises:
        ConfigError: naming the entry and the expected form.
    """
    m = _SPEC.match(spec.strip())
    form = (
        f"debug.faults entry {spec!r} must look like KIND@STEPS[:rRANK][=VALUE] with KIND one of "
        f"{', '.join(KINDS)} and STEPS N, N-M or N- (e.g. 'nan@7', 'sleep@3-:r1=0.5')"
    )
    if m is None or m["kind"] not in KINDS:
        raise ConfigError(form)
    first = int(m["first"])
    last = first if m["range"] is None else (int(m["last"]) if m["last"] else None)
    if first < 1 or (last is not None and last < first):
        raise ConfigError(form)
    try:
        value = float(m["value"]) if m["value"] else _NEEDS_VALUE.get(m["kind"], 0.0)
    except ValueError:
        raise ConfigError(form) from None
    rank = int(m["rank"]) if m["rank"] is not None else None
    return FaultSpec(kind=m["kind"], first_step=first, last_step=last, rank=rank, value=value)
