"""KfmLM (eval/lm.py): lm-eval's LM on a native kfm checkpoint.

The reference is lm-eval's own HFLM on the same checkpoint exported with `kfm.export.export_hf`:
both must give the same log-likelihoods (1e-4 absolute), greedy flags, rolling log-likelihoods
and greedy generations, on real registry items turned into (context, continuation) requests,
some longer than the model's 128 positions (left-truncated). Then: batch size and padding do
not change a number; from_model leaves the model as it found it; from_hf on the export gives
the checkpoint's numbers; two gloo ranks with the model FSDP2-sharded (meta init + DCP load, or
streamed from the HF folder), tensor-parallel, or replicated give the single process's numbers
on both ranks.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from eval.lm import KfmLM
from eval.registry import iter_items
from kfm.tokenizer.core import tokenizer_hash
from tests.checkpoint.conftest import run_gloo_ranks
from tests.conftest import REPO
from tests.eval.checks import STEP, swapped_tokenizer, tiny_run, unrecorded_copy

MAX_LEN = 128  # configs/tiny.yaml model.max_seq_len


def _requests() -> list[tuple[str, str]]:
    """(context, continuation) pairs from the registry: every choice of a few English and
    Korean items, zero-shot; PubMedQA's abstracts make contexts far longer than 128 tokens."""
    pairs = []
    for name, n in (("medqa_usmle", 2), ("pubmedqa", 2), ("klue_nli", 2), ("xnli_ko", 1)):
        for item in itertools.islice(iter_items(name), n):
            context = f"{item.context}\n" if item.context else ""
            prompt = f"{context}Question: {item.question}\nAnswer:"
            pairs += [(prompt, f" {choice}") for choice in item.choices]
    pairs.append(("", "Aspirin inhibits cyclooxygenase."))  # empty context: the bos token
    return pairs


def _instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


ROLLING = [
    "Metformin is a first-line treatment for type 2 diabetes mellitus.",
    "환자는 급성 심근경색으로 응급실에 내원하였다.",
]


def _rolling_texts() -> list[str]:
    """Two short texts and one long abstract (several 128-token windows)."""
    abstract = next(iter(iter_items("pubmedqa"))).context
    assert abstract is not None
    return [*ROLLING, abstract]


GENERATE = [
    ("Question: What does aspirin inhibit?\nAnswer:", {"until": ["\n"], "max_gen_toks": 8}),
    ("혈압은", {"until": ["."], "max_gen_toks": 6}),
    ("The", {"max_gen_toks": 5}),
]


@pytest.fixture(scope="module")
def run_dir(tiny_sources, tmp_path_factory) -> Path:
    return tiny_run(tiny_sources, tmp_path_factory).run_dir


