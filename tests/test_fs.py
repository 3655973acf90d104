"""kfm.fs.atomic_write_bytes: atomic for files, in place for devices and pipes, errors name the path."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from kfm.fs import atomic_write_bytes


def test_replaces_a_file_and_leaves_no_temp_file(tmp_path):
    out = tmp_path / "a.json"
    out.write_bytes(b"old")
    atomic_write_bytes(out, b"new")
    assert out.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_pipe_is_written_in_place_not_replaced_by_a_file(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    atomic_write_bytes(fifo, b"through the pipe")
    reader.join(timeout=10)
    assert got == [b"through the pipe"]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # renaming over it would have made it a file


def test_a_full_device_reports_enospc_naming_the_path(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    link = tmp_path / "out.jsonl"
    link.symlink_to("/dev/full")
    with pytest.raises(OSError) as err:
        atomic_write_bytes(link, b"x" * 10)
    assert err.value.errno == 28  # ENOSPC
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_a_symlink_keeps_pointing_at_its_updated_target(tmp_path):
    target = tmp_path / "real.txt"
    target.write_bytes(b"old")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    atomic_write_bytes(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"


def test_errors_name_the_path_not_the_temp_file(tmp_path):
    out = tmp_path / "missing_dir" / "x.json"
    with pytest.raises(OSError) as err:
        atomic_write_bytes(out, b"x")
    assert err.value.filename == str(out) and ".tmp-" not in str(err.value)
