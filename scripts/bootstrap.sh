#!/usr/bin/env bash
# Install ds-mlm and everything it needs into .venv at the repo root, once; later calls return at once.
# torch is chosen for the machine: a CUDA build where an NVIDIA GPU is present, else a CPU build (a local wheel
# when pip's find-links has one, else PyTorch's CPU index) -- never the multi-GB CUDA build on a CPU machine.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
stamp="$venv/.ds-mlm-installed"
torch_version=${DS_MLM_TORCH_VERSION:-2.13.0}

if [ -f "$stamp" ] && [ "$stamp" -nt "$root/setup.py" ] \
   && "$venv/bin/python" -c "import ds_mlm, torch, deepspeed" >/dev/null 2>&1; then  # quiet: DeepSpeed prints on import
  exit 0
fi
echo "bootstrap: installing ds-mlm into $venv (first run only)" >&2
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" install "torch==$torch_version"  # PyPI's Linux wheel is the CUDA build
  elif "${pip[@]}" install --no-deps --no-index "torch==$torch_version" >/dev/null 2>&1; then
    echo "bootstrap: torch $torch_version taken from a local wheel" >&2  # find-links on this machine's disk
  else
    "${pip[@]}" install "torch==$torch_version" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"${pip[@]}" install -q -e "$root[dev]"
touch "$stamp"
echo "bootstrap: done" >&2
