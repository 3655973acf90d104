"""The bad-input table: mistakes a user makes, each driven through the real command line.

Every row runs ``python -m kfm_cli ...`` in a subprocess and asserts the exit code, a message
naming the file, key or flag to fix, and that no Python traceback reaches the console. Setups
are cheap: a few small files, the session's tiny shard sets and one 2-step training run shared
by the rows that need a checkpoint. Ctrl-C and a multi-rank failure need their own drivers and
follow the table.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO, TOKENIZER, tiny_overrides

TINY = str(REPO / "configs" / "tiny.yaml")
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
ENV.pop("KFM_DEBUG", None)


@dataclass
class World:
    """Files the rows point at, made once per module."""

    root: Path
    sources: list[dict]
    run: Path = field(init=False)
    other_tokenizer: Path = field(init=False)

    def p(self, name: str) -> str:
        return str(self.root / name)

    def train(self, *extra: str, root: Path | None = None, name: str = "run") -> list[str]:
        return ["train", TINY, *tiny_overrides(self.sources, root or self.root, name), *extra]


def _kfm(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kfm_cli", *args],
        cwd=REPO,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def world(tiny_sources, tmp_path_factory) -> World:
    w = World(tmp_path_factory.mktemp("bad_inputs"), tiny_sources)
    r = w.root
    (r / "empty.jsonl").write_bytes(b"")
    (r / "ok.jsonl").write_text('{"text": "mail kim@example.com"}\n', encoding="utf-8")
    with gzip.open(r / "notes.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"id": "a", "text": "call 010-1234-5678"}\n{"id": "b", "text": "none"}\n')
    # Invalid UTF-8: 0xff is byte 11 of the line in each JSON line below (from 1).
    (r / "bad.jsonl").write_bytes(b'{"text":"ok"}\n{"text":"b\xffad"}\n')
    with gzip.open(r / "bad.jsonl.gz", "wb") as f:
        f.write(b'{"text":"ok"}\n{"text":"fine"}\n{"text":"b\xffad"}\n')
    (r / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text":"b\xffad"}\n')  # the BOM counts: byte 14
    (r / "bad.txt").write_bytes(b"line one\nline two\nbad \xff here\n")  # line 3, byte 5
    (r / "existing").mkdir()
    (r / "existing" / "notes.txt").write_text("not kfm's\n")
    (r / "corpus").mkdir()
    shutil.copy(r / "ok.jsonl", r / "corpus" / "a.jsonl")
    # ENOSPC from /dev/full, through a symlink: were the output replaced instead of written,
    # only the link would go, never the device.
    (r / "full.jsonl").symlink_to("/dev/full")
    (r / "a_file").write_text("x\n")

    # Another tokenizer: the same vocabulary, a different tokenizer.json (hash).
    w.other_tokenizer = r / "other_tokenizer"
    shutil.copytree(TOKENIZER, w.other_tokenizer)
    tj = w.other_tokenizer / "tokenizer.json"
    tj.write_text(json.dumps(json.loads(tj.read_text(encoding="utf-8")), indent=1))

    train = [*w.train(), "--train.steps=2", "--checkpoint.interval=2", "--eval.interval=0"]
    proc = _kfm(*train, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w.run = r / "run"
    return w


@dataclass(frozen=True)
class Row:
    argv: Callable[[World], list[str]]
    code: int
    message: Callable[[World], str] | str
    env: dict[str, str] = field(default_factory=dict)
    traceback: bool = False
    """--debug / KFM_DEBUG rows: the traceback is asked for, and shown before the message."""
    intact: tuple[str, ...] = ()
    """Files (under the world's root) the command must leave byte-identical."""


def _row(id: str, row: Row, *marks: pytest.MarkDecorator):
    return pytest.param(row, id=id, marks=marks)


TABLE = [
    # ---- inputs
    _row(
        "pack_empty_file",
        Row(
            lambda w: [
                "pack",
                w.p("empty.jsonl"),
                "--tokenizer",
                str(TOKENIZER),
                "--out",
                w.p("o1"),
            ],
            1,
            lambda w: f"{w.p('empty.jsonl')}: no documents to pack (the input is empty)",
        ),
    ),
    _row(
        "pack_missing_input",
        Row(
            lambda w: ["pack", w.p("nope.jsonl"), "--tokenizer", str(TOKENIZER), "--out", w.p("o")],
            1,
            lambda w: f"{w.p('nope.jsonl')}: no such file or directory",
        ),
    ),
    _row(
        "pii_report_reads_gz",
        Row(
            lambda w: ["data", "pii-report", w.p("notes.jsonl.gz"), "-o", w.p("pii.jsonl")],
            0,
            "PII spans found: 1",
        ),
    ),
    _row(
        "utf8_jsonl_line_and_byte",
        Row(
            lambda w: ["data", "pii-report", w.p("bad.jsonl")],
            1,
            lambda w: f"{w.p('bad.jsonl')}:2: not UTF-8: byte 11 of the line is 0xff",
        ),
    ),
    _row(
        "utf8_gz_line_and_byte",
        Row(
            lambda w: ["data", "pii-report", w.p("bad.jsonl.gz")],
            1,
            lambda w: f"{w.p('bad.jsonl.gz')}:3: not UTF-8: byte 11 of the line is 0xff",
        ),
    ),
    _row(
        "utf8_bom_counts",
        Row(
            lambda w: ["pack", w.p("bom.jsonl"), "--tokenizer", str(TOKENIZER), "--out", w.p("o")],
            1,
            lambda w: f"{w.p('bom.jsonl')}:1: not UTF-8: byte 14 of the line is 0xff",
        ),
    ),
    _row(
        "utf8_txt_line_and_byte",
        Row(
            lambda w: ["pack", w.p("bad.txt"), "--tokenizer", str(TOKENIZER), "--out", w.p("o")],
            1,
            lambda w: f"{w.p('bad.txt')}:3: not UTF-8: byte 5 of the line is 0xff",
        ),
    ),
    # ---- outputs
    _row(
        "pack_existing_output",
        Row(
            lambda w: [
                "pack",
                w.p("ok.jsonl"),
                "--tokenizer",
                str(TOKENIZER),
                "--out",
                w.p("existing"),
            ],
            1,
            lambda w: f"{w.p('existing')} exists and is not a shard set made by kfm",
            intact=("existing/notes.txt", "ok.jsonl"),
        ),
    ),
    _row(
        "pack_overwrite_into_input",
        Row(
            lambda w: [
                "pack",
                w.p("corpus"),
                "--tokenizer",
                str(TOKENIZER),
                "--out",
                w.p("corpus"),
                "--overwrite",
            ],  # fmt: skip
            1,
            lambda w: f"{w.p('corpus')} is the input {w.p('corpus')}",
            intact=("corpus/a.jsonl",),
        ),
    ),
    _row(
        "full_disk",
        Row(
            lambda w: ["data", "pii-report", w.p("ok.jsonl"), "-o", w.p("full.jsonl")],
            1,
            lambda w: f"{w.p('full.jsonl')}: no space left on the device",
            intact=("ok.jsonl",),
        ),
    ),
    _row(
        "output_is_a_directory",
        Row(
            lambda w: ["data", "pii-report", w.p("ok.jsonl"), "-o", w.p("existing")],
            1,
            lambda w: f"{w.p('existing')}: is a directory",
        ),
    ),
    # ---- training
    _row(
        "run_root_unwritable",
        Row(
            lambda w: w.train("--train.run_root=/proc/kfm-runs"),
            2,
            "cannot write the run directory /proc/kfm-runs/run",
        ),
    ),
    _row(
        "run_root_unwritable_dry_run",
        Row(
            lambda w: w.train("--train.run_root=/proc/kfm-runs", "--dry-run"),
            1,
            "FAIL run directory: /proc/kfm-runs/run: cannot write",
        ),
    ),
    _row(
        "run_root_is_a_file",
        Row(
            lambda w: w.train(f"--train.run_root={w.p('a_file')}"),
            2,
            lambda w: f"{w.p('a_file')}/run ([Errno 20] Not a directory",
        ),
    ),
    _row(
        "global_batch_size_0",
        Row(
            lambda w: w.train("--train.global_batch_size=0", "--dry-run"),
            2,
            "train.global_batch_size=0 must be >= 1 (set --train.global_batch_size)",
        ),  # fmt: skip
    ),
    _row(
        "negative_lr",
        Row(lambda w: w.train("--optim.lr=-1", "--dry-run"), 2, "optim.lr=-1.0 must be > 0"),
    ),
    _row(
        "bad_config_key",
        Row(lambda w: ["train", TINY, "--optim.lrr=1", "--dry-run"], 2, "did you mean 'optim.lr'"),
    ),
    _row(
        "steps_below_checkpoint",
        Row(lambda w: w.train("--train.steps=1"), 0, "nothing to do"),
    ),
    _row(
        "eval_other_tokenizer",
        Row(
            lambda w: ["eval", str(w.run), "--tokenizer", str(w.other_tokenizer), "--batches=1"],
            1,
            lambda w: f"--tokenizer {w.other_tokenizer} is not the tokenizer this checkpoint",
        ),
    ),
    _row(
        "export_other_tokenizer",
        Row(
            lambda w: ["export", str(w.run), w.p("hf"), "--tokenizer", str(w.other_tokenizer)],
            1,
            lambda w: f"--tokenizer {w.other_tokenizer} is not the tokenizer this checkpoint",
        ),
    ),
    # ---- the command line itself
    _row(
        "unknown_flag",
        Row(
            lambda w: [
                "pack",
                w.p("ok.jsonl"),
                "--tokenizer",
                str(TOKENIZER),
                "--out",
                w.p("o"),
                "--bogus",
            ],  # fmt: skip
            2,
            "unrecognized arguments for kfm pack: --bogus",
        ),
    ),
    _row("unknown_command", Row(lambda w: ["trian", TINY], 2, "invalid choice: 'trian'")),
    _row(
        "global_flag_after_command",
        Row(lambda w: ["train", TINY, "-q"], 2, "put it before the command (kfm -q train ...)"),
    ),
    _row(
        "debug_flag_shows_traceback",
        Row(
            lambda w: ["--debug", "data", "pii-report", w.p("bad.jsonl")],
            1,
            "kfm data pii-report: error: ",
            traceback=True,
        ),
    ),
    _row(
        "debug_env_shows_traceback",
        Row(
            lambda w: ["data", "pii-report", w.p("bad.jsonl")],
            1,
            "kfm data pii-report: error: ",
            env={"KFM_DEBUG": "1"},
            traceback=True,
        ),
    ),
]


@pytest.mark.parametrize("row", TABLE)
def test_bad_input(world: World, row: Row) -> None:
    before = {name: (world.root / name).read_bytes() for name in row.intact}
    proc = _kfm(*row.argv(world), env={**ENV, **row.env})
    message = row.message(world) if callable(row.message) else row.message
    out = proc.stdout + proc.stderr
    assert proc.returncode == row.code, out[-3000:]
    assert message in out, out[-3000:]
    assert ("Traceback (most recent call last)" in proc.stderr) == row.traceback, proc.stderr
    if row.traceback:  # the message still comes last, after the traceback
        assert proc.stderr.rstrip().splitlines()[-1].startswith(message)
    assert {name: (world.root / name).read_bytes() for name in row.intact} == before
    assert Path("/dev/full").is_char_device()  # written through the link, never replaced


def test_locked_run_names_the_holder(world: World) -> None:
    from kfm.train.lock import RunLock

    lock = RunLock(world.run)
    lock.acquire()
    try:
        proc = _kfm(*world.train("--train.steps=4"))
    finally:
        lock.release()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"pid {os.getpid()}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_ctrl_c_is_one_line_and_exit_130(world: World) -> None:
    """SIGINT while a command works: one line, exit 130. The command reads a named pipe, so the
    signal lands once it is inside our code (the pipe's writer side opens only then)."""
    fifo = world.root / "pipe.jsonl"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kfm_cli", "data", "pii-report", str(fifo)],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    opened: list[int] = []
    opener = threading.Thread(target=lambda: opened.append(os.open(fifo, os.O_WRONLY)))
    opener.start()
    opener.join(timeout=60)
    try:
        assert opened, "kfm never opened its input"
        os.write(opened[0], b'{"text": "first line"}\n')  # it now waits for the next line
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if opened:
            os.close(opened[0])
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.strip() == "kfm data pii-report: interrupted (Ctrl-C)", err


def test_every_rank_prints_one_clean_line(world: World) -> None:
    """Under torchrun each rank runs main(): a rank that fails prints its message once, tagged
    with its rank, without a traceback from kfm's code. (torchrun then stops the other ranks,
    which may not get to print, and adds its own ChildFailedError report.)"""
    bad = world.p("nope_shards")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "kfm_cli", *world.train(f"--data.sources=[{{name: x, path: {bad}}}]",
                                      name="two_ranks"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    heads = [line.split(":")[0] for line in proc.stderr.splitlines() if line.startswith("kfm ")]
    assert heads and set(heads) <= {"kfm train [rank 0]", "kfm train [rank 1]"}, proc.stderr
    assert len(heads) == len(set(heads)), proc.stderr  # once per rank
    assert f"{bad}: not a shard set" in proc.stderr
    ours = ("/kfm/", "/kfm_cli/", "/data_pipeline/", "/eval/")
    frames = [line for line in proc.stderr.splitlines() if line.strip().startswith("File ")]
    assert not [f for f in frames if any(p in f for p in ours)], proc.stderr
