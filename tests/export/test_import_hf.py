"""`kfm import-hf` and ``checkpoint.init_from``: a transformers folder becomes a kfm checkpoint
that training starts from (kfm/export/hf_import.py, kfm/train/init_from.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from kfm.checkpoint import load_model_state
from kfm.config import ConfigError, DataSourceConfig, ModelConfig, ScheduleConfig, config_from_dict
from kfm.export import export_hf
from kfm.export.hf_import import HFImportError, import_hf, model_config_from_hf, weight_map
from kfm.fs import OutputError
from kfm.model import Transformer
from kfm.tokenizer import tokenizer_hash
from kfm.train.init_from import architecture, check_source
from kfm.train.loss import cross_entropy_loss
from kfm.train.optim import lr_at
from tests.conftest import REPO, TOKENIZER
from tests.eval.checks import STEP, tiny_run
from tests.parallel.harness import losses, run_train, shared_root, train_command

# configs/tiny.yaml's model as transformers builds it (tied embeddings, GQA, SwiGLU 192 wide).
TINY = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
LLAMA31 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _with_tokenizer(folder: Path, tokenizer: Path = TOKENIZER) -> Path:
    """Put a tokenizer into an HF folder as transformers users have it (no kfm marker)."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, folder / name)
    return folder


def _hf_folder(
    out: Path, arch: str, *, tie: bool, seed: int = 0, std: float = 0.02
) -> tuple[Path, torch.nn.Module]:
    """A random transformers model saved in several safetensors shards, with the test tokenizer
    (normal init of std ``std``)."""
    torch.manual_seed(seed)
    extra = dict(tie_word_embeddings=tie, initializer_range=std)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**TINY, **extra))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=16, **extra))
    model.save_pretrained(str(out), max_shard_size="50KB")
    return _with_tokenizer(out), model.eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """configs/tiny.yaml's model, initialised with std 0.2: its loss is far from a kfm init's."""
    return _hf_folder(tmp_path_factory.mktemp("hf") / "llama", "llama", tie=True, std=0.2)[0]


@pytest.fixture(scope="module")
def imported(llama_dir, tmp_path_factory) -> Path:
    """llama_dir imported by one process."""
    out = tmp_path_factory.mktemp("imported") / "llama"
    import_hf(llama_dir, out)
    return out


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_model_state(out / "checkpoints" / "step_000000")[0]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# -- round trips ---------------------------------------------------------------------------------


def test_kfm_hf_kfm_round_trip_is_exact(tiny_sources, tmp_path_factory, tmp_path):
    run = tiny_run(tiny_sources, tmp_path_factory)
    state, saved = load_model_state(run.checkpoint(2))
    cfg = config_from_dict(saved)
    export_hf(state, cfg.model, tmp_path / "hf", tokenizer_dir=TOKENIZER)
    result = import_hf(tmp_path / "hf", tmp_path / "back")

    assert result.model == cfg.model  # every ModelConfig field, ffn_hidden/n_kv_heads included
    _assert_same(_weights(tmp_path / "back"), state)
    # The tokenizer is copied byte for byte: same hash as the run's (and its shards').
    manifest = json.loads((run.checkpoint(2) / "manifest.json").read_text())
    assert result.tokenizer_hash == tokenizer_hash(TOKENIZER) == manifest["tokenizer_hash"]
    assert STEP == "step_000002"


def test_qwen3_round_trip_untied_gqa_is_exact(tokenizer_dir, tmp_path):
    cfg = ModelConfig(
        vocab_size=320,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=1,
        ffn_hidden=96,
        rope_theta=500000.0,
        norm_eps=1e-6,
        max_seq_len=64,
        qk_norm=True,
        tie_embeddings=False,
    )
    torch.manual_seed(3)
    state = Transformer(cfg).state_dict()
    export_hf(state, cfg, tmp_path / "hf", tokenizer_dir=tokenizer_dir)
    result = import_hf(tmp_path / "hf", tmp_path / "back")

    assert result.architecture == "Qwen3ForCausalLM"
    assert result.model == cfg
    _assert_same(_weights(tmp_path / "back"), state)


