"""PackedLoader and validation_batches, checked against the token streams the tests wrote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kfm.config import DataSourceConfig
from kfm.data.loader import MIX_BLOCK, Batch, PackedLoader, validation_batches
from kfm.data.shards import ShardError, ShardWriter, token_dtype, write_manifest

BOS, EOS = 0, 1
VOCAB = 1000
T = 16


def _docs(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[np.ndarray]:
    """[bos] + body + [eos] documents with body ids in [lo, hi), lengths 1..39."""
    return [
        np.concatenate([[BOS], rng.integers(lo, hi, size=int(rng.integers(1, 40))), [EOS]])
        for _ in range(n)
    ]


def _write_source(
    out: Path,
    split_docs: dict[str, list[np.ndarray]],
    *,
    shard_tokens: int = 300,
    tokenizer_hash: str = "ab" * 32,
) -> Path:
    splits = {}
    for split, docs in split_docs.items():
        w = ShardWriter(out, split, vocab_size=VOCAB, shard_tokens=shard_tokens)
        for d in docs:
            w.add_document(d)
        splits[split] = w.close()
    write_manifest(
        out,
        {
            "format": "kfm-shards",
            "version": 1,
            "dtype": token_dtype(VOCAB).name,
            "vocab_size": VOCAB,
            "tokenizer_hash": tokenizer_hash,
            "bos_id": BOS,
            "eos_id": EOS,
            "sources": [],
            "splits": splits,
        },
    )
    return out


class Source:
    """A written source plus the streams the loader's output is checked against."""

    def __init__(self, root: Path, name: str, seed: int, n_docs: int, lo: int, hi: int) -> None:
        rng = np.random.default_rng(seed)
        self.train, self.val = _docs(rng, n_docs, lo, hi), _docs(rng, 8, lo, hi)
        self.cfg = DataSourceConfig(name=name, path=str(root / name))
        _write_source(root / name, {"train": self.train, "val": self.val})
        self.lo, self.hi = lo, hi

    @staticmethod
    def stream(docs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(docs), np.repeat(np.arange(len(docs)), [len(d) for d in docs])

    def windows(self, split: str = "train") -> dict[tuple[int, ...], int]:
        """Input tokens of every window -> window number (windows are unique for random data)."""
        toks, _ = self.stream(self.train if split == "train" else self.val)
        n = toks.size // (T + 1)
        out = {tuple(toks[k * (T + 1) : k * (T + 1) + T].tolist()): k for k in range(n)}
        assert len(out) == n
        return out


def _src(cfg: DataSourceConfig, weight: float) -> DataSourceConfig:
    return DataSourceConfig(name=cfg.name, path=cfg.path, weight=weight)


@pytest.fixture
def three(tmp_path: Path) -> list[Source]:
    # Disjoint body-id ranges tell a row's source from its tokens.
    return [Source(tmp_path, f"s{i}", i, 60 + 20 * i, 2 + 300 * i, 300 * (i + 1)) for i in range(3)]


def _rows(batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.cat([b.tokens for b in batches]),
        torch.cat([b.labels for b in batches]),
        torch.cat([b.doc_ids for b in batches]),
    )


def _assert_same(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.tokens, y.tokens)
        assert torch.equal(x.labels, y.labels)
        assert torch.equal(x.doc_ids, y.doc_ids)


def _take(loader: PackedLoader, n: int) -> list[Batch]:
    return [loader.next_batch() for _ in range(n)]


def test_windows_reconstruct_stream_and_epochs_cover_every_window(three) -> None:
    src = three[0]
    windows = src.windows()
    toks, doc_of = Source.stream(src.train)
    loader = PackedLoader([src.cfg], seq_len=T, micro_batch_size=1, seed=7, verify="size")
    epochs = []
    for _ in range(2):
        seen = []
        for _ in range(len(windows)):
            b = loader.next_batch()
            assert b.tokens.shape == (1, T) and b.tokens.dtype == torch.int64
            row = b.tokens[0].tolist()
            k = windows[tuple(row)]
            start = k * (T + 1)
            assert b.labels[0].tolist() == toks[start + 1 : start + T + 1].tolist()
            expect_docs = doc_of[start : start + T] - doc_of[start]
            assert b.doc_ids[0].tolist() == expect_docs.tolist()
            seen.append(k)
        assert sorted(seen) == list(range(len(windows))), "an epoch must visit each window once"
        epochs.append(seen)
    assert epochs[0] != epochs[1], "epochs must reshuffle"


def test_doc_ids_mark_boundaries_across_files(three) -> None:
    src = three[1]
    manifest = json.loads(Path(src.cfg.path, "manifest.json").read_text())
    assert len(manifest["splits"]["train"]["files"]) > 3, "windows should cross files"
    loader = PackedLoader([src.cfg], seq_len=T, micro_batch_size=8, seed=3)
    tokens, _, docs = _rows(_take(loader, 20))
    assert torch.all(docs[:, 0] == 0)
    step = docs[:, 1:] - docs[:, :-1]
    assert torch.all((step == 0) | (step == 1))
    # Every document starts with bos, so a new doc id appears exactly where an input is bos.
    assert torch.equal(step == 1, tokens[:, 1:] == BOS)
    assert int(step.sum()) > 20


def test_deterministic_and_seed_dependent(three) -> None:
    cfgs = [s.cfg for s in three]
    a = _take(PackedLoader(cfgs, seq_len=T, micro_batch_size=4, seed=1, verify="size"), 6)
    b = _take(PackedLoader(cfgs, seq_len=T, micro_batch_size=4, seed=1, verify="size"), 6)
    c = _take(PackedLoader(cfgs, seq_len=T, micro_batch_size=4, seed=2, verify="size"), 6)
    _assert_same(a, b)
    assert not torch.equal(_rows(a)[0], _rows(c)[0])


def test_mixture_follows_weights(three) -> None:
    weights = [1.0, 2.0, 5.0]
    cfgs = [_src(s.cfg, w) for s, w in zip(three, weights, strict=True)]
    loader = PackedLoader(cfgs, seq_len=T, micro_batch_size=64, seed=11, verify="size")
    tokens = _rows(_take(loader, 100))[0]  # 6400 samples
    source_of_row = tokens.max(dim=1).values // 300
    share = torch.bincount(source_of_row, minlength=3).double() / tokens.shape[0]
    expected = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    # Binomial std at n=6400 is <= 0.0063; 0.03 is ~5 sigma.
    assert torch.allclose(share, expected, atol=0.03), share


def test_zero_weight_source_never_drawn(three) -> None:
    cfgs = [_src(three[0].cfg, 1.0), _src(three[1].cfg, 0.0)]
    tokens = _rows(_take(PackedLoader(cfgs, seq_len=T, micro_batch_size=32, seed=0), 10))[0]
    assert int(tokens.max()) < 300


@pytest.mark.parametrize(("k", "batch"), [(3, 4), (70, 64)])
def test_resume_gives_the_uninterrupted_batches(three, k: int, batch: int) -> None:
    cfgs = [_src(s.cfg, w) for s, w in zip(three, [1.0, 2.0, 3.0], strict=True)]

    def make() -> PackedLoader:
        return PackedLoader(cfgs, seq_len=T, micro_batch_size=batch, seed=5, verify="size")

    if batch == 64:
        assert k * batch > MIX_BLOCK, "this case must resume past a mixture block boundary"
    ref = make()
    full = _take(ref, k + 5)
    first = make()
    _take(first, k)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["samples_consumed"] == k * batch
    resumed = make()
    resumed.load_state_dict(state)
    _assert_same(_take(resumed, 5), full[k:])


def test_ranks_interleave_to_the_global_stream(three) -> None:
    cfgs = [s.cfg for s in three]
    kw = dict(seq_len=T, micro_batch_size=2, seed=9, verify="size")
    glob = _take(PackedLoader(cfgs, **kw), 10)
    ranks = [PackedLoader(cfgs, **kw, rank=r, world_size=2) for r in range(2)]
    for step in range(5):
        for r in range(2):
            _assert_same([ranks[r].next_batch()], [glob[2 * step + r]])
    assert ranks[0].state_dict() == ranks[1].state_dict()


def test_world_1_state_resumes_on_world_2(three) -> None:
    cfgs = [s.cfg for s in three]
    kw = dict(seq_len=T, micro_batch_size=2, seed=4, verify="size")
    glob = _take(PackedLoader(cfgs, **kw), 9)
    one = PackedLoader(cfgs, **kw)
    _take(one, 3)
    state = one.state_dict()
    ranks = [PackedLoader(cfgs, **kw, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    for step in range(3):
        for r in range(2):
            _assert_same([ranks[r].next_batch()], [glob[3 + 2 * step + r]])


def test_load_state_rejects_changed_settings(three) -> None:
    cfgs = [s.cfg for s in three]
    base = PackedLoader(cfgs, seq_len=T, micro_batch_size=2, seed=4, verify="size")
    base.next_batch()
    state = base.state_dict()
    others = {
        "seq_len": PackedLoader(cfgs, seq_len=T + 1, micro_batch_size=2, seed=4),
        "seed": PackedLoader(cfgs, seq_len=T, micro_batch_size=2, seed=5),
        "sources": PackedLoader(cfgs[:2], seq_len=T, micro_batch_size=2, seed=4),
        "weights": PackedLoader(
            [_src(cfgs[0], 2.0), *cfgs[1:]], seq_len=T, micro_batch_size=2, seed=4
        ),
    }
    for field, loader in others.items():
        with pytest.raises(ValueError, match=f"{field}=.*fresh loader state"):
            loader.load_state_dict(state)
    with pytest.raises(ValueError, match="inconsistent"):
        base.load_state_dict({**state, "samples_consumed": state["samples_consumed"] + 1})


def test_tokenizer_mismatch_names_both_sources(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = _write_source(tmp_path / "a", {"train": _docs(rng, 20, 2, 900)})
    b = _write_source(tmp_path / "b", {"train": _docs(rng, 20, 2, 900)}, tokenizer_hash="cd" * 32)
    cfgs = [DataSourceConfig(name="ko", path=str(a)), DataSourceConfig(name="en", path=str(b))]
    with pytest.raises(ShardError, match="'ko'.*'en'.*different tokenizers"):
        PackedLoader(cfgs, seq_len=T, micro_batch_size=2, seed=0)


def test_loader_reports_bad_shards(three, tmp_path: Path) -> None:
    src = three[0]
    bin0 = Path(src.cfg.path, "train-00000.bin")
    data = bytearray(bin0.read_bytes())
    data[0] ^= 0xFF
    bin0.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-00000\.bin: sha256 mismatch"):
        PackedLoader([src.cfg], seq_len=T, micro_batch_size=2, seed=0, verify="sha256")
    # "spread" (the default) opens like "size": the trainer hashes with verify_shard_sets.
    for mode in ("spread", "size"):
        PackedLoader([src.cfg], seq_len=T, micro_batch_size=2, seed=0, verify=mode)
    validation_batches([src.cfg], seq_len=T, micro_batch_size=2, n_batches=1)
    with pytest.raises(ShardError, match="fewer than seq_len"):
        PackedLoader([src.cfg], seq_len=100_000, micro_batch_size=2, seed=0, verify="size")
    missing = DataSourceConfig(name="gone", path=str(tmp_path / "gone"))
    with pytest.raises(ShardError, match="not a shard set"):
        PackedLoader([missing], seq_len=T, micro_batch_size=2, seed=0)


def test_validation_batches_fixed_round_robin_val_only(three) -> None:
    cfgs = [s.cfg for s in three]
    a = validation_batches(cfgs, seq_len=T, micro_batch_size=4, n_batches=3)
    b = validation_batches(cfgs, seq_len=T, micro_batch_size=4, n_batches=3)
    _assert_same(a, b)
    assert [x.tokens.shape for x in a] == [(4, T)] * 3
    val_windows = [s.windows("val") for s in three]
    tokens, labels, _ = _rows(a)
    for i, row in enumerate(tokens.tolist()):
        s, k = i % 3, i // 3  # round-robin: every source has >= 4 val windows
        assert val_windows[s][tuple(row)] == k
        toks, _ = Source.stream(three[s].val)
        assert labels[i].tolist() == toks[k * (T + 1) + 1 : (k + 1) * (T + 1)].tolist()

    everything = validation_batches(cfgs, seq_len=T, micro_batch_size=4, n_batches=1000)
    rows = _rows(everything)[0].tolist()
    assert len(rows) == sum(len(w) for w in val_windows), "must stop, not wrap"
    assert len({tuple(r) for r in rows}) == len(rows)


def test_validation_needs_val_tokens(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    no_val = _write_source(tmp_path / "a", {"train": _docs(rng, 20, 2, 900)})
    tiny_val = _write_source(
        tmp_path / "b", {"train": _docs(rng, 20, 2, 900), "val": [np.array([BOS, 5, EOS])]}
    )
    with pytest.raises(ShardError, match="no split 'val'"):
        validation_batches(
            [DataSourceConfig(name="a", path=str(no_val))],
            seq_len=T,
            micro_batch_size=2,
            n_batches=1,
        )
    with pytest.raises(ShardError, match="no source has a full validation window.*'b' \\(3 val"):
        validation_batches(
            [DataSourceConfig(name="b", path=str(tiny_val))],
            seq_len=T,
            micro_batch_size=2,
            n_batches=1,
        )
    ok = _write_source(
        tmp_path / "c", {"train": _docs(rng, 20, 2, 900), "val": _docs(rng, 10, 2, 900)}
    )
    both = [
        DataSourceConfig(name="b", path=str(tiny_val)),
        DataSourceConfig(name="c", path=str(ok)),
    ]
    with pytest.warns(UserWarning, match="skips sources without a full val window: 'b'"):
        batches = validation_batches(both, seq_len=T, micro_batch_size=2, n_batches=2)
    assert len(batches) == 2 and all(len(b.tokens) == 2 for b in batches)
