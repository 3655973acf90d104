"""Shard verification spread over ranks: each file checked by exactly one rank, problems found by
the rank that owns the file, and combined into one error. Ranks are simulated by calling with
rank=r, world_size=W for each r; no processes are started."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from kfm.config import DataSourceConfig
from kfm.data.loader import PackedLoader
from kfm.data.shards import ShardError, ShardSet, ShardWriter, token_dtype, write_manifest
from kfm.data.verify import (
    ShardFile,
    VerifyShare,
    files_for_rank,
    list_shard_files,
    raise_verify_errors,
    verification_share,
    verify_shard_sets,
)

VOCAB = 500
W = 4


def _write_set(out: Path, seed: int, n_train: int = 40, n_val: int = 8) -> Path:
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        with ShardWriter(out, split, vocab_size=VOCAB, shard_tokens=150) as w:
            for _ in range(n):
                body = rng.integers(2, VOCAB, size=int(rng.integers(1, 40)))
                w.add_document(np.concatenate([[0], body, [1]]))
        splits[split] = w.close()
    manifest = {
        "format": "kfm-shards",
        "version": 1,
        "dtype": token_dtype(VOCAB).name,
        "vocab_size": VOCAB,
        "tokenizer_hash": "ab" * 32,
        "bos_id": 0,
        "eos_id": 1,
        "sources": [],
        "splits": splits,
    }
    write_manifest(out, manifest)
    return out


@pytest.fixture
def sets(tmp_path: Path) -> list[Path]:
    return [_write_set(tmp_path / name, i) for i, name in enumerate(("ko", "en", "pubmed"))]


def _owner(files: list[ShardFile], source: Path, name: str, world_size: int) -> int:
    """The rank that owns file ``name`` of ``source``: its index in the sorted list mod W."""
    keys = [(Path(f.source), f.entry["bin"], f.entry["idx"]) for f in files]
    (i,) = [i for i, (s, b, x) in enumerate(keys) if s == source and name in (b, x)]
    return i % world_size


def _per_rank(paths: list[Path], world_size: int, **kw) -> list[list[str]]:
    return [
        verify_shard_sets(paths, rank=r, world_size=world_size, **kw) for r in range(world_size)
    ]


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_file_goes_to_exactly_one_rank(sets) -> None:
    files = list_shard_files(sets)
    n_bin = sum(len(list(p.glob("*.bin"))) for p in sets)
    assert len(files) == n_bin > 12, "shard_tokens=150 should give several files per split"
    assert [f.key for f in files] == sorted(f.key for f in files)
    # The order, hence the assignment, does not depend on the order the sources are given in.
    assert [f.key for f in list_shard_files(sets[::-1])] == [f.key for f in files]
    for world_size in (1, 2, 3, W, 7, len(files) + 5):
        shares = [files_for_rank(files, r, world_size) for r in range(world_size)]
        keys = [f.key for share in shares for f in share]
        assert sorted(keys) == [f.key for f in files], "each file on exactly one rank"
        assert len(set(keys)) == len(keys)
        sizes = [len(s) for s in shares]
        assert max(sizes) - min(sizes) <= 1
        for r in range(world_size):
            share = verification_share(sets, rank=r, world_size=world_size)
            assert (share.n_files, share.n_bytes) == (
                sizes[r],
                sum(f.nbytes for f in shares[r]),
            )
            assert share.total_files == len(files)
    disk = sum(p.stat().st_size for s in sets for p in s.iterdir() if p.suffix in (".bin", ".idx"))
    assert verification_share(sets).total_bytes == disk


def test_corrupt_bin_found_only_by_its_rank_under_spread(sets) -> None:
    files = list_shard_files(sets)
    target = sets[1] / "train-00002.bin"
    _flip_byte(target, 5)
    found = _per_rank(sets, W)
    owner = _owner(files, sets[1], target.name, W)
    assert [bool(e) for e in found] == [r == owner for r in range(W)]
    (msg,) = found[owner]
    assert msg.startswith(f"{target}: sha256 mismatch") and "kfm pack" in msg

    # "size" misses it, at open and in the loader ("spread" opens the same way).
    ShardSet.open(sets[1], verify="size")
    cfg = DataSourceConfig(name="en", path=str(sets[1]))
    PackedLoader([cfg], seq_len=16, micro_batch_size=1, seed=0, verify="spread")
    # "sha256" finds it on the rank that opens the set.
    with pytest.raises(ShardError, match=r"train-00002\.bin: sha256 mismatch"):
        ShardSet.open(sets[1], verify="sha256")
    # The trainer all-gathers the lists and raises on every rank.
    with pytest.raises(ShardError, match=r"found 1 problem:\n- .*train-00002\.bin: sha256"):
        raise_verify_errors(found)
    # The full check (one process) finds it too.
    assert verify_shard_sets(sets) == [msg]


def test_bad_idx_found_by_spread_on_its_rank(sets) -> None:
    files = list_shard_files(sets)
    src = sets[2]
    idx = src / "train-00001.idx"
    offsets = np.fromfile(idx, dtype="<i8")
    offsets[1], offsets[2] = offsets[2], offsets[1]
    offsets.tofile(idx)
    # Rehash into the manifest: a packer bug, which only the offset check can catch.
    manifest = json.loads((src / "manifest.json").read_text())
    for f in manifest["splits"]["train"]["files"]:
        if f["idx"] == idx.name:
            f["sha256_idx"] = hashlib.sha256(idx.read_bytes()).hexdigest()
    (src / "manifest.json").write_text(json.dumps(manifest))

    ShardSet.open(src, verify="size")  # first and last offsets are fine: not seen at open
    found = _per_rank(sets, W)
    owner = _owner(files, src, idx.name, W)
    assert [bool(e) for e in found] == [r == owner for r in range(W)]
    assert found[owner] == [
        f"{idx}: document offsets must rise strictly from 0 to "
        f"{offsets[-1]}; re-run `kfm pack` to rebuild the shard set"
    ]


def test_truncated_file_found_by_size(sets) -> None:
    files = list_shard_files(sets)
    target = sets[0] / "val-00000.bin"
    target.write_bytes(target.read_bytes()[:-2])
    with pytest.raises(ShardError, match=r"val-00000\.bin: \d+ bytes, manifest says .*truncated"):
        ShardSet.open(sets[0], "val", verify="size")
    found = _per_rank(sets, W)
    owner = _owner(files, sets[0], target.name, W)
    assert [len(e) for e in found] == [int(r == owner) for r in range(W)]
    assert "truncated" in found[owner][0] and "sha256" not in found[owner][0]


def test_missing_idx_and_several_problems_all_listed(sets) -> None:
    (sets[0] / "train-00000.idx").unlink()
    _flip_byte(sets[2] / "val-00000.bin", 0)
    errors = verify_shard_sets(sets, workers=2)
    assert len(errors) == 2
    assert any("train-00000.idx: listed in" in e and "missing" in e for e in errors)
    with pytest.raises(ShardError, match="found 2 problems") as info:
        raise_verify_errors(_per_rank(sets, 3))
    assert str(info.value).count("\n- ") == 2


def test_clean_sets_full_check_is_silent(sets, capsys) -> None:
    seen: list[tuple[tuple[str, str, str], list[str]]] = []
    assert verify_shard_sets(sets, splits=None, on_file=lambda f, e: seen.append((f.key, e))) == []
    assert [k for k, _ in seen] == [f.key for f in list_shard_files(sets)]
    assert all(e == [] for _, e in seen)
    assert verify_shard_sets(sets, workers=3) == []
    assert verify_shard_sets(sets, splits=["val"], rank=1, world_size=2) == []
    raise_verify_errors([[], None, []])
    # DataSourceConfig works as well as paths; a directory given twice is checked once.
    cfgs = [DataSourceConfig(name=f"s{i}", path=str(p)) for i, p in enumerate(sets)]
    assert len(list_shard_files([*cfgs, sets[0]])) == len(list_shard_files(sets))
    assert capsys.readouterr() == ("", "")


def test_manifest_problems_on_every_rank_listed_once(sets, tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    found = _per_rank([*sets, gone], 3, splits=("train", "test"))
    for errors in found:
        assert any(e.startswith(f"{gone}: not a shard set") for e in errors)
        assert sum("no split 'test'" in e for e in errors) == len(sets)
    with pytest.raises(ShardError, match=f"found {1 + len(sets)} problems"):
        raise_verify_errors(found)
    with pytest.raises(ShardError, match="not a shard set"):
        list_shard_files([gone])
    assert verification_share([gone, sets[0]]).total_files == len(list_shard_files([sets[0]]))


def test_share_description_and_bad_rank(sets) -> None:
    share = VerifyShare(
        rank=1,
        world_size=4,
        n_files=12,
        n_bytes=3_100_000_000,
        total_files=48,
        total_bytes=12_400_000_000,
    )
    assert share.describe() == (
        "verified 12 shard files (3.1 GB) on this rank, 48 files (12.4 GB) over 4 ranks"
    )
    for rank, world_size in ((4, 4), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="rank="):
            verify_shard_sets(sets, rank=rank, world_size=world_size)
    with pytest.raises(ValueError, match="workers"):
        verify_shard_sets(sets, workers=0)
