#!/usr/bin/env bash
# Create .venv (if absent) and install reglue with its test and teacher (train-vfm) extras. Safe to rerun.
# PyTorch is pinned and installed first with plain pip, so no resolver pulls another build;
# set REGLUE_TORCH_SPEC to choose another (e.g. "torch==2.9.1 torchvision==0.24.1").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${REGLUE_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"

pip_install() {  # quiet pip; hides only the "location is ignored" notes of local index mirrors
  .venv/bin/python -m pip install --quiet "$@" 2> >(grep -v "is ignored" >&2)
}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC2086
pip_install $TORCH_SPEC
pip_install -e ".[test,teacher]"
.venv/bin/python -c "import reglue, torch; print(f'reglue {reglue.__version__} ready (torch {torch.__version__}) in .venv')"
