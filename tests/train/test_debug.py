"""Debug aids (kfm/train/debug.py): the fault injector's hooks and the batch trace, as units."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from kfm.config import ConfigError
from kfm.train.backends.base import DeviceTimer, StepOutput
from kfm.train.callbacks import StepInfo
from kfm.train.debug import BatchTrace, FaultInjector
from tests.conftest import REPO


class FakeBackend:
    """What FaultInjector uses of a backend: the module and wait()."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.module = nn.Linear(4, 3)
        self.waited = 0

    def wait(self) -> None:
        self.waited += 1


def step_info(step: int) -> StepInfo:
    zero = torch.zeros(())
    out = StepOutput(
        loss=zero,
        grad_norm=zero,
        skipped=zero,
        lr=0.0,
        optim_timer=DeviceTimer(torch.device("cpu")),
    )
    return StepInfo(step=step, out=out, last=False, stopping=False, host_s=0.0, data_s=0.0)


def outputs_per_step(faults: list[str], rank: int, steps: int = 4) -> dict[int, torch.Tensor]:
    """step -> the module's training forward between on_step_start and on_step_end."""
    backend = FakeBackend()
    injector = FaultInjector(faults, backend, rank)  # type: ignore[arg-type]
    x = torch.ones(2, 4)
    out = {}
    for step in range(1, steps + 1):
        injector.on_step_start(step)
        out[step] = backend.module(x).detach()
        injector.on_step_end(step_info(step))
    out[0] = backend.module(x).detach()  # after the loop: no hook left
    return out


def test_nan_and_spike_change_the_output_only_on_their_steps():
    base = outputs_per_step([], rank=0)
    out = outputs_per_step(["nan@2", "spike@3=10"], rank=0)
    assert torch.isnan(out[2]).all()
    torch.testing.assert_close(out[3], base[3] * 10)
    for step in (0, 1, 4):
        assert torch.equal(out[step], base[step])


def test_faults_act_only_on_their_rank_and_not_in_eval_mode():
    base = outputs_per_step([], rank=0)
    other = outputs_per_step(["nan@2:r1", "spike@1-:r1"], rank=0)
    assert all(torch.equal(other[s], base[s]) for s in base)
    mine = outputs_per_step(["spike@2-:r1=3"], rank=1)
    assert torch.equal(mine[1], base[1])
    torch.testing.assert_close(mine[4], base[4] * 3)

    backend = FakeBackend()
    injector = FaultInjector(["nan@1"], backend, 0)
    injector.on_step_start(1)
    backend.module.eval()  # an evaluation inside the faulty step stays clean
    assert torch.isfinite(backend.module(torch.ones(1, 4))).all()
    backend.module.train()
    assert torch.isnan(backend.module(torch.ones(1, 4))).all()
    injector.on_train_end(1, None)
    assert torch.isfinite(backend.module(torch.ones(1, 4))).all()


def test_sleep_and_hang_at_step_start():
    injector = FaultInjector(["sleep@2:r0=0.3", "hang@3:r0"], FakeBackend(), 0)
    t0 = time.perf_counter()
    injector.on_step_start(1)
    assert time.perf_counter() - t0 < 0.2
    injector.on_step_start(2)
    assert time.perf_counter() - t0 >= 0.3
    blocked = threading.Thread(target=injector.on_step_start, args=(3,), daemon=True)
    blocked.start()
    blocked.join(0.5)
    assert blocked.is_alive()  # a daemon thread: it dies with the test process


def test_bad_fault_spec_is_a_config_error():
    with pytest.raises(ConfigError, match="KIND@STEPS"):
        FaultInjector(["explode@3"], FakeBackend(), 0)


def test_sigkill_waits_for_the_checkpoint_then_kills(tmp_path):
    script = textwrap.dedent(
        """
        import sys
        from tests.train.test_debug import FakeBackend, step_info
        from kfm.train.debug import FaultInjector

        class Backend(FakeBackend):
            def wait(self):
                print("waited for the save", flush=True)

        injector = FaultInjector(["sigkill@3"], Backend(), 0)
        for step in (1, 2, 3):
            injector.on_step_start(step)
            injector.on_step_end(step_info(step))
            print("survived step", step, flush=True)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.splitlines() == [
        "survived step 1",
        "survived step 2",
        "waited for the save",
    ]


@dataclass
class FakeBatch:
    tokens: torch.Tensor


class FakeLoader:
    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.samples_consumed = 0
        self.other = "passed through"

    def next_batch(self) -> FakeBatch:
        start = self.samples_consumed
        self.samples_consumed += 4  # global samples: 2 ranks x 2 rows
        rows = torch.arange(start * 8, (start + 2) * 8, dtype=torch.int32).reshape(2, 8)
        return FakeBatch(tokens=rows + 1000 * self.rank)


def test_batch_trace_appends_one_record_per_micro_batch(tmp_path: Path):
    loader = FakeLoader(rank=1)
    trace = BatchTrace(loader, tmp_path / "trace", rank=1)
    batches = [trace.next_batch() for _ in range(3)]
    assert trace.samples_consumed == 12 and trace.rank == 1 and trace.other == "passed through"
    trace.close()
    trace = BatchTrace(loader, tmp_path / "trace", rank=1)  # a resumed run appends
    batches.append(trace.next_batch())
    trace.close()

    lines = (tmp_path / "trace" / "batches_rank1.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["start"] for r in records] == [0, 4, 8, 12]
    assert all(r["dp_rank"] == 1 for r in records)
    for record, batch in zip(records, batches, strict=True):
        expect = [hashlib.sha1(row.numpy().tobytes()).hexdigest()[:16] for row in batch.tokens]
        assert record["rows"] == expect and len(expect) == 2
