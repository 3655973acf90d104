"""DeepSpeed ZeRO backend: generated config, and real 2-rank gloo runs against plain torch.

Parity: ZeRO-1/2/3 at 2 ranks (micro-batch 2, 2 accumulation steps) against one plain-torch
process (micro-batch 4, 2 accumulation steps) on the same global batches of the tiny data, same
initial weights, same torch AdamW and schedule, fp32, 10 steps. The two differ only in the
order of floating-point sums (per-rank gradients averaged by an all-reduce vs accumulated in one
process; ZeRO's flat fp32 buffers), so per-step losses agree to a few ulp of fp32 (measured
<= ~1e-7 relative; asserted 1e-5) and final weights to ~1e-6.

The first DeepSpeed run in a fresh environment JIT-builds a comm op (35-110 s on 2 busy cores,
cached in ~/.cache/torch_extensions); afterwards a 2-rank run takes ~15-30 s, so the multi-rank
tests are marked slow + distributed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kfm.checkpoint.deepspeed import (
    is_deepspeed_checkpoint,
    load_model_state_from_deepspeed,
    validate_deepspeed_checkpoint,
)
from kfm.config import ConfigError, load_config
from kfm.parallel.deepspeed import ds_config, ds_config_yaml
from kfm.train.backends.deepspeed import (
    DeepSpeedBackend,  # noqa: F401  (imported: the module must import without deepspeed set up)
)
from tests.conftest import REPO, tiny_overrides
from tests.parallel._ds_worker import eval_tokens

WORKER = Path(__file__).with_name("_ds_worker.py")
STEPS = 10
LOSS_RTOL = 1e-5  # summation order only (see module docstring)
# AdamW's update m / sqrt(v) normalises each gradient element: where a gradient is ~0, ulp-level
# differences in it change the update's size, by up to ~lr x 1e-3 per step (measured <= 7e-6
# after 10 steps at lr 4e-3, against weights that moved by up to ~2e-2).
WEIGHT_ATOL = 2e-5


def tiny(*overrides: str):
    return load_config(REPO / "configs" / "tiny.yaml", list(overrides))


# -- config (fast, no processes) ---------------------------------------------------------------


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_ds_config_from_kfm_config(stage):
    cfg = tiny(
        "--parallel.backend=deepspeed",
        f"--parallel.zero_stage={stage}",
        "--train.global_batch_size=64",
        "--train.micro_batch_size=4",
        "--optim.grad_clip=0.5",
    )
    c = ds_config(cfg, world_size=4)
    assert c["train_batch_size"] == 64
    assert c["train_micro_batch_size_per_gpu"] == 4
    assert c["gradient_accumulation_steps"] == 4  # 64 / (4 x 4)
    assert c["zero_optimization"]["stage"] == stage
    assert c["gradient_clipping"] == 0.5
    assert c["bf16"] == {"enabled": False, "check_grad_overflow": True}
    assert c["communication_data_type"] == "fp32"
    assert "optimizer" not in c and "scheduler" not in c  # kfm's torch AdamW and LambdaLR
    assert ("stage3_prefetch_bucket_size" in c["zero_optimization"]) == (stage == 3)
    json.dumps(c)  # DeepSpeed takes it as JSON


def test_ds_config_bf16_and_yaml_for_dry_run():
    import yaml

    cfg = tiny("--train.dtype=bf16", "--parallel.reduce_dtype=bf16")
    c = ds_config(cfg, world_size=2)
    assert c["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert c["communication_data_type"] == "bf16"
    assert c["gradient_accumulation_steps"] == 1  # 8 / (4 x 2)
    assert yaml.safe_load(ds_config_yaml(cfg, 2)) == c


def test_ds_config_rejects_batch_that_does_not_divide_and_tp():
    with pytest.raises(ConfigError, match="--train.global_batch_size"):
        ds_config(tiny(), world_size=3)
    with pytest.raises(ConfigError, match="--parallel.tp=1"):
        ds_config(tiny("--parallel.tp=2"), world_size=2)


def test_ds_config_refuses_hsdp_layout():
    """dp_replicate x dp_shard is not silently ignored: ZeRO shards over every rank."""
    cfg = tiny("--parallel.dp_replicate=2", "--parallel.dp_shard=2")
    with pytest.raises(ConfigError, match="HSDP.*--parallel.dp_replicate=1 --parallel.dp_shard=-1"):
        ds_config(cfg, world_size=4)
    cfg = tiny("--parallel.dp_shard=4", "--train.micro_batch_size=2")
    assert ds_config(cfg, world_size=4)["zero_optimization"]["stage"] == 3


def test_ds_config_is_accepted_by_deepspeed():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = tiny("--parallel.zero_stage=3", "--train.micro_batch_size=2")
    parsed = DeepSpeedConfig(ds_config(cfg, world_size=1))
    assert parsed.zero_optimization_stage == 3
    assert parsed.gradient_accumulation_steps == 4


# -- real 2-rank runs --------------------------------------------------------------------------


def ds_overrides(sources, root: Path, name: str, stage: int, *extra: str) -> list[str]:
    return [
        *tiny_overrides(sources, root, name),
        "--parallel.backend=deepspeed",
        f"--parallel.zero_stage={stage}",
        "--train.micro_batch_size=2",  # 2 ranks x 2 x 2 accumulation steps = global batch 8
        f"--train.steps={STEPS}",
        *extra,
    ]


def launch(overrides: list[str], out: Path, *worker_args: str, nproc: int = 2):
    """torchrun ``nproc`` gloo ranks of the worker (``nproc=0``: one plain process, no torchrun)."""
    pytest.importorskip("deepspeed", reason="needs the extra: pip install 'kfm[deepspeed]'")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [
        sys.executable,
        *(launcher if nproc else []),
        str(WORKER),
        f"--out={out}",
        *worker_args,
        "--",
        *overrides,
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def run_ds(overrides: list[str], out: Path, *worker_args: str, nproc: int = 2) -> dict:
    """Run the worker (see `launch`); return what rank 0 recorded."""
    proc = launch(overrides, out, *worker_args, nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    record = json.loads(out.read_text())
    for key in ("loss", "grad_norm", "lr"):
        record[key] = {int(k): v for k, v in record[key].items()}
    return record


def reference_run(sources, root: Path) -> tuple[dict[int, float], dict[str, torch.Tensor]]:
    """Plain torch in this process: one rank, micro-batch 4, 2 accumulation steps; the loop of
    kfm.train.trainer.train_step (zero_grad, accumulate loss/accum, clip, step, schedule)."""
    from kfm.data import PackedLoader
    from kfm.model.transformer import Transformer
    from kfm.train.loss import cross_entropy_loss
    from kfm.train.optim import build_optimizer, build_scheduler

    cfg = tiny(*tiny_overrides(sources, root, "reference"), f"--train.steps={STEPS}")
    accum = cfg.train.global_batch_size // cfg.train.micro_batch_size
    loader = PackedLoader(
        cfg.data.sources,
        seq_len=cfg.data.seq_len,
        micro_batch_size=cfg.train.micro_batch_size,
        seed=cfg.data.seed,
    )
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps=STEPS)
    losses = {}
    for step in range(1, STEPS + 1):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(accum):
            batch = loader.next_batch()
            ce, _ = cross_entropy_loss(model(batch.tokens, batch.doc_ids), batch.labels)
            (ce / accum).backward()
            total += ce.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        losses[step] = total / accum
    with torch.no_grad():
        tokens = eval_tokens(cfg.model.vocab_size)
        eval_loss = cross_entropy_loss(model.eval()(tokens[:, :-1]), tokens[:, 1:])[0].item()
    losses[0] = eval_loss  # step 0 is free: the final model's loss on the fixed eval tokens
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def reference(tiny_sources, tmp_path_factory):
    return reference_run(tiny_sources, tmp_path_factory.mktemp("ds_ref"))


@pytest.fixture(scope="module")
def zero3_run(tiny_sources, tmp_path_factory):
    """ZeRO-3 at 2 ranks for 10 steps, checkpoints at steps 5 and 10."""
    root = tmp_path_factory.mktemp("ds_zero3")
    overrides = ds_overrides(tiny_sources, root, "z3", 3)
    record = run_ds(overrides, root / "z3.json", "--save-at", "5", "10")
    return root, overrides, record


def assert_parity(record: dict, reference) -> float:
    ref_losses, _ = reference
    assert sorted(record["loss"]) == list(range(1, STEPS + 1))
    # The final model, evaluated through backend.module, scores the fixed tokens the same.
    rel_eval = abs(record["eval_loss"] - ref_losses[0]) / ref_losses[0]
    assert rel_eval <= LOSS_RTOL, (record["eval_loss"], ref_losses[0])
    worst = 0.0
    for step, loss in record["loss"].items():
        rel = abs(loss - ref_losses[step]) / abs(ref_losses[step])
        assert rel <= LOSS_RTOL, f"step {step}: {loss} vs {ref_losses[step]} (rel {rel:.2e})"
        worst = max(worst, rel)
    return worst


def timing(record: dict) -> str:
    return f"initialize {record['init_s']:.1f} s, {STEPS} steps + saves {record['train_s']:.1f} s"


def assert_weights_close(state: dict[str, torch.Tensor], reference) -> float:
    _, ref_state = reference
    assert state.keys() == ref_state.keys()
    worst = max((state[k] - ref_state[k]).abs().max().item() for k in ref_state)
    assert worst <= WEIGHT_ATOL, f"max |w_ds - w_ref| = {worst:.2e}"
    return worst


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_zero12_matches_single_process(stage, tiny_sources, tmp_path, reference):
    overrides = ds_overrides(tiny_sources, tmp_path, f"z{stage}", stage)
    record = run_ds(overrides, tmp_path / "r.json", "--save-at", str(STEPS))
    rel = assert_parity(record, reference)
    ckpt = tmp_path / f"z{stage}" / "checkpoints" / f"step_{STEPS:06d}"
    state, _ = load_model_state_from_deepspeed(ckpt)
    diff = assert_weights_close(state, reference)
    print(
        f"ZeRO-{stage}: loss rel diff <= {rel:.1e}, weights max abs diff {diff:.1e}, {timing(record)}"
    )


@pytest.mark.distributed
def test_zero3_matches_single_process(zero3_run, reference):
    root, _, record = zero3_run
    rel = assert_parity(record, reference)
    state, config = load_model_state_from_deepspeed(root / "z3" / "checkpoints" / "step_000010")
    assert config["parallel"]["zero_stage"] == 3
    diff = assert_weights_close(state, reference)
    print(f"ZeRO-3: loss rel diff <= {rel:.1e}, weights max abs diff {diff:.1e}, {timing(record)}")


@pytest.mark.distributed
def test_zero3_checkpoint_is_atomic_kfm_layout_and_resume_is_exact(zero3_run):
    root, overrides, straight = zero3_run
    ckpts = root / "z3" / "checkpoints"
    assert os.readlink(ckpts / "latest") == "step_000010"
    assert not list(ckpts.glob("*.tmp-*"))
    manifest = validate_deepspeed_checkpoint(ckpts / "step_000005")
    assert manifest["backend"] == "deepspeed" and manifest["world_size"] == 2
    assert is_deepspeed_checkpoint(ckpts / "step_000005")

    resumed = run_ds(overrides, root / "resumed.json", "--resume", str(ckpts / "step_000005"))
    assert resumed["start"] == 5
    assert sorted(resumed["loss"]) == list(range(6, STEPS + 1))
    # Same ranks, same reduction order: the continued curve is bitwise the uninterrupted one.
    assert all(resumed["loss"][s] == straight["loss"][s] for s in resumed["loss"])
    assert all(resumed["lr"][s] == straight["lr"][s] for s in resumed["lr"])


@pytest.mark.distributed
def test_export_from_zero3_checkpoint_loads_in_transformers(zero3_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from kfm.config import config_from_dict
    from kfm.export.hf import export_hf
    from kfm.model.transformer import Transformer

    root, _, _ = zero3_run
    state, config = load_model_state_from_deepspeed(root / "z3" / "checkpoints" / "step_000010")
    cfg = config_from_dict(config)
    out = export_hf(state, cfg.model, tmp_path / "hf", tokenizer_dir=cfg.tokenizer.path)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    model = Transformer(cfg.model)
    model.load_state_dict(state)
    tokens = torch.randint(
        0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        diff = (hf(tokens).logits - model.eval()(tokens)).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.slow
@pytest.mark.distributed
def test_bf16_zero3_trains_close_to_fp32(tiny_sources, tmp_path, reference):
    """bf16 params (fp32 master weights in ZeRO, fp32 RoPE buffers cast to bf16 in apply_rope):
    10 steps stay within 1e-3 relative of fp32 (measured ~7e-5)."""
    overrides = ds_overrides(tiny_sources, tmp_path, "bf16", 3, "--train.dtype=bf16")
    record = run_ds(overrides, tmp_path / "r.json")
    assert record["dtypes"] == {"param": "torch.bfloat16", "rope": "torch.float32"}
    ref_losses, _ = reference
    worst = max(abs(record["loss"][s] - ref_losses[s]) / ref_losses[s] for s in record["loss"])
    print(f"bf16 ZeRO-3 vs fp32: loss rel diff <= {worst:.1e}")
    assert worst <= 1e-3


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_on_another_world_size_is_refused(zero3_run, tmp_path):
    """One plain process (the backend starts a 1-rank group itself) refuses 2-rank ZeRO shards."""
    root, overrides, _ = zero3_run
    ckpt = root / "z3" / "checkpoints" / "step_000005"
    proc = launch(overrides, tmp_path / "r.json", "--resume", str(ckpt), nproc=0)
    assert proc.returncode != 0
    assert "saved by 2 DeepSpeed ranks and this run has 1" in proc.stderr


def test_corrupt_deepspeed_checkpoint_is_refused(tmp_path):
    from kfm.checkpoint import CheckpointError

    step = tmp_path / "step_000001"
    step.mkdir()
    with pytest.raises(CheckpointError, match="did not finish"):
        validate_deepspeed_checkpoint(step)
    (step / "manifest.json").write_text(json.dumps({"format": "kfm-checkpoint", "files": {}}))
    with pytest.raises(CheckpointError, match="not written by the DeepSpeed backend"):
        validate_deepspeed_checkpoint(step)
    assert not is_deepspeed_checkpoint(step)
