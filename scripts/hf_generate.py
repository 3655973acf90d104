"""Load an exported kfm model with plain transformers and print greedy samples.

python scripts/hf_generate.py runs/quickstart/export/hf --prompt "Diabetes is" --prompt "당뇨병은"
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_PROMPTS = ["What are the symptoms of diabetes?", "당뇨병의 증상은 무엇인가요?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="folder written by `kfm export`")
    parser.add_argument("--prompt", action="append", help="prompt (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate")
    args = parser.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir).eval()
    print(f"loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} params)")
    for prompt in args.prompt or DEFAULT_PROMPTS:
        inputs = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        text = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        print(f"[greedy] {prompt!r} -> {text!r}")


if __name__ == "__main__":
    main()
