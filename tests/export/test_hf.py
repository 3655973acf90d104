"""Export to Hugging Face: logits parity, tokenizer round trip, name mapping, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from kfm.config import ModelConfig
from kfm.export import ExportError, export_hf, from_hf_state_dict, hf_config, to_hf_state_dict
from kfm.fs import OutputError
from kfm.model import Transformer

ATOL = 1e-4
TEXTS = [
    "Aspirin inhibits cyclooxygenase (COX-1/COX-2).",
    "아스피린은 사이클로옥시게나제를 억제한다.",
    "혈당 126 mg/dL 이상이면 당뇨병을 의심한다; HbA1c ≥ 6.5%.",
]


def tiny_cfg(*, qk_norm: bool, tie: bool) -> ModelConfig:
    # GQA (2 kv heads for 4 query heads) and non-default theta/eps, so a mapping that drops any
    # of them changes the logits.
    return ModelConfig(
        vocab_size=320,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        rope_theta=50_000.0,
        norm_eps=1e-6,
        max_seq_len=64,
        qk_norm=qk_norm,
        tie_embeddings=tie,
        document_masking=False,
        attn_backend="sdpa",
    )


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A kfm model whose every weight (norm gains included) is random, so none maps by luck."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05)
    return model.eval()


@pytest.mark.parametrize(
    ("qk_norm", "tie", "arch"),
    [
        (False, False, "LlamaForCausalLM"),
        (False, True, "LlamaForCausalLM"),
        (True, False, "Qwen3ForCausalLM"),
        (True, True, "Qwen3ForCausalLM"),
    ],
)
def test_export_logits_match(
    tmp_path: Path, tokenizer_dir: Path, qk_norm: bool, tie: bool, arch: str
) -> None:
    cfg = tiny_cfg(qk_norm=qk_norm, tie=tie)
    model = random_model(cfg)
    out = export_hf(model.state_dict(), cfg, tmp_path / "hf", tokenizer_dir=tokenizer_dir)

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == arch
    assert hf.config.rope_parameters["rope_theta"] == 50_000.0
    assert next(hf.parameters()).dtype == torch.float32
    if tie:
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
    else:
        assert hf.lm_head.weight is not hf.model.embed_tokens.weight

    torch.manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(input_ids=tokens).logits
    assert theirs.shape == ours.shape
    err = (ours - theirs).abs().max().item()
    assert err < ATOL, f"max abs logit difference {err:.2e} >= {ATOL}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    cfg = tiny_cfg(qk_norm=False, tie=True)
    out = tmp_path_factory.mktemp("export") / "model"
    return export_hf(
        random_model(cfg).state_dict(),
        cfg,
        out,
        tokenizer_dir=tokenizer_dir,
        extra_readme="Trained on the unit-test corpus.",
    )


def test_export_directory_contents(exported: Path) -> None:
    names = {p.name for p in exported.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md"} <= names
    assert "tokenizer.json" in names
    assert not list(exported.parent.glob("*.tmp-*")), "temporary export dir left behind"

    gen = json.loads((exported / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (0, 1, 2)
    assert gen.get("do_sample", False) is False
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 1, 2)
    assert config["tie_word_embeddings"] is True

    readme = (exported / "README.md").read_text()
    assert "kfm" in readme and "LlamaForCausalLM" in readme
    assert "license" in readme.lower() and "unit-test corpus" in readme


def test_tokenizer_round_trip(exported: Path) -> None:
    tok = AutoTokenizer.from_pretrained(exported)
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id == 0
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.eos_token_id, tok.pad_token_id) == (1, 2)


def test_bf16_export(tmp_path: Path, tokenizer_dir: Path) -> None:
    cfg = tiny_cfg(qk_norm=True, tie=False)
    out = export_hf(
        random_model(cfg).state_dict(),
        cfg,
        tmp_path / "bf16",
        tokenizer_dir=tokenizer_dir,
        dtype=torch.bfloat16,
    )
    with safe_open(out / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (not a dict)
    assert dtypes == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("tie", [False, True])
def test_state_dict_round_trip(qk_norm: bool, tie: bool) -> None:
    cfg = tiny_cfg(qk_norm=qk_norm, tie=tie)
    state = random_model(cfg).state_dict()
    hf_state = to_hf_state_dict(state, cfg)

    # The mapped names are exactly the HF model's own, so strict loading works both ways.
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config(cfg, bos_id=0, eos_id=1, pad_id=2))
    assert set(hf_state) == set(hf.state_dict())

    back = from_hf_state_dict(hf_state, cfg)
    assert set(back) == set(state)
    for key, value in state.items():
        assert torch.equal(back[key], value), key


def test_from_hf_accepts_checkpoint_without_tied_lm_head() -> None:
    cfg = tiny_cfg(qk_norm=False, tie=True)
    hf_state = to_hf_state_dict(random_model(cfg).state_dict(), cfg)
    del hf_state["lm_head.weight"]  # save_pretrained drops the tied copy
    back = from_hf_state_dict(hf_state, cfg)
    assert back["output.weight"] is back["tok_embeddings.weight"]
    Transformer(cfg).load_state_dict(back, strict=True)


def test_compiled_prefix_is_ignored() -> None:
    cfg = tiny_cfg(qk_norm=False, tie=False)
    state = random_model(cfg).state_dict()
    wrapped = {f"_orig_mod.{k}": v for k, v in state.items()}
    assert to_hf_state_dict(wrapped, cfg).keys() == to_hf_state_dict(state, cfg).keys()


def test_missing_and_unexpected_keys_are_listed() -> None:
    cfg = tiny_cfg(qk_norm=False, tie=False)
    state = random_model(cfg).state_dict()
    del state["layers.1.feed_forward.w3.weight"]
    state["layers.2.ffn_norm.weight"] = torch.ones(64)
    with pytest.raises(ExportError) as err:
        to_hf_state_dict(state, cfg)
    msg = str(err.value)
    assert "missing keys (1): layers.1.feed_forward.w3.weight" in msg
    assert "unexpected keys (1): layers.2.ffn_norm.weight" in msg
    assert "--model.n_layers" in msg


def test_qk_norm_mismatch_is_reported() -> None:
    # A qk_norm checkpoint exported with qk_norm=False would silently drop the norms.
    state = random_model(tiny_cfg(qk_norm=True, tie=True)).state_dict()
    with pytest.raises(ExportError, match="unexpected keys .*q_norm"):
        to_hf_state_dict(state, tiny_cfg(qk_norm=False, tie=True))


def test_untied_checkpoint_with_tied_config_is_refused() -> None:
    state = random_model(tiny_cfg(qk_norm=False, tie=False)).state_dict()
    with pytest.raises(ExportError, match="tie_embeddings=false"):
        to_hf_state_dict(state, tiny_cfg(qk_norm=False, tie=True))


def test_shape_mismatch_names_the_tensor(tmp_path: Path) -> None:
    cfg = tiny_cfg(qk_norm=False, tie=True)
    state = random_model(cfg).state_dict()
    wider = tiny_cfg(qk_norm=False, tie=True)
    wider.n_kv_heads = 4
    with pytest.raises(
        ExportError, match=r"k_proj.weight: checkpoint \(32, 64\) vs config \(64, 64\)"
    ):
        export_hf(state, wider, tmp_path / "out", tokenizer_dir=None)
    assert not (tmp_path / "out").exists()


def test_vocab_larger_than_model_is_refused(tmp_path: Path, tokenizer_dir: Path) -> None:
    cfg = tiny_cfg(qk_norm=False, tie=True)
    state = random_model(cfg).state_dict()
    n_tokens = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    small = tiny_cfg(qk_norm=False, tie=True)
    small.vocab_size = 128
    with pytest.raises(ExportError) as err:
        export_hf(state, small, tmp_path / "out", tokenizer_dir=tokenizer_dir)
    msg = str(err.value)
    assert f"{n_tokens} tokens" in msg and "model.vocab_size=128" in msg
    assert "--model.vocab_size" in msg
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer_dir(tmp_path: Path) -> None:
    cfg = tiny_cfg(qk_norm=False, tie=True)
    with pytest.raises(ExportError, match="tokenizer directory .*nope.* does not exist"):
        export_hf(
            random_model(cfg).state_dict(), cfg, tmp_path / "out", tokenizer_dir=tmp_path / "nope"
        )


def test_existing_output_needs_overwrite(tmp_path: Path, tokenizer_dir: Path) -> None:
    cfg = tiny_cfg(qk_norm=False, tie=True)
    state = random_model(cfg).state_dict()
    out = tmp_path / "out"
    export_hf(state, cfg, out, tokenizer_dir=tokenizer_dir, source="runs/x/checkpoints/step_1")
    marker = json.loads((out / "kfm_export.json").read_text())
    assert marker["format"] == "kfm-export" and marker["source"] == "runs/x/checkpoints/step_1"
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(OutputError, match="already holds a kfm export; pass --overwrite"):
        export_hf(random_model(cfg).state_dict(), cfg, out, tokenizer_dir=tokenizer_dir)
    assert (out / "model.safetensors").read_bytes() == before

    new = random_model(cfg, seed=1).state_dict()
    export_hf(new, cfg, out, tokenizer_dir=tokenizer_dir, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "tmp/backup dirs left behind"


def test_overwrite_refuses_a_folder_kfm_did_not_export(tmp_path: Path, tokenizer_dir: Path) -> None:
    cfg = tiny_cfg(qk_norm=False, tie=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("not an export")
    with pytest.raises(OutputError, match=r"out exists and is not an export made by kfm"):
        export_hf(
            random_model(cfg).state_dict(), cfg, out, tokenizer_dir=tokenizer_dir, overwrite=True
        )
    assert (out / "stale.txt").read_text() == "not an export"


def test_empty_output_dir_is_reused(tmp_path: Path) -> None:
    cfg = tiny_cfg(qk_norm=False, tie=True)
    out = tmp_path / "empty"
    out.mkdir()
    export_hf(random_model(cfg).state_dict(), cfg, out, tokenizer_dir=None)
    config = json.loads((out / "config.json").read_text())
    assert config["bos_token_id"] is None
    assert not (out / "tokenizer.json").exists()


def test_exported_model_generates_greedily(exported: Path) -> None:
    tok = AutoTokenizer.from_pretrained(exported)
    hf = AutoModelForCausalLM.from_pretrained(exported).eval()
    ids = tok(TEXTS[1], return_tensors="pt")["input_ids"]
    first = hf.generate(ids, max_new_tokens=4, min_new_tokens=4)
    again = hf.generate(ids, max_new_tokens=4, min_new_tokens=4)
    assert first.shape == (1, ids.shape[1] + 4)
    assert torch.equal(first, again)  # greedy: deterministic
