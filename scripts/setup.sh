#!/usr/bin/env bash
# Create .venv (if missing), install kfm into it, activate it and set the offline environment.
# Sourced by quickstart.sh and test.sh.
#   KFM_VENV   venv directory (default: .venv in the repo)
#   KFM_EXTRAS extras to install (default: dev)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${KFM_VENV:-$repo/.venv}"
extras="${KFM_EXTRAS:-dev}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.kfm-installed"
if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
  log="$venv/kfm-install.log"
  echo "[setup] installing torch 2.13.0 (CPU wheel) and kfm[$extras] (pip's output: $log)"
  # pip's notes (index locations, build warnings) go to the log; a failure shows its end.
  pip_install() {
    if ! python -m pip install "$@" >>"$log" 2>&1; then
      tail -n 40 "$log" >&2
      echo "[setup] pip install $* failed; the whole output is in $log" >&2
      return 1
    fi
  }
  pip_install -q --upgrade pip
  # torch first and pinned: a bare `torch` requirement could resolve to a multi-GB CUDA build.
  # On a GPU machine, install the CUDA torch of your cluster first; this line then keeps it
  # only if it is 2.13.0, so set KFM_SKIP_TORCH=1 there.
  if [ -z "${KFM_SKIP_TORCH:-}" ]; then
    pip_install -q "torch==2.13.0"
  fi
  pip_install -q -e "$repo[$extras]"
  touch "$stamp"
fi

# Nothing is downloaded at run time: no hub models, datasets or tokenizers; wandb stays offline.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export WANDB_MODE="${WANDB_MODE:-offline}"
export TOKENIZERS_PARALLELISM=false