@pytest.fixture(scope="module")
def native(run_dir: Path) -> KfmLM:
    return KfmLM.from_checkpoint(run_dir, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def native_results(native: KfmLM) -> dict:
    """Results of the single process, batch size 8: what every other setup must reproduce."""
    return {
        "loglikelihood": native.loglikelihood(_instances("loglikelihood", _requests())),
        "rolling": native.loglikelihood_rolling(
            _instances("loglikelihood_rolling", [(t,) for t in _rolling_texts()])
        ),
        "generate": native.generate_until(_instances("generate_until", GENERATE)),
    }


@pytest.fixture(scope="module")
def hf_dir(run_dir: Path, tmp_path_factory) -> Path:
    """The checkpoint exported to a transformers folder (kfm.export.export_hf)."""
    from kfm.checkpoint import load_model_state
    from kfm.config import config_from_dict
    from kfm.export.hf import export_hf

    state, config = load_model_state(run_dir / "checkpoints" / STEP)
    cfg = config_from_dict(config)
    out = export_hf(
        state,
        cfg.model,
        tmp_path_factory.mktemp("hf") / "tiny",
        tokenizer_dir=cfg.tokenizer.path,
        source=run_dir / "checkpoints" / STEP,
    )
    return out


@pytest.fixture(scope="module")
def hflm(hf_dir: Path):
    """lm-eval's HFLM on the exported folder: the reference implementation."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(hf_dir), batch_size=4, device="cpu", dtype="float32")


def test_loglikelihood_matches_hflm(native_results: dict, native: KfmLM, hflm) -> None:
    requests = _requests()
    long = [c for c, _ in requests if len(native.tok_encode(c)) > MAX_LEN]
    assert len(long) >= 6, "PubMedQA's contexts must need left truncation"
    ours = native_results["loglikelihood"]
    theirs = hflm.loglikelihood(_instances("loglikelihood", requests), disable_tqdm=True)
    assert len(ours) == len(theirs) == len(requests)
    for (a, greedy_a), (b, greedy_b) in zip(ours, theirs, strict=True):
        assert abs(a - b) < 1e-4, (a, b)
        assert greedy_a == greedy_b
    assert all(logp < 0 for logp, _ in ours)


def test_rolling_matches_hflm(native_results: dict, native: KfmLM, hflm) -> None:
    texts = _rolling_texts()
    assert len(native.tok_encode(texts[-1])) > 2 * MAX_LEN  # several windows
    # As HFLM: the text's own bos (kfm's tokenizer adds one) after the prefix token, also bos.
    bos = native.tokenizer.bos_token_id
    assert native.tok_encode(texts[0])[0] == native.prefix_token_id == bos
    theirs = hflm.loglikelihood_rolling(
        _instances("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True
    )
    for a, b in zip(native_results["rolling"], theirs, strict=True):
        assert abs(a - b) < 1e-4 * max(1.0, abs(b)), (a, b)


def test_generate_matches_hflm(native_results: dict, hflm) -> None:
    ours = native_results["generate"]
    # One request per call: HFLM left-pads a batch, which moves float noise around.
    theirs = [
        hflm.generate_until(_instances("generate_until", [g]), disable_tqdm=True)[0]
        for g in GENERATE
    ]
    assert ours == theirs
    assert "\n" not in ours[0] and all(ours)


def test_from_hf_matches_the_checkpoint(hf_dir: Path, native_results: dict) -> None:
    lm = KfmLM.from_hf(hf_dir, batch_size=8, progress=False)
    assert lm.tokenizer_hash == tokenizer_hash(hf_dir) and lm.checkpoint is None
    ours = lm.loglikelihood(_instances("loglikelihood", _requests()))
    for (a, ga), (b, gb) in zip(ours, native_results["loglikelihood"], strict=True):
        assert abs(a - b) < 1e-5 and ga == gb
    assert lm.generate_until(_instances("generate_until", GENERATE)) == native_results["generate"]


def test_batch_size_and_padding_do_not_change_numbers(native: KfmLM, native_results) -> None:
    one = KfmLM.from_model(
        native.model, native.tokenizer, device="cpu", batch_size=1, progress=False
    )
    requests = _instances("loglikelihood", _requests())
    for (a, ga), (b, gb) in zip(
        one.loglikelihood(requests), native_results["loglikelihood"], strict=True
    ):
        assert abs(a - b) < 1e-5 and ga == gb
    rolling = one.loglikelihood_rolling(
        _instances("loglikelihood_rolling", [(t,) for t in _rolling_texts()])
    )
    assert rolling == pytest.approx(native_results["rolling"], abs=1e-5)
    assert one.generate_until(_instances("generate_until", GENERATE)) == native_results["generate"]


def test_one_row_serves_requests_with_the_same_input(native: KfmLM) -> None:
    """Letter answers to one prompt differ only in their last token: one row for all four."""
    items = list(itertools.islice(iter_items("medqa_usmle"), 3))
    prompts = [
        f"Question: {it.question[-200:]}\n"
        + "".join(f"{k}. {c}\n" for k, c in zip("ABCD", it.choices, strict=True))
        + "Answer:"
        for it in items
    ]
    pairs = [(p, f" {letter}") for p in prompts for letter in "ABCD"]
    rows: list[int] = []
    hook = native.model.register_forward_hook(lambda m, args, out: rows.append(len(args[0])))
    try:
        together = native.loglikelihood(_instances("loglikelihood", pairs))
        assert sum(rows) == len(prompts)  # 12 requests, 3 rows
        alone = [native.loglikelihood(_instances("loglikelihood", [p]))[0] for p in pairs]
    finally:
        hook.remove()
    assert sum(rows) == len(prompts) + len(pairs)
    assert len({logp for logp, _ in together}) > len(prompts)  # letters score differently
    for (a, ga), (b, gb) in zip(together, alone, strict=True):
        assert abs(a - b) < 1e-5 and ga == gb


def test_from_model_restores_mode_and_leaves_params(native: KfmLM) -> None:
    model = native.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lm = KfmLM.from_model(model, native.tokenizer, device="cpu", batch_size=4, progress=False)
    for mode in (True, False):
        model.train(mode)
        lm.loglikelihood(_instances("loglikelihood", _requests()[:3]))
        lm.generate_until(_instances("generate_until", GENERATE[:1]))
        assert model.training is mode
        assert all(m.training is mode for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_progress_bar_only_when_asked(native: KfmLM, capsys) -> None:
    requests = _instances("loglikelihood", _requests()[:2])
    KfmLM.from_model(native.model, native.tokenizer, device="cpu").loglikelihood(requests)
    err = capsys.readouterr().err
    assert "kfm loglikelihood" in err and "Tokenizing inputs" in err
    native.loglikelihood(requests)  # progress=False: no bar at all, lm-eval's tokenising one too
    err = capsys.readouterr().err
    assert "kfm loglikelihood" not in err and "Tokenizing inputs" not in err


def test_truncation_is_reported_once_per_call(native: KfmLM, caplog) -> None:
    requests = _requests()
    n_long = sum(len(native.tok_encode(c + x)) > MAX_LEN + 1 for c, x in requests)
    assert n_long > 0
    loud = KfmLM.from_model(native.model, native.tokenizer, device="cpu", max_length=MAX_LEN)
    with caplog.at_level("INFO", logger="eval.lm"):
        loud.loglikelihood(_instances("loglikelihood", requests))
        native.loglikelihood(_instances("loglikelihood", requests))  # progress=False: info only
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if "left-trunc" in r.message]
    message = (
        f"{n_long} of {len(requests)} requests are longer than max_length={MAX_LEN} tokens: "
        "their contexts were left-truncated"
    )
    assert lines == [("WARNING", message), ("INFO", message)]


def test_bf16_is_close_to_fp32(run_dir: Path, native_results: dict) -> None:
    lm = KfmLM.from_checkpoint(run_dir, dtype="bf16", batch_size=8, progress=False)
    assert lm.autocast_dtype == torch.bfloat16
    ours = lm.loglikelihood(_instances("loglikelihood", _requests()))
    ref = native_results["loglikelihood"]
    assert [a for a, _ in ours] != [b for b, _ in ref]  # it really ran in bf16
    for (a, _), (b, _) in zip(ours, ref, strict=True):
        assert abs(a - b) < 0.05 * abs(b) + 0.05


def test_tokenizer_checked_before_weights(run_dir: Path, tmp_path: Path) -> None:
    from kfm.tokenizer.identity import TokenizerMismatchError

    broken = tmp_path / "run"
    shutil.copytree(run_dir, broken, symlinks=True)
    for shard in (broken / "checkpoints" / STEP).glob("*.distcp"):
        shard.unlink()  # weights unreadable: only a check that runs first can pass this point
    tok = swapped_tokenizer(tmp_path / "tok")
    with pytest.raises(TokenizerMismatchError, match="not the tokenizer this checkpoint"):
        KfmLM.from_checkpoint(broken / "checkpoints" / STEP, tokenizer_dir=tok)


def test_unchecked_tokenizer_is_said(run_dir: Path, tmp_path: Path, caplog) -> None:
    """A checkpoint recording no tokenizer hash, of a run whose shards are gone: loads, warns."""
    step_dir = unrecorded_copy(run_dir, tmp_path / "old", sources_gone=True)
    with caplog.at_level("WARNING", logger="eval.lm"):
        lm = KfmLM.from_checkpoint(step_dir, progress=False)
    assert lm.tokenizer_check is not None and "NOT checked" in lm.tokenizer_check
    assert any("NOT checked" in r.getMessage() for r in caplog.records)


def test_bad_requests_are_refused(native: KfmLM, run_dir: Path) -> None:
    from kfm.config import ParallelConfig

    sampling = ("Hi", {"do_sample": True, "temperature": 0.7})
    with pytest.raises(ValueError, match="greedily only"):
        native.generate_until(_instances("generate_until", [sampling]))
    with pytest.raises(ValueError, match="no room for a context"):
        native.generate_until(_instances("generate_until", [("Hi", {"max_gen_toks": MAX_LEN})]))
    with pytest.raises(ValueError, match="needs a process group"):
        KfmLM.from_checkpoint(run_dir, parallel=ParallelConfig())
    tok = native.tokenizer
    with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
        KfmLM.from_model(native.model, tok, device="cpu", batch_size=0)
    with pytest.raises(ValueError, match=r"max_length=129 must be in \[2, model.max_seq_len=128\]"):
        KfmLM.from_model(native.model, tok, device="cpu", max_length=MAX_LEN + 1)


# -- two gloo ranks -----------------------------------------------------------------------

RANK_SCRIPT = """
import json, sys
import torch
from kfm.config import ParallelConfig
from kfm.train.dist import process_group, world_from_env
from eval.lm import KfmLM
from lm_eval.api.instance import Instance

run_dir, hf_dir, out, requests = sys.argv[1:4] + [json.loads(sys.argv[4])]
world = world_from_env()
results = {}
with process_group(ParallelConfig(dist_backend="gloo"), world, torch.device("cpu")):
    setups = (
        ("fsdp", KfmLM.from_checkpoint, run_dir, ParallelConfig()),
        ("tp", KfmLM.from_checkpoint, run_dir, ParallelConfig(dp_shard=1, tp=2)),
        ("hf_fsdp", KfmLM.from_hf, hf_dir, ParallelConfig()),
        ("replica", KfmLM.from_checkpoint, run_dir, None),
    )
    lms = {}
    for name, build, source, parallel in setups:
        lm = lms[name] = build(source, parallel=parallel, batch_size=2, progress=False)
        model = lm.model
        sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())
        inst = lambda kind, args: [Instance(kind, {}, tuple(a), i) for i, a in enumerate(args)]
        results[name] = {
            "sharded": sharded,
            "dp": [lm.dp_rank, lm.dp_size],
            "tied": model.output.weight is model.tok_embeddings.weight,
            "loglikelihood": lm.loglikelihood(inst("loglikelihood", requests["loglikelihood"])),
            "rolling": lm.loglikelihood_rolling(inst("loglikelihood_rolling", requests["rolling"])),
            "generate": lm.generate_until(inst("generate_until", requests["generate"])),
        }
    # A rank given other requests: an error on every rank, not a hang in FSDP2's all-gathers.
    mine = requests["loglikelihood"][: 5 + world.rank]
    try:
        lms["fsdp"].loglikelihood(inst("loglikelihood", mine))
    except RuntimeError as e:
        results["mismatch"] = str(e)
