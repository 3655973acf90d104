"""The shard format: writer/reader round trip, on-disk layout, and errors that name the file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from kfm.data.shards import ShardError, ShardSet, ShardWriter, token_dtype, write_manifest

BOS, EOS = 0, 1


def _docs(rng: np.random.Generator, n: int, vocab: int, max_len: int = 40) -> list[np.ndarray]:
    """Documents shaped like the packer's: [bos] + body + [eos], bodies of random length >= 1."""
    return [
        np.concatenate([[BOS], rng.integers(2, vocab, size=int(rng.integers(1, max_len))), [EOS]])
        for _ in range(n)
    ]


def _manifest(vocab: int, splits: dict, tokenizer_hash: str = "ab" * 32) -> dict:
    return {
        "format": "kfm-shards",
        "version": 1,
        "dtype": token_dtype(vocab).name,
        "vocab_size": vocab,
        "tokenizer_hash": tokenizer_hash,
        "bos_id": BOS,
        "eos_id": EOS,
        "sources": [{"name": "synthetic", "license": "CC0-1.0", "inputs": [], "n_docs": 0}],
        "splits": splits,
        "created_by": "kfm test",
        "created_at": "2025-01-01T00:00:00Z",
    }


def _write_set(
    out: Path, split_docs: dict[str, list[np.ndarray]], *, vocab: int, shard_tokens: int
) -> dict:
    splits = {}
    for split, docs in split_docs.items():
        with ShardWriter(out, split, vocab_size=vocab, shard_tokens=shard_tokens) as w:
            for d in docs:
                w.add_document(d)
        splits[split] = w.close()
    manifest = _manifest(vocab, splits)
    write_manifest(out, manifest)
    return manifest


@pytest.fixture
def shard_set(tmp_path: Path) -> tuple[Path, list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    train, val = _docs(rng, 60, 500), _docs(rng, 10, 500)
    _write_set(tmp_path / "set", {"train": train, "val": val}, vocab=500, shard_tokens=200)
    return tmp_path / "set", train, val


def test_token_dtype_boundaries() -> None:
    assert token_dtype(65536) == np.dtype("<u2")
    assert token_dtype(65537) == np.dtype("<u4")
    with pytest.raises(ValueError, match="vocab_size"):
        token_dtype(0)


def test_round_trip_stream_and_doc_index_across_files(shard_set) -> None:
    path, train, _ = shard_set
    ss = ShardSet.open(path, "train")
    stream = np.concatenate(train)
    doc_of = np.repeat(np.arange(len(train)), [len(d) for d in train])
    n_files = len(ss.manifest["splits"]["train"]["files"])
    assert n_files > 3, "shard_tokens=200 should force several files"
    assert (ss.n_tokens, ss.n_docs) == (stream.size, len(train))
    assert ss.read(0, ss.n_tokens).dtype == np.int64
    np.testing.assert_array_equal(ss.read(0, ss.n_tokens), stream)
    np.testing.assert_array_equal(ss.doc_index(0, ss.n_tokens), doc_of)
    rng = np.random.default_rng(1)
    for _ in range(50):
        start = int(rng.integers(0, stream.size))
        length = int(rng.integers(0, stream.size - start + 1))
        np.testing.assert_array_equal(ss.read(start, length), stream[start : start + length])
        np.testing.assert_array_equal(ss.doc_index(start, length), doc_of[start : start + length])
    with pytest.raises(IndexError):
        ss.read(ss.n_tokens - 3, 4)


def test_on_disk_layout_matches_contract(shard_set) -> None:
    path, train, _ = shard_set
    manifest = json.loads((path / "manifest.json").read_text())
    files = manifest["splits"]["train"]["files"]
    assert [f["bin"] for f in files] == [f"train-{i:05d}.bin" for i in range(len(files))]
    doc_ends = set(np.cumsum([len(d) for d in train]).tolist())
    docs_seen = 0
    for f in files:
        raw = (path / f["bin"]).read_bytes()
        idx = np.fromfile(path / f["idx"], dtype="<i8")
        tokens = np.frombuffer(raw, dtype="<u2")
        assert tokens.size == f["n_tokens"] and idx.size == f["n_docs"] + 1
        assert idx[0] == 0 and idx[-1] == f["n_tokens"]
        expected = np.concatenate(train[docs_seen : docs_seen + f["n_docs"]])
        np.testing.assert_array_equal(tokens, expected)  # whole documents only
        docs_seen += f["n_docs"]
        assert f["n_tokens"] <= 200 or f["n_docs"] == 1
        assert f["sha256_bin"] == hashlib.sha256(raw).hexdigest()
        assert f["sha256_idx"] == hashlib.sha256((path / f["idx"]).read_bytes()).hexdigest()
    assert docs_seen == len(train)
    ends = np.cumsum([f["n_tokens"] for f in files]).tolist()
    assert set(ends) <= doc_ends, "a document spans two files"
    assert not list(path.glob("*.tmp"))


def test_uint32_vocab_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, 100_000, size=17) for _ in range(5)]
    docs[0][3] = 99_999
    _write_set(tmp_path, {"train": docs}, vocab=100_000, shard_tokens=1 << 20)
    ss = ShardSet.open(tmp_path, verify="size")
    assert (tmp_path / "train-00000.bin").stat().st_size == 4 * 85
    np.testing.assert_array_equal(ss.read(0, 85), np.concatenate(docs))


