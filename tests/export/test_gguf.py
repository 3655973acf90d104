"""`kfm export --format gguf`: one llama.cpp file with the tokenizer embedded.

The tiny trained run is exported through the real CLI in every dtype and read back with
``gguf.GGUFReader``: tensors (names, shapes, GGML types, values after undoing the q/k permutation),
metadata against the run's config, and the vocabulary against the tokenizer. The q/k permutation
is checked on its own: RoPE applied the way ggml's ``llama`` kernel does it (adjacent pairs) to
the permuted weights gives the attention scores kfm's rotate_half RoPE gives on the originals.
The slow tests run the files in llama.cpp (llama-cpp-python): tokens and logits as kfm's, a
negative control (the export without the permutation is far off), and q8_0 tensors byte-equal
to llama.cpp's own quantizer's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from kfm.checkpoint import load_model_state
from kfm.checkpoint.stepdir import read_manifest
from kfm.config import Config, ModelConfig, config_from_dict
from kfm.export import gguf as export_module
from kfm.export.gguf import (
    GGUF_TOLERANCE,
    LLAMA_CPP_PRE,
    export_gguf,
    gguf_state_dict,
    gguf_weights_diff,
    permute_for_ggml,
    read_gguf_tensor,
    unpermute_from_ggml,
)
from kfm.export.hf import ExportError, to_hf_state_dict
from kfm.fs import OutputError
from kfm.model import ffn_hidden_dim
from kfm.model.transformer import Transformer
from kfm_cli import main
from tests.conftest import SAMPLE, TOKENIZER
from tests.eval.checks import STEP, tiny_run, unrecorded_copy

T = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def run_dir(tiny_sources, tmp_path_factory) -> Path:
    return tiny_run(tiny_sources, tmp_path_factory).run_dir


@pytest.fixture(scope="module")
def checkpoint(run_dir: Path) -> tuple[Config, dict[str, torch.Tensor]]:
    step = run_dir / "checkpoints" / STEP
    cfg = config_from_dict(read_manifest(step)["config"], source=str(step))
    state, _ = load_model_state(step)
    return cfg, state


def export_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["export", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def field(reader: gguf.GGUFReader, key: str):
    f = reader.get_field(key)
    assert f is not None, f"{key} missing"
    return f.contents()


# ---- the q/k permutation -------------------------------------------------------------------


@pytest.mark.parametrize(("n_heads", "head_dim"), [(1, 2), (4, 8), (3, 16), (2, 6)])
def test_permutation_round_trips_and_moves_rows(n_heads: int, head_dim: int) -> None:
    w = torch.randn(n_heads * head_dim, 5)
    p = permute_for_ggml(w, n_heads)
    assert torch.equal(unpermute_from_ggml(p, n_heads), w)
    half = head_dim // 2
    for h in range(n_heads):
        for i in range(half):
            for s in range(2):  # row s*half + i of a head goes to row 2i + s
                assert torch.equal(p[h * head_dim + 2 * i + s], w[h * head_dim + s * half + i])


def _rope_rotate_half(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
    """kfm's / transformers' RoPE on one head vector: pairs (i, i + d/2)."""
    d = x.shape[-1]
    ang = pos * theta ** (-np.arange(d // 2) * 2.0 / d)
    a, b = x[: d // 2], x[d // 2 :]
    return np.concatenate([a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)])


def _rope_ggml_norm(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
    """ggml's rope in mode 0 (llama.cpp's LLAMA_ROPE_TYPE_NORM): pairs (2i, 2i+1), angle
    pos * theta^(-2i/d), as ggml-cpu's rope kernel computes it."""
    d = x.shape[-1]
    out = x.copy()
    for i in range(d // 2):
        ang = pos * theta ** (-2.0 * i / d)
        x0, x1 = x[2 * i], x[2 * i + 1]
        out[2 * i] = x0 * np.cos(ang) - x1 * np.sin(ang)
        out[2 * i + 1] = x0 * np.sin(ang) + x1 * np.cos(ang)
    return out


def test_ggml_rope_on_permuted_weights_gives_kfm_attention_scores() -> None:
    n_heads, n_kv_heads, head_dim, d_model, theta = 4, 2, 8, 16, 500.0
    g = torch.Generator().manual_seed(0)
    wq = torch.randn(n_heads * head_dim, d_model, generator=g, dtype=torch.float64)
    wk = torch.randn(n_kv_heads * head_dim, d_model, generator=g, dtype=torch.float64)
    xs = torch.randn(6, d_model, generator=g, dtype=torch.float64)
    pq, pk = permute_for_ggml(wq, n_heads), permute_for_ggml(wk, n_kv_heads)
    moved = 0
    for h in range(n_heads):
        kv = h // (n_heads // n_kv_heads)  # GQA: query heads share a k head
        rows_q, rows_k = (
            slice(h * head_dim, (h + 1) * head_dim),
            slice(kv * head_dim, (kv + 1) * head_dim),
        )
        for m, xm in enumerate(xs):
            for n, xn in enumerate(xs[: m + 1]):
                q_hf = _rope_rotate_half((wq[rows_q] @ xm).numpy(), m, theta)
                k_hf = _rope_rotate_half((wk[rows_k] @ xn).numpy(), n, theta)
                q_gg = _rope_ggml_norm((pq[rows_q] @ xm).numpy(), m, theta)
                k_gg = _rope_ggml_norm((pk[rows_k] @ xn).numpy(), n, theta)
                np.testing.assert_allclose(q_gg @ k_gg, q_hf @ k_hf, rtol=1e-10, atol=1e-10)
                # ggml's rope on the unpermuted weights would be another model:
                k_wrong = _rope_ggml_norm((wk[rows_k] @ xn).numpy(), n, theta)
                q_wrong = _rope_ggml_norm((wq[rows_q] @ xm).numpy(), m, theta)
                moved += not np.isclose(q_wrong @ k_wrong, q_hf @ k_hf)
    assert moved > 0


# ---- the tiny trained run through the CLI -----------------------------------------------------


def _expected_type(w: torch.Tensor, dtype: str):
    if w.dim() < 2 or dtype == "fp32":
        return T.F32
    return {"fp16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[dtype]


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "q8_0"])
def test_tiny_run_exports_every_tensor(run_dir, checkpoint, tmp_path, capsys, dtype) -> None:
    cfg, state = checkpoint
    out_dir = tmp_path / "gguf"
    code, out, err = export_cli(
        capsys, str(run_dir), str(out_dir), "--format", "gguf", "--dtype", dtype
    )
    assert code == 0, err
    path = out_dir / f"model-{dtype}.gguf"
    assert f"exported {run_dir / 'checkpoints' / STEP} -> {path}" in out.splitlines()
    assert f"(tolerance {GGUF_TOLERANCE[dtype]:.0e} for {dtype}): ok" in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["kfm_export.json", path.name]
    marker = json.loads((out_dir / "kfm_export.json").read_text())
    assert marker["format"] == "kfm-export" and marker["kind"] == "gguf"
    assert marker["dtype"] == dtype and marker["file"] == path.name

    m = cfg.model
    reader = gguf.GGUFReader(str(path))
    hf = to_hf_state_dict(state, m)
    # tied embeddings: llama.cpp reuses token_embd for the output, so output.weight is absent
    assert m.tie_embeddings and "output.weight" not in {t.name for t in reader.tensors}
    names = {  # the HF name of each GGUF tensor, spelled out here rather than taken from gguf
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
    }
    for i in range(m.n_layers):
        for g, h in [
            ("attn_norm", "input_layernorm"),
            ("attn_q", "self_attn.q_proj"),
            ("attn_k", "self_attn.k_proj"),
            ("attn_v", "self_attn.v_proj"),
            ("attn_output", "self_attn.o_proj"),
            ("ffn_norm", "post_attention_layernorm"),
            ("ffn_gate", "mlp.gate_proj"),
            ("ffn_up", "mlp.up_proj"),
            ("ffn_down", "mlp.down_proj"),
        ]:
            names[f"blk.{i}.{g}.weight"] = f"model.layers.{i}.{h}.weight"
    assert sorted(t.name for t in reader.tensors) == sorted(names)
    for t in reader.tensors:
        ref = hf[names[t.name]].float()
        assert t.tensor_type == _expected_type(ref, dtype), t.name
        assert tuple(int(d) for d in reversed(t.shape)) == tuple(ref.shape), t.name
        got = read_gguf_tensor(t, m)
        if dtype == "fp32" or ref.dim() < 2:
            assert torch.equal(got, ref), t.name
        elif dtype in ("fp16", "bf16"):
            want = ref.to(torch.float16 if dtype == "fp16" else torch.bfloat16).float()
            assert torch.equal(got, want), t.name
        else:  # q8_0: within half a step (absmax/127 of its 32-value block), plus that step's
            # fp16 rounding (2^-11 relative) times the largest code, 127
            blocks = ref.reshape(-1, 32)
            step = blocks.abs().amax(dim=1, keepdim=True) / 127
            bound = step * (0.5 + 127 * 2**-11)
            assert ((got.reshape(-1, 32) - blocks).abs() <= bound).all(), t.name
    # the file's raw q/k rows are kfm's, permuted; undone above by read_gguf_tensor
    raw_q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    if dtype == "fp32":
        raw = torch.from_numpy(np.array(raw_q.data)).reshape(m.d_model, m.d_model)
        assert torch.equal(
            raw, permute_for_ggml(hf["model.layers.0.self_attn.q_proj.weight"], m.n_heads)
        )


