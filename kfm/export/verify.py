"""Check an exported Hugging Face folder against the kfm model it came from."""

from __future__ import annotations

from pathlib import Path

import torch

from kfm.config import ModelConfig
from kfm.model.transformer import Transformer


@torch.no_grad()
def export_logits_diff(
    state: dict[str, torch.Tensor], cfg: ModelConfig, hf_dir: str | Path, tokens: torch.Tensor
) -> float:
    """Max |logits_kfm - logits_hf| (fp32) on ``tokens`` (B, T), document masking off.

    Both models run in fp32 on CPU with the HF model's SDPA attention, so the difference measures
    the export (weight mapping, config translation), not kernel choice.
    """
    from transformers import AutoModelForCausalLM

    model = Transformer(cfg)
    model.load_state_dict(state, strict=True)
    model.float().eval()
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ours = model(tokens)  # doc_ids=None -> plain causal attention, as in HF
    theirs = hf(input_ids=tokens).logits
    return (ours.float() - theirs.float()).abs().max().item()
