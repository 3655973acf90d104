#!/usr/bin/env bash
# One command, fresh machine -> a trained, evaluated and exported Korean/English model:
#   venv + install -> curation pipeline (+ tokenizer + packed shards) -> train -> eval
#   -> Hugging Face export -> samples.
# Runs on the bundled sample (data/sample/, see data/sample/LICENSES.md) in ~7 minutes on 2 CPU cores (first run, install included).
# Extra arguments are config overrides for the training run, e.g. --train.steps=100.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/setup.sh
. scripts/setup.sh  # venv + install; offline environment

run=runs/quickstart
echo "== [1/5] data: curate data/sample (normalise, language ID, quality filters, PII, decontamination, dedup),"
echo "          train the tokenizer on the result, pack shards, write DATA_CARD.md"
kfm data run configs/data/quickstart.yaml --overwrite

echo "== [2/5] train (validation bits/byte is printed at step 0 and at the end)"
rm -rf "$run/checkpoints" "$run/metrics.jsonl" "$run/tb" "$run/eval"  # the previous run's
# train.yaml = configs/quickstart.yaml with the curated shard sets and the new tokenizer filled in
kfm train "$run/data/train.yaml" --checkpoint.resume=never "$@"

echo "== [3/5] eval: the newest checkpoint on the held-out split"
kfm eval "$run"

echo "== [4/5] export to Hugging Face format (+ logits check against kfm)"
kfm export "$run" "$run/export/hf" --overwrite

echo "== [5/5] load with transformers and sample greedily"
# A plain transformers script, outside kfm's console settings: keep the libraries' load
# warnings, bars and torchao's note on its CUDA-only kernels (CPU wheel) off the console.
TRANSFORMERS_VERBOSITY=error TORCH_LOGS=-torch HF_HUB_DISABLE_PROGRESS_BARS=1 \
  python scripts/hf_generate.py "$run/export/hf" 2> >(grep -v '^Failed to load .*torchao' >&2)
echo "== quickstart done: $run (data card: $run/data/DATA_CARD.md)"