def test_tiny_run_metadata_and_vocabulary(run_dir, checkpoint, tmp_path, capsys) -> None:
    cfg, _ = checkpoint
    m = cfg.model
    code, _, err = export_cli(capsys, str(run_dir), str(tmp_path / "g"), "--format", "gguf")
    assert code == 0, err
    reader = gguf.GGUFReader(str(tmp_path / "g" / "model-fp32.gguf"))

    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.name") == cfg.train.name
    assert field(reader, "general.file_type") == gguf.LlamaFileType.ALL_F32
    head_dim = m.d_model // m.n_heads
    expected = {
        "context_length": m.max_seq_len,
        "embedding_length": m.d_model,
        "block_count": m.n_layers,
        "feed_forward_length": ffn_hidden_dim(m),
        "attention.head_count": m.n_heads,
        "attention.head_count_kv": m.n_kv_heads,
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
        "rope.dimension_count": head_dim,
        "vocab_size": m.vocab_size,
    }
    for key, value in expected.items():
        assert field(reader, f"llama.{key}") == value, key
    assert field(reader, "llama.rope.freq_base") == pytest.approx(m.rope_theta, rel=1e-7)
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(
        m.norm_eps, rel=1e-6
    )

    spec = json.loads((TOKENIZER / "tokenizer.json").read_text(encoding="utf-8"))
    tok = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == LLAMA_CPP_PRE == "smollm"
    assert len(tokens) == len(types) == m.vocab_size
    assert {t: tokens.index(t) for t in vocab} == vocab
    added = {a["id"]: a for a in spec["added_tokens"]}
    for i in range(m.vocab_size):
        if i in added:
            want = gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED
        elif i < len(vocab):
            want = gguf.TokenType.NORMAL
        else:
            want = gguf.TokenType.UNUSED
        assert types[i] == want, (i, tokens[i])
    assert types[vocab["<|email|>"]] == gguf.TokenType.USER_DEFINED
    merges = field(reader, "tokenizer.ggml.merges")
    assert merges == [" ".join(pair) for pair in spec["model"]["merges"]]

    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    assert field(reader, "tokenizer.ggml.bos_token_id") == hf_tok.bos_token_id
    assert field(reader, "tokenizer.ggml.eos_token_id") == hf_tok.eos_token_id
    assert field(reader, "tokenizer.ggml.padding_token_id") == hf_tok.pad_token_id
    prepends_bos = hf_tok("환자").input_ids[0] == hf_tok.bos_token_id
    assert field(reader, "tokenizer.ggml.add_bos_token") is prepends_bos is True
    assert reader.get_field("tokenizer.chat_template") is None  # kfm's tokenizer has none