@pytest.mark.parametrize(
    ("ids", "match"),
    [([5, 500], "token id 500"), ([-1, 3], "token id -1"), ([], "non-empty"), ([1.5], "integers")],
)
def test_writer_rejects_bad_documents(tmp_path: Path, ids, match: str) -> None:
    w = ShardWriter(tmp_path, "train", vocab_size=500)
    with pytest.raises(ValueError, match=match):
        w.add_document(np.asarray(ids))


def test_writer_context_manager_drops_tmp_on_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError), ShardWriter(tmp_path, "train", vocab_size=10) as w:
        w.add_document([1, 2])
        w.add_document([99])
    assert not list(tmp_path.glob("*.tmp"))
    assert not (tmp_path / "train-00000.bin").exists()


def test_writer_removes_stale_manifest(shard_set) -> None:
    path, _, _ = shard_set
    ShardWriter(path, "train", vocab_size=500)
    with pytest.raises(ShardError, match="not a shard set"):
        ShardSet.open(path)


def test_write_manifest_checks_files_and_totals(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, "train", vocab_size=50) as w:
        w.add_document([0, 5, 1])
    entry = w.close()
    bad = _manifest(50, {"train": {**entry, "n_tokens": 4}})
    with pytest.raises(ShardError, match="n_tokens"):
        write_manifest(tmp_path, bad)
    (tmp_path / "train-00000.idx").unlink()
    with pytest.raises(ShardError, match="train-00000.idx"):
        write_manifest(tmp_path, _manifest(50, {"train": entry}))
    assert not (tmp_path / "manifest.json").exists()


def _corrupt_byte(path: Path, offset: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_open_errors_name_the_file_and_fix(shard_set, tmp_path: Path) -> None:
    path, _, _ = shard_set
    with pytest.raises(ShardError, match="not a shard set"):
        ShardSet.open(tmp_path / "nope")
    with pytest.raises(ShardError, match="no split 'test'"):
        ShardSet.open(path, "test")
    (path / "train-00000.bin.tmp").write_bytes(b"junk")  # leftover of a crash: ignored
    ShardSet.open(path)

    bin1 = path / "train-00001.bin"
    _corrupt_byte(bin1, 7)
    ShardSet.open(path)  # default "size": sizes still agree, no data read
    ShardSet.open(path, verify="spread")  # the same at open; the hashing is verify_shard_sets
    with pytest.raises(ShardError, match=r"train-00001\.bin: sha256 mismatch.*kfm pack"):
        ShardSet.open(path, verify="sha256")

    good = bin1.read_bytes()
    bin1.write_bytes(good[:-2])
    with pytest.raises(ShardError, match=r"train-00001\.bin.*truncated.*kfm pack"):
        ShardSet.open(path, verify="size")
    bin1.write_bytes(good)

    (path / "train-00002.idx").unlink()
    with pytest.raises(ShardError, match=r"train-00002\.idx.*missing"):
        ShardSet.open(path, "train", verify="size")
    ShardSet.open(path, "val")  # the other split is intact


def test_open_rejects_bad_manifests(shard_set) -> None:
    path, _, _ = shard_set
    mpath = path / "manifest.json"
    good = json.loads(mpath.read_text())
    for change, match in [
        ({"format": "other"}, "format"),
        ({"version": 2}, "version=2"),
        ({"dtype": "uint32"}, "dtype"),
    ]:
        mpath.write_text(json.dumps({**good, **change}))
        with pytest.raises(ShardError, match=match):
            ShardSet.open(path, verify="size")
    mpath.write_text("{not json")
    with pytest.raises(ShardError, match=r"manifest\.json: not valid JSON"):
        ShardSet.open(path)
    mpath.unlink()
    with pytest.raises(ShardError, match="not a shard set.*kfm pack"):
        ShardSet.open(path)


def _rewrite_idx(path: Path, name: str, offsets: np.ndarray) -> None:
    """Write bad offsets into an .idx and its manifest hash: a packer bug, not disk corruption."""
    offsets.astype("<i8").tofile(path / name)
    mpath = path / "manifest.json"
    manifest = json.loads(mpath.read_text())
    for entry in manifest["splits"].values():
        for f in entry["files"]:
            if f["idx"] == name:
                f["sha256_idx"] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    mpath.write_text(json.dumps(manifest))


def test_idx_is_memory_mapped_not_read(shard_set) -> None:
    path, _, _ = shard_set
    ss = ShardSet.open(path, verify="size")
    assert ss._idxs and all(isinstance(i, np.memmap) and i.mode == "r" for i in ss._idxs)
    assert all(isinstance(b, np.memmap) for b in ss._bins)


def test_idx_contents_checked(shard_set) -> None:
    path, _, _ = shard_set
    offsets = np.fromfile(path / "val-00000.idx", dtype="<i8")
    swapped = offsets.copy()
    swapped[1], swapped[2] = offsets[2], offsets[1]
    _rewrite_idx(path, "val-00000.idx", swapped)
    ShardSet.open(path, "val", verify="size")  # the full monotonic check is not on the open path
    with pytest.raises(ShardError, match=r"val-00000\.idx: document offsets must rise"):
        ShardSet.open(path, "val", verify="sha256")
    # First and last offsets are checked at open in every mode (O(1)).
    _rewrite_idx(path, "val-00000.idx", np.concatenate([offsets[:-1], [offsets[-1] - 1]]))
    with pytest.raises(ShardError, match=r"val-00000\.idx: document offsets.*run from 0 to"):
        ShardSet.open(path, "val", verify="size")