with open(f"{out}/rank{world.rank}.json", "w") as f:
    json.dump(results, f)
"""


def test_two_ranks_sharded_match_one_process(
    run_dir: Path, hf_dir: Path, native_results: dict, tmp_path: Path
) -> None:
    requests = {
        "loglikelihood": _requests()[:-2],  # 19 requests: not divisible by 2 ranks x batch 2
        "rolling": [[t] for t in _rolling_texts()],
        "generate": [list(g) for g in GENERATE],
    }
    assert len(requests["loglikelihood"]) % 4 != 0
    run_gloo_ranks(
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n" + RANK_SCRIPT,
        str(run_dir),
        str(hf_dir),
        str(tmp_path),
        json.dumps(requests),
        timeout=300,
    )
    ref = native_results
    n = len(requests["loglikelihood"])
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        setups = {"fsdp": [rank, 2], "tp": [0, 1], "hf_fsdp": [rank, 2], "replica": [rank, 2]}
        for name, dp in setups.items():
            res = got[name]
            assert res["sharded"] is (name != "replica") and res["dp"] == dp, (name, res)
            assert res["tied"], name  # meta init + to_empty kept the tied embedding
            assert len(res["loglikelihood"]) == n
            for (a, ga), (b, gb) in zip(
                res["loglikelihood"], ref["loglikelihood"][:n], strict=True
            ):
                assert abs(a - b) < 1e-5 and ga == gb, (name, a, b)
            # Sums over ~100-1000 tokens: 1e-5 per 100 tokens of float32 summation-order noise.
            assert res["rolling"] == pytest.approx(ref["rolling"], rel=1e-7, abs=1e-5), name
            assert res["generate"] == ref["generate"], name
        assert "rank 0: 5, rank 1: 6 rows" in got["mismatch"]