# ---- other architectures, dtypes and refusals ---------------------------------------------------


def _random(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return Transformer(cfg).state_dict()


def test_qk_norm_model_is_qwen3_unpermuted_and_untied_keeps_output(tmp_path: Path) -> None:
    cfg = ModelConfig(
        vocab_size=1024,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=128,
        qk_norm=True,
        tie_embeddings=False,
        rope_theta=5e5,
    )
    state = _random(cfg)
    path = export_gguf(state, cfg, tmp_path / "q", tokenizer_dir=TOKENIZER, dtype="fp32")
    reader = gguf.GGUFReader(str(path))
    assert field(reader, "general.architecture") == "qwen3"
    assert field(reader, "qwen3.rope.freq_base") == 5e5
    tensors = {t.name: t for t in reader.tensors}
    raw = lambda n: torch.from_numpy(np.array(tensors[n].data)).reshape(  # noqa: E731
        tuple(int(d) for d in reversed(tensors[n].shape))
    )
    # qwen3 rotates halves in llama.cpp too: q/k rows as kfm has them
    assert torch.equal(raw("blk.1.attn_q.weight"), state["layers.1.attention.wq.weight"])
    assert torch.equal(raw("blk.1.attn_k.weight"), state["layers.1.attention.wk.weight"])
    assert torch.equal(raw("blk.1.attn_q_norm.weight"), state["layers.1.attention.q_norm.weight"])
    assert torch.equal(raw("blk.1.attn_k_norm.weight"), state["layers.1.attention.k_norm.weight"])
    assert torch.equal(raw("output.weight"), state["output.weight"])
    assert gguf_weights_diff(path, state, cfg) == 0.0


def test_q8_0_falls_back_to_f16_for_rows_not_a_multiple_of_32(tmp_path: Path) -> None:
    cfg = ModelConfig(
        vocab_size=1024, d_model=64, n_layers=1, n_heads=4, max_seq_len=64, ffn_hidden=80
    )
    state = _random(cfg)
    path = export_gguf(state, cfg, tmp_path / "q", tokenizer_dir=TOKENIZER, dtype="q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.ffn_down.weight"] == T.F16  # rows of 80
    assert types["blk.0.ffn_up.weight"] == T.Q8_0  # rows of 64
    assert gguf_weights_diff(path, state, cfg) <= GGUF_TOLERANCE["q8_0"]


def test_weights_diff_sees_a_changed_tensor_and_non_finite_values(tmp_path: Path) -> None:
    cfg = ModelConfig(vocab_size=1024, d_model=64, n_layers=1, n_heads=4, max_seq_len=64)
    state = _random(cfg)
    path = export_gguf(state, cfg, tmp_path / "a", tokenizer_dir=TOKENIZER, dtype="fp32")
    other = dict(state)
    other["layers.0.attention.wk.weight"] = state["layers.0.attention.wk.weight"] * 1.01
    assert gguf_weights_diff(path, other, cfg) > 1e-3
    nan = dict(state)
    nan["layers.0.ffn_norm.weight"] = state["layers.0.ffn_norm.weight"].clone()
    nan["layers.0.ffn_norm.weight"][3] = float("nan")
    path_nan = export_gguf(nan, cfg, tmp_path / "n", tokenizer_dir=TOKENIZER, dtype="fp32")
    assert gguf_weights_diff(path_nan, nan, cfg) == float("inf")


@pytest.mark.parametrize(("dtype", "scale"), [("fp16", 1e8), ("q8_0", 1e10)])
def test_values_past_fp16_are_refused_before_writing(tmp_path: Path, dtype, scale) -> None:
    cfg = ModelConfig(vocab_size=1024, d_model=64, n_layers=1, n_heads=4, max_seq_len=64)
    big = _random(cfg)
    big["layers.0.feed_forward.w2.weight"] = big["layers.0.feed_forward.w2.weight"] * scale
    with pytest.raises(ExportError, match=r"blk.0.ffn_down.weight holds .* --dtype bf16 or fp32"):
        export_gguf(big, cfg, tmp_path / "b", tokenizer_dir=TOKENIZER, dtype=dtype)
    assert list(tmp_path.iterdir()) == []
    export_gguf(big, cfg, tmp_path / "b", tokenizer_dir=TOKENIZER, dtype="bf16")


def test_wrong_state_dict_names_the_keys(tmp_path: Path) -> None:
    cfg = ModelConfig(vocab_size=1024, d_model=64, n_layers=1, n_heads=4, max_seq_len=64)
    state = _random(cfg)
    del state["layers.0.attention.wq.weight"]
    with pytest.raises(ExportError, match="missing keys .*layers.0.attention.wq.weight"):
        gguf_state_dict(state, cfg)
    wider = ModelConfig(vocab_size=1024, d_model=64, n_layers=1, n_heads=4, ffn_hidden=256)
    with pytest.raises(
        ExportError,
        match=r"feed_forward.w1.weight: checkpoint \(192, 64\) vs "
        r"config \(256, 64\)",
    ):
        gguf_state_dict(_random(cfg), wider)


def test_refusals(run_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    # a .gguf file name (the export is a folder) and a tokenizer llama.cpp cannot reproduce are
    # refused before the weights are read
    import kfm.checkpoint

    def no_reading(*args, **kwargs):
        raise AssertionError("weights read before the refusal")

    with monkeypatch.context() as m:
        m.setattr(kfm.checkpoint, "load_model_state", no_reading)
        code, out, err = export_cli(
            capsys, str(run_dir), str(tmp_path / "m.gguf"), "--format", "gguf"
        )
        assert code == 1 and "give a folder name without the .gguf suffix" in err, err
        other_tok = shutil.copytree(TOKENIZER, tmp_path / "tok")
        spec = json.loads((other_tok / "tokenizer.json").read_text(encoding="utf-8"))
        spec["normalizer"] = {"type": "Lowercase"}
        (other_tok / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
        # (a run that records no tokenizer hash, so the identity check cannot refuse it first)
        old_run = unrecorded_copy(run_dir, tmp_path / "old_run", sources_gone=True)
        code, out, err = export_cli(
            capsys,
            str(old_run),
            str(tmp_path / "g"),
            "--format",
            "gguf",
            "--tokenizer",
            str(other_tok),
        )
        assert code == 1 and "normalizer 'Lowercase' has no llama.cpp equivalent" in err, err
    assert not (tmp_path / "m.gguf").exists()
    # GGUF-only dtypes with the HF export: a config error naming the flag
    code, out, err = export_cli(capsys, str(run_dir), str(tmp_path / "hf"), "--dtype", "q8_0")
    assert code == 2 and "--dtype q8_0 is for --format gguf" in err
    assert not (tmp_path / "hf").exists()
    # a second export needs --overwrite; then replaces the folder, dtype and all
    out_dir = tmp_path / "g"
    assert export_cli(capsys, str(run_dir), str(out_dir), "--format", "gguf", "--no-verify")[0] == 0
    code, out, err = export_cli(capsys, str(run_dir), str(out_dir), "--format", "gguf")
    assert code == 1 and "pass --overwrite" in err
    code, out, err = export_cli(
        capsys, str(run_dir), str(out_dir), "--format", "gguf", "--dtype", "q8_0", "--overwrite"
    )
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["kfm_export.json", "model-q8_0.gguf"]


def test_no_verify_says_so(run_dir: Path, tmp_path: Path, capsys) -> None:
    code, out, err = export_cli(
        capsys, str(run_dir), str(tmp_path / "g"), "--format", "gguf", "--no-verify"
    )
    assert code == 0
    assert "export check: GGUF tensors not compared with the checkpoint (--no-verify)" in out
    assert "max |w_gguf" not in out


def test_tokenizer_llama_cpp_cannot_reproduce_is_refused(tmp_path: Path) -> None:
    cfg = ModelConfig(vocab_size=1024, d_model=64, n_layers=1, n_heads=4, max_seq_len=64)
    tok = tmp_path / "tok"
    tok.mkdir()
    spec = json.loads((TOKENIZER / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = spec["pre_tokenizer"]["pretokenizers"][1]  # no digit splitting
    (tok / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ExportError, match=r"tok/tokenizer.json: pre_tokenizer .* is not kfm's"):
        export_gguf(_random(cfg), cfg, tmp_path / "g", tokenizer_dir=tok)
    assert not (tmp_path / "g").exists()
    with pytest.raises(ExportError, match="has 1024 tokens but model.vocab_size=512"):
        export_gguf(
            {},
            ModelConfig(vocab_size=512, d_model=64, n_layers=1, n_heads=4),
            tmp_path / "g",
            tokenizer_dir=TOKENIZER,
        )
    with pytest.raises(OutputError, match="lies inside the input"):
        export_gguf({}, cfg, TOKENIZER / "g", tokenizer_dir=TOKENIZER)


# ---- llama.cpp itself ---------------------------------------------------------------------------

PROMPT = "환자는 2024년 3월 12일 급성 심근경색으로 내원. Troponin I 3.45 ng/mL, <|email|> 확인"


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        pytest.skip(
            f"llama.cpp runtime not installed ({exc}): `CMAKE_ARGS=-DGGML_NATIVE=OFF pip install "
            "-e '.[llama]'` (llama-cpp-python) builds it from source: cmake and a C++ compiler, "
            "~7 CPU-minutes; .ci/run does this before the slow tests"
        )
    return llama_cpp


def _llama_cpp_logits(llama_cpp, path: Path, ids: list[int], n_ctx: int) -> np.ndarray:
    # fp32 KV cache: llama.cpp's default fp16 cache alone moves logits by ~1e-2
    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_threads=1,
        logits_all=True,
        verbose=False,
        type_k=f32,
        type_v=f32,
    )
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def _kfm_logits(cfg: ModelConfig, state: dict[str, torch.Tensor], ids: list[int]) -> np.ndarray:
    model = Transformer(cfg)
    model.load_state_dict(state)
    model.float().eval()
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


@pytest.mark.slow
def test_llama_cpp_tokenizes_and_runs_the_tiny_run_like_kfm(run_dir, checkpoint, tmp_path, capsys):
    llama_cpp = _llama_cpp()
    cfg, state = checkpoint
    code, _, err = export_cli(capsys, str(run_dir), str(tmp_path / "g"), "--format", "gguf")
    assert code == 0, err
    path = tmp_path / "g" / "model-fp32.gguf"
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(TOKENIZER))(PROMPT).input_ids
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=cfg.model.max_seq_len, verbose=False)
    # Korean, digits one by one, a PII placeholder (USER_DEFINED) matched in plain text, bos
    assert llm.tokenize(PROMPT.encode("utf-8"), add_bos=True, special=False) == ids
    assert llm.detokenize(ids[1:]).decode("utf-8") == PROMPT
    theirs = _llama_cpp_logits(llama_cpp, path, ids, cfg.model.max_seq_len)
    ours = _kfm_logits(cfg.model, state, ids)
    assert np.abs(theirs - ours).max() < 1e-3
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()


def _rounded(w: torch.Tensor, dtype: str) -> torch.Tensor:
    """``w`` as a ``dtype`` GGUF stores it, back in fp32 (q8_0 through gguf's own codec)."""
    if dtype == "q8_0":
        q8 = gguf.GGMLQuantizationType.Q8_0
        blocks = gguf.quants.quantize(w.numpy(), q8)
        return torch.from_numpy(gguf.quants.dequantize(blocks, q8).copy()).reshape(w.shape)
    return w.to(torch.float16 if dtype == "fp16" else torch.bfloat16).float()


@pytest.mark.slow
def test_llama_cpp_tokenizes_the_sample_documents_like_kfm(run_dir, tmp_path, capsys) -> None:
    """The pre-tokenizer claim on real text: every bundled sample document (Korean and English,
    NFC) gets kfm's ids from llama.cpp; NFD Hangul does not (llama.cpp does not normalize)."""
    import gzip
    import unicodedata

    llama_cpp = _llama_cpp()
    code, _, err = export_cli(capsys, str(run_dir), str(tmp_path / "g"), "--format", "gguf")
    assert code == 0, err
    llm = llama_cpp.Llama(
        model_path=str(tmp_path / "g" / "model-fp32.gguf"), vocab_only=True, verbose=False
    )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    texts = []
    for path in sorted(SAMPLE.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            texts += [unicodedata.normalize("NFC", json.loads(line)["text"]) for line in f]
    assert len(texts) > 200 and sum(map(len, texts)) > 200_000
    differ = [t[:60] for t in texts if llm.tokenize(t.encode(), add_bos=True) != tok(t).input_ids]
    assert differ == []
    nfd = unicodedata.normalize("NFD", "환자는 급성 심근경색으로 내원하였다.")
    assert llm.tokenize(nfd.encode(), add_bos=True) != tok(nfd).input_ids


@pytest.mark.slow
@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qwen3"])
def test_llama_cpp_logits_equal_kfm_with_sharp_attention(tmp_path, monkeypatch, qk_norm):
    """Weights large enough that attention is far from uniform, so a wrong q/k layout shows:
    the llama model exported without the permutation is checked to fail."""
    llama_cpp = _llama_cpp()
    cfg = ModelConfig(
        vocab_size=1024,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=128,
        qk_norm=qk_norm,
        tie_embeddings=False,
    )
    torch.manual_seed(1)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    state = model.state_dict()
    ids = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json")).encode(PROMPT).ids
    ours = _kfm_logits(cfg, state, ids)
    path = export_gguf(state, cfg, tmp_path / "g", tokenizer_dir=TOKENIZER)
    theirs = _llama_cpp_logits(llama_cpp, path, ids, cfg.max_seq_len)
    assert np.abs(ours).max() > 5  # measured 10.5 (llama), 11.8 (qwen3)
    assert np.abs(theirs - ours).max() < 1e-3  # measured 2.9e-5, 1.0e-5
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()
    # fp16/bf16/q8_0 files against kfm run on the same rounded weights: what is left is llama.cpp
    # rounding the activations to the weights' type in its matmuls. Measured with the portable
    # (AVX2) build, llama / qwen3, on logits of size ~10: fp16 0.022 / 0.011 (a -march=native
    # build: 2.5e-5), bf16 0.32 / 0.10, q8_0 0.40 / 0.31; argmax equal at >= 94% of positions.
    for dtype, tol, same_argmax in (("fp16", 0.1, 1.0), ("bf16", 1.0, 0.9), ("q8_0", 1.0, 0.8)):
        rounded = export_gguf(state, cfg, tmp_path / dtype, tokenizer_dir=TOKENIZER, dtype=dtype)
        same = {k: _rounded(v, dtype) if v.dim() == 2 else v for k, v in state.items()}
        got = _llama_cpp_logits(llama_cpp, rounded, ids, cfg.max_seq_len)
        want = _kfm_logits(cfg, same, ids)
        assert np.abs(got - want).max() < tol, dtype
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= same_argmax, dtype
    if not qk_norm:  # the same export with q/k rows left in kfm's order
        monkeypatch.setattr(export_module, "permute_for_ggml", lambda w, n_heads: w)
        wrong = export_gguf(state, cfg, tmp_path / "wrong", tokenizer_dir=TOKENIZER)
        off = np.abs(_llama_cpp_logits(llama_cpp, wrong, ids, cfg.max_seq_len) - ours).max()
        assert off > 1.0  # measured 13.9


@pytest.mark.slow
def test_q8_0_export_equals_llama_cpps_own_quantizer(run_dir, tmp_path, capsys) -> None:
    """Every Q8_0 tensor of `--dtype q8_0` is byte for byte what llama.cpp's llama-quantize
    makes of the fp32 export."""
    import ctypes

    llama_cpp = _llama_cpp()
    for dtype in ("fp32", "q8_0"):
        code, _, err = export_cli(
            capsys, str(run_dir), str(tmp_path / dtype), "--format", "gguf", "--dtype", dtype
        )
        assert code == 0, err
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    theirs_path = tmp_path / "llama-quantize-q8_0.gguf"
    src = str(tmp_path / "fp32" / "model-fp32.gguf").encode()
    assert llama_cpp.llama_model_quantize(src, str(theirs_path).encode(), ctypes.byref(params)) == 0
    ours = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "q8_0" / "model-q8_0.gguf")).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(str(theirs_path)).tensors}
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        assert ours[name].tensor_type == t.tensor_type, name
        assert np.array_equal(np.asarray(ours[name].data), np.asarray(t.data)), name
