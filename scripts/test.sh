#!/usr/bin/env bash
# Set up .venv and run the test suite. Extra arguments go to pytest, e.g.
#   bash scripts/test.sh -m slow          # the long checks
#   bash scripts/test.sh tests/model -x   # one area
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# shellcheck source=scripts/setup.sh
. scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
export TOKENIZERS_PARALLELISM=false
python -m pytest "$@"