@pytest.mark.parametrize("arch,tie", [("llama", True), ("qwen3", False)])
def test_transformers_folder_gives_transformers_logits(arch, tie, tmp_path):
    folder, hf = _hf_folder(tmp_path / "hf", arch, tie=tie, seed=1)
    shards = {p.name for p in weight_map(folder).values()}
    assert (folder / "model.safetensors.index.json").is_file() and len(shards) > 3
    result = import_hf(folder, tmp_path / "out")

    assert result.model.qk_norm == (arch == "qwen3") and result.model.tie_embeddings == tie
    state, saved = load_model_state(result.checkpoint)
    model = Transformer(config_from_dict(saved).model)
    model.load_state_dict(state, strict=True)
    tokens = torch.randint(
        0, TINY["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        diff = (model.eval()(tokens) - hf(input_ids=tokens).logits).abs().max().item()
    assert diff <= 1e-5
    # The weights read are every tensor of the folder, once (a tied lm_head is not stored).
    assert result.reports[0].bytes_read == sum(p.numel() * 4 for p in hf.parameters())


def test_layout_marker_preset_and_tokenizer(imported, llama_dir):
    marker = json.loads((imported / "kfm_import.json").read_text())
    assert marker["format"] == "kfm-import" and marker["source"] == str(llama_dir.resolve())
    assert marker["architecture"] == "LlamaForCausalLM" and marker["world_size"] == 1
    # The tokenizer dir is a kfm tokenizer dir: marker beside an unchanged tokenizer.json.
    meta = json.loads((imported / "tokenizer" / "kfm_tokenizer.json").read_text())
    assert meta["tokenizer_hash"] == tokenizer_hash(TOKENIZER) == tokenizer_hash(llama_dir)
    assert (imported / "checkpoints" / "latest").resolve().name == "step_000000"
    manifest = json.loads((imported / "checkpoints/step_000000/manifest.json").read_text())
    assert manifest["has_optimizer"] is False and manifest["step"] == 0
    assert manifest["config"]["tokenizer"]["path"] == str(imported / "tokenizer")
    # train.yaml is a preset kfm loads: the imported model, its tokenizer and init_from.
    from kfm.config import load_config

    cfg = load_config(imported / "train.yaml")
    assert architecture(cfg.model) == architecture(model_config_from_hf(llama_dir))
    assert cfg.checkpoint.init_from == str(imported)
    assert cfg.tokenizer.path == str(imported / "tokenizer")


# -- sharded reading -----------------------------------------------------------------------------


def test_two_ranks_each_read_only_their_shard(llama_dir, imported, tmp_path):
    """Under torchrun every rank reads its slice of each tensor: per rank about half of the bytes
    a single process reads, never a whole large tensor, and the same checkpoint comes out."""
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "kfm_cli", "import-hf", str(llama_dir), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("imported ") == 1 and "over 2 ranks" in proc.stdout

    single = json.loads((imported / "kfm_import.json").read_text())["per_rank"]
    ranks = json.loads((out / "kfm_import.json").read_text())["per_rank"]
    total = single[0]["bytes_read"]
    assert len(ranks) == 2 and sum(r["bytes_read"] for r in ranks) == total
    for r in ranks:
        assert r["bytes_read"] <= 0.55 * total  # a full read per rank would be 1.0
        assert r["largest_read"] == single[0]["largest_read"] // 2  # the embedding's half
    _assert_same(_weights(out), _weights(imported))
    assert len(list((out / "checkpoints/step_000000").glob("__*_0.distcp"))) == 2


# -- refusals ------------------------------------------------------------------------------------


def _config_only(folder: Path, cls, **changes) -> Path:
    folder.mkdir(parents=True)
    data = cls(**TINY).to_dict()
    data.update(changes)
    data = {k: v for k, v in data.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize(
    "cls,changes,key",
    [
        (LlamaConfig, {"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_type"),
        # A legacy config.json (rope_theta and rope_scaling at the top level), as Llama 3.1's.
        (
            LlamaConfig,
            {"rope_parameters": None, "rope_theta": 5e5, "rope_scaling": LLAMA31},
            "llama3",
        ),
        (LlamaConfig, {"attention_bias": True}, "attention_bias"),
        (LlamaConfig, {"mlp_bias": True}, "mlp_bias"),
        (LlamaConfig, {"hidden_act": "gelu"}, "hidden_act"),
        (LlamaConfig, {"head_dim": 32}, "head_dim"),
        (LlamaConfig, {"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
        (Qwen3Config, {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
        (Qwen3Config, {"model_type": "qwen2"}, "model_type"),
    ],
)
def test_what_kfm_cannot_compute_is_refused_by_key(cls, changes, key, tmp_path):
    folder = _config_only(tmp_path / "hf", cls, **changes)
    with pytest.raises(HFImportError, match=key) as e:
        model_config_from_hf(folder)
    assert "config.json" in str(e.value)


def test_cli_refusal_names_the_key_and_writes_nothing(tmp_path, capsys):
    from kfm_cli.main import main

    folder = _config_only(tmp_path / "hf", LlamaConfig, hidden_act="relu")
    assert main(["import-hf", str(folder), str(tmp_path / "out")]) == 1
    assert "hidden_act='relu'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tensors_kfm_has_no_place_for_are_named(llama_dir, tmp_path):
    from safetensors.torch import save_file

    folder = shutil.copytree(llama_dir, tmp_path / "hf")
    save_file(
        {"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, folder / "extra.safetensors"
    )
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.q_proj.bias"] = "extra.safetensors"
    del index["weight_map"]["model.norm.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(HFImportError, match="q_proj.bias") as e:
        import_hf(folder, tmp_path / "out")
    assert "missing (1): model.norm.weight" in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_missing_tokenizer_and_bin_weights_are_refused(llama_dir, tmp_path):
    folder = shutil.copytree(llama_dir, tmp_path / "hf")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(HFImportError, match="tokenizer.json is missing"):
        import_hf(folder, tmp_path / "out")
    bin_only = _config_only(tmp_path / "bin", LlamaConfig)
    (bin_only / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(HFImportError, match="safetensors only"):
        import_hf(bin_only, tmp_path / "out")


def test_overwrite_replaces_only_an_import(llama_dir, imported, tmp_path):
    out = shutil.copytree(imported, tmp_path / "out", symlinks=True)
    with pytest.raises(OutputError, match="--overwrite"):
        import_hf(llama_dir, out)
    import_hf(llama_dir, out, overwrite=True)
    _assert_same(_weights(out), _weights(imported))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not an import made by kfm"):
        import_hf(llama_dir, other, overwrite=True)
    with pytest.raises(OutputError, match="lies inside the input"):
        import_hf(llama_dir, llama_dir / "out", overwrite=True)


# -- training from an import ---------------------------------------------------------------------


def _first_step_loss(state: dict[str, torch.Tensor] | None, sources: list[dict]) -> float:
    """The loss of the weights ``state`` (None: kfm's own init from train.seed 0) on the first
    optimizer step's batch of configs/tiny.yaml (2 micro-batches of 4, seq_len 64, data.seed
    1234), computed here directly."""
    from kfm.config import load_config
    from kfm.data import PackedLoader

    torch.manual_seed(0)
    model = Transformer(load_config(REPO / "configs/tiny.yaml").model)
    if state is not None:
        model.load_state_dict(state)
    loader = PackedLoader(
        [DataSourceConfig(**s) for s in sources], seq_len=64, micro_batch_size=4, seed=1234
    )
    per_micro = []
    with torch.no_grad():
        for _ in range(2):
            batch = loader.next_batch()
            ce, _ = cross_entropy_loss(model(batch.tokens, batch.doc_ids), batch.labels, z_loss=0.0)
            per_micro.append(ce.item())
    return sum(per_micro) / 2


def test_training_starts_from_the_imported_weights(tiny_sources, imported, tmp_path_factory):
    root = shared_root(tmp_path_factory)
    args = (f"--checkpoint.init_from={imported}", "--eval.interval=0")
    run = run_train(tiny_sources, root, "from_import", nproc=0, args=("--train.steps=1", *args))

    assert (
        f"started from the weights of {imported}/checkpoints/step_000000" in run.stdout + run.stderr
    )
    expected = _first_step_loss(_weights(imported), tiny_sources)
    assert abs(run.losses()[1] - expected) <= 1e-5 * expected
    # Without init_from the run would start from kfm's own init, whose loss is far from it.
    assert abs(_first_step_loss(None, tiny_sources) - expected) > 0.5
    # Step 0 of the schedule (warm-up), a fresh optimizer: the run's first update's lr.
    first = next(r for r in run.records() if r.get("step") == 1 and "lr" in r)
    tiny_schedule = ScheduleConfig(warmup_steps=5)
    assert first["lr"] == pytest.approx(lr_at(0, total_steps=1, peak_lr=4e-3, cfg=tiny_schedule))

    # Restarted, the run resumes from its own checkpoint, never from the initial weights again.
    again = run_train(tiny_sources, root, "from_import", nproc=0, args=("--train.steps=2", *args))
    text = again.stdout + again.stderr
    assert "resumed from" in text and "started from the weights" not in text
    assert set(losses(again.run_dir)) == {1, 2}


def test_another_architecture_is_refused_by_key(tiny_sources, imported, tmp_path):
    cmd = train_command(tiny_sources, tmp_path, "wrong", nproc=0)
    cmd += [f"--checkpoint.init_from={imported}", "--model.n_layers=3", "--model.qk_norm=true"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.n_layers: the weights have 2, the config has 3" in proc.stderr
    assert "--model.n_layers=2 --model.qk_norm=false" in proc.stderr


def test_another_tokenizer_is_refused(imported):
    path = imported / "checkpoints" / "step_000000"
    manifest = json.loads((path / "manifest.json").read_text())
    cfg = config_from_dict(manifest["config"])
    check_source(path, manifest, cfg, manifest["tokenizer_hash"])  # its own: fine
    with pytest.raises(ConfigError, match="kfm pack --tokenizer .*tokenizer"):
        check_source(path, manifest, cfg, "0" * 64)


def test_eval_and_export_take_an_import(imported, tiny_sources, tmp_path, capsys):
    from kfm_cli.main import main

    out = shutil.copytree(imported, tmp_path / "imported", symlinks=True)
    assert main(["export", str(out), str(tmp_path / "hf")]) == 0
    printed = capsys.readouterr().out
    assert "matches" in printed and "max |logits_kfm - logits_hf| = 0.00e+00" in printed
    assert main(["eval", str(out), "--data", tiny_sources[0]["path"], "--batches", "1"]) == 0
    assert "validation loss" in capsys.readouterr().out


def test_run_choices_pass_and_deepspeed_is_refused(imported):
    from dataclasses import replace

    from kfm.train.dist import WorldInfo
    from kfm.train.init_from import init_from_weights

    path = imported / "checkpoints" / "step_000000"
    manifest = json.loads((path / "manifest.json").read_text())
    cfg = config_from_dict(manifest["config"])
    cfg.model = replace(cfg.model, max_seq_len=64, attn_backend="sdpa", document_masking=False)
    cfg.model.init_std = 0.5
    check_source(path, manifest, cfg, manifest["tokenizer_hash"])  # not architecture keys
    cfg.parallel.backend = "deepspeed"
    with pytest.raises(ConfigError, match="parallel.backend=fsdp"):
        init_from_weights(cfg, None, WorldInfo(0, 1, 0), {"tokenizer_hash": ""})  # type: ignore[arg-type]


def test_init_from_takes_a_kfm_run_too(tiny_sources, tmp_path_factory):
    from kfm.train.dist import WorldInfo
    from kfm.train.init_from import find_source

    run = tiny_run(tiny_sources, tmp_path_factory)
    cfg = config_from_dict(json.loads((run.checkpoint(2) / "manifest.json").read_text())["config"])
    for arg in (run.run_dir, run.run_dir / "checkpoints", run.checkpoint(2)):
        assert find_source(str(arg), cfg, WorldInfo(0, 1, 0)) == run.checkpoint(2)
    with pytest.raises(ConfigError, match="does not exist"):
        find_source(str(run.run_dir / "nope"), cfg, WorldInfo(0, 1, 0))


def test_a_bos_token_set_in_tokenizer_config_keeps_the_hash(imported, tmp_path):
    """Qwen3's tokenizer has no bos_token, which kfm pack needs: setting one in
    tokenizer_config.json does not change the tokenizer's identity (the hash of tokenizer.json)."""
    from kfm.tokenizer import load_tokenizer

    tok = shutil.copytree(imported / "tokenizer", tmp_path / "tok")
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config["bos_token"] = "<|pad|>"
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    assert tokenizer_hash(tok) == tokenizer_hash(imported / "tokenizer")
    loaded = load_tokenizer(tok)
    assert loaded.bos_token_id == loaded.convert_tokens_to_ids("<|pad|>") != 0
