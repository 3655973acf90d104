#!/usr/bin/env bash
# One command, fresh machine -> a trained, evaluated and exported Korean/English model:
#   venv + install -> tokenizer -> packed shards -> train -> eval -> Hugging Face export -> samples.
# Runs on the bundled sample (data/sample/, see data/sample/LICENSES.md) in ~6 minutes on 2 CPU cores (first run, install included).
# Extra arguments are config overrides for the training run, e.g. --train.steps=100.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/setup.sh
. scripts/setup.sh  # venv + install; offline environment

config=configs/quickstart.yaml
run=runs/quickstart
echo "== [1/6] tokenizer: byte-level BPE on data/sample"
kfm tokenizer train "$config" --overwrite

echo "== [2/6] pack: one shard set per sample file"
for f in data/sample/*.jsonl.gz; do
  name="$(basename "$f" .jsonl.gz)"
  # licenses are read from each document's `license` field into the manifest
  kfm pack "$f" --tokenizer "$run/tokenizer" --out "$run/shards/$name" --source-name "$name" \
    --val-fraction 0.03 --workers 2 --overwrite
done

echo "== [3/6] train (validation bits/byte is printed at step 0 and at the end)"
rm -rf "$run/checkpoints" "$run/metrics.jsonl" "$run/tb"
kfm train "$config" --checkpoint.resume=never "$@"

echo "== [4/6] eval: the newest checkpoint on the held-out split"
kfm eval "$run"

echo "== [5/6] export to Hugging Face format (+ logits check against kfm)"
kfm export "$run" "$run/export/hf" --overwrite

echo "== [6/6] load with transformers and sample greedily"
python scripts/hf_generate.py "$run/export/hf"
echo "== quickstart done: $run"
